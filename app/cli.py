"""The terminal client: type, attach files or talk into the microphone; replies stream as they are generated."""

import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import soundfile

from app.cli_text import (
    BANNER,
    EMPTY_REPLY,
    EXPORT_SUFFIXES,
    added,
    call_text,
    describe_clip,
    duration,
    ended_without_text,
    help_text,
    model_line,
    parse_number,
    plural,
    split_args,
    summary,
    tool_result,
)
from app.recorder import Recorder, Speaker, play
from chat import saving
from chat.audio import SAMPLE_RATE
from chat.backend import Backend
from chat.clip import Clip
from chat.conversation import STOPPED, USER, Conversation
from chat.errors import ChatError, ClipError, StoreError
from chat.settings import SETTING_NAMES, GenerationSettings, with_setting
from chat.speech import SpeechChunk, Voices
from chat.store import Store
from chat.timestamps import DEFAULT_WORD_MODEL
from chat.tools import ToolBox, toolbox_for
from chat.turn import ReasoningChunk, TextChunk, ToolCallFinished, ToolCallStarted, Turn, drain, pump

try:
    import readline  # noqa: F401  (importing it gives input() line editing and history)
except ImportError:  # Windows
    pass

PROMPT = "> "
RECORDING_PROMPT = "recording (Enter stops, Ctrl-C discards) "
EXIT_INTERRUPTED = 130  # the shell's code for "ended by Ctrl-C"
TOOL_MARK = "[tool]"  # before a tool call the reply makes
THINKING_MARK = "[thinking]"  # before a reply's thinking, which is dimmed where the terminal shows colour
DIM, UNDIM = "\033[2m", "\033[22m"  # ANSI faint on, off: each piece is undimmed at once, so Ctrl-C never leaves it on
TERMINAL_SESSION = "terminal"  # the store's session id of the terminal's conversations


