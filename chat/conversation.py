"""Conversations: ordered messages whose clips are numbered Audio 1, Audio 2, ... for good."""

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from chat.clip import Clip
from chat.errors import ConversationError
from chat.settings import GenerationSettings
from chat.speech import Speech

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
USER, ASSISTANT, TOOL = "user", "assistant", "tool"
ROLES = (USER, ASSISTANT, TOOL)
DONE, STOPPED, FAILED = "done", "stopped", "failed"  # how an assistant reply ended
STATUSES = (DONE, STOPPED, FAILED)


@dataclass(frozen=True)
class ToolUse:
    """A tool call a reply made."""

    name: str
    arguments: dict


@dataclass(frozen=True)
class Figures:
    """How a reply was made and what it cost, kept with it so every exchange is on record."""

    model: str  # the checkpoint or served model
    family: str
    quantization: str  # "4bit", "8bit", "none", or "server" for a model behind an API
    settings: GenerationSettings
    prompt_tokens: int
    reused_tokens: int  # of the prompt, taken from the previous reply's attention cache
    new_tokens: int
    time_to_first_token_s: float | None
    tokens_per_s: float | None
    peak_gpu_memory_mb: float | None  # None where there is no GPU
    time_to_first_audio_s: float | None = None  # a reply its backend spoke: when its first audio was made

    def summary(self) -> str:
        """`Qwen2-Audio · 4bit · 812 prompt tokens (640 cached) · first token 0.21 s · 38.2 tokens/s · 5.2 GB GPU`,
        with `first audio 0.45 s` after the first token where the backend spoke the reply."""
        parts = [self.family, self.quantization, f"{self.prompt_tokens} prompt tokens"
                 + (f" ({self.reused_tokens} cached)" if self.reused_tokens else ""), f"{self.new_tokens} new"]
        if self.time_to_first_token_s is not None:
            parts.append(f"first token {self.time_to_first_token_s:.2f} s")
        if self.time_to_first_audio_s is not None:
            parts.append(f"first audio {self.time_to_first_audio_s:.2f} s")
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tokens/s")
        if self.peak_gpu_memory_mb is not None:
            parts.append(f"{self.peak_gpu_memory_mb / 1024:.1f} GB GPU")
        return " · ".join(parts)


@dataclass(frozen=True)
class Message:
    """One message. Clips come before the text when the model reads a user turn.

    text is exactly what the model reads; for a reply, what it wrote, tool calls included. What a
    person is shown of a reply is `shown`, recorded once when the reply ends, so nothing re-parses text.
    """

    role: str
    text: str = ""
    clips: tuple[Clip, ...] = ()
    status: str = DONE
    note: str = ""  # why a reply is partial or failed
    shown: str | None = None  # a reply's text meant for the person: calls taken out, timestamps readable
    reasoning: str = ""  # a reply's thinking (between <think> and </think>), shown collapsed, never as the answer
    calls: tuple[ToolUse, ...] = ()  # the tool calls a reply made
    tool: str = ""  # a tool message: the tool that produced it
    failed: bool = False  # a tool message: the call was refused or failed
    figures: Figures | None = None  # a reply's: how it was made and what it cost
    speech: Speech | None = None  # a reply's spoken audio, when the voice was on; never heard by the model

    @property
    def display_text(self) -> str:
        """What a person is shown of the message."""
        return self.text if self.shown is None else self.shown

    @property
    def empty(self) -> bool:
        """A reply the model ended at once: done, with no text and no tool call."""
        return self.role == ASSISTANT and self.status == DONE and not self.text.strip() and not self.calls

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {self.role!r}")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")


