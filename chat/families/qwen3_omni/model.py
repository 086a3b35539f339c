"""Qwen3-Omni's thinker loaded and run with transformers' own class: the family of family.py.

The thinker-only class loads from the full checkpoint folder, leaving the talker and code2wav on disk. Its
processor is not used: it demands an image processor, and AutoProcessor imports torchvision, which has no build
beside every torch; the tokenizer and the Whisper feature extractor are all the text side needs.
"""

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen3OmniMoeThinkerForConditionalGeneration, WhisperFeatureExtractor

from chat.audio import SAMPLE_RATE
from chat.errors import BackendError
from chat.families.base import LoadOptions, TransformersTokenizerModel
from chat.families.qwen3_omni.experts import with_experts
from chat.families.qwen3_omni.family import FAMILY, IM_END, IM_START


class Qwen3OmniModel(TransformersTokenizerModel):
    """Qwen3OmniMoeThinkerForConditionalGeneration, its tokenizer, and each part's log-mel computed alone."""

    def __init__(self, checkpoint: str, options: LoadOptions) -> None:
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(checkpoint)
        if self.feature_extractor.n_samples != FAMILY.window_samples:
            raise BackendError(
                f"{checkpoint}'s feature extractor hears {self.feature_extractor.chunk_length} s at once, but "
                f"{FAMILY.title} checkpoints hear {FAMILY.window_s:g} s: this checkpoint is not one this app knows."
            )
        self.model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(
            checkpoint, dtype=options.dtype, device_map=options.device_map,
            quantization_config=with_experts(options.quantization_config),
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.audio_token_id = self.model.config.audio_token_id
        self.context_tokens = self.model.config.text_config.max_position_embeddings
        self.stop_ids = self.end_ids([IM_END, IM_START])

    def features(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """The part's log-mel exactly as the processor makes it for a call with this one clip (unpadded: padding
        to a longer neighbour would give a clip whose length 160 does not divide one more frame), and its mask."""
        out = self.feature_extractor(samples, sampling_rate=SAMPLE_RATE, padding=True, truncation=False,
                                     return_attention_mask=True, return_tensors="pt")
        return {"input_features": out["input_features"][0], "feature_attention_mask": out["attention_mask"][0]}
