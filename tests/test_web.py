"""The browser chat's handlers and its API.

Plumbing that needs exact text runs the handlers with the scripted backend; the API is driven end to end
by gradio_client, a second real client, against the page serving the tiny Qwen2-Audio model.
"""

import asyncio
import errno
import functools
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "audio-chat-tests-gradio"))

import gradio as gr  # noqa: E402
import httpx  # noqa: E402
import pytest  # noqa: E402
import soundfile  # noqa: E402
from gradio.state_holder import SessionState  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from app.render import render  # noqa: E402
from app.web import (  # noqa: E402
    ASSETS, INTERRUPTED_NOTE, STOP_WAIT_S, ChatPage, attachment_names, build_demo, launch, with_settings)
from chat import saving  # noqa: E402
from chat.clip import Clip  # noqa: E402
from chat.conversation import Conversation, Message  # noqa: E402
from chat.edit_tools import delete_ranges  # noqa: E402
from chat.errors import StoreError  # noqa: E402
from chat.settings import GenerationSettings  # noqa: E402
from chat.local import GENERATION_THREAD, LocalBackend  # noqa: E402
from chat.store import Store  # noqa: E402
from chat.tools import Tool, ToolBox  # noqa: E402
from chat.turn import ToolCallStarted  # noqa: E402
from testkit.scripted import ScriptedBackend  # noqa: E402
from tests.conftest import tone, write_audio  # noqa: E402

SETTINGS = ("", GenerationSettings())  # the system prompt and the generation settings, as the handlers take them
PANEL = dict(max_new_tokens=512, temperature=0.7, top_p=0.5, top_k=0, repetition_penalty=1.1, seed="")  # as sent
SAMPLED = dict(max_new_tokens=60, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed="1234")


def endless_copy(checkpoint: Path, folder: Path) -> Path:
    """A copy of a tiny checkpoint that never ends a reply by itself, so max_new_tokens alone sets its length."""
    shutil.copytree(checkpoint, folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text())
    config["suppress_tokens"].append(config["eos_token_id"])
    path.write_text(json.dumps(config))
    return folder