@dataclass
class Conversation:
    """The source of truth for one chat.

    Invariant: clip numbers follow the order in which clips entered the conversation, across
    all turns, and adding messages never renumbers a clip. Every failed operation leaves the
    conversation exactly as it was.
    """

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    messages: list[Message] = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @contextmanager
    def unchanged_on_error(self) -> Iterator["Conversation"]:
        """Undo every change made inside the block if it raises, so a failed step loses nothing."""
        messages, system_prompt = list(self.messages), self.system_prompt
        try:
            yield self
        except BaseException:
            self.messages[:], self.system_prompt = messages, system_prompt
            raise

    def clips(self) -> list[Clip]:
        """Every clip in numbering order: clips()[n - 1] is Audio n."""
        return [clip for message in self.messages for clip in message.clips]

    def clip(self, number: int) -> Clip:
        """The clip labelled Audio `number`."""
        clips = self.clips()
        if not 1 <= number <= len(clips):
            valid = f"Audio 1 to Audio {len(clips)}" if clips else "none yet"
            raise ConversationError(f"There is no Audio {number} in this conversation (clips: {valid}).")
        return clips[number - 1]

    def number(self, clip: Clip) -> int:
        """The N of the label Audio N of a clip in this conversation."""
        for n, known in enumerate(self.clips(), start=1):
            if known.id == clip.id:
                return n
        raise ConversationError(f"{clip.name} is not part of this conversation.")

    def add_user(self, text: str = "", clips: tuple[Clip, ...] | list[Clip] = ()) -> Message:
        """Add text and clips to the open user turn, or start one; returns the turn."""
        text, clips = text.strip(), tuple(clips)
        if not text and not clips:
            raise ConversationError("Type a message or add a clip first.")
        self._check_new_clips(clips)
        last = self.messages[-1] if self.messages else None
        if last is not None and last.role == USER:
            merged = replace(last, text="\n".join(t for t in (last.text, text) if t), clips=last.clips + clips)
            self.messages[-1] = merged
            return merged
        message = Message(USER, text, clips)
        self.messages.append(message)
        return message

    def add_assistant(self, text: str, status: str = DONE, note: str = "", figures: Figures | None = None,
                      shown: str | None = None, reasoning: str = "") -> Message:
        """Record a reply (or the part of it that was generated before a stop or a failure)."""
        if not self.messages:
            raise ConversationError("A reply needs a question: the conversation is empty.")
        message = Message(ASSISTANT, text, status=status, note=note, figures=figures, shown=shown, reasoning=reasoning)
        self.messages.append(message)
        return message

    def add_tool(self, tool_name: str, text: str, clips: tuple[Clip, ...] = (), failed: bool = False) -> Message:
        """Record a tool's result; a clip it made gets the next Audio number. A reply that made several calls is
        followed by their results in order."""
        if not self.messages or self.messages[-1].role not in (ASSISTANT, TOOL):
            raise ConversationError("A tool result must follow the reply that called the tool.")
        self._check_new_clips(tuple(clips))
        message = Message(TOOL, text, tuple(clips), tool=tool_name, failed=failed)
        self.messages.append(message)
        return message

    def describe_reply(self, reply: Message, shown: str, calls: tuple[ToolUse, ...] = (), reasoning: str = ""
                       ) -> Message:
        """Record what a person is shown of a recorded reply, the calls it made and its thinking; returns the new
        message."""
        return self.revise_reply(reply, shown=shown, calls=calls, reasoning=reasoning)

    def revise_reply(self, reply: Message, **changes) -> Message:
        """Replace a recorded reply by a copy with some fields changed (Message's); returns the new message."""
        index = next(i for i in range(len(self.messages) - 1, -1, -1) if self.messages[i] is reply)
        self.messages[index] = replace(reply, **changes)
        return self.messages[index]

    def awaiting_reply(self) -> bool:
        """True when the last message is a user turn or a tool result the model has not answered."""
        return bool(self.messages) and self.messages[-1].role in (USER, TOOL)

    def drop_reply(self) -> Message:
        """Remove everything after the last user turn (to regenerate it); returns that turn."""
        index = self._last_user_index()
        del self.messages[index + 1:]
        return self.messages[index]

    def undo(self) -> list[Message]:
        """Remove the last exchange (the last user turn and all after it); returns what was removed."""
        index = self._last_user_index()
        removed = self.messages[index:]
        del self.messages[index:]
        return removed

    def clear(self) -> None:
        """Remove every message; the system prompt stays."""
        self.messages.clear()

    def turns(self) -> list[list[Message]]:
        """Messages grouped into exchanges, each starting at a user turn."""
        turns: list[list[Message]] = []
        for message in self.messages:
            if message.role == USER or not turns:
                turns.append([])
            turns[-1].append(message)
        return turns

    def _last_user_index(self) -> int:
        for index in range(len(self.messages) - 1, -1, -1):
            if self.messages[index].role == USER:
                return index
        raise ConversationError("Nothing to undo: the conversation has no messages yet.")

    def _check_new_clips(self, clips: tuple[Clip, ...]) -> None:
        known = {clip.id: n for n, clip in enumerate(self.clips(), start=1)}
        seen: set[str] = set()
        for clip in clips:
            if not isinstance(clip, Clip):
                raise ConversationError(f"Expected a Clip, got {type(clip).__name__}.")
            if clip.id in known:
                raise ConversationError(
                    f"{clip.name} is already in this conversation as Audio {known[clip.id]}: refer to it by that name."
                )
            if clip.id in seen:
                raise ConversationError(f"{clip.name} was added twice in one turn.")
            seen.add(clip.id)