class Leave(Exception):
    """Ends the chat with an exit code."""

    def __init__(self, code: int = 0) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class Terminal:
    """One chat: reads lines, runs commands and streams replies; the conversation holds all chat state."""

    backend: Backend
    settings: GenerationSettings
    conversation: Conversation
    tools: ToolBox | None  # the speech-editing tools offered to the model, or None
    recorder: Recorder | None
    player: Callable[[Clip], None]
    stdin: TextIO
    stdout: TextIO
    store: Store | None = None  # where every change is kept and /list, /open find conversations; None: nowhere
    at_line_start: bool = True  # whether the cursor is at the start of a line
    show_figures: bool = False  # print each reply's figures after it (on a terminal, not into a pipe)
    colour: bool = False  # whether stdout shows ANSI styles (a terminal that has not asked for none)
    thinking: bool = False  # whether the reply's thinking is being printed now
    voices: Voices | None = None  # those replies can be spoken in; None: text only
    voice: str | None = None  # the voice replies are spoken in now; None: off
    speaker: Speaker | None = None  # plays spoken replies

    def __post_init__(self) -> None:
        self.commands: dict[str, Callable[[str], None]] = {
            "/add": self.add, "/rec": self.record, "/send": self.send, "/clips": self.list_clips,
            "/play": self.play, "/voice": self.set_voice, "/export": self.export, "/save": self.save, "/load": self.load,
            "/undo": self.undo, "/clear": self.clear, "/system": self.system, "/set": self.set, "/help": self.help,
            "/quit": self.quit,
            "/list": self.list_conversations, "/open": self.open_conversation, "/new": self.new_conversation,
        }

    def run(self) -> int:
        """Chat until the user leaves; returns the exit code."""
        self.say(model_line(self.backend))
        self.say(BANNER)
        if self.voice is not None:
            self.say(f"Replies are spoken in {self.voice}; /voice off stops that.")
        while True:
            try:
                line = self.read(self.prompt())
            except (EOFError, KeyboardInterrupt):
                self.end_line()
                return 0
            try:
                self.handle(line.strip())
                self.keep()
            except Leave as e:
                return e.code
            except ChatError as e:
                self.say(f"error: {e}")
            except KeyboardInterrupt:
                self.say("[interrupted]")

    def handle(self, line: str) -> None:
        """Run one line: a command, a message, or an empty line (send the waiting turn, else record)."""
        if not line and self.conversation.awaiting_reply():
            self.send("")
        elif not line:
            self.record("")
        elif line.startswith("/"):
            name, _, args = line.partition(" ")
            if name not in self.commands:
                raise ChatError(f"Unknown command {name}: /help lists the commands.")
            self.commands[name](args.strip())
        else:
            self.send(line)

    def prompt(self) -> str:
        """The input prompt, naming the clips that wait in the open user turn."""
        last = self.conversation.messages[-1] if self.conversation.messages else None
        if last is None or last.role != USER or not last.clips:
            return PROMPT
        waiting = ", ".join(f"Audio {self.conversation.number(clip)}" for clip in last.clips)
        return f"[{waiting}] {PROMPT}"

    # replies

    def send(self, text: str) -> None:
        """Add text to the open user turn and stream the reply; a refused turn leaves the conversation as it was."""
        with self.conversation.unchanged_on_error():
            if text:
                self.conversation.add_user(text)
            voice = self.voices.get(self.voice) if self.voice is not None else None  # loads its model the first time
            turn = Turn(self.backend, self.conversation, self.settings, tools=self.tools, voice=voice)
        self.stream(turn)

    def stream(self, turn: Turn) -> None:
        """Print the turn's events as they come; Ctrl-C stops the reply, a second Ctrl-C leaves."""
        events: queue.Queue = queue.Queue()
        worker = threading.Thread(target=pump, args=(turn, events), daemon=True)
        try:
            worker.start()
            self.show(events)
        except KeyboardInterrupt:
            try:  # a second Ctrl-C, even one right after the cancel, leaves
                turn.cancel()
                self.silence()
                self.show(events)  # what was generated before the model noticed
            except KeyboardInterrupt:
                self.say("[left before the reply had stopped]")
                raise Leave(EXIT_INTERRUPTED) from None
        self.thinking = False
        if turn.response.message is not None and turn.response.message.status == STOPPED:
            self.write("[stopped]" if self.at_line_start or turn.response.text[-1:].isspace() else " [stopped]")
        self.end_line()
        message = turn.response.message
        if message is not None and ended_without_text(message):
            self.say(f"[{EMPTY_REPLY}]")
        if turn.response.history_note:
            self.say(f"[{turn.response.history_note}]")
        if self.show_figures and message is not None and message.figures is not None:
            self.say(f"[{message.figures.summary()}]")
        if message is not None and message.speech is not None:
            self.finish_speaking()

    def hear(self, chunk: SpeechChunk) -> None:
        """Play a piece of the spoken reply; speakers that fail turn the voice off, and the text goes on."""
        if self.voice is None:  # the speakers failed earlier in this reply
            return
        try:
            self.speaker.play(chunk.samples, chunk.sample_rate)
        except ClipError as e:
            self.voice = None
            self.say(f"error: {e} Replies are not spoken now; /voice on speaks them again.")

    def finish_speaking(self) -> None:
        """Wait while the spoken reply plays to its end; Ctrl-C silences it."""
        try:
            self.speaker.wait()
        except KeyboardInterrupt:
            self.silence()
            self.say("[silenced]")

    def silence(self) -> None:
        """Stop the spoken reply at once."""
        if self.speaker is not None:
            self.speaker.stop()

    def show(self, events: queue.Queue) -> None:
        """Print the worker's events until it ends; raise the error the turn ended with, if any."""
        for event in (event for batch in drain(events) for event in batch):
            if isinstance(event, ReasoningChunk):
                if not self.thinking:
                    self.end_line()
                    self.write(f"{THINKING_MARK} ")
                    self.thinking = True
                self.write(event.text, dim=True)
                continue
            if self.thinking:  # the thinking is over: what follows starts on a line of its own
                self.end_line()
                self.thinking = False
            if isinstance(event, TextChunk):
                self.write(event.text)
            elif isinstance(event, SpeechChunk):
                self.hear(event)
            elif isinstance(event, ToolCallStarted):
                self.end_line()
                self.write(f"{TOOL_MARK} {call_text(event)}")
            elif isinstance(event, ToolCallFinished):
                self.write(tool_result(event.message, self.conversation) + "\n")

    # clips

    def record(self, args: str) -> None:
        """Record until Enter; the recording joins the open user turn as the next Audio N."""
        if self.recorder is None:
            raise ClipError("Recording is off in this session: attach audio files with /add PATH.")
        self.recorder.start()
        try:
            self.read(RECORDING_PROMPT)
        except (EOFError, KeyboardInterrupt):
            with contextlib.suppress(ChatError):
                self.recorder.stop()
            self.say("Recording discarded.")
            return
        samples, sample_rate = self.recorder.stop()
        self.attach(Clip.from_array(samples, sample_rate, name="recording"))

    def add(self, args: str) -> None:
        """Attach files to the open user turn; a file that cannot be read is reported and skipped."""
        for path in split_args(args, "/add PATH [PATH...]", n_args=None):
            try:
                self.attach(Clip.from_file(Path(path).expanduser()))
            except ChatError as e:
                self.say(f"error: {e}")

    def attach(self, clip: Clip) -> None:
        """Put a clip in the open user turn and announce its Audio N."""
        self.conversation.add_user("", [clip])
        for line in added(self.conversation.number(clip), clip, self.backend):
            self.say(line)

    def list_clips(self, args: str) -> None:
        """Print every clip of the conversation."""
        clips = self.conversation.clips()
        if not clips:
            self.say("No clips yet: /add a file, or press Enter on an empty line to record.")
        for n, clip in enumerate(clips, start=1):
            self.say(describe_clip(n, clip, self.backend))

    def play(self, args: str) -> None:
        """Play Audio N; Ctrl-C stops the playback, not the chat."""
        (number,) = split_args(args, "/play N", n_args=1)
        n = parse_number(number, "/play N")
        clip = self.conversation.clip(n)
        self.say(f"Playing Audio {n} ({duration(clip.duration_s)}); Ctrl-C stops.")
        try:
            self.player(clip)
        except KeyboardInterrupt:
            self.say("[stopped]")

    def set_voice(self, args: str) -> None:
        """Speak replies in a voice (`/voice Ethan`, `/voice on`), stop speaking them (`/voice off`), or show the
        voice and the voices there are."""
        if self.voices is None or self.speaker is None:
            raise ChatError("Spoken replies are off in this session: it has no voices or no speakers.")
        if args == "off":
            self.voice = None
        elif args:
            name = self.voices.default if args == "on" else args
            self.voices.get(name)  # an unknown name is refused here; the voice's model loads now, not mid-reply
            self.voice = name
        state = f"replies are spoken in {self.voice}" if self.voice else "replies are not spoken"
        self.say(f"Voice: {state}. Voices: {', '.join(self.voices.names)}.")

    def export(self, args: str) -> None:
        """Write Audio N to an audio file."""
        number, file = split_args(args, "/export N FILE", n_args=2)
        n, path = parse_number(number, "/export N FILE"), Path(file).expanduser()
        clip = self.conversation.clip(n)
        if path.suffix.lower() not in EXPORT_SUFFIXES:
            raise ClipError(f"Cannot export to {path.name}: name a file ending in {', '.join(EXPORT_SUFFIXES)}.")
        try:
            soundfile.write(path, clip.samples, SAMPLE_RATE)
        except (OSError, soundfile.LibsndfileError) as e:
            raise ClipError(f"Cannot write {path}: {e}. Check that the folder exists and is writable.") from e
        self.say(f"Saved Audio {n} to {path}")

    # the conversation

    def save(self, args: str) -> None:
        """Save the conversation with its clips to a folder."""
        (folder,) = split_args(args, "/save FOLDER", n_args=1)
        try:
            saving.save(self.conversation, Path(folder).expanduser())
        except OSError as e:
            raise StoreError(f"Cannot save to {folder}: {e}. Choose a folder you can write to.") from e
        self.say(f"Saved to {folder}: {summary(self.conversation)}.")

    def load(self, args: str) -> None:
        """Replace this conversation with a saved one."""
        (folder,) = split_args(args, "/load FOLDER", n_args=1)
        self.conversation = saving.load(Path(folder).expanduser())
        self.say(f"Loaded {folder}: {summary(self.conversation)}.")

    def list_conversations(self, args: str) -> None:
        """Print the stored conversations of this terminal, newest first."""
        for n, saved in enumerate(self._history(), start=1):
            current = " (open)" if saved.id == self.conversation.id else ""
            self.say(f"{n}. {saved.title} · {saved.when} UTC{current}")

    def open_conversation(self, args: str) -> None:
        """Switch to stored conversation N of /list."""
        (number,) = split_args(args, "/open N", n_args=1)
        history, n = self._history(), parse_number(number, "/open N")
        if not 1 <= n <= len(history):
            raise ChatError(f"There is no conversation {n}: /list shows {len(history)}.")
        self.conversation = self.store.open(history[n - 1].id, TERMINAL_SESSION)
        self.say(f"Opened {history[n - 1].title}: {summary(self.conversation)}.")

    def new_conversation(self, args: str) -> None:
        """Start an empty conversation; this one stays in /list."""
        self.conversation = Conversation(system_prompt=self.conversation.system_prompt)
        self.say("New conversation.")

    def keep(self) -> None:
        """Store the conversation as it now is, if it holds anything (a failure is said, and the chat goes on)."""
        if self.store is not None and self.conversation.messages:
            self.store.save(TERMINAL_SESSION, self.conversation)

    def _history(self) -> list:
        if self.store is None:
            raise ChatError("Conversations are not kept in this session: /save and /load folders instead.")
        self.keep()
        return self.store.history(TERMINAL_SESSION)

    def undo(self, args: str) -> None:
        """Remove the last exchange."""
        removed = self.conversation.undo()
        self.say(f"Removed the last exchange ({plural(len(removed), 'message')}).")

    def clear(self, args: str) -> None:
        """Remove every message."""
        self.conversation.clear()
        self.say("Cleared the conversation; the system prompt stays.")

    def system(self, args: str) -> None:
        """Show the system prompt, or set it."""
        if args:
            self.conversation.system_prompt = args
            self.say("System prompt set.")
        else:
            self.say(f"System prompt: {self.conversation.system_prompt}")

    def set(self, args: str) -> None:
        """Show the generation settings, or set one (`/set temperature 0.2`)."""
        name, _, value = args.partition(" ")
        if name:
            self.settings = with_setting(self.settings, name, value.strip())
        values = [(setting, getattr(self.settings, setting)) for setting in SETTING_NAMES]
        shown = ", ".join(f"{setting} {'random' if v is None else v}" for setting, v in values)
        self.say(f"Settings: {shown}.")

    def help(self, args: str) -> None:
        """Print the commands."""
        self.say(help_text(self.backend))

    def quit(self, args: str) -> None:
        """Leave the chat."""
        raise Leave(0)

    # the terminal

    def read(self, prompt: str) -> str:
        """One line of input; raises EOFError at the end of input (Ctrl-D)."""
        self.at_line_start = False
        if self.stdin is sys.stdin and self.stdout is sys.stdout and sys.stdin.isatty():
            line = input(prompt)  # readline's line editing and history
        else:
            self.write(prompt)
            line = self.stdin.readline()
            if not line:
                raise EOFError
            line = line.rstrip("\n")
            self.write(line + "\n")  # echo, so the log of a piped session reads like the screen
        self.at_line_start = True
        return line

    def write(self, text: str, dim: bool = False) -> None:
        """Print text as it is (a streamed chunk); dim: faint, where the terminal shows colour."""
        if text:
            self.stdout.write(f"{DIM}{text}{UNDIM}" if dim and self.colour else text)
            self.stdout.flush()
            self.at_line_start = text.endswith("\n")

    def end_line(self) -> None:
        """Finish the current line, if anything was printed on it."""
        if not self.at_line_start:
            self.write("\n")

    def say(self, text: str) -> None:
        """Print text on lines of its own."""
        self.end_line()
        self.write(text + "\n")