def free_port() -> int:
    """A port nothing listens on (gradio 6 refuses server_port=0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FIGURES = re.compile(r"\n\n<sub>(.*)</sub>$")  # a reply's figures, under its text


def chats(updates: Iterator[tuple]) -> Iterator[list]:
    """The chat of each of respond()'s updates, without the audio each carries for the page's spoken-reply player;
    closing it closes respond(), as gradio does on Stop."""
    try:
        for chat, _audio in updates:
            yield chat
    finally:
        updates.close()


def bot_texts(chat: list) -> list[str]:
    """The text of each assistant message of a rendered chat (gr.ChatMessage list or API dicts), figures left out."""
    texts = []
    for message in chat:
        role, content = (message.role, message.content) if isinstance(message, gr.ChatMessage) else (
            message["role"], [part.get("text", "") for part in message["content"]])
        if role == "assistant":
            texts.append(FIGURES.sub("", content if isinstance(content, str) else " ".join(map(str, content))))
    return texts


def figures_shown(chat: list) -> list[str]:
    """The figures line under each reply that has one."""
    return [m.group(1) for m in (FIGURES.search(str(message.content)) for message in chat) if m]


def all_text(chat: list) -> str:
    """Every text part of a rendered chat, joined: what a person reads."""
    if chat and isinstance(chat[0], gr.ChatMessage):
        parts = [part for m in chat for part in (m.content if isinstance(m.content, list) else [m.content])]
        return "\n".join(str(part) for part in parts)
    return "\n".join(part.get("text", "") for m in chat for part in m["content"])


@pytest.fixture
def scripted(tmp_path):
    """A page over the scripted backend, with one session open."""
    backend = ScriptedBackend()
    page = ChatPage(backend, Store(tmp_path / "data"), None)
    _, session, *_ = page.open_session(None)
    return backend, page, session


def send(page: ChatPage, session, text: str = "", files=(), settings: GenerationSettings = SETTINGS[1]) -> list:
    """What the page does on Enter: add the message, then stream the reply; returns every render."""
    page.add_message(session, {"text": text, "files": [str(f) for f in files]}, SETTINGS[0], settings)
    return list(chats(page.respond(session)))


def test_a_reply_streams_as_the_whole_chat_and_is_saved(scripted):
    backend, page, session = scripted
    backend.interval_s = 0.25  # a model slower than the page's updates
    backend.enqueue(["Hel", "lo ", "there."])
    renders = send(page, session, "hi")
    assert [bot_texts(r) for r in renders] == [["Hel"], ["Hello "], ["Hello there."], ["Hello there."]]
    # once recorded, the reply shows how it was made, small, under its text
    assert [figures_shown(r) for r in renders[-2:]] == [[session.conversation.messages[-1].figures.summary()]] * 2
    assert re.fullmatch(r"Qwen2-Audio · none · \d+ prompt tokens · 3 new · first token 0\.\d\d s · \d+\.\d tokens/s",
                        figures_shown(renders[-1])[0])
    assert all(r[0].role == "user" and r[0].content == ["hi"] for r in renders)
    saved = page.store.load(session.id)
    assert [(m.role, m.text, m.status) for m in saved.messages] == [
        ("user", "hi", "done"), ("assistant", "Hello there.", "done")]


def test_a_reply_whose_saving_fails_does_not_leave_the_page_waiting_for_it(scripted, monkeypatch):
    backend, page, session = scripted
    page.add_message(session, {"text": "hi", "files": []}, *SETTINGS)

    def full_disk(*args, **kwargs):
        raise StoreError("The disk is full. Free some space on it, then try again.")

    monkeypatch.setattr(page.store, "save", full_disk)
    with pytest.raises(StoreError):
        list(chats(page.respond(session)))
    monkeypatch.undo()
    started = time.monotonic()
    page.clear(session)  # stops the reply first: it has ended, so at once
    assert session.reply is None and time.monotonic() - started < STOP_WAIT_S / 2


def test_a_reply_the_model_ends_at_once_says_so_with_its_figures(scripted):
    backend, page, session = scripted
    backend.enqueue([])  # the model's first token ends its turn
    final = send(page, session, "Anything?")[-1]
    assert bot_texts(final) == ["*The model ended its reply without text.*"]
    assert figures_shown(final) == [session.conversation.messages[-1].figures.summary()]
    assert bot_texts(page.open_session(session.id)[2]) == bot_texts(final)  # and so after a reload


def test_text_faster_than_the_update_rate_is_batched_into_the_next_update(scripted):
    backend, page, session = scripted
    backend.enqueue([f"w{i} " for i in range(50)])  # all at once, as a fast GPU fills the streamer
    page.add_message(session, {"text": "hi", "files": []}, *SETTINGS)
    stream = chats(page.respond(session))
    first = bot_texts(next(stream))
    time.sleep(1.0)  # a slow update: the rest of the reply arrives meanwhile
    assert first[0].startswith("w0") and bot_texts(next(stream)) == [" ".join(f"w{i}" for i in range(50))]


def test_a_recording_waits_labelled_and_an_empty_send_asks_it_as_a_voice_question(scripted, speech_wav):
    backend, page, session = scripted
    chat, recorder = page.add_recording(session, str(speech_wav))
    assert recorder is None and "**Audio 1** · recording · " in all_text(chat)
    assert session.conversation.awaiting_reply() and backend.prompts == []
    send(page, session)
    assert backend.prompts[-1].text.endswith(
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n<|im_end|>\n<|im_start|>assistant\n")


def test_attached_files_are_numbered_after_the_clips_already_there(scripted, audio_files, speech_wav):
    backend, page, session = scripted
    page.add_recording(session, str(speech_wav))
    renders = send(page, session, "Compare Audio 1 and Audio 3.", [audio_files["mp3"], audio_files["flac"]])
    text = all_text(renders[-1])
    for label in ("**Audio 1** · recording", "**Audio 2** · tone.mp3", "**Audio 3** · tone.flac"):
        assert label in text
    assert backend.prompts[-1].text.count("<|AUDIO|>") == 3


def test_a_long_clip_says_how_many_parts_it_is_sent_as(scripted, tmp_path):
    _, page, session = scripted
    long_clip = write_audio(tmp_path / "lecture.wav", tone(65.0))
    chat = send(page, session, "Summarize.", [long_clip])[-1]
    assert "**Audio 1** · lecture.wav · 1:05 · sent as 3 parts of 30 s" in all_text(chat)


def test_a_file_that_is_not_audio_is_refused_and_changes_nothing(scripted, speech_wav, tmp_path):
    _, page, session = scripted
    page.add_recording(session, str(speech_wav))
    before = list(session.conversation.messages)
    fake = tmp_path / "notes.wav"
    fake.write_text("these are my notes, not audio")
    good = write_audio(tmp_path / "tone.flac", tone(1.0))
    with pytest.warns(UserWarning, match="Not sent: notes.wav is not an audio file this app reads"):
        chat, box, recorder = page.add_message(session, {"text": "What is this?", "files": [str(good), str(fake)]},
                                               *SETTINGS)
    assert session.conversation.messages == before and session.turn is None
    assert page.store.load(session.id).messages == before
    # the text and the good file stay in the box, the refused one is taken out: the next send works
    assert box.value["text"] == "What is this?" and box.interactive
    assert [file["orig_name"] for file in box.value["files"]] == ["tone.flac"]
    assert list(chats(page.respond(session))) == []  # nothing was asked


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be between 1 and 8192"),
        ({"temperature": 2.5}, "temperature must be between 0 and 2"),
        ({"top_k": None}, "top_k needs a value: a whole number"),
        ({"seed": "-1"}, "seed must be a whole number from 0, or empty or random for a new one each time, not '-1'"),
        ({"seed": str(2**32)}, "seed must be empty or between 0 and 2\\*\\*32 - 1"),
    ],
)
def test_invalid_settings_are_named_and_nothing_is_sent(scripted, changed, message):
    _, page, session = scripted
    add_message = with_settings(page.add_message)  # as the page's event calls it: every value by name
    with pytest.raises(gr.Error, match=message):
        add_message(session, message={"text": "hello", "files": []}, system_prompt="", **{**PANEL, **changed})
    assert session.conversation.messages == []


def test_the_side_panel_values_reach_the_reply_as_one_generation_settings(scripted):
    backend, page, session = scripted
    with_settings(page.add_message)(session, message={"text": "hello", "files": []}, system_prompt="",
                                    **{**PANEL, "seed": " Random "})
    list(chats(page.respond(session)))
    assert session.conversation.messages[-1].figures.settings == GenerationSettings(seed=None)
    with_settings(page.regenerate)(session, system_prompt="", **{**PANEL, "top_k": 40, "seed": "7"})
    list(chats(page.respond(session)))
    assert page.store.load(session.id).messages[-1].figures.settings == GenerationSettings(top_k=40, seed=7)


def test_a_turn_too_long_for_the_context_leaves_the_conversation_as_it_was(scripted, speech_wav):
    backend, page, session = scripted
    page.add_recording(session, str(speech_wav))
    before = list(session.conversation.messages)
    backend.context_tokens = 600  # 512 of them are kept for the reply
    with pytest.raises(gr.Error, match="needs about .* tokens but the model's context holds 88"):
        page.add_message(session, {"text": "Why? " * 100, "files": []}, *SETTINGS)
    assert session.conversation.messages == before and session.turn is None


def test_stop_keeps_the_partial_reply_marked_as_stopped(tmp_path):
    backend = ScriptedBackend(interval_s=0.25)
    backend.enqueue([f"word{i} " for i in range(200)])
    page = ChatPage(backend, Store(tmp_path), None)
    _, session, *_ = page.open_session(None)
    page.add_message(session, {"text": "Talk.", "files": []}, *SETTINGS)
    renders = []
    streaming = threading.Thread(target=lambda: renders.extend(chats(page.respond(session))))
    streaming.start()
    while len(renders) < 3:
        time.sleep(0.01)
    chat, textbox, recorder = page.stop(session)
    streaming.join(timeout=30)
    reply = session.conversation.messages[-1]
    assert (reply.status, reply.note) == ("stopped", "Stopped by the user.")
    assert 3 <= len(reply.text.split()) < 20 and session.turn is None
    assert bot_texts(chat) == [reply.text.strip() + "\n\n*Stopped by the user.*"]
    assert textbox.interactive and textbox.submit_btn and not textbox.stop_btn
    assert page.store.load(session.id).messages[-1] == reply


def test_stop_waits_for_the_reply_to_end_and_no_longer_than_stop_wait_s(scripted, monkeypatch):
    backend, page, session = scripted
    backend.interval_s = 0.25
    page.add_message(session, {"text": "Talk.", "files": []}, *SETTINGS)
    stream = chats(page.respond(session))
    next(stream)  # streaming: a stop now waits for respond() to record the reply
    monkeypatch.setattr("app.web.STOP_WAIT_S", 0.3)
    started = time.monotonic()
    with pytest.raises(gr.Error, match="The reply did not stop within 0 s"):  # nobody closes the stream here
        page.stop(session)
    assert 0.3 <= time.monotonic() - started < 5
    monkeypatch.setattr("app.web.STOP_WAIT_S", 60.0)
    stopped = []
    stopping = threading.Thread(target=lambda: stopped.append(page.stop(session)))
    stopping.start()
    time.sleep(0.2)
    assert stopping.is_alive()  # still waiting
    closed_at = time.monotonic()
    stream.close()  # what gradio does to a cancelled reply: its end wakes the stop at once
    stopping.join(timeout=30)
    assert stopped and time.monotonic() - closed_at < 5 and session.turn is None
    assert session.conversation.messages[-1].status == "stopped"


def test_a_stream_closed_by_gradio_records_the_partial_reply_at_once(scripted):
    backend, page, session = scripted
    backend.interval_s = 0.25
    backend.enqueue(["one ", "two ", "three ", "four"])
    page.add_message(session, {"text": "Count.", "files": []}, *SETTINGS)
    stream = chats(page.respond(session))
    next(stream), next(stream)
    stream.close()  # what a cancelled event does to the generator
    assert session.conversation.messages[-1].status == "stopped" and session.turn is None
    assert page.store.load(session.id).messages[-1].text == "one two "


def test_regenerate_undo_and_clear(scripted):
    backend, page, session = scripted
    backend.enqueue(["First answer."])
    backend.enqueue(["Second answer."])
    send(page, session, "Question one")
    page.regenerate(session, *SETTINGS)
    assert bot_texts(list(chats(page.respond(session)))[-1]) == ["Second answer."]
    chat, box = page.undo(session, {"text": "typed meanwhile", "files": []})
    assert chat == [] and box == {"text": "Question one\ntyped meanwhile", "files": []}
    with pytest.raises(gr.Error, match="Nothing to undo"):
        page.undo(session, None)
    send(page, session, "Question two")
    page.clear(session)
    assert session.conversation.messages == [] and page.store.load(session.id).messages == []


def test_the_system_prompt_is_sent_and_kept_with_the_conversation(scripted):
    backend, page, session = scripted
    page.add_message(session, {"text": "hi", "files": []}, "Answer in French.", settings=SETTINGS[1])
    list(chats(page.respond(session)))
    assert backend.prompts[-1].text.startswith("<|im_start|>system\nAnswer in French.<|im_end|>")
    assert page.open_session(session.id)[3] == "Answer in French."


def test_a_reload_or_a_restart_brings_the_conversation_back_and_sessions_stay_apart(tmp_path, speech_wav):
    page = ChatPage(ScriptedBackend(), Store(tmp_path), None)
    _, session, *_ = page.open_session(None)
    page.add_recording(session, str(speech_wav))
    send(page, session, "What is said?")
    restarted = ChatPage(ScriptedBackend(), Store(tmp_path), None)
    session_id, reopened, chat, *_ = restarted.open_session(session.id)
    assert session_id == session.id and reopened.conversation.messages == session.conversation.messages
    assert "**Audio 1** · recording" in all_text(chat)
    other_id, other, other_chat, *_ = restarted.open_session(None)
    assert other_id != session.id and other_chat == [] and other.conversation.clips() == []
    assert restarted.open_session("../../etc/passwd")[0] not in ("../../etc/passwd", session.id)


def test_download_and_upload_a_conversation(scripted, speech_wav):
    _, page, session = scripted
    page.add_recording(session, str(speech_wav))
    send(page, session, "What is said?")
    download = page.download(session).value["path"]
    with zipfile.ZipFile(download) as archive:
        assert "conversation.json" in archive.namelist()
    _, other, *_ = page.open_session(None)
    page.upload(other, download)
    assert other.conversation.messages == session.conversation.messages
    assert other.conversation.id != session.conversation.id  # a copy: each session keeps its own
    assert page.store.load(other.id).messages == session.conversation.messages
    assert page.store.load(session.id).id == session.conversation.id


def test_a_tool_call_shows_as_a_step_and_its_clip_as_the_next_audio(tmp_path, speech_wav):
    backend = ScriptedBackend()
    backend.enqueue(["Cutting it.\n<tool_call>\n", '{"name": "delete_ranges", "arguments": ',
                     '{"audio": 1, "ranges": [[0.2, 0.5]]}}\n</tool_call>'])
    backend.enqueue(["Done: Audio 2 is ", "Audio 1 without that part."])
    shown_pending = threading.Event()

    @functools.wraps(delete_ranges)
    def delete_ranges_once_shown(*args, **kwargs):  # a tool that runs until the page has shown it running
        assert shown_pending.wait(timeout=30), "the page never showed the running tool"
        return delete_ranges(*args, **kwargs)

    page = ChatPage(backend, Store(tmp_path), ToolBox([Tool.from_function(delete_ranges_once_shown)]))
    _, session, *_ = page.open_session(None)
    page.add_message(session, {"text": "Remove 0.2 to 0.5 s from Audio 1.", "files": [str(speech_wav)]}, *SETTINGS)
    renders = []
    for shown in chats(page.respond(session)):
        renders.append(shown)
        if any(m.metadata.get("status") == "pending" for m in shown):
            shown_pending.set()
    pending = [m.metadata for r in renders for m in r if m.metadata.get("status") == "pending"]
    assert pending == [{"title": "🛠 delete_ranges(audio=1, ranges=[[0.2, 0.5]])", "status": "pending"}]
    final = renders[-1]
    assert bot_texts(final)[0] == "Cutting it."  # the call itself is not shown
    assert [m.metadata for m in final if m.metadata] == [{"title": "🛠 delete_ranges", "status": "done"}]
    edited = session.conversation.clip(2)
    assert edited.source == "edited"
    assert f"**Audio 2** · {edited.name} · {edited.duration_s:.1f} s · {edited.note}" in all_text(final)
    assert {"path": str(page.store.clip_path(edited))} in final[-2].content
    assert bot_texts(final)[-1] == "Done: Audio 2 is Audio 1 without that part."


def test_an_edited_clip_is_captioned_with_its_label_once(tmp_path, speech_wav):
    backend = ScriptedBackend()
    backend.enqueue(['<tool_call>\n{"name": "delete_ranges", "arguments": {"audio": 1, "ranges": [[0.2, 0.5]]}}'
                     '\n</tool_call>'])
    page = ChatPage(backend, Store(tmp_path), ToolBox([Tool.from_function(delete_ranges)]))
    _, session, *_ = page.open_session(None)
    final = send(page, session, "Remove 0.2 to 0.5 s from Audio 1.", [speech_wav])[-1]
    edited = session.conversation.clip(2)
    caption = f"**Audio 2** · {edited.name} · {edited.duration_s:.1f} s · Audio 1 with 0.2–0.5 s removed"
    assert caption in all_text(final)


def test_an_edit_saved_with_its_label_in_its_note_shows_the_label_once(scripted, speech_wav):
    _, page, session = scripted
    conversation = Conversation()
    original = Clip.from_file(speech_wav)
    conversation.add_user("Reverse Audio 1.", [original])
    conversation.add_assistant("<tool_call>...</tool_call>")
    edit = Clip(original.samples[::-1], "audio2-reverse.wav", "edited", note="Audio 2 = Audio 1 reversed")
    conversation.add_tool("reverse", "Audio 2 = Audio 1 reversed (2.0 s).", (edit,))  # as saved before
    page.store.save(session.id, conversation)
    chat = page.open_session(session.id)[2]
    assert f"**Audio 2** · audio2-reverse.wav · {edit.duration_s:.1f} s · Audio 1 reversed" in all_text(chat)


def test_a_failed_tool_call_stays_open_with_its_error(tmp_path, speech_wav):
    backend = ScriptedBackend()
    backend.enqueue(['<tool_call>\n{"name": "delete_ranges", "arguments": {"audio": 7, "ranges": [[0, 1]]}}\n</tool_call>'])
    backend.enqueue(["Sorry, there is no Audio 7."])
    page = ChatPage(backend, Store(tmp_path), ToolBox())
    _, session, *_ = page.open_session(None)
    renders = send(page, session, "Cut Audio 7.", [speech_wav])
    final = renders[-1]
    assert not any("without text" in all_text(r) for r in renders)  # a reply that only called a tool: only its step
    step = next(m for m in final if m.metadata)
    assert step.metadata == {"title": "🛠 delete_ranges failed"}  # no status: the step shows open
    assert step.content.startswith("Error: ") and "Audio 7" in step.content
    assert bot_texts(final)[-1] == "Sorry, there is no Audio 7."


# ---- end to end: gradio_client against the served page and the tiny model ----


@pytest.fixture(scope="module")
def served(tiny_qwen2_audio, tmp_path_factory):
    """The page with the tiny model that only max_new_tokens stops, served on 127.0.0.1; yields (url, store)."""
    folder = tmp_path_factory.mktemp("web")
    backend = LocalBackend(str(endless_copy(tiny_qwen2_audio, folder / "model")), cpu_only=True)
    store = Store(folder / "data")
    demo = build_demo(backend, store, description="Model: tiny, on the CPU.")
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url, store
    demo.close()
    backend.close()


def test_an_api_client_chats_with_streamed_replies_about_numbered_clips(served, speech_wav, audio_files):
    url, store = served
    client = Client(url, verbose=False)
    session_id = client.predict(None, api_name="/open_session")[0]
    files = [handle_file(str(speech_wav)), handle_file(str(audio_files["wav"]))]
    chat, *_ = client.predict({"text": "What is in Audio 2?", "files": files}, "", **SAMPLED,
                              api_name="/add_message")
    assert "**Audio 2** · tone.wav · 2.0 s" in all_text(chat)
    updates = [chat for chat, _audio in client.submit(api_name="/respond")]  # the chat, and audio when spoken
    partials = [bot_texts(chat)[-1] for chat in updates if bot_texts(chat)]
    assert len(set(partials)) >= 3 and all(partials[-1].startswith(p) for p in partials)
    saved = store.load(session_id)
    assert [m.role for m in saved.messages] == ["user", "assistant"]
    assert saved.messages[1].text.strip() == partials[-1] and saved.messages[1].status == "done"  # shown stripped
    assert len(saved.clips()) == 2 and saved.messages[0].text == "What is in Audio 2?"
    assert saved.messages[1].figures.settings == GenerationSettings(**{**SAMPLED, "seed": 1234})  # each by its name
    # the same session from a second client (another tab, or the page after a restart) shows the same chat
    again = Client(url, verbose=False).predict(session_id, api_name="/open_session")[1]
    reply = f"{partials[-1]}\n\n<sub>{saved.messages[1].figures.summary()}</sub>"
    assert all_text(again) == all_text(chat).replace("What is in Audio 2?", f"What is in Audio 2?\n{reply}")


def test_an_api_client_can_stop_a_reply(served):
    url, store = served
    client = Client(url, verbose=False)
    session_id = client.predict(None, api_name="/open_session")[0]
    client.predict({"text": "Talk for a long time.", "files": []}, "", **{**SAMPLED, "max_new_tokens": 8192},
                   api_name="/add_message")
    job = client.submit(api_name="/respond")
    while len(job.outputs()) < 3:
        time.sleep(0.01)
    chat = client.predict(api_name="/stop")[0]
    reply = store.load(session_id).messages[-1]
    assert reply.status == "stopped" and 0 < len(reply.text) < 4000
    assert bot_texts(chat)[-1].endswith("*Stopped by the user.*")
    generating = [t for t in threading.enumerate() if t.name == GENERATION_THREAD]
    for thread in generating:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in generating)  # the model stopped too, not only the page


def test_login_is_required_when_auth_is_on(tmp_path):
    demo = build_demo(ScriptedBackend(), Store(tmp_path))
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                auth=[("ann", "secret")])
    try:
        with pytest.raises(Exception, match="(?i)login|credentials|401"):
            Client(demo.local_url, auth=("ann", "wrong"), verbose=False)
        client = Client(demo.local_url, auth=("ann", "secret"), verbose=False)
        assert client.predict(None, api_name="/open_session")[1] == []
    finally:
        demo.close()


def test_the_recording_api_refuses_an_over_long_file_without_decoding_it(tmp_path):
    path = tmp_path / "hours.mp3"  # 15 minutes in 0.9 MB; gradio passes the file on as it is, the gate refuses it
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=300:duration=900",
                    "-ar", "8000", "-b:a", "8k", str(path)], check=True)
    store = Store(tmp_path / "data")
    demo = build_demo(ScriptedBackend(), store)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        session_id = client.predict(None, api_name="/open_session")[0]
        with pytest.raises(Exception, match="longer than the 10-minute limit per clip"):
            client.predict(handle_file(str(path)), api_name="/add_recording")
        assert store.load(session_id) is None and not any(store.clips_folder.iterdir())
    finally:
        demo.close()


def test_a_conversation_whose_clip_file_is_gone_still_opens_and_carries_on(scripted, speech_wav):
    backend, page, session = scripted
    send(page, session, "What is said?", [speech_wav])
    lost = session.conversation.clips()[0]
    page.store.clip_path(lost).unlink()
    _, reopened, chat, *_ = page.open_session(session.id)  # a reload after the file went
    assert reopened.conversation.clips()[0].missing
    assert f"**Audio 1** · {lost.name} · missing: its audio file is gone" in all_text(chat)
    assert bot_texts(chat) == ["This is a scripted reply."]
    renders = send(page, reopened, "And now?")
    assert bot_texts(renders[-1])[-1] == "This is a scripted reply." and backend.prompts[-1].audio_parts == ()


def test_another_login_with_the_same_session_id_cannot_open_the_conversation(tmp_path):
    store = Store(tmp_path)
    demo = build_demo(ScriptedBackend(), store)
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                auth=[("ann", "secret"), ("bob", "hunter2")])
    try:
        ann = Client(demo.local_url, auth=("ann", "secret"), verbose=False)
        session_id = ann.predict(None, api_name="/open_session")[0]
        ann.predict({"text": "My private question", "files": []}, "", **SAMPLED, api_name="/add_message")
        ann.predict(api_name="/respond")
        bob = Client(demo.local_url, auth=("bob", "hunter2"), verbose=False)
        assert bob.predict(session_id, api_name="/open_session")[1] == []  # a new, empty conversation for bob
        assert "My private question" in str(Client(demo.local_url, auth=("ann", "secret"), verbose=False).predict(
            session_id, api_name="/open_session")[1])
        assert store.load(session_id, "ann").messages[0].text == "My private question"
    finally:
        demo.close()


def test_a_clip_file_is_served_only_to_the_logins_shown_it(tmp_path, speech_wav):
    store = Store(tmp_path)
    demo = build_demo(ScriptedBackend(), store)
    launch(demo, store, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
           auth=[("ann", "secret"), ("bob", "hunter2")])

    def logged_in(user: str, password: str) -> httpx.Client:
        client = httpx.Client(base_url=demo.local_url, timeout=60)
        client.post("/login", data={"username": user, "password": password}).raise_for_status()
        return client  # the cookie of its login is on it now

    try:
        ann_api = Client(demo.local_url, auth=("ann", "secret"), verbose=False)
        ann_api.predict(None, api_name="/open_session")
        chat = ann_api.predict({"text": "What is said?", "files": [handle_file(str(speech_wav))]}, "",
                               **SAMPLED, api_name="/add_message")[0]
        shown = next(part["file"] for message in chat for part in message["content"] if "file" in part)
        clip_file = store.clips_folder / Path(shown).name  # the client downloaded it from there, as ann
        assert Path(shown).read_bytes() == clip_file.read_bytes()
        url = f"/gradio_api/file={clip_file}"
        (tmp_path / "link").symlink_to(store.clips_folder)
        twisted = f"/gradio_api/file={tmp_path}/link//{clip_file.name}"  # the same file by another name
        no_such = f"/gradio_api/file={store.clips_folder}/{'0' * 16}.wav"
        with closing(logged_in("ann", "secret")) as ann, closing(logged_in("bob", "hunter2")) as bob:
            assert ann.get(url).content == clip_file.read_bytes()
            assert ann.get(twisted).status_code == 200
            for path in (url, twisted, no_such):  # bob learns nothing, not even that the file exists
                refused = bob.get(path)
                assert refused.status_code == 403
                assert refused.json() == {"detail": f"File not allowed: {path.split('file=', 1)[1]}."}
            assert bob.get("/gradio_api/file=" + str(ASSETS / "knock.wav")).status_code == 200  # the examples: all
        assert httpx.get(demo.local_url + url[1:], timeout=60).status_code in (401, 403)  # no login, no file
    finally:
        demo.close()


@pytest.fixture
def data_elsewhere():
    """A data folder outside both the working directory and the temp folder, where --data-dir may put it: gradio
    serves files from neither place unless the app lets it. Removed after the test."""
    folder = Path.home() / f"audio-chat-test-{uuid.uuid4().hex[:12]}"
    if any(folder.is_relative_to(Path(p).resolve()) for p in (os.getcwd(), tempfile.gettempdir())):
        pytest.skip(f"the home folder {Path.home()} is inside the working directory or the temp folder")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_attachments_downloads_and_imports_are_served_from_a_data_folder_anywhere(data_elsewhere, speech_wav):
    store = Store(data_elsewhere)
    demo = build_demo(ScriptedBackend(), store)
    launch(demo, store, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
           auth=[("ann", "secret")])
    try:
        ann = Client(demo.local_url, auth=("ann", "secret"), verbose=False)
        ann.predict(None, api_name="/open_session")
        chat = ann.predict({"text": "What is said?", "files": [handle_file(str(speech_wav))]}, "", **SAMPLED,
                           api_name="/add_message")[0]
        ann.predict(api_name="/respond")
        (shown,) = [part["file"] for message in chat for part in message["content"] if "file" in part]
        (clip,) = store.clips_folder.iterdir()
        assert Path(shown).read_bytes() == clip.read_bytes()  # the attachment, fetched from the page

        download = Path(ann.predict(api_name="/download")["value"])  # an update that also shows the file
        with zipfile.ZipFile(download) as archive:
            assert sorted(archive.namelist()) == ["clips/" + clip.name, "conversation.json"]
            samples = saving.read_clip_bytes(archive.read("clips/" + clip.name), clip.name)
            assert Clip(samples, clip.name).id == clip.stem  # the same audio (the wav headers hold a time stamp)

        again = Client(demo.local_url, auth=("ann", "secret"), verbose=False)
        session_id = again.predict(None, api_name="/open_session")[0]
        opened = again.predict(handle_file(str(download)), api_name="/upload")[0]
        assert bot_texts(opened) == ["This is a scripted reply."] and "What is said?" in all_text(opened)
        (reopened,) = [part["file"] for message in opened for part in message["content"] if "file" in part]
        assert Path(reopened).read_bytes() == clip.read_bytes()
        saved = store.load(session_id, "ann")
        assert [m.text for m in saved.messages] == ["What is said?", "This is a scripted reply."]
    finally:
        demo.close()


def test_clips_of_conversations_saved_before_the_upgrade_stay_fetchable_by_their_owner(tmp_path, speech_wav):
    store = Store(tmp_path)
    conversation = Conversation()
    conversation.add_user("Hi", [Clip.from_file(speech_wav)])
    store.save("s" * 32, conversation, "ann")
    with sqlite3.connect(tmp_path / "chat.db") as conn:  # as a data folder written before clip_owners existed
        conn.execute("DROP TABLE clip_owners")
        conn.execute("DELETE FROM _migrations WHERE name = 'm004_clip_owners'")
    upgraded = Store(tmp_path)
    clip_id = conversation.clips()[0].id
    assert upgraded.may_fetch(clip_id, "ann") and not upgraded.may_fetch(clip_id, "bob")


def test_a_reply_is_saved_as_it_streams_and_reads_as_interrupted_if_the_app_dies(scripted):
    backend, page, session = scripted
    backend.interval_s = 0.25
    backend.enqueue([f"w{i} " for i in range(12)])  # 3 s
    page.add_message(session, {"text": "Talk.", "files": []}, *SETTINGS)
    stream = chats(page.respond(session))
    next(stream)
    after_crash = page.store.load(session.id)  # what a restart would find right after the reply began
    assert after_crash.messages[-1].role == "assistant" and after_crash.messages[-1].note == INTERRUPTED_NOTE
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(page.store.load(session.id).messages[-1].text.split()) < 5:
        next(stream)
    partial = page.store.load(session.id).messages[-1]
    assert (partial.status, partial.note) == ("stopped", INTERRUPTED_NOTE) and partial.text.startswith("w0 w1 w2 w3 ")
    assert "*Interrupted: the app stopped while writing this reply.*" in bot_texts(
        page.open_session(session.id)[2])[-1]  # as the page shows it after a restart
    list(stream)
    final = page.store.load(session.id).messages[-1]
    assert (final.status, final.note, final.text) == ("done", "", "".join(f"w{i} " for i in range(12)))


@pytest.mark.parametrize("failure", ["clip file", "clip file in libsndfile", "database"])
def test_a_full_disk_changes_nothing_and_says_so(scripted, speech_wav, monkeypatch, failure):
    backend, page, session = scripted
    send(page, session, "First question.")
    before = list(session.conversation.messages)
    if failure == "clip file":
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr("chat.saving.soundfile.write", full)
    elif failure == "clip file in libsndfile":  # what it raises on a full disk (tests/test_store.py writes to one)
        def full(*args, **kwargs):
            raise soundfile.LibsndfileError(2)
        monkeypatch.setattr("chat.saving.soundfile.write", full)
        monkeypatch.setattr("chat.saving.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30, 0))
    else:
        monkeypatch.setattr(page.store, "_connect", lambda: (_ for _ in ()).throw(
            sqlite3.OperationalError("database or disk is full")))
    with pytest.raises(gr.Error, match="Nothing was changed: the app's data folder could not be written "
                                       r"\(the disk is full\)\. Free some space"):
        page.add_message(session, {"text": "Lost?", "files": [str(speech_wav)]}, *SETTINGS)
    assert session.conversation.messages == before and session.turn is None
    monkeypatch.undo()
    assert page.store.load(session.id).messages == before
    send(page, session, "Second question.")  # the refused message is not sent along with the next one
    assert [m.text for m in session.conversation.messages if m.role == "user"] == ["First question.", "Second question."]


def test_conversations_are_listed_newest_first_and_can_be_opened_renamed_deleted_and_started_anew(scripted):
    backend, page, session = scripted
    send(page, session, "First topic?")
    first = session.conversation.id
    chat, _, box, recorder, history = page.new_conversation(session)
    assert chat == [] and [title.split(" · ")[0] for title, _ in history.choices] == ["New conversation", "First topic?"]
    send(page, session, "Second topic?")
    *_, history = page.finish(session)
    assert [title.split(" · ")[0] for title, _ in history.choices] == ["Second topic?", "First topic?"]
    assert history.value == session.conversation.id
    chat, *_, history = page.open_conversation(session, first)
    assert bot_texts(chat) == ["This is a scripted reply."] and "First topic?" in all_text(chat)
    assert history.value == first and page.open_session(session.id)[1].conversation.id == first  # after a reload too
    history = page.rename(session, "Trains")
    assert [title.split(" · ")[0] for title, _ in history.choices] == ["Trains", "Second topic?"]
    chat, *_, history = page.delete(session)
    assert [title.split(" · ")[0] for title, _ in history.choices] == ["Second topic?"]
    assert "Second topic?" in all_text(chat) and history.value == session.conversation.id


def test_opening_a_downloaded_conversation_adds_it_to_the_list(scripted):
    backend, page, session = scripted
    send(page, session, "Keep me.")
    download = page.download(session).value["path"]
    chat, *_, history = page.upload(session, download)
    titles = [title.split(" · ")[0] for title, _ in history.choices]
    assert titles == ["Keep me.", "Keep me."] and len({value for _, value in history.choices}) == 2


def test_attachments_are_listed_by_name():
    assert attachment_names({"text": "hi", "files": ["/tmp/g/1/question.wav", {"path": "/tmp/g/2/knock.flac"}]}) == (
        "Attached: question.wav · knock.flac")
    assert attachment_names({"text": "hi", "files": []}) == attachment_names(None) == ""


def test_the_chat_renders_while_a_reply_adds_a_clip_to_the_conversation(speech_wav):
    class Growing(list):
        """The conversation's messages, to which the reply's worker thread adds a tool result while the page reads."""

        def __iter__(self):
            items = list(super().__iter__())
            if len(items) == 2:
                self.append(Message("tool", "cut", (Clip(tone(0.5), name="cut.wav"),), tool="delete_ranges"))
            return iter(items)

    conversation = Conversation()
    conversation.add_user("Cut it.", [Clip.from_file(speech_wav)])
    conversation.add_assistant("I will cut it.")
    conversation.messages = Growing(conversation.messages)
    chat = render(conversation, lambda clip: Path(f"/clips/{clip.id}.wav"), ScriptedBackend().family)
    assert "**Audio 1** · question.wav" in all_text(chat) and "I will cut it." in all_text(chat)
    assert len(conversation.messages) == 3  # added meanwhile: shown at the next update


def test_each_update_sends_what_gradio_would_and_processes_only_what_changed(tmp_path, speech_wav):
    backend = ScriptedBackend()
    backend.enqueue(['<tool_call>\n{"name": "delete_ranges", "arguments": {"audio": 1, "ranges": [[0.2, 0.5]]}}'
                     '\n</tool_call>'])
    backend.enqueue(["Cut: Audio 2."])
    backend.enqueue([])  # a reply without text
    store = Store(tmp_path / "data")
    demo = build_demo(backend, store, tools=True)
    respond = next(fn for fn in demo.fns.values() if fn.api_name == "respond")
    page = respond.fn.__self__
    _, session, *_ = page.open_session(None)
    send(page, session, "Cut 0.2 to 0.5 s out of Audio 1.", [speech_wav])
    send(page, session, "Anything else?", [write_audio(tmp_path / "tone.flac", tone(1.0))])
    store.clip_path(session.conversation.clips()[2]).unlink()
    _, session, *_ = page.open_session(session.id)  # Audio 3's file is gone: shown as missing
    running = ToolCallStarted("reverse", {"audio": 2})
    state = SessionState(demo)
    chat = session.view.show(session.conversation, "So far", running)
    sent = asyncio.run(demo.postprocess_data(respond, (chat, None), state))  # no audio: a reply not spoken
    shown = render(session.conversation, functools.partial(store.clip_path, owner=""), backend.family, "So far",
                   running)
    assert sent == asyncio.run(gr.Blocks.postprocess_data(demo, respond, (shown, None), state))  # gradio's own
    assert len(sent[0]) == 8 and sum(1 for message in sent[0] for part in message["content"] if "file" in part) == 2

    processed = []
    process = session.view.process
    session.view.process = lambda messages: processed.append(messages) or process(messages)
    session.view.show(session.conversation, "So far, and more")
    assert [[m.content for m in messages] for messages in processed] == [["So far, and more"]]  # the new text only



class Thinking(type(ScriptedBackend().family)):
    """A family whose replies start with their thinking, as Qwen3-Omni's Thinking checkpoint's do."""

    reasoning_tags = ("<think>", "</think>")


def thoughts(chat: list) -> list[tuple[str, str | None, str]]:
    """(title, status, text) of each thinking block of a rendered chat."""
    return [(m.metadata["title"], m.metadata.get("status"), m.content) for m in chat
            if m.metadata and m.metadata.get("title") == "Thinking"]


def test_thinking_streams_open_then_folds_away_and_stays_with_the_reply(tmp_path):
    backend = ScriptedBackend(interval_s=0.25, family=Thinking())
    backend.enqueue(["<think>\nThe clip", " is a tone.", "\n</think>\n\n", "A tone."])
    page = ChatPage(backend, Store(tmp_path), None)
    _, session, *_ = page.open_session(None)
    renders = send(page, session, "What is it?")
    assert thoughts(renders[0]) == [("Thinking", "pending", "The clip")]  # open, with a spinner, while it is written
    assert ("Thinking", "pending", "The clip is a tone.") in [t for r in renders for t in thoughts(r)]
    final = renders[-1]
    assert thoughts(final) == [("Thinking", "done", "The clip is a tone.")]  # folded away once done
    assert bot_texts(final)[-1] == "A tone."  # the answer, in a message of its own
    assert not any("think>" in all_text(r) for r in renders)
    reply = session.conversation.messages[-1]
    assert (reply.reasoning, reply.shown) == ("The clip is a tone.", "A tone.")
    assert thoughts(page.open_session(session.id)[2]) == thoughts(final)  # after a reload
    _, other, *_ = page.open_session(None)
    page.upload(other, page.download(session).value["path"])
    assert thoughts(page._render(other)) == thoughts(final)  # and in a downloaded copy opened again


def test_a_reply_stopped_while_thinking_shows_what_was_thought(tmp_path):
    backend = ScriptedBackend(interval_s=0.25, family=Thinking())
    backend.enqueue(["<think>\nFirst", " thought", " and more", " and more"])
    page = ChatPage(backend, Store(tmp_path), None)
    _, session, *_ = page.open_session(None)
    page.add_message(session, {"text": "Think.", "files": []}, *SETTINGS)
    stream = chats(page.respond(session))
    next(stream)
    next(stream)
    stream.close()  # as gradio closes it on Stop
    final = page._render(session)
    assert thoughts(final)[0][:2] == ("Thinking", "done") and thoughts(final)[0][2].startswith("First thought")
    assert bot_texts(final)[-1] == "*Stopped by the user.*"


def test_several_calls_in_one_reply_show_as_steps_in_order(tmp_path, speech_wav):
    backend = ScriptedBackend()
    call = '<tool_call>\n{{"name": "delete_ranges", "arguments": {{"audio": 1, "ranges": [[{}, {}]]}}}}\n</tool_call>'
    backend.enqueue(["Cutting twice.\n" + call.format(0.1, 0.2)[:30], call.format(0.1, 0.2)[30:] + "\n",
                     call.format(0.3, 0.4)])
    backend.enqueue(["Done: Audio 2 and Audio 3."])
    shown_running: list[str] = []  # the titles of the running steps the page has shown
    page_caught_up = threading.Condition()

    @functools.wraps(delete_ranges)
    def delete_ranges_once_shown(audio, ranges):  # a tool that runs until the page has shown it running
        title = f"🛠 delete_ranges(audio=1, ranges={ranges!r})"  # as the model wrote the call
        with page_caught_up:
            assert page_caught_up.wait_for(lambda: title in shown_running, timeout=30), f"never shown: {title}"
        return delete_ranges(audio, ranges)

    page = ChatPage(backend, Store(tmp_path), ToolBox([Tool.from_function(delete_ranges_once_shown)]))
    _, session, *_ = page.open_session(None)
    page.add_message(session, {"text": "Cut twice.", "files": [str(speech_wav)]}, *SETTINGS)
    renders = []
    for chat in chats(page.respond(session)):
        renders.append(chat)
        with page_caught_up:
            shown_running += [m.metadata["title"] for m in chat if m.metadata.get("status") == "pending"]
            page_caught_up.notify_all()
    assert list(dict.fromkeys(shown_running)) == ["🛠 delete_ranges(audio=1, ranges=[[0.1, 0.2]])",
                                                  "🛠 delete_ranges(audio=1, ranges=[[0.3, 0.4]])"]
    final = renders[-1]
    assert [m.metadata for m in final if m.metadata] == [{"title": "🛠 delete_ranges", "status": "done"}] * 2
    assert bot_texts(final)[0] == "Cutting twice." and bot_texts(final)[-1] == "Done: Audio 2 and Audio 3."
    assert [clip.note for clip in session.conversation.clips()[1:]] == ["Audio 1 with 0.1–0.2 s removed",
                                                                        "Audio 1 with 0.3–0.4 s removed"]
