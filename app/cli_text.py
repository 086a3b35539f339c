"""What the terminal client prints, and how it reads command arguments: pure functions, no I/O."""

import shlex

from chat.backend import Backend
from chat.clip import Clip
from chat.conversation import DONE, Conversation, Message, ToolUse
from chat.errors import ChatError
from chat.tools import tools_note

EXPORT_SUFFIXES = (".wav", ".flac", ".ogg")
TOOL_RESULT_CHARS = 100  # a tool's text result is shown on one line, cut to this length
EMPTY_REPLY = "The model ended its reply without text."  # said of a reply that has neither text nor a tool call

BANNER = "Type a message, /add FILE, or press Enter on an empty line to talk. /help lists commands; Ctrl-D leaves."
HELP = f"""\
Type a message and press Enter to send it; the reply streams in. Ctrl-C stops a reply (it is kept, marked [stopped]).

Talking: press Enter on an empty line to record from the microphone, and Enter again to stop.
The recording waits in your turn as the next Audio N (the prompt shows it). Then either press
Enter once more to send it as a spoken question, or type a question about it.

  /add PATH [PATH...]  attach audio files (wav, mp3, flac, ogg, m4a, webm, ...) to your turn
  /rec                 record from the microphone (the same as Enter on an empty line)
  /send                send your turn as it is (e.g. clips without text)
  /clips               list the clips: Audio N, name, length, source, note
  /play N              play Audio N (Ctrl-C stops)
  /voice [NAME|on|off] speak replies aloud as they are written (Ctrl-C stops), in voice NAME; without an
                       argument, show the voice and the voices there are
  /export N FILE       write Audio N to a {", ".join(EXPORT_SUFFIXES)} file
  /save FOLDER         save the conversation and its clips
  /load FOLDER         open a saved conversation (replaces this one)
  /list                list the conversations kept in the data folder, newest first
  /open N              open conversation N of /list
  /new                 start a new conversation (this one stays in /list)
  /undo                remove the last exchange
  /clear               remove every message (the system prompt stays)
  /system [TEXT]       show the system prompt, or set it
  /set [NAME VALUE]    show the generation settings, or set one: max_new_tokens, temperature (0 = greedy),
                       top_p, top_k (0 = off), repetition_penalty, seed (a whole number; empty or random:
                       a new one each time)
  /help                show this help
  /quit                leave (so do Ctrl-D, and Ctrl-C at the prompt)"""


def model_line(backend: Backend) -> str:
    """`Model: /models/Qwen-Audio-Chat (Qwen-Audio-Chat)`, and why the editing tools are off where they must be."""
    return " ".join(filter(None, [f"Model: {backend.name} ({backend.family.title})", tools_note(backend)]))


def help_text(backend: Backend) -> str:
    """HELP, with how long clips are sent to this model."""
    window = f"{backend.family.window_s:g} s"
    return f"{HELP}\n\nClips longer than {window} are sent as several parts of up to {window} each."


def added(n: int, clip: Clip, backend: Backend) -> list[str]:
    """The lines that announce a new clip: `Audio 3: recording, 4.2 s`, plus how a long one is sent."""
    lines = [f"Audio {n}: {clip.name}, {duration(clip.duration_s)}"]
    n_parts = backend.family.n_parts(clip)
    if n_parts > 1:
        window = f"{backend.family.window_s:g} s"
        lines.append(f"Audio {n} ({duration(clip.duration_s)}) will be sent as {n_parts} parts of up to {window}")
    return lines


def describe_clip(n: int, clip: Clip, backend: Backend) -> str:
    """`Audio 2: question.wav, 4.2 s, recorded, 2 parts (note)`."""
    if clip.missing:
        return f"Audio {n}: {clip.name}, missing (its audio file is gone; the model no longer hears it)"
    line = ", ".join([f"Audio {n}: {clip.name}", duration(clip.duration_s), clip.source])
    n_parts = backend.family.n_parts(clip)
    line += f", {n_parts} parts" if n_parts > 1 else ""
    return f"{line} ({clip.note})" if clip.note else line


def call_text(call: ToolUse) -> str:
    """`name(key=value, ...)` with the arguments as the model gave them; each client marks it as a call its own way."""
    arguments = ", ".join(f"{key}={value!r}" for key, value in call.arguments.items())
    return f"{call.name}({arguments})"


def tool_result(message: Message, conversation: Conversation) -> str:
    """`→ Audio 4 (2.1 s)` for the clips a tool made, else `→ ` and the start of its text on one line."""
    if message.clips:
        made = ", ".join(f"Audio {conversation.number(c)} ({duration(c.duration_s)})" for c in message.clips)
        return f" → {made}"
    text = " ".join(message.text.split())
    return " → " + (text if len(text) <= TOOL_RESULT_CHARS else text[: TOOL_RESULT_CHARS - 1] + "…")


def ended_without_text(message: Message) -> bool:
    """A reply the model ended without text for the person and without a call: at once, or right after its
    thinking."""
    no_answer = message.status == DONE and not message.calls and not message.display_text.strip()
    return message.empty or bool(message.reasoning and no_answer)


def duration(seconds: float) -> str:
    """`4.2 s` under a minute, `1:10` from a minute on."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


def summary(conversation: Conversation) -> str:
    """`4 messages, 2 clips`."""
    return f"{plural(len(conversation.messages), 'message')}, {plural(len(conversation.clips()), 'clip')}"


def plural(n: int, word: str) -> str:
    """`1 clip`, `2 clips`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def split_args(args: str, usage: str, n_args: int | None) -> list[str]:
    """Shell-style words (quotes keep spaces in paths): exactly n_args of them, or at least one if None."""
    try:
        words = shlex.split(args)
    except ValueError as e:
        raise ChatError(f"Cannot read the arguments ({e}). Usage: {usage}") from e
    if (n_args is None and not words) or (n_args is not None and len(words) != n_args):
        raise ChatError(f"Usage: {usage}")
    return words


def parse_number(text: str, usage: str) -> int:
    """The N of `Audio N`."""
    if not text.isdigit():
        raise ChatError(f"{text!r} is not a clip number. Usage: {usage} (/clips lists the numbers)")
    return int(text)
