"""What a model family is: the few facts and functions that differ from one audio-language model to the next.

A family module (qwen2_audio.py, qwen_audio_chat.py, ...) subclasses Family and, for local use,
LocalModel. Everything else (the local and remote backends, turns, tools, the page and the
terminal) works through these two interfaces and never names a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chat.audio import SAMPLE_RATE, n_windows
from chat.conversation import DEFAULT_SYSTEM_PROMPT
from chat.prompts import Prompt, PromptRenderer
from chat.settings import GenerationSettings
from chat.toolcalls import ReplyReader, get_parser

if TYPE_CHECKING:  # torch is imported when a checkpoint is loaded, not when a family is chosen
    import torch

TIMESTAMP_TOKEN = re.compile(r"<\|(\d{1,2}\.\d{2})\|>")  # the first generation's <|3.04|> tokens
# The end of a streamed text that may still change how it reads: timestamps that a second one may pair
# with, and the start of a token still arriving (`<`, `<|3.`, `<|3.04|`).
UNFINISHED_TIMESTAMPS = re.compile(r"(<\|\d{1,2}\.\d{2}\|>\s*)*(<(\|(\d{1,2}(\.(\d{1,2}(\|>?)?)?)?)?)?)?\Z")


@dataclass(frozen=True)
class LoadOptions:
    """How the local backend wants a checkpoint loaded."""

    dtype: torch.dtype
    device_map: str | dict
    quantization_config: object | None  # transformers' BitsAndBytesConfig, or None for full precision


class LocalModel:
    """A loaded checkpoint as the local backend drives it: token ids, audio features, generate().

    model.generate() takes input_ids with each audio placeholder already repeated to its part's
    token count, attention_mask, and for the parts still to encode the tensors of features(), each
    stacked over the parts (n_parts, ...).
    """

    model: torch.nn.Module
    tokenizer: object  # decode(ids, skip_special_tokens=...) is what the streamer needs
    audio_token_id: int  # the placeholder of one audio part; every part's tokens share it
    stop_ids: list[int]
    context_tokens: int
    settings: GenerationSettings | None = None  # sampling defaults the checkpoint states, over its family's

    def token_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids with one audio_token_id per audio part."""
        raise NotImplementedError

    def features(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """The model's audio inputs of one part by name, e.g. input_features (n_mels, n_frames)."""
        raise NotImplementedError

    def n_audio_tokens(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Audio tokens of each part (n_parts,), from the parts' features() stacked (the encoder's own length rule)."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Exact token count of plain text."""
        raise NotImplementedError

    def position_encoding(self, n_tokens: int) -> object:
        """Set up generation for an input of n_tokens; returns what the keys' positions were encoded with.

        A cached reply is reused only when the new input's value equals the cached one. Most models
        encode positions the same way at any length (None); Qwen-Audio-Chat changes its RoPE base
        with the prompt's length.
        """
        return None


class Family:
    """One model family: how its checkpoints look, how it hears, what its prompts are, what it can do."""

    name = ""  # registry key, e.g. "qwen2-audio"
    title = ""  # how the page and the terminal name it
    example_checkpoint = ""  # a hub id, for messages
    context_tokens = 8192
    window_s = 30.0  # the most audio the encoder hears at once; longer clips are sent as parts
    system_prompt = DEFAULT_SYSTEM_PROMPT
    settings = GenerationSettings()  # its published sampling defaults
    tool_style: str | None = "hermes"  # the tool-call format it is offered (chat.toolcalls); None: it has none
    offers_tools = False  # whether the editing tools are offered unless a person says otherwise: if trained on calls
    timestamp_edits = False  # whether <|t|> timestamp pairs in a reply become clips
    control_tokens: tuple[str, ...] = ()  # tokens a person's text must not produce
    unquantized_modules: tuple[str, ...] = ()  # full module paths kept in bf16 when the LLM is quantized
    served_by_vllm = False
    renderer_class: type[PromptRenderer] = PromptRenderer

    @property
    def window_samples(self) -> int:
        """window_s in samples."""
        return round(self.window_s * SAMPLE_RATE)

    def n_parts(self, clip) -> int:
        """How many window-sized parts a clip is sent as."""
        return n_windows(len(clip.samples), self.window_samples)

    @property
    def renderer(self) -> PromptRenderer:
        """The prompt renderer of this family."""
        return self.renderer_class(self)

    def recognizes(self, config: dict) -> bool:
        """Whether a checkpoint's config.json is one of this family's."""
        raise NotImplementedError

    def recognizes_name(self, model_name: str) -> bool:
        """Whether a model name (as a server serves it) is one of this family's."""
        return False

    def n_audio_tokens(self, n_samples: int) -> int:
        """Audio tokens a part of n_samples (at most one window) becomes in the prompt."""
        raise NotImplementedError

    def config_of_file(self, path: Path) -> dict | None:
        """The config of a checkpoint that -c names by one file of this family's own kind; None if it is not one."""
        return None

    def request_messages(self, prompt: Prompt) -> list[dict]:
        """The prompt as OpenAI chat messages for a server that serves this family."""
        raise NotImplementedError(f"No OpenAI-compatible server serves {self.title}; run it locally instead.")

    def reader(self, tools: bool) -> ReplyReader:
        """Reads a streamed reply: text meant for the person and, with tools, the calls it makes."""
        return FormattedReader(get_parser(self.tool_style) if tools else ReplyReader(), self.timestamp_edits)

    def timestamp_spans(self, text: str) -> list[tuple[float, float]]:
        """(start_s, end_s) pairs of the timestamp tokens in a reply, as the first generation's demo cut them.

        Like that demo, only an even number of timestamps counts; pairs that do not run forward are skipped.
        """
        if not self.timestamp_edits:
            return []
        times = [float(t) for t in TIMESTAMP_TOKEN.findall(text)]
        if len(times) % 2:
            return []
        return [(start, end) for start, end in zip(times[::2], times[1::2]) if end > start]


class FormattedReader(ReplyReader):
    """A reader whose shown text has timestamp tokens written as times a person reads: `<|3.04|>` → `3.04 s`."""

    def __init__(self, inner: ReplyReader, timestamps: bool) -> None:
        super().__init__()
        self.inner, self.timestamps = inner, timestamps
        self.held = ""  # the end of the text so far, while UNFINISHED_TIMESTAMPS may still change it

    def feed(self, chunk: str) -> tuple[str, list]:
        text, calls = self.inner.feed(chunk)
        return self._format(text, final=bool(calls)), calls  # a call ends the text shown

    def finish(self) -> tuple[str, list]:
        text, calls = self.inner.finish()
        return self._format(text, final=True), calls

    def _format(self, text: str, final: bool) -> str:
        if not self.timestamps:
            return text
        text = self.held + text
        n_shown = len(text) if final else UNFINISHED_TIMESTAMPS.search(text).start()
        text, self.held = text[:n_shown], text[n_shown:]
        return format_timestamps(text)


def format_timestamps(text: str) -> str:
    """`<|3.04|> to <|3.23|>` as `3.04 s to 3.23 s`; a pair right next to each other as `3.04 s – 3.23 s`."""
    text = re.sub(r"<\|(\d{1,2}\.\d{2})\|>\s*<\|(\d{1,2}\.\d{2})\|>", r"\1 s – \2 s", text)
    return TIMESTAMP_TOKEN.sub(r"\1 s", text)

