"""Save and load: a conversation with all its clips comes back identical, numbering included."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat import Clip, Conversation, StoreError, load, save
from chat.conversation import ToolUse
from chat.audio import SAMPLE_RATE
from chat.clip import EDITED
from chat.families import get_family
from chat.saving import FORMAT_VERSION
from chat.speech import Speech
from chat.store import Store, from_zip, to_zip
from tests.conftest import tone


def clip(k: int) -> Clip:
    return Clip.from_array(tone(0.3, 150 + 11 * k) * (0.2 + 0.01 * k), SAMPLE_RATE, name=f"c{k}.wav")


def assert_identical(a: Conversation, b: Conversation) -> None:
    assert (a.id, a.system_prompt, a.messages) == (b.id, b.system_prompt, b.messages)
    for x, y in zip(a.clips(), b.clips(), strict=True):
        np.testing.assert_array_equal(x.samples, y.samples)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    system=st.text(max_size=30),
    turns=st.lists(st.tuples(st.text(max_size=30), st.integers(0, 2), st.sampled_from(["done", "stopped", "failed"])),
                   min_size=1, max_size=4),
)
def test_round_trip_is_identical(tmp_path_factory, system, turns):
    c, k = Conversation(system_prompt=system), 0
    for text, n_clips, status in turns:
        if not text.strip() and not n_clips:
            text = "hello"
        c.add_user(text, [clip(k + i) for i in range(n_clips)])
        k += n_clips
        c.add_assistant("reply", status=status, note="" if status == "done" else "why")
    c.add_tool("reverse", "made Audio", (Clip(clip(99).samples[::-1], "edit", EDITED, note="Audio 1 reversed"),))
    folder = save(c, tmp_path_factory.mktemp("saved"))
    assert_identical(load(folder), c)


def test_saved_file_is_versioned_json_and_clips_are_stored_once(tmp_path):
    c = Conversation()
    c.add_user("q", [clip(1), clip(2)])
    save(c, tmp_path)
    data = json.loads((tmp_path / "conversation.json").read_text())
    assert data["version"] == FORMAT_VERSION and data["messages"][0]["clips"][1]["name"] == "c2.wav"
    assert sorted(p.stem for p in (tmp_path / "clips").iterdir()) == sorted(x.id for x in c.clips())


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "conversation.json").unlink(), "conversation.json is missing"),
        (lambda f: (f / "conversation.json").write_text("{not json"), "damaged"),
        (lambda f: (f / "conversation.json").write_text('{"version": 99}'), "format version 99"),
        (lambda f: next((f / "clips").iterdir()).unlink(), r"\.wav is missing"),
        (lambda f: next((f / "clips").iterdir()).write_bytes(b"RIFF....garbage"), "damaged"),
    ],
    ids=["no-json", "bad-json", "future-version", "missing-clip", "bad-clip"],
)
def test_damaged_saves_are_refused_clearly(tmp_path, damage, message):
    c = Conversation()
    c.add_user("q", [clip(1)])
    save(c, tmp_path)
    damage(tmp_path)
    with pytest.raises(StoreError, match=message):
        load(tmp_path)


def test_a_clip_whose_audio_was_swapped_is_detected(tmp_path):
    c = Conversation()
    c.add_user("q", [clip(1)])
    save(c, tmp_path)
    import soundfile

    soundfile.write(next((tmp_path / "clips").iterdir()), clip(2).samples, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(StoreError, match="does not match its id"):
        load(tmp_path)


def test_an_edit_saved_with_its_own_label_in_its_note_reads_without_it(tmp_path):
    c = Conversation()
    c.add_user("Reverse Audio 1.", [clip(1)])
    c.add_assistant("<tool_call>...</tool_call>")
    edit = Clip(clip(1).samples[::-1], "audio2-reverse.wav", EDITED, note="Audio 2 = Audio 1 reversed")
    c.add_tool("reverse", "made Audio 2", (edit,))  # as chat.tools wrote an edit's note until it left the label out
    save(c, tmp_path)
    loaded = load(tmp_path)
    assert [x.note for x in loaded.clips()] == ["", "Audio 1 reversed"]  # the label is shown apart, once
    assert [x.id for x in loaded.clips()] == [x.id for x in c.clips()]
    save(loaded, tmp_path / "again")
    assert [x.note for x in load(tmp_path / "again").clips()] == ["", "Audio 1 reversed"]  # and a note without it stays



def test_a_replys_thinking_and_calls_are_saved_and_read_back(tmp_path):
    c = Conversation()
    c.add_user("Reverse Audio 1 and Audio 2.", [clip(1), clip(2)])
    text = '<think>\nBoth.\n</think>\n\n<tool_call>{"name": "reverse"}</tool_call>\n<tool_call>...</tool_call>'
    reply = c.add_assistant(text)
    c.describe_reply(reply, "", (ToolUse("reverse", {"audio": 1}), ToolUse("reverse", {"audio": 2})), "Both.")
    c.add_tool("reverse", "made Audio 3")
    c.add_tool("reverse", "made Audio 4")  # one result per call, in order
    save(c, tmp_path)
    assert json.loads((tmp_path / "conversation.json").read_text())["messages"][1]["reasoning"] == "Both."
    loaded = load(tmp_path)
    assert_identical(loaded, c)
    assert (loaded.messages[1].reasoning, loaded.messages[1].text, len(loaded.messages[1].calls)) == ("Both.", text, 2)


def test_a_version_2_file_without_thinking_still_loads(tmp_path):
    c = Conversation()
    c.add_user("q")
    c.add_assistant("a")
    save(c, tmp_path)
    path = tmp_path / "conversation.json"
    data = json.loads(path.read_text())
    data["version"] = 2
    for message in data["messages"]:
        del message["reasoning"]
    path.write_text(json.dumps(data))
    assert load(tmp_path).messages == c.messages and load(tmp_path).messages[1].reasoning == ""


def spoken(seconds: float = 0.5, rate: int = 24000) -> Speech:
    """A reply's speech: a tone at the voices' 24 kHz."""
    t = np.arange(int(seconds * rate)) / rate
    return Speech((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, "Ethan")


def spoken_conversation() -> Conversation:
    c = Conversation()
    c.add_user("q", [clip(1)])
    reply = c.add_assistant("An answer.")
    c.revise_reply(reply, speech=spoken())
    return c


def test_a_spoken_reply_is_saved_at_its_own_rate_and_comes_back_playable(tmp_path):
    c = spoken_conversation()
    loaded = load(save(c, tmp_path))
    assert_identical(loaded, c)
    speech = loaded.messages[1].speech
    assert (speech.sample_rate, speech.voice, speech.id) == (24000, "Ethan", c.messages[1].speech.id)
    np.testing.assert_array_equal(speech.samples, c.messages[1].speech.samples)
    assert json.loads((tmp_path / "conversation.json").read_text())["messages"][1]["speech"]["sample_rate"] == 24000


def test_a_saved_folder_without_a_spoken_replys_file_is_incomplete(tmp_path):
    c = spoken_conversation()
    save(c, tmp_path)
    (tmp_path / "clips" / f"{c.messages[1].speech.id}.wav").unlink()
    with pytest.raises(StoreError, match="missing"):
        load(tmp_path)


def test_in_the_store_a_lost_spoken_reply_keeps_the_reply_without_its_speech(tmp_path):
    store, c = Store(tmp_path), spoken_conversation()
    store.save("s", c)
    (store.clips_folder / f"{c.messages[1].speech.id}.wav").unlink()
    loaded = store.load("s")
    assert loaded.messages[1].text == "An answer." and loaded.messages[1].speech is None


def test_a_spoken_reply_goes_with_an_exported_conversation(tmp_path):
    c = spoken_conversation()
    loaded = from_zip(to_zip(c, tmp_path / "c.zip"))
    np.testing.assert_array_equal(loaded.messages[1].speech.samples, c.messages[1].speech.samples)


def test_a_spoken_reply_is_never_sent_to_the_model():
    c = spoken_conversation()
    c.add_user("And again?")
    prompt = get_family("qwen2-audio").renderer.render(c, 8192, lambda p: 0)
    assert [part.clip.id for part in prompt.audio_parts] == [c.clips()[0].id]  # the question's clip only
    assert "An answer." in prompt.text
