"""The terminal client: scripted sessions with their exact transcripts, then the conversation they leave.

Replies come from ScriptedBackend (exact, deterministic text) and recordings from ArrayRecorder; the
end-to-end test at the bottom runs the real program in a pseudo-terminal against the tiny real model.
"""

import io
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile

import launch
from app.cli import EXIT_INTERRUPTED, RECORDING_PROMPT, run_cli
from app.cli_text import BANNER, help_text, model_line, tool_result
from app.recorder import SoundDeviceRecorder
from chat import BackendError, Clip, ClipError, Conversation, GenerationSettings, load_backend, saving
from chat.audio import MAX_CLIP_S, SAMPLE_RATE
from chat.backend import Backend
from chat.clip import EDITED, UPLOADED
from chat.conversation import ASSISTANT, DONE, FAILED, STOPPED, TOOL, USER
from chat.families import DEFAULT_FAMILY
from chat.local import LocalBackend
from chat.speech import Voices
from chat.store import Store
from chat.tts import CURATED_VOICES, KokoroSpeech
from testkit.recorder import ArrayRecorder
from testkit.scripted import ScriptedBackend
from testkit.tiny.qwen2_5_omni import build_tiny_qwen2_5_omni
from tests.conftest import one_intra_op_thread, tone, write_audio

CTRL_C = KeyboardInterrupt  # an input line that is a Ctrl-C at the prompt
REPO = Path(__file__).resolve().parents[1]


class Keyboard:
    """stdin for a scripted session: lines, with Ctrl-C where the script says CTRL_C; then end of input."""

    def __init__(self, lines: list) -> None:
        self.lines = list(lines)

    def readline(self) -> str:
        if not self.lines:
            return ""
        line = self.lines.pop(0)
        if line is CTRL_C:
            raise KeyboardInterrupt
        return line + "\n"


class InterruptedScreen(io.StringIO):
    """stdout that takes a Ctrl-C right after it shows `after` (once), as if the user pressed it then."""

    def __init__(self, after: str) -> None:
        super().__init__()
        self.after = after

    def write(self, text: str) -> int:
        n = super().write(text)
        if text == self.after:
            self.after = None
            raise KeyboardInterrupt
        return n


def session(lines, backend=None, recorder=None, conversation=None, stdout=None, **options):
    """Run the client on scripted input; returns (exit code, transcript, conversation)."""
    conversation = Conversation() if conversation is None else conversation
    stdout = io.StringIO() if stdout is None else stdout
    code = run_cli(backend or ScriptedBackend(), recorder=recorder, conversation=conversation,
                   stdin=Keyboard(lines), stdout=stdout, **options)
    return code, stdout.getvalue(), conversation


def two_turns_about_two_clips(backend: Backend, folder: Path) -> None:
    """The terminal with a real (tiny) model: a clip added and asked about, then a second one, greedily; both replies
    land, stream to the screen, and the second starts from the first one's attention cache."""
    files = [write_audio(folder / f"clip{k}.wav", tone(1.6 + k, 300.0 + 200 * k)) for k in (1, 2)]
    lines = [f"/add {files[0]}", "/set max_new_tokens 6", "/set temperature 0", "What is Audio 1?",
             f"/add {files[1]}", "And Audio 2?", "/quit"]
    code, transcript, conversation = session(lines, backend)
    assert code == 0
    replies = [m for m in conversation.messages if m.role == ASSISTANT]
    assert [m.status for m in replies] == [DONE, DONE] and all(m.text for m in replies)
    assert [clip.name for clip in conversation.clips()] == ["clip1.wav", "clip2.wav"]
    assert replies[1].figures.reused_tokens > 0
    assert all(m.display_text in transcript for m in replies)


def take(seconds: float, sample_rate: int = 48000) -> tuple[np.ndarray, int]:
    """What a stereo 16-bit microphone delivers for `seconds` of a tone."""
    mono = (tone(seconds, 300, sample_rate) * 32767).astype(np.int16)
    return np.stack([mono, mono], axis=1), sample_rate


def screen(*lines: str) -> str:
    """The transcript a session prints: which model, the banner, then the given lines."""
    return "\n".join([model_line(ScriptedBackend()), BANNER, *lines]) + "\n"


def test_a_typed_message_streams_the_reply_and_both_land_on_the_conversation():
    backend = ScriptedBackend()
    backend.enqueue(["Hello", " there", "."])
    code, transcript, conversation = session(["What is this?", "/quit"], backend)
    assert code == 0
    assert transcript == screen("> What is this?", "Hello there.", "> /quit")
    assert [(m.role, m.text, m.status) for m in conversation.messages] == [
        (USER, "What is this?", DONE), (ASSISTANT, "Hello there.", DONE)]
    assert backend.prompts[0].text.endswith("What is this?<|im_end|>\n<|im_start|>assistant\n")


