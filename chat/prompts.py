"""Prompt renderers: the exact ChatML text each model family was trained on."""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from chat.audio import SAMPLE_RATE
from chat.clip import Clip
from chat.conversation import ASSISTANT, DEFAULT_SYSTEM_PROMPT, TOOL, USER, Conversation, Message
from chat.errors import PromptTooLongError

AUDIO_TOKEN_S = 0.04  # the Whisper-style encoders emit one audio token per 40 ms
MAX_AUDIO_TOKENS_PER_PART = 750  # a full 30-s window
CHARS_PER_TOKEN_ESTIMATE = 3  # used only when no tokenizer is given; errs on the long side
CONTROL_TOKEN = re.compile(r"<\|(im_start|im_end|endoftext|AUDIO|audio_bos|audio_eos)\|>")
ZERO_WIDTH_SPACE = "\u200b"


@dataclass(frozen=True)
class AudioPart:
    """One encoder window of a clip, in the order the prompt refers to it."""

    clip: Clip
    number: int  # the clip's Audio N
    index: int  # 0-based part of the clip
    samples: np.ndarray  # (n_samples,) float32 at SAMPLE_RATE, at most one window

    @property
    def n_audio_tokens(self) -> int:
        """Audio tokens this part expands to in the model's input (exactly the processor's count)."""
        # 10-ms mel frames, halved by a stride-2 convolution (rounding up), then by a pool of 2 (rounding down)
        n_half_tokens = -(-len(self.samples) // round(SAMPLE_RATE * AUDIO_TOKEN_S / 2))
        return min(MAX_AUDIO_TOKENS_PER_PART, n_half_tokens // 2)


@dataclass(frozen=True)
class Prompt:
    """Exactly what the model sees: the text and the audio parts its placeholders stand for."""

    text: str
    audio_parts: tuple[AudioPart, ...]
    messages: tuple[Message, ...]  # the messages rendered, after history was dropped
    n_dropped_turns: int = 0  # oldest exchanges left out so the prompt fits the context


class PromptRenderer:
    """Base for one model family's chat format."""

    family = ""
    stop_strings: tuple[str, ...] = ("<|im_end|>", "<|im_start|>")

    def render(
        self,
        conversation: Conversation,
        max_tokens: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> Prompt:
        """Render the conversation for a reply, dropping the oldest turns while it exceeds max_tokens.

        The current turn is never dropped: if it alone does not fit, PromptTooLongError says by how much.
        """
        count_tokens = count_tokens or (lambda text: math.ceil(len(text) / CHARS_PER_TOKEN_ESTIMATE))
        numbers = {clip.id: n for n, clip in enumerate(conversation.clips(), start=1)}
        turns = conversation.turns()
        for n_dropped in range(max(1, len(turns))):
            messages = tuple(m for turn in turns[n_dropped:] for m in turn)
            prompt = self._prompt(conversation.system_prompt, messages, numbers, n_dropped)
            needed = count_tokens(prompt.text) + sum(p.n_audio_tokens - 1 for p in prompt.audio_parts)
            if max_tokens is None or needed <= max_tokens:
                return prompt
        raise PromptTooLongError(
            f"This turn alone needs about {needed} tokens but the model's context holds {max_tokens}. "
            "Send fewer or shorter clips, or a shorter message."
        )

    def _prompt(self, system: str, messages: tuple[Message, ...], numbers: dict[str, int], n_dropped: int) -> Prompt:
        system, messages = defuse(system), tuple(replace(m, text=defuse(m.text)) for m in messages)
        parts = tuple(
            AudioPart(clip, numbers[clip.id], index, samples)
            for message in messages
            for clip in message.clips
            for index, samples in enumerate(clip.parts())
        )
        return Prompt(self.render_text(system, messages, numbers), parts, messages, n_dropped)

    def render_text(self, system: str, messages: tuple[Message, ...], numbers: dict[str, int]) -> str:
        """The prompt text, ending where the assistant's reply begins."""
        raise NotImplementedError


def defuse(text: str) -> str:
    """Text with any control token a person typed (`<|im_end|>`, `<|AUDIO|>`, ...) broken up, so it stays text.

    Otherwise the tokenizer would read it as the real token: a typed `<|im_end|>` would end the turn
    and a typed `<|AUDIO|>` would claim a clip that is not there.
    """
    return CONTROL_TOKEN.sub(lambda match: f"<{ZERO_WIDTH_SPACE}|{match.group(1)}|>", text)


def audio_label(clip: Clip, number: int, index: int) -> str:
    """`Audio 3`, or `Audio 3 (part 2 of 3)` for a clip longer than one window."""
    if clip.n_parts == 1:
        return f"Audio {number}"
    return f"Audio {number} (part {index + 1} of {clip.n_parts})"


class Qwen2AudioRenderer(PromptRenderer):
    """Qwen2-Audio-Instruct: byte-identical to the processor's chat template for clips up to 30 s.

    Clips carry their conversation number rather than a per-prompt counter, so dropped history
    never renumbers them, and long clips appear as labelled parts.
    """

    family = "qwen2-audio"
    audio_placeholder = "<|audio_bos|><|AUDIO|><|audio_eos|>"

    def render_text(self, system: str, messages: tuple[Message, ...], numbers: dict[str, int]) -> str:
        """The prompt text, ending where the assistant's reply begins."""
        text = f"<|im_start|>system\n{system or DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
        for message in messages:
            if message.role == ASSISTANT and not message.text:
                continue  # a reply that failed before its first token has nothing to show the model
            role, body = message.role, self._audio_lines(message, numbers) + message.text
            if message.role == TOOL:
                role, body = USER, f"<tool_response>\n{body}\n</tool_response>"
            text += f"<|im_start|>{role}\n{body}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"

    def _audio_lines(self, message: Message, numbers: dict[str, int]) -> str:
        return "".join(
            f"{audio_label(clip, numbers[clip.id], index)}: {self.audio_placeholder}\n"
            for clip in message.clips
            for index in range(clip.n_parts)
        )


class QwenAudioChatRenderer(PromptRenderer):
    """Qwen-Audio-Chat (first generation): its make_context layout and `Audio N:<audio>ref</audio>` queries.

    Tool results are shown ReAct-style as `Observation:` lines inside the reply, the format the
    Qwen-7B-Chat family was trained on.
    """

    family = "qwen-audio-chat"

    def __init__(self, audio_ref: Callable[[Clip, int], str] | None = None) -> None:
        self.audio_ref = audio_ref or (lambda clip, index: f"{clip.id}-{index}.wav")

    def render_text(self, system: str, messages: tuple[Message, ...], numbers: dict[str, int]) -> str:
        """The prompt text, ending where the assistant's reply begins (or continues after a tool)."""
        text = f"<|im_start|>system\n{system or DEFAULT_SYSTEM_PROMPT}<|im_end|>"
        exchanges = _exchanges(messages)
        for index, (query, reply) in enumerate(exchanges):
            text += f"\n<|im_start|>user\n{self._query(query, numbers)}<|im_end|>\n<|im_start|>assistant\n"
            text += self._reply(reply)
            if index < len(exchanges) - 1:
                text += "<|im_end|>"
        return text

    def _query(self, query: Message, numbers: dict[str, int]) -> str:
        audio = "".join(
            f"{audio_label(clip, numbers[clip.id], index)}:<audio>{self.audio_ref(clip, index)}</audio>\n"
            for clip in query.clips
            for index in range(clip.n_parts)
        )
        return audio + query.text

    def _reply(self, reply: list[Message]) -> str:
        return "".join(m.text if m.role == ASSISTANT else f"\nObservation: {m.text}\n" for m in reply)


def _exchanges(messages: tuple[Message, ...]) -> list[tuple[Message, list[Message]]]:
    """(user query, the replies and tool results that followed it) pairs."""
    exchanges: list[tuple[Message, list[Message]]] = []
    for message in messages:
        if message.role == USER:
            exchanges.append((message, []))
        elif exchanges:
            exchanges[-1][1].append(message)
    return exchanges


RENDERERS: dict[str, type[PromptRenderer]] = {
    Qwen2AudioRenderer.family: Qwen2AudioRenderer,
    QwenAudioChatRenderer.family: QwenAudioChatRenderer,
}


def get_renderer(family: str) -> PromptRenderer:
    """The renderer of a model family; the error lists the valid names."""
    if family not in RENDERERS:
        raise ValueError(f"Unknown model family {family!r}; choose one of: {', '.join(RENDERERS)}.")
    return RENDERERS[family]()
