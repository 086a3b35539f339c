"""A tiny random-weight Qwen2-Audio checkpoint.

The builder writes a complete checkpoint folder (model, generation config, processor)
with ``save_pretrained``, so the product loads it with the same ``from_pretrained(folder)``
code that loads the real checkpoint. Nothing is downloaded; builds are deterministic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Config,
    Qwen2Tokenizer,
    WhisperFeatureExtractor,
)

from testkit.tiny.common import PRINTABLE_ASCII, SAMPLING_RATE, SEED, byte_vocab, space_merges, suppress_all_but

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
]
QWEN_VOCAB_SIZE = 384  # > 356 tokenizer ids, padded like the real model's vocabulary


def build_tiny_qwen2_audio(folder: Path, chunk_length_s: int = 30) -> Path:
    """Save a tiny random Qwen2-Audio model and processor to ``folder`` and return it.

    ``chunk_length_s=30`` reproduces the real 30-s window (3000 mel frames, 750 audio
    tokens at most per clip); smaller values shrink the window and the encoder with it.
    Generation can only emit printable ASCII (single bytes and " x" pairs) and
    ``<|im_end|>`` (the eos token).
    """
    folder = Path(folder)
    merges = space_merges()
    tokenizer = Qwen2Tokenizer(
        vocab=byte_vocab(QWEN_SPECIAL_TOKENS + [a + b for a, b in merges]),
        merges=merges,
        extra_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)))
    spaced_ids = range(256 + len(QWEN_SPECIAL_TOKENS), len(tokenizer))
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128, sampling_rate=SAMPLING_RATE, chunk_length=chunk_length_s
    )
    # chat_template=None makes the processor use its built-in default_chat_template,
    # which is the official Qwen2-Audio template; save_pretrained writes it to chat_template.jinja.
    processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    config = Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "num_mel_bins": 128,
            # The encoder requires mel length == 2 * max_source_positions (100 frames per s).
            "max_source_positions": 50 * chunk_length_s,
        },
        text_config=Qwen2Config(
            vocab_size=QWEN_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=ids["<|endoftext|>"],
        ),
        audio_token_index=ids["<|AUDIO|>"],
    )
    torch.manual_seed(SEED)
    model = Qwen2AudioForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        suppress_tokens=suppress_all_but({*PRINTABLE_ASCII, *spaced_ids, ids["<|im_end|>"]}, QWEN_VOCAB_SIZE),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
