"""Prompts: exactly what a model sees, and the base of each family's renderer (chat.families).

A family renders a conversation once, into segments: text its tokenizer encodes on its own, control tokens, and
audio parts. The token ids come from the segments (LocalModel.token_ids), and so does the prompt's text, which a
person reads and the remote backend's length estimate counts.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from chat.audio import split_windows
from chat.clip import Clip
from chat.conversation import DEFAULT_SYSTEM_PROMPT, USER, Conversation, Message
from chat.errors import PromptTooLongError

CHARS_PER_TOKEN_ESTIMATE = 3  # used only when the tokenizer is out of reach; errs on the long side
ZERO_WIDTH_SPACE = "\u200b"


@dataclass(frozen=True)
class AudioPart:
    """One encoder window of a clip, in the order the prompt refers to it."""

    clip: Clip
    number: int  # the clip's Audio N
    index: int  # 0-based part of the clip
    n_parts: int  # how many parts the clip is sent as
    samples: np.ndarray  # (n_samples,) float32 at SAMPLE_RATE, at most one window
    n_audio_tokens: int  # what the part expands to in the model's input (the family's rule)

    @property
    def key(self) -> tuple[str, int]:
        """(clip id, part index): the same audio wherever and whenever a prompt holds it."""
        return self.clip.id, self.index

    @property
    def label(self) -> str:
        """`Audio 3`, or `Audio 3 (part 2 of 3)` for a clip longer than one window."""
        if self.n_parts == 1:
            return f"Audio {self.number}"
        return f"Audio {self.number} (part {self.index + 1} of {self.n_parts})"


@dataclass(frozen=True)
class Text:
    """Text the family's tokenizer encodes on its own, as the model's original code encoded it apart."""

    text: str
    shown: str | None = None  # how it reads in the prompt's text, where that differs (SALMONN's leading `▁`)


@dataclass(frozen=True)
class Control:
    """One control token (`<|im_start|>`, `</s>`), by its spelling in the model's vocabulary."""

    token: str


@dataclass(frozen=True)
class AudioSlot:
    """Where an audio part's tokens go: part.n_audio_tokens of the family's audio token."""

    part: AudioPart
    token: str  # the audio token's spelling, for the prompt's text (one stands for the part's run)


Segment = Text | Control | AudioSlot


@dataclass(frozen=True)
class Prompt:
    """Exactly what the model sees, as segments, and the conversation they were rendered from."""

    segments: tuple[Segment, ...]
    messages: tuple[Message, ...]  # the messages rendered, after history was dropped
    n_dropped_turns: int = 0  # oldest exchanges left out so the prompt fits the context
    system: str = ""  # the system prompt rendered
    tools: tuple[dict, ...] = ()  # tool specs (OpenAI function format) for a family whose template takes them

    @property
    def text(self) -> str:
        """The prompt as text, one audio token standing for each part's run of them."""
        return "".join(_shown(segment) for segment in self.segments)

    @property
    def audio_parts(self) -> tuple[AudioPart, ...]:
        """The audio parts in the order the prompt refers to them."""
        return tuple(segment.part for segment in self.segments if isinstance(segment, AudioSlot))

    @property
    def clip_parts(self) -> dict[str, list[AudioPart]]:
        """Each clip's parts, by clip id."""
        parts: dict[str, list[AudioPart]] = {}
        for part in self.audio_parts:
            parts.setdefault(part.clip.id, []).append(part)
        return parts


def _shown(segment: Segment) -> str:
    if isinstance(segment, Text):
        return segment.text if segment.shown is None else segment.shown
    return segment.token


class Segments:
    """A prompt being written: text joins the text before it unless it is encoded apart."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.apart = False  # whether the next text starts a piece of its own

    def text(self, text: str, shown: str | None = None) -> None:
        """Add text, encoded with the text right before it unless break_text() came between them."""
        if not text:
            return
        last = self.segments[-1] if self.segments else None
        if isinstance(last, Text) and not self.apart and shown is None and last.shown is None:
            self.segments[-1] = Text(last.text + text)
        else:
            self.segments.append(Text(text, shown))
        self.apart = False

    def break_text(self) -> None:
        """Encode the next text apart from the text before it, as the model's original code did."""
        self.apart = True

    def control(self, token: str) -> None:
        """Add a control token."""
        self.segments.append(Control(token))

    def audio(self, part: AudioPart, token: str) -> None:
        """Add an audio part, spelled as token in the prompt's text."""
        self.segments.append(AudioSlot(part, token))

    def audio_line(self, part: AudioPart, start: str, token: str, end: str) -> None:
        """A labelled line, `Audio 2: ` and the part between its start and end control tokens (the Qwen layouts)."""
        self.text(f"{part.label}: ")
        self.control(start)
        self.audio(part, token)
        self.control(end)
        self.text("\n")