def shows_colour(stdout: TextIO) -> bool:
    """Whether stdout is a terminal that shows ANSI styles: not a pipe, not TERM=dumb, no NO_COLOR (no-color.org)."""
    return stdout.isatty() and os.environ.get("TERM") != "dumb" and not os.environ.get("NO_COLOR")


def run_cli(
    backend: Backend,
    settings: GenerationSettings | None = None,
    system_prompt: str | None = None,
    recorder: Recorder | None = None,
    tools: bool | None = None,
    *,
    word_model: str = DEFAULT_WORD_MODEL,
    conversation: Conversation | None = None,
    player: Callable[[Clip], None] = play,
    voices: Voices | None = None,
    voice: str | None = None,
    speaker: Speaker | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    store: Store | None = None,
) -> int:
    """Chat with backend in the terminal until the user leaves; returns the process exit code.

    tools offers the speech-editing tools (None: as the model family does by default) to a backend that
    supports them, finding words with word_model (a Whisper hub id or folder). recorder None turns
    recording off; conversation continues a given one; store keeps every change and serves /list and
    /open (None: nothing is kept); voices are those replies can be spoken in through speaker, voice the one on
    at the start (None: off); player, stdin and stdout are for tests.
    """
    conversation = Conversation() if conversation is None else conversation
    if system_prompt:
        conversation.system_prompt = system_prompt
    toolbox = toolbox_for(backend, tools, word_model)
    stdout = stdout or sys.stdout
    terminal = Terminal(backend, settings or backend.default_settings, conversation, toolbox, recorder, player,
                        stdin or sys.stdin, stdout, store=store, show_figures=stdout.isatty(),
                        colour=shows_colour(stdout), voices=voices, speaker=speaker)
    if voice is not None:
        voices.get(voice)  # refused here if it is not one of them; its model loads before the first reply
        terminal.voice = voice
    return terminal.run()