def test_push_to_talk_records_the_next_audio_and_enter_sends_it_as_a_voice_question():
    backend = ScriptedBackend()
    backend.enqueue(["It says hello."])
    recorder = ArrayRecorder([take(4.2)])
    # Enter: record; Enter: stop; Enter on the waiting recording: send it without text
    code, transcript, conversation = session(["", "", "", "/quit"], backend, recorder)
    assert transcript == screen(
        "> ", RECORDING_PROMPT, "Audio 1: recording, 4.2 s", "[Audio 1] > ", "It says hello.", "> /quit")
    question, reply = conversation.messages
    assert question.role == USER and question.text == ""
    (clip,) = question.clips
    assert clip.source == "recorded" and clip.duration_s == pytest.approx(4.2, abs=0.01)
    assert reply.text == "It says hello." and [p.number for p in backend.prompts[0].audio_parts] == [1]


def test_a_recording_and_a_typed_question_go_out_as_one_turn():
    recorder = ArrayRecorder([take(1.0), take(2.0, SAMPLE_RATE)])
    code, transcript, conversation = session(["/rec", "", "/rec", "", "Which is longer?", "/quit"], None, recorder)
    assert transcript == screen(
        "> /rec", RECORDING_PROMPT, "Audio 1: recording, 1.0 s",
        "[Audio 1] > /rec", RECORDING_PROMPT, "Audio 2: recording, 2.0 s",
        "[Audio 1, Audio 2] > Which is longer?", "This is a scripted reply.", "> /quit")
    question = conversation.messages[0]
    assert question.text == "Which is longer?" and [c.duration_s for c in question.clips] == [1.0, 2.0]


def test_ctrl_c_while_recording_discards_it():
    recorder = ArrayRecorder([take(1.0)])
    code, transcript, conversation = session(["", CTRL_C, "/clips", "/quit"], None, recorder)
    assert transcript == screen(
        "> ", RECORDING_PROMPT, "Recording discarded.", "> /clips",
        "No clips yet: /add a file, or press Enter on an empty line to record.", "> /quit")
    assert conversation.messages == []


def test_microphone_trouble_is_one_line_and_the_chat_goes_on():
    lost = ClipError("The microphone stopped delivering audio during the recording (was it unplugged?).")
    silence = (np.zeros(SAMPLE_RATE, dtype=np.int16), SAMPLE_RATE)
    too_long = (np.full((MAX_CLIP_S + 1) * SAMPLE_RATE, 1000, dtype=np.int16), SAMPLE_RATE)
    recorder = ArrayRecorder([lost, silence, too_long])
    lines = ["", "", "", "", "", "", "", "hello", "/quit"]  # three takes, then a machine without a microphone
    code, transcript, conversation = session(lines, None, recorder)
    errors = [str(lost), *(str(_clip_error(*t)) for t in (silence, too_long)),
              "No microphone could be opened (no input device). Connect a microphone or allow access to it, "
              "then try again; or attach a file with /add PATH."]
    assert transcript == screen(
        *[line for error in errors[:3] for line in ("> ", RECORDING_PROMPT, f"error: {error}")],
        "> ", f"error: {errors[3]}", "> hello", "This is a scripted reply.", "> /quit")
    assert [m.clips for m in conversation.messages] == [(), ()]


def test_a_real_sounddevice_recorder_without_that_microphone_says_so():
    code, transcript, _ = session(["", "/quit"], None, SoundDeviceRecorder(device="no such microphone"))
    assert "\nerror: No microphone could be opened (No input device matching 'no such microphone')" in transcript
    assert transcript.endswith("> /quit\n") and code == 0


def _clip_error(samples: np.ndarray, sample_rate: int) -> ClipError:
    with pytest.raises(ClipError) as error:
        Clip.from_array(samples, sample_rate, name="recording")
    return error.value


def test_files_are_attached_and_a_bad_one_is_one_line(tmp_path):
    good = write_audio(tmp_path / "tone.flac", tone(2.0))
    long = write_audio(tmp_path / "long talk.wav", tone(70.0, 200))
    (tmp_path / "notes.txt").write_text("not audio")
    lines = [f"/add {good} {tmp_path / 'notes.txt'} '{long}'", "/clips", "/send", "/add", "/quit"]
    code, transcript, conversation = session(lines, None)
    error = _file_error(tmp_path / "notes.txt")
    assert transcript == screen(
        f"> {lines[0]}", "Audio 1: tone.flac, 2.0 s", f"error: {error}", "Audio 2: long talk.wav, 1:10",
        "Audio 2 (1:10) will be sent as 3 parts of up to 30 s",
        "[Audio 1, Audio 2] > /clips",
        "Audio 1: tone.flac, 2.0 s, uploaded", "Audio 2: long talk.wav, 1:10, uploaded, 3 parts",
        "[Audio 1, Audio 2] > /send", "This is a scripted reply.",
        "> /add", "error: Usage: /add PATH [PATH...]", "> /quit")
    assert [c.name for c in conversation.clips()] == ["tone.flac", "long talk.wav"]
    assert [m.role for m in conversation.messages] == [USER, ASSISTANT]


