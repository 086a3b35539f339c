"""What a model family is: the few facts and functions that differ from one audio-language model to the next.

A family's folder (qwen2_audio/, qwen_audio_chat/, ...) subclasses Family in family.py and, for local use,
LocalModel in model.py. Everything else (the local and remote backends, turns, tools, the page and the
terminal) works through these two interfaces and never names a model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chat.audio import SAMPLE_RATE, n_windows
from chat.clip import Clip
from chat.conversation import ASSISTANT, DEFAULT_SYSTEM_PROMPT, Conversation
from chat.openai_content import audio_content, text_content
from chat.prompts import Control, Prompt, PromptRenderer, Text
from chat.reasoning import ReasoningReader
from chat.settings import GenerationSettings
from chat.toolcalls import ReplyReader, get_parser

if TYPE_CHECKING:  # torch is imported when a checkpoint is loaded, not when a family is chosen
    import torch

MAX_REMEMBERED_PIECES = 4096  # texts whose ids a local model keeps: a long chat's, so a turn encodes only its new ones


@dataclass(frozen=True)
class ReplyStep:
    """A step a finished reply takes by itself, shown and recorded as a tool step (Qwen-Audio-Chat's timestamp
    spans, cut into clips)."""

    tool: str
    arguments: dict
    text: str  # the tool message
    clips: tuple[Clip, ...] = ()  # the clips it adds, numbered next
    failed: bool = False


@dataclass(frozen=True)
class LoadOptions:
    """How the local backend wants a checkpoint loaded."""

    dtype: torch.dtype
    device_map: str | dict
    quantization_config: object | None  # BitsAndBytesConfig or FineGrainedFP8Config; None for full precision


class LocalModel:
    """A loaded checkpoint as the local backend drives it: token ids, audio features, generate().

    model.generate() takes input_ids with each part's run of audio tokens (as many as the family's rule
    says), attention_mask, and for the parts still to encode the tensors of features(), each stacked
    over the parts (n_parts, ...).
    """

    model: torch.nn.Module
    tokenizer: object  # decode(ids, skip_special_tokens=...) is what the streamer needs
    audio_token_id: int  # the placeholder of one audio part; every part's tokens share it
    stop_ids: list[int]
    context_tokens: int
    settings: GenerationSettings | None = None  # sampling defaults the checkpoint states, over its family's

    _remembered: OrderedDict[str, list[int]] | None = None  # text → ids of the pieces encoded last
    _remembered_lock = threading.Lock()

    def token_ids(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids: each text encoded on its own, each control token's id, each part's audio tokens."""
        texts = [segment.text for segment in prompt.segments if isinstance(segment, Text)]
        encoded = iter(self._encode_remembered(texts))
        controls = {segment.token for segment in prompt.segments if isinstance(segment, Control)}
        control_ids = {token: self.control_id(token) for token in controls}
        ids: list[int] = []
        for segment in prompt.segments:
            if isinstance(segment, Text):
                ids += next(encoded)
            elif isinstance(segment, Control):
                ids.append(control_ids[segment.token])
            else:
                ids += [self.audio_token_id] * segment.part.n_audio_tokens
        return ids

    def _encode_remembered(self, texts: list[str]) -> list[list[int]]:
        """encode(texts), remembering the most recent pieces: a turn's history is encoded once, not on every turn."""
        with self._remembered_lock:
            if self._remembered is None:
                self._remembered = OrderedDict()
            new = [text for text in dict.fromkeys(texts) if text not in self._remembered]
            self._remembered.update(zip(new, self.encode(new)))
            encoded = [self._remembered[text] for text in texts]
            for text in texts:
                self._remembered.move_to_end(text)
            while len(self._remembered) > MAX_REMEMBERED_PIECES:
                self._remembered.popitem(last=False)
        return encoded

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The ids of each piece of text, each encoded on its own (in one call: a prompt has hundreds)."""
        raise NotImplementedError

    def control_id(self, token: str) -> int:
        """The id of a control token."""
        raise NotImplementedError

    def features(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """The model's audio inputs of one part by name, e.g. input_features (n_mels, n_frames)."""
        raise NotImplementedError

    def new_cache(self) -> object | None:
        """The attention cache a reply starts with where none is reused; None: the one transformers makes."""
        return None

    def position_encoding(self, n_tokens: int) -> object:
        """Set up generation for an input of n_tokens; returns what the keys' positions were encoded with.

        A cached reply is reused only when the new input's value equals the cached one. Most models
        encode positions the same way at any length (None); Qwen-Audio-Chat changes its RoPE base
        with the prompt's length.
        """
        return None


class TransformersTokenizerModel(LocalModel):
    """A LocalModel whose tokenizer is transformers' own (Qwen2-Audio, the Omni families): its ids and stop ids."""

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The tokenizer's ids of each text."""
        return self.tokenizer(texts)["input_ids"] if texts else []

    def control_id(self, token: str) -> int:
        """The tokenizer's id of a special token."""
        return self.tokenizer.convert_tokens_to_ids(token)

    def end_ids(self, tokens: list[str]) -> list[int]:
        """The ids of tokens that end a reply, with every end the checkpoint's generation config names."""
        eos = self.model.generation_config.eos_token_id  # None, an id or a list of ids
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return sorted({*map(self.control_id, tokens), *eos})


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
    reasoning_tags: tuple[str, str] | None = None  # (open, close) of the thinking a reply may start with
    control_tokens: tuple[str, ...] = ()  # tokens a person's text must not produce
    unquantized_modules: tuple[str, ...] = ()  # full module paths kept in bf16 when the LLM is quantized
    served_by_vllm = False
    talker = ""  # its Talker class by dotted path, for a family that speaks with its own talker (the Omni families)
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
        """The prompt as OpenAI chat messages for a server that serves this family. This base writes what another
        instance of this app reads (its /v1 runs every family): each clip part as input_audio after its label, which
        that app writes anew, replies as the model wrote them, tool results as tool messages."""
        messages = [{"role": "system", "content": prompt.system}]
        for message in prompt.messages:
            if message.role == ASSISTANT:
                if message.text:
                    messages.append({"role": ASSISTANT, "content": message.text})
                continue
            heard = [chunk for clip in message.clips for part in prompt.clip_parts.get(clip.id, [])
                     for chunk in (text_content(f"{part.label}: "), audio_content(part.samples))]
            messages.append({"role": message.role, "content": heard + ([text_content(message.text)] if message.text
                                                                        else [])})
        return messages

    def reader(self, tools: bool) -> ReplyReader:
        """Reads a streamed reply: its thinking (with reasoning_tags), text meant for the person and, with tools,
        the calls it makes."""
        reader = get_parser(self.tool_style) if tools else ReplyReader()
        return reader if self.reasoning_tags is None else ReasoningReader(self.reasoning_tags, reader)

    def after_reply(self, conversation: Conversation) -> ReplyStep | None:
        """The step the reply that ends the conversation takes by itself, if any; the base family takes none."""
        return None
