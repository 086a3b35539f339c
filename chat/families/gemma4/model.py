"""Gemma 4 loaded and run with transformers' own class: the family of family.py.

Gemma4ForConditionalGeneration (Gemma4ForCausalLM finds none of the folder's weights, which sit under
model.language_model). Its audio tower supports eager attention only, so the model is loaded with eager attention.
The processor is not used: AutoProcessor imports torchvision for the image and video processors; the tokenizer and
the audio feature extractor are all the audio path needs.
"""

import numpy as np
import torch
from transformers import AutoTokenizer, DynamicCache, Gemma4AudioFeatureExtractor, Gemma4ForConditionalGeneration

from chat.audio import SAMPLE_RATE
from chat.errors import BackendError
from chat.families.base import LoadOptions, TransformersTokenizerModel
from chat.families.gemma4.family import (
    CALL_CLOSE, CALL_OPEN, CHANNEL_CLOSE, CHANNEL_OPEN, FAMILY, TURN_CLOSE,
)
from chat.gemma4_args import STRING_MARK

KEPT_TOKENS = (CALL_OPEN, CALL_CLOSE, STRING_MARK, CHANNEL_OPEN, CHANNEL_CLOSE)  # a reply's calls and thought


class GemmaText:
    """The tokenizer, with decoding for the streamer: the tokens of a call (<|tool_call>, <tool_call|>, <|"|>) and
    of a thought (<|channel>, <channel|>) stay in the text, where the family's readers find them; the other special
    tokens are no text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.kept = set(tokenizer.convert_tokens_to_ids(list(KEPT_TOKENS)))
        self.special = set(tokenizer.all_special_ids) | {
            i for i, token in tokenizer.added_tokens_decoder.items() if token.special}

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Text of ids; with skip_special_tokens, special tokens other than a call's or a thought's are left out."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special or i in self.kept]
        return self.tokenizer.decode(ids, skip_special_tokens=False, **kwargs)


class Gemma4Model(TransformersTokenizerModel):
    """Gemma4ForConditionalGeneration, its tokenizer, and each part's log-mel as the processor makes it."""

    def __init__(self, checkpoint: str, options: LoadOptions) -> None:
        self.feature_extractor = Gemma4AudioFeatureExtractor.from_pretrained(checkpoint)
        extractor = self.feature_extractor
        if (extractor.sampling_rate, extractor.frame_length, extractor.hop_length) != (SAMPLE_RATE, 320, 160):
            raise BackendError(
                f"{checkpoint}'s feature extractor makes frames of {extractor.frame_length} samples every "
                f"{extractor.hop_length} at {extractor.sampling_rate} Hz, but {FAMILY.title}'s audio-token rule is for "
                f"320 every 160 at {SAMPLE_RATE} Hz: this checkpoint is not one this app knows.")
        self.model = Gemma4ForConditionalGeneration.from_pretrained(
            checkpoint, dtype=options.dtype, device_map=options.device_map,
            quantization_config=options.quantization_config, attn_implementation="eager",
        ).eval()
        self.tokenizer = GemmaText(AutoTokenizer.from_pretrained(checkpoint))
        self.audio_token_id = self.model.config.audio_token_id
        self.context_tokens = self.model.config.text_config.max_position_embeddings
        self.stop_ids = self.end_ids([TURN_CLOSE])

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The tokenizer's ids of each text, without a <bos> of its own (the prompt writes its one <bos>)."""
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def features(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """The part's log-mel (frames, 128) as the processor makes it beside a 30-s clip, and its mask.

        Every part is padded to the window's 2999 frames: the backend stacks parts by padding their last dimension,
        which here is the mel bins, so parts must arrive equally long. Padding does not change what the audio tower
        makes of the valid frames (the processor pads the clips of a call to the longest); the mask says which.
        """
        out = self.feature_extractor([samples], sampling_rate=SAMPLE_RATE, padding="max_length",
                                     max_length=FAMILY.window_samples, truncation=True, return_tensors="pt")
        return {"input_features": out["input_features"][0], "input_features_mask": out["input_features_mask"][0]}

    def new_cache(self) -> DynamicCache:
        """A cache of full layers. The one transformers makes for Gemma 4 keeps only the last sliding_window keys
        (512) of its sliding-window layers, and such a layer cannot be cropped once a prompt is longer: the next turn
        could not start from the last reply's cache (chat.local crops it to the prefix the prompts share). Full layers
        can be cropped anywhere, and the sliding layers' masks still see only their window, so the outputs are the
        same. The cost is memory: those layers' keys and values for the whole context, as a full layer holds them."""
        return DynamicCache()
