"""Qwen2-Audio loaded and run with transformers' own model and processor: the family of family.py."""

import numpy as np
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from chat.audio import SAMPLE_RATE
from chat.families.base import LoadOptions, TransformersTokenizerModel
from chat.families.qwen2_audio.family import IM_END, IM_START


class Qwen2AudioModel(TransformersTokenizerModel):
    """Qwen2AudioForConditionalGeneration and its processor, from_pretrained."""

    def __init__(self, checkpoint: str, options: LoadOptions) -> None:
        self.model = Qwen2AudioForConditionalGeneration.from_pretrained(
            checkpoint, dtype=options.dtype, device_map=options.device_map,
            quantization_config=options.quantization_config,
        ).eval()
        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.tokenizer = self.processor.tokenizer
        self.audio_token_id = self.model.config.audio_token_id
        self.context_tokens = self.model.config.text_config.max_position_embeddings
        self.stop_ids = self.end_ids([IM_END, IM_START])

    def features(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """The processor's mel features of one part, padded to the 30-s window, with its frame mask."""
        out = self.processor.feature_extractor(
            samples, sampling_rate=SAMPLE_RATE, padding="max_length", return_attention_mask=True, return_tensors="pt",
        )
        return {"input_features": out["input_features"][0], "feature_attention_mask": out["attention_mask"][0]}
