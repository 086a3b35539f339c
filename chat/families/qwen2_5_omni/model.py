"""Qwen2.5-Omni's thinker loaded and run with transformers' own classes: the family of family.py.

Only the thinker (audio encoder, vision encoder, language model) is loaded, from the full checkpoint folder: the
talker and token2wav, which speak, stay on disk while the voice is off. The processor class demands an image
processor and AutoProcessor imports torchvision, so the tokenizer and the Whisper feature extractor are loaded
on their own and used as the processor uses them.
"""

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2_5OmniThinkerForConditionalGeneration, WhisperFeatureExtractor

from chat.audio import SAMPLE_RATE
from chat.errors import BackendError
from chat.families.base import LoadOptions, TransformersTokenizerModel
from chat.families.qwen2_5_omni.family import FAMILY, IM_END


class Qwen2_5OmniModel(TransformersTokenizerModel):
    """Qwen2_5OmniThinkerForConditionalGeneration, its tokenizer and feature extractor, from_pretrained."""

    def __init__(self, checkpoint: str, options: LoadOptions) -> None:
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(checkpoint)
        window_s = self.feature_extractor.chunk_length
        if window_s != FAMILY.window_s:  # the family's window (and so its parts and token counts) is static
            raise BackendError(
                f"{checkpoint}'s feature extractor hears {window_s:g} s at once, but {FAMILY.title} checkpoints hear "
                f"{FAMILY.window_s:g} s (chunk_length in preprocessor_config.json); this app cannot run it."
            )
        self.model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
            checkpoint, dtype=options.dtype, device_map=options.device_map,
            quantization_config=options.quantization_config,
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.audio_token_id = self.model.config.audio_token_id
        self.context_tokens = self.model.config.text_config.max_position_embeddings
        self.stop_ids = self.end_ids([IM_END])

    def features(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """The part's mel features as Qwen2_5OmniProcessor makes them (its audio kwargs, padded to the 300-s window,
        the only padding it allows) and its frame mask, both cut to the frames the mask keeps: the model reads only
        those, and a cached 300-s part then takes its own size, not 15 MB."""
        out = self.feature_extractor(
            samples, sampling_rate=SAMPLE_RATE, padding="max_length", return_attention_mask=True, return_tensors="pt",
        )
        n_frames = int(out["attention_mask"][0].sum())
        return {"input_features": out["input_features"][0, :, :n_frames],
                "feature_attention_mask": out["attention_mask"][0, :n_frames]}