def _file_error(path: Path) -> ClipError:
    with pytest.raises(ClipError) as error:
        Clip.from_file(path)
    return error.value


def test_ctrl_c_during_a_reply_stops_it_keeps_the_partial_reply_and_the_chat():
    backend = ScriptedBackend(interval_s=0.3)
    backend.enqueue(["one ", "two ", "three ", "four"])
    backend.enqueue(["Again."])
    stdout = InterruptedScreen(after="two ")
    code, transcript, conversation = session(["Count.", "And again?", "/quit"], backend, stdout=stdout)
    assert transcript == screen("> Count.", "one two [stopped]", "> And again?", "Again.", "> /quit")
    assert [(m.text, m.status) for m in conversation.messages[1::2]] == [("one two ", STOPPED), ("Again.", DONE)]


def test_a_reply_the_model_ends_at_once_says_so():
    backend = ScriptedBackend()
    backend.enqueue([])  # the model's first token ends its turn
    code, transcript, conversation = session(["Anything?", "/quit"], backend)
    assert transcript == screen("> Anything?", "[The model ended its reply without text.]", "> /quit")
    assert [(m.role, m.text, m.status) for m in conversation.messages] == [(USER, "Anything?", DONE),
                                                                           (ASSISTANT, "", DONE)]


def test_ctrl_c_at_the_prompt_or_end_of_input_leaves():
    assert session([CTRL_C, "never read"])[:2] == (0, screen("> "))
    assert session([])[:2] == (0, screen("> "))


class StuckInPrefill(Backend):
    """A backend that cannot notice a cancel until `release` is set, like a long prefill."""

    family, name = DEFAULT_FAMILY, "scripted"

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.cancel = threading.Event()

    def execute(self, prompt, settings, stats, cancel, voice=None):
        self.cancel = cancel
        self.started.set()
        self.release.wait(60)
        yield "late"


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt, as in a terminal. A shell starts a background job (a test run with `&`) with
    SIGINT ignored, and Python then leaves it ignored: no Ctrl-C would arrive at all."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def press_ctrl_c() -> None:
    """Ctrl-C as a terminal sends it: SIGINT, which reaches the main thread even while it waits on a lock."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def ctrl_c_as_on_a_terminal() -> None:
    """For a child process: SIGINT as a terminal's program gets it, whatever this process was started with."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_second_ctrl_c_leaves_while_the_reply_cannot_stop_yet(ctrl_c_raises):
    backend = StuckInPrefill()

    def press_ctrl_c_twice():
        backend.started.wait(60)
        press_ctrl_c()
        # the second press once the first has been handled: two presses before the busy main thread runs
        # again would reach it as one
        backend.cancel.wait(60)
        press_ctrl_c()

    presser = threading.Thread(target=press_ctrl_c_twice)
    presser.start()
    try:
        code, transcript, _ = session(["Hi", "/quit"], backend)
    finally:
        backend.release.set()
        presser.join()
    assert code == EXIT_INTERRUPTED
    assert transcript == screen("> Hi", "[left before the reply had stopped]")


class FailsMidReply(Backend):
    """A backend whose model fails after the first chunk."""

    family, name = DEFAULT_FAMILY, "scripted"

    def execute(self, prompt, settings, stats, cancel, voice=None):
        yield "Partial"
        raise BackendError("The GPU ran out of memory. Try --quantization 4bit.")


def test_a_failing_reply_is_one_error_line_and_is_recorded_as_failed():
    code, transcript, conversation = session(["Hi", "/quit"], FailsMidReply())
    assert transcript == screen("> Hi", "Partial", "error: The GPU ran out of memory. Try --quantization 4bit.", "> /quit")
    assert (conversation.messages[-1].status, conversation.messages[-1].text) == (FAILED, "Partial")


def test_a_turn_the_model_cannot_take_is_refused_and_the_conversation_is_unchanged():
    backend = ScriptedBackend()
    backend.context_tokens = 64
    code, transcript, conversation = session(["word " * 200, "/quit"], backend, settings=GenerationSettings(max_new_tokens=8))
    assert transcript.splitlines()[3].startswith("error: This turn alone needs about ")
    assert conversation.messages == [] and backend.prompts == []