class PromptRenderer:
    """Base of one model family's chat format; the family supplies the audio window and token rule."""

    def __init__(self, family) -> None:
        self.family = family  # a chat.families.Family
        tokens = "|".join(re.escape(token) for token in family.control_tokens) or "(?!)"
        self.control_token = re.compile(tokens)

    def render(
        self,
        conversation: Conversation,
        max_tokens: int | None = None,
        count_tokens: Callable[[Prompt], int] | None = None,
        tools: tuple[dict, ...] = (),
    ) -> Prompt:
        """Render the conversation for a reply, dropping the oldest turns while it exceeds max_tokens.

        count_tokens gives a prompt's length in tokens (the backend's count: exact where it holds the tokenizer);
        without one it is estimated from its text.
        tools are specs for a family that writes them in its own template (a native tool style, chat.toolcalls);
        others get their tools in the system prompt. The current turn is never dropped: if it alone does not fit,
        PromptTooLongError says by how much.
        """
        count_tokens = count_tokens or estimate_tokens
        numbers = {clip.id: n for n, clip in enumerate(conversation.clips(), start=1)}
        turns = conversation.turns()
        for n_dropped in range(max(1, len(turns))):
            messages = tuple(m for turn in turns[n_dropped:] for m in turn)
            prompt = self._prompt(conversation.system_prompt, messages, numbers, n_dropped, tools)
            needed = count_tokens(prompt)
            if max_tokens is None or needed <= max_tokens:
                return prompt
        raise PromptTooLongError(
            f"This turn alone needs about {needed} tokens but the model's context holds {max_tokens}. "
            "Send fewer or shorter clips, or a shorter message."
        )

    def _prompt(self, system: str, messages: tuple[Message, ...], numbers: dict[str, int], n_dropped: int,
                tools: tuple[dict, ...]) -> Prompt:
        system, messages = self.defuse(system), tuple(self._defused(message) for message in messages)
        parts = {clip.id: self.parts(clip, numbers[clip.id]) for message in messages for clip in message.clips}
        # the app's default prompt (what a person who set none has) stands for the family's own default
        system = self.family.system_prompt if system in ("", DEFAULT_SYSTEM_PROMPT) else system
        segments = Segments()
        self.write(segments, system, messages, parts, tools)
        return Prompt(tuple(segments.segments), messages, n_dropped, system, tools)

    def parts(self, clip: Clip, number: int) -> list[AudioPart]:
        """The clip as the window-sized parts the model hears, each with its token count; none for a lost clip."""
        if clip.missing:
            return []
        pieces = split_windows(clip.samples, self.family.window_samples)
        return [AudioPart(clip, number, index, len(pieces), samples, self.family.n_audio_tokens(len(samples)))
                for index, samples in enumerate(pieces)]

    def write(self, prompt: Segments, system: str, messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
              tools: tuple[dict, ...]) -> None:
        """Write the prompt, ending where the assistant's reply begins; parts maps clip ids to their parts."""
        raise NotImplementedError

    def _defused(self, message: Message) -> Message:
        """The message with its text defused; the same message when there was nothing to break up."""
        text = self.defuse(message.text)
        return message if text == message.text else replace(message, text=text)

    def defuse(self, text: str) -> str:
        """Text with any control token a person typed (`<|im_end|>`, `<|AUDIO|>`, ...) broken up, so it stays text.

        Otherwise the tokenizer would read it as the real token: a typed `<|im_end|>` would end the turn
        and a typed `<|AUDIO|>` would claim a clip that is not there.
        """
        return self.control_token.sub(lambda match: f"{match.group()[0]}{ZERO_WIDTH_SPACE}{match.group()[1:]}", text)


def estimate_tokens(prompt: Prompt) -> int:
    """A prompt's length in tokens from its text, for a backend whose tokenizer is out of reach; errs on the long side."""
    # each part stands in the text as one audio token
    return math.ceil(len(prompt.text) / CHARS_PER_TOKEN_ESTIMATE) + sum(p.n_audio_tokens - 1 for p in prompt.audio_parts)


def exchanges(messages: tuple[Message, ...]) -> list[tuple[Message, list[Message]]]:
    """(user query, the replies and tool results that followed it) pairs."""
    pairs: list[tuple[Message, list[Message]]] = []
    for message in messages:
        if message.role == USER:
            pairs.append((message, []))
        elif pairs:
            pairs[-1][1].append(message)
    return pairs