def test_play_export_and_clips_show_edited_clips(tmp_path):
    conversation = Conversation()
    original = Clip.from_array(tone(3.0), SAMPLE_RATE, name="question.wav", source=UPLOADED)
    conversation.add_user("Remove the cough.", [original])
    conversation.add_assistant("Done.")
    edited = Clip(original.samples[: 2 * SAMPLE_RATE], name="question (edited)", source=EDITED,
                  note="Audio 1 with 2.00–3.00 s removed")
    conversation.add_tool("delete_ranges", "Made Audio 2.", (edited,))
    played: list[Clip] = []
    lines = ["/clips", "/play 2", "/play 3", "/play two", f"/export 2 {tmp_path / 'edit.wav'}",
             f"/export 2 {tmp_path / 'edit.mp3'}", "/quit"]
    code, transcript, _ = session(lines, conversation=conversation, player=played.append)
    assert transcript == screen(
        "> /clips", "Audio 1: question.wav, 3.0 s, uploaded",
        "Audio 2: question (edited), 2.0 s, edited (Audio 1 with 2.00–3.00 s removed)",
        "> /play 2", "Playing Audio 2 (2.0 s); Ctrl-C stops.",
        "> /play 3", "error: There is no Audio 3 in this conversation (clips: Audio 1 to Audio 2).",
        "> /play two", "error: 'two' is not a clip number. Usage: /play N (/clips lists the numbers)",
        f"> {lines[4]}", f"Saved Audio 2 to {tmp_path / 'edit.wav'}",
        f"> {lines[5]}", "error: Cannot export to edit.mp3: name a file ending in .wav, .flac, .ogg.",
        "> /quit")
    assert played == [edited]
    exported, rate = soundfile.read(tmp_path / "edit.wav", dtype="float32")
    assert rate == SAMPLE_RATE and np.allclose(exported, edited.samples, atol=1e-4)


def test_save_load_undo_clear_and_the_system_prompt(tmp_path):
    folder = tmp_path / "chat"
    lines = ["/system You answer in one word.", "/system", "First?", "Second?", "/undo", f"/save {folder}", "/clear",
             "/undo", f"/load {folder}", f"/load {tmp_path / 'nothing'}", "/quit"]
    code, transcript, _ = session(lines)
    out = transcript.splitlines()
    assert out[2:8] == ["> /system You answer in one word.", "System prompt set.", "> /system",
                        "System prompt: You answer in one word.", "> First?", "This is a scripted reply."]
    assert out[10:] == [
        "> /undo", "Removed the last exchange (2 messages).",
        f"> /save {folder}", f"Saved to {folder}: 2 messages, 0 clips.",
        "> /clear", "Cleared the conversation; the system prompt stays.",
        "> /undo", "error: Nothing to undo: the conversation has no messages yet.",
        f"> /load {folder}", f"Loaded {folder}: 2 messages, 0 clips.",
        f"> /load {tmp_path / 'nothing'}",
        f"error: conversation.json is missing from {tmp_path / 'nothing'}: this is not a saved conversation.",
        "> /quit"]
    saved = saving.load(folder)
    assert saved.system_prompt == "You answer in one word."
    assert [m.text for m in saved.messages] == ["First?", "This is a scripted reply."]


def test_a_loaded_conversation_carries_on_where_it_was_saved(tmp_path):
    saved = Conversation(system_prompt="Be brief.")
    saved.add_user("Saved question?", [Clip.from_array(tone(1.0), SAMPLE_RATE, name="a.wav")])
    saving.save(saved, tmp_path / "saved")
    backend = ScriptedBackend()
    code, transcript, _ = session([f"/load {tmp_path / 'saved'}", "", f"/save {tmp_path / 'after'}", "/quit"], backend)
    # the saved turn still waits for its reply, so Enter sends it
    assert transcript.splitlines()[4:7] == ["[Audio 1] > ", "This is a scripted reply.", f"> /save {tmp_path / 'after'}"]
    assert backend.prompts[0].text.startswith("<|im_start|>system\nBe brief.")
    after = saving.load(tmp_path / "after")
    assert after.id == saved.id and [m.text for m in after.messages] == ["Saved question?", "This is a scripted reply."]


def test_help_and_unknown_commands():
    code, transcript, _ = session(["/help", "/frobnicate", "/quit"])
    assert transcript == screen("> /help", help_text(ScriptedBackend()), "> /frobnicate", "error: Unknown command /frobnicate: /help lists the commands.",
                                "> /quit")


def test_a_tool_call_is_shown_with_its_result_and_the_reply_goes_on():
    backend = ScriptedBackend()
    # the call is split inside its tag, as a model streams it; the parser keeps it off the screen
    backend.enqueue(["Cutting it. <tool_", 'call>\n{"name": "delete_ranges", "arguments": {"audio": 1, ',
                     '"ranges": [[0.5, 1.0]]}}\n</tool_call>'])
    backend.enqueue(["Audio 2 is ", "the edit."])
    backend.enqueue(['<tool_call>\n{"name": "delete_ranges", "arguments": {"audio": 7, "ranges": [[0, 1]]}}\n</tool_call>'])
    backend.enqueue(["Sorry."])
    conversation = Conversation()
    conversation.add_user("", [Clip.from_array(tone(3.0), SAMPLE_RATE, name="a.wav", source=UPLOADED)])
    code, transcript, _ = session(["Cut 0.5 to 1 s.", "Now Audio 7.", "/clips", "/quit"], backend,
                                  conversation=conversation, tools=True)  # Qwen2-Audio: only when asked
    edit, refusal = (m for m in conversation.messages if m.role == TOOL)
    assert transcript == screen(
        "[Audio 1] > Cut 0.5 to 1 s.", "Cutting it. ",
        "[tool] delete_ranges(audio=1, ranges=[[0.5, 1.0]]) → Audio 2 (2.5 s)", "Audio 2 is the edit.",
        "> Now Audio 7.", f"[tool] delete_ranges(audio=7, ranges=[[0, 1]]) → {refusal.text}", "Sorry.",
        "> /clips", "Audio 1: a.wav, 3.0 s, uploaded", f"Audio 2: {edit.clips[0].name}, 2.5 s, edited ({edit.clips[0].note})",
        "> /quit")
    assert refusal.text.startswith("Error: ") and not refusal.clips
    assert "<tools>" in backend.prompts[0].text  # the tools were offered


def test_long_tool_results_are_cut_to_one_line():
    conversation = Conversation()
    conversation.add_user("Hi")
    conversation.add_assistant("<tool_call>...</tool_call>")
    message = conversation.add_tool("find_words", "word " * 100)
    assert tool_result(message, conversation) == " → " + ("word " * 20)[:99] + "…"


def test_a_model_that_cannot_load_is_one_error_line_and_exit_code_1(tmp_path, capsys):
    assert launch.main(["--cli", "-c", str(tmp_path / "no model here"), "--cpu-only"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: There is no model folder {tmp_path / 'no model here'}.") and "Traceback" not in err


def test_the_client_in_a_real_terminal_with_the_tiny_model(tiny_qwen2_audio, speech_wav, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    # Its generation config never lets the model end a reply early, so every reply runs the full
    # max_new_tokens (about 2 s here): long enough to see it stream and to interrupt it mid-way.
    checkpoint = shutil.copytree(tiny_qwen2_audio, tmp_path / "never-ends")
    config_path = checkpoint / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["suppress_tokens"] = sorted({*config["suppress_tokens"], config["eos_token_id"]})
    config_path.write_text(json.dumps(config))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "dumb", "PYTHONPATH": str(REPO),
           "AUDIO_CHAT_DATA_DIR": str(tmp_path / "data")}
    child = pexpect.spawn(sys.executable, ["launch.py", "--cli", "-c", str(checkpoint), "--cpu-only"], cwd=REPO, env=env,
                          encoding="utf-8", timeout=120, dimensions=(24, 400), preexec_fn=ctrl_c_as_on_a_terminal)
    try:
        child.expect_exact("/help lists commands; Ctrl-D leaves.")
        child.expect_exact("> ")
        child.sendline(f"/add {speech_wav}")
        child.expect(r"Audio 1: question\.wav, \d+\.\d s\r\n\[Audio 1\] > ")
        child.sendline("What is said?")
        child.expect_exact("What is said?\r\n")
        # the streamed reply, its figures (on a terminal), then the prompt again
        child.expect(r"(.+)\r\n\[Qwen2-Audio · none · \d+ prompt tokens · \d+ new · first token [\d.]+ s.*\]\r\n> ")
        assert child.match.group(1).strip() and "[stopped]" not in child.match.group(1)

        child.sendline("/set max_new_tokens 8192")  # a reply of a minute: Ctrl-C comes mid-way, however busy
        child.expect_exact("seed random.\r\n> ")  # the whole answer and the next prompt: then it reads again
        child.sendline("And now?")
        child.expect_exact("And now?\r\n")
        child.expect(r"[^\r\n]{20}")  # the reply is streaming (a line no prompt or echo fills)
        child.sendcontrol("c")
        child.expect(r"\[stopped\]\r\n\[Qwen2-Audio · none · \d+ prompt tokens \(\d+ cached\) .*\]\r\n> ")
        child.sendline("/clips")
        child.expect_exact("Audio 1: question.wav, ")
        child.expect_exact(", uploaded\r\n> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    log = (tmp_path / "data" / "audio-chat.log").read_text()
    assert re.search(r"INFO launch: loaded .* as Qwen2-Audio \(none\) in [\d.]+ s", log)
    assert re.search(r"INFO chat.backend: reply done: Qwen2-Audio · none · \d+ prompt tokens", log)
    assert re.search(r"INFO chat.backend: reply stopped: .*\(\d+ cached\)", log)


def test_conversations_are_kept_listed_and_reopened(tmp_path):
    store = Store(tmp_path)
    backend = ScriptedBackend()
    lines = ["About trains?", "/new", "About boats?", "/list", "/open 2", "/list", "/open 9", "/quit"]
    code, transcript, conversation = session(lines, backend, store=store)
    out = transcript.splitlines()
    listed = [line for line in out if line[:3] in ("1. ", "2. ")]
    assert [re.sub(r" · .* UTC", "", line) for line in listed] == [
        "1. About boats? (open)", "2. About trains?", "1. About trains? (open)", "2. About boats?"]
    assert "Opened About trains?: 2 messages, 0 clips." in out
    assert "error: There is no conversation 9: /list shows 2." in out
    assert [m.text for m in conversation.messages] == ["About trains?", "This is a scripted reply."]
    assert [s.title for s in store.history("terminal")] == ["About trains?", "About boats?"]


def test_without_a_store_list_says_how_to_keep_conversations():
    code, transcript, _ = session(["/list", "/quit"])
    assert "error: Conversations are not kept in this session: /save and /load folders instead." in transcript


def test_set_shows_and_changes_the_generation_settings_with_clear_errors():
    code, transcript, conversation = session(["/set temperature 0.2", "/set top_k many", "/set warmth 1", "/set top_p 3",
                                              "/set seed -1", "/set top_k", "/set seed 7", "Hi", "/set seed",
                                              "/set seed 3", "/set seed Random", "/set seed 4", "/set seed none",
                                              "/quit"])
    lines = transcript.splitlines()
    assert "error: seed must be a whole number from 0, or empty or random for a new one each time, not '-1'." in lines
    assert "error: top_k needs a value: a whole number." in lines
    assert ("Settings: max_new_tokens 512, temperature 0.2, top_p 0.5, top_k 0, repetition_penalty 1.1, "
            "seed random.") in lines
    assert "error: top_k must be a whole number, not 'many'." in lines
    assert ("error: There is no setting 'warmth'; the settings are max_new_tokens, temperature, top_p, top_k, "
            "repetition_penalty, seed.") in lines
    assert "error: top_p must be above 0 and at most 1." in lines
    assert conversation.messages[-1].figures.settings == GenerationSettings(temperature=0.2, seed=7)
    assert [line.rsplit(", ", 1)[1] for line in lines if line.startswith("Settings:")][-5:] == [
        "seed random.", "seed 3.", "seed random.", "seed 4.", "seed random."]  # empty, random or none: a new one


class Thinking(type(DEFAULT_FAMILY)):
    """A family whose replies start with their thinking, as Qwen3-Omni's Thinking checkpoint's do."""

    reasoning_tags = ("<think>", "</think>")


class Terminal(io.StringIO):
    """stdout that is a terminal."""

    def isatty(self) -> bool:
        return True


def thinking_backend() -> ScriptedBackend:
    backend = ScriptedBackend(family=Thinking())
    backend.enqueue(["<think>\nTwo", " tones.\n</th", "ink>\n\n", "Both ", "are tones."])
    return backend


def test_thinking_is_marked_on_a_line_of_its_own_and_never_the_answer():
    code, transcript, conversation = session(["What are they?", "/quit"], thinking_backend())
    assert transcript == screen("> What are they?", "[thinking] Two tones.", "Both are tones.", "> /quit")
    reply = conversation.messages[-1]
    assert (reply.reasoning, reply.shown) == ("Two tones.", "Both are tones.")


def test_thinking_is_dimmed_where_the_terminal_shows_colour(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    _, transcript, _ = session(["What are they?", "/quit"], thinking_backend(), stdout=Terminal())
    assert "[thinking] \033[2mTwo\033[22m\033[2m tones.\033[22m\nBoth are tones.\n" in transcript
    monkeypatch.setenv("NO_COLOR", "1")
    _, transcript, _ = session(["What are they?", "/quit"], thinking_backend(), stdout=Terminal())
    assert "\033[" not in transcript and "[thinking] Two tones.\nBoth are tones.\n" in transcript


def test_a_reply_stopped_while_thinking_keeps_its_thought():
    backend = ScriptedBackend(interval_s=0.3, family=Thinking())
    backend.enqueue(["<think>\nFirst", " thought", " never shown"])
    _, transcript, conversation = session(["Think.", "/quit"], backend, stdout=InterruptedScreen(" thought"))
    assert transcript == screen("> Think.", "[thinking] First thought [stopped]", "> /quit")
    reply = conversation.messages[-1]
    assert (reply.status, reply.reasoning) == (STOPPED, "First thought")


def test_several_calls_in_one_reply_are_shown_one_step_each_in_order():
    backend = ScriptedBackend()
    call = '<tool_call>\n{{"name": "reverse", "arguments": {{"audio": {}}}}}\n</tool_call>'
    backend.enqueue(["Both. " + call.format(1)[:20], call.format(1)[20:] + "\n" + call.format(2)])
    backend.enqueue(["Audio 3 and Audio 4."])
    conversation = Conversation()
    conversation.add_user("", [Clip.from_array(tone(1.0, f), SAMPLE_RATE, name=f"{f}.wav", source=UPLOADED)
                               for f in (300, 400)])
    _, transcript, _ = session(["Reverse both.", "/quit"], backend, conversation=conversation, tools=True)
    assert transcript == screen("[Audio 1, Audio 2] > Reverse both.", "Both. ",
                                "[tool] reverse(audio=1) → Audio 3 (1.0 s)",
                                "[tool] reverse(audio=2) → Audio 4 (1.0 s)", "Audio 3 and Audio 4.", "> /quit")
    assert [m.role for m in conversation.messages] == [USER, ASSISTANT, TOOL, TOOL, ASSISTANT]


# Spoken replies: the tiny Qwen2.5-Omni speaks with its own talker; the tiny Qwen2-Audio is read aloud by the tiny
# Kokoro. A Loudspeaker stands in for the sound card.

TALKER_CODES = 84  # the tiny talker never ends by itself: 84 codes are three chunks (36, then 24 a chunk)
LONG_REPLY_TOKENS = 300  # a reply the thinker writes for longer than the talker takes to its first chunk
SPOKEN_SHORT = ["/set temperature 0", "/set max_new_tokens 8"]


@dataclass
class Loudspeaker:
    """A Speaker that keeps each chunk it is given with how much of the screen was printed by then; its wait() can
    be a Ctrl-C, as when a person cuts short a reply that is still heard after its text."""

    screen: io.StringIO
    ctrl_c_in_wait: bool = False
    played: list[tuple[np.ndarray, int, int]] = field(default_factory=list)  # (samples, rate, screen length)
    n_stops: int = 0
    n_played_at_stop: int | None = None  # how many chunks had been played when it was last silenced

    def play(self, samples: np.ndarray, sample_rate: int) -> None:
        self.played.append((samples, sample_rate, len(self.screen.getvalue())))

    def wait(self) -> None:
        if self.ctrl_c_in_wait:
            self.ctrl_c_in_wait = False
            raise KeyboardInterrupt

    def stop(self) -> None:
        self.n_stops += 1
        self.n_played_at_stop = len(self.played)


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> Iterator[tuple[LocalBackend, Voices]]:
    """The tiny Qwen2.5-Omni on the CPU with its talker, and its voices."""
    folder = build_tiny_qwen2_5_omni(tmp_path_factory.mktemp("tiny-qwen2.5-omni"))
    with one_intra_op_thread():
        backend = load_backend(str(folder), cpu_only=True)
        backend.talker().max_new_codes = TALKER_CODES
        yield backend, launch.voices_for(backend, None)
    backend.close()


def spoken_session(lines: list, backend: Backend, voices: Voices | None, speaker: Loudspeaker | None, **options):
    """session() with voices and a speaker that prints to the speaker's screen, the model at one thread."""
    with one_intra_op_thread():
        return session(lines, backend, stdout=speaker.screen if speaker else None, voices=voices, speaker=speaker,
                       **options)


def test_a_spoken_reply_is_heard_chunk_by_chunk_while_its_text_streams(omni, tmp_path):
    backend, voices = omni
    files = [write_audio(tmp_path / f"clip{k}.wav", tone(1.6 + k, 300.0 + 200 * k)) for k in (1, 2)]
    speaker = Loudspeaker(io.StringIO())
    lines = [f"/add {files[0]}", "/set temperature 0", f"/set max_new_tokens {LONG_REPLY_TOKENS}", "What is Audio 1?",
             f"/add {files[1]}", "And Audio 2?", "/quit"]
    code, transcript, conversation = spoken_session(lines, backend, voices, speaker, voice="Chelsie")
    assert code == 0 and "Replies are spoken in Chelsie; /voice off stops that." in transcript
    replies = [m for m in conversation.messages if m.role == ASSISTANT]
    assert [m.status for m in replies] == [DONE, DONE] and replies[1].figures.reused_tokens > 0
    ends = [transcript.index(m.text) + len(m.text) for m in replies]  # where each reply's text ended on the screen
    chunks = [[p for p in speaker.played if start < p[2] <= end] for start, end in zip([0, ends[0]], ends)]
    for reply, heard, end in zip(replies, chunks, ends):
        assert len(heard) > 1 and heard[0][2] < end  # the first chunk was heard while the text still came
        assert reply.speech.voice == "Chelsie" and reply.speech.sample_rate == heard[0][1] == 24_000
        np.testing.assert_array_equal(reply.speech.samples, np.concatenate([samples for samples, *_ in heard]))
    assert len(speaker.played) == sum(map(len, chunks))


def test_voice_shows_switches_and_turns_off_the_spoken_replies(omni):
    backend, voices = omni
    speaker = Loudspeaker(io.StringIO())
    lines = [*SPOKEN_SHORT, "/voice", "/voice Ethan", "/voice nosuch", "Hi", "/voice off", "Again", "/quit"]
    _, transcript, conversation = spoken_session(lines, backend, voices, speaker)
    said = [line for line in transcript.splitlines() if line.startswith(("Voice:", "error:"))]
    assert said == ["Voice: replies are not spoken. Voices: Chelsie, Ethan.",
                    "Voice: replies are spoken in Ethan. Voices: Chelsie, Ethan.",
                    "error: There is no voice 'nosuch'; choose one of: Chelsie, Ethan.",
                    "Voice: replies are not spoken. Voices: Chelsie, Ethan."]
    spoken, silent = (m for m in conversation.messages if m.role == ASSISTANT)
    assert spoken.speech.voice == "Ethan" and silent.speech is None
    assert sum(len(samples) for samples, *_ in speaker.played) == len(spoken.speech.samples)  # none for "Again"


@pytest.mark.parametrize("voices, speaker", [(None, Loudspeaker(io.StringIO())), ("omni", None)])
def test_voice_says_it_is_off_without_voices_or_speakers(omni, voices, speaker):
    _, transcript, _ = session(["/voice", "/voice Ethan", "/quit"], ScriptedBackend(),
                               voices=omni[1] if voices else None, speaker=speaker)
    off = "error: Spoken replies are off in this session: it has no voices or no speakers."
    assert transcript.splitlines()[2:] == ["> /voice", off, "> /voice Ethan", off, "> /quit"]


def test_ctrl_c_while_the_reply_is_still_heard_silences_it_and_the_chat_goes_on(omni):
    backend, voices = omni
    speaker = Loudspeaker(io.StringIO(), ctrl_c_in_wait=True)
    lines = [*SPOKEN_SHORT, "Hi", "Again", "/quit"]
    code, transcript, conversation = spoken_session(lines, backend, voices, speaker, voice="Ethan")
    first, second = (m for m in conversation.messages if m.role == ASSISTANT)
    assert code == 0 and speaker.n_stops == 1
    assert transcript.count("[silenced]") == 1
    assert transcript.index(first.text) < transcript.index("[silenced]\n> Again")
    assert (first.status, second.status) == (DONE, DONE) and second.speech is not None  # heard whole the next time


class ReadingStoppedOnceWritten(Loudspeaker):
    """A Loudspeaker that is a Ctrl-C at the first chunk after the reply's text is complete: what is still to be
    read is cut short, as a person cuts it, and the test need not wait for the tiny Kokoro to read it all."""

    def __init__(self, conversation: Conversation) -> None:
        super().__init__(io.StringIO())
        self.conversation = conversation

    def play(self, samples: np.ndarray, sample_rate: int) -> None:
        super().play(samples, sample_rate)
        if self.n_stops == 0 and self.conversation.messages[-1].role == ASSISTANT:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def reader(tiny_qwen2_audio, tiny_kokoro, tmp_path_factory) -> Iterator[tuple[LocalBackend, Voices]]:
    """The tiny Qwen2-Audio, able to write only spaces, full stops and "a" and never ending by itself: short sentences
    the tiny Kokoro reads quickly, as many as max_new_tokens says. Its voices are the tiny Kokoro's."""
    folder = shutil.copytree(tiny_qwen2_audio, tmp_path_factory.mktemp("reader") / "model")
    n_tokens = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    allowed = set(map(ord, " .a"))  # a byte token's id is its byte
    config = json.loads((folder / "generation_config.json").read_text())
    config["suppress_tokens"] = [i for i in range(n_tokens) if i not in allowed]
    (folder / "generation_config.json").write_text(json.dumps(config))
    kokoro, tagger = tiny_kokoro
    with one_intra_op_thread():
        backend = load_backend(str(folder), cpu_only=True)
        yield backend, Voices(CURATED_VOICES, lambda: KokoroSpeech(str(kokoro), tagger=str(tagger)))
    backend.close()


def test_a_reply_read_aloud_is_heard_before_its_text_has_ended(reader):
    backend, voices = reader
    conversation = Conversation()
    speaker = ReadingStoppedOnceWritten(conversation)
    lines = [f"/set max_new_tokens {LONG_REPLY_TOKENS}", "/set temperature 1", "/set top_p 1", "/set seed 1",
             "Tell me a story.", "/quit"]
    code, transcript, _ = spoken_session(lines, backend, voices, speaker, voice="af_heart", conversation=conversation)
    reply = conversation.messages[-1]
    assert code == 0 and reply.status == DONE and reply.figures.new_tokens == LONG_REPLY_TOKENS
    assert reply.text.count(". ") > 3  # sentences, read one by one
    first_heard = speaker.played[0][2]
    assert first_heard < transcript.index(reply.text) + len(reply.text)
    assert speaker.n_stops == 1 and "[silenced]" not in transcript  # cut short while the reply still came
    assert speaker.n_played_at_stop == len(speaker.played)  # nothing more was heard after the Ctrl-C
    assert reply.speech.voice == "af_heart" and len(reply.speech.samples) == sum(len(s) for s, *_ in speaker.played)


class BrokenSpeakers(Loudspeaker):
    """Speakers that cannot be opened, as when the sound device is gone."""

    def play(self, samples, sample_rate) -> None:
        raise ClipError("No speakers could be opened (no output device). Turn the voice off with /voice off.")


def test_speakers_that_fail_turn_the_voice_off_and_the_reply_goes_on(omni):
    backend, voices = omni
    speaker = BrokenSpeakers(io.StringIO())
    code, transcript, conversation = spoken_session(["/set max_new_tokens 40", "Hello?", "/voice", "/quit"], backend,
                                                    voices, speaker, voice="Chelsie")
    assert code == 0 and transcript.count("No speakers could be opened") == 1
    assert "Replies are not spoken now; /voice on speaks them again." in transcript
    assert "Voice: replies are not spoken." in transcript
    assert conversation.messages[-1].status == DONE  # the text was written to its end
