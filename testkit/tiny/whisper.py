"""A tiny random Whisper checkpoint, for the word-timestamp tool (chat.timestamps)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from testkit.tiny.common import PRINTABLE_ASCII, SAMPLING_RATE, SEED, byte_vocab, space_merges, suppress_all_but

WHISPER_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",  # must be the last special token: timestamp ids follow it
]


def build_tiny_whisper(folder: Path) -> Path:
    """Save a tiny random multilingual-layout Whisper model and processor to ``folder``.

    Token layout follows the real Whisper vocabulary: text tokens (bytes, " x" pairs),
    ``<|endoftext|>`` and the other special tokens ending with ``<|notimestamps|>``, then
    the 1501 timestamp tokens ``<|0.00|>`` .. ``<|30.00|>``.
    ``alignment_heads`` is set, so word-level timestamps work through
    ``pipeline("automatic-speech-recognition", ..., return_timestamps="word")`` and
    ``model.generate(..., return_token_timestamps=True)``.
    """
    folder = Path(folder)
    merges = space_merges()
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tokenizer = WhisperTokenizer(
        vocab=byte_vocab([a + b for a, b in merges] + WHISPER_SPECIAL_TOKENS + timestamps),
        merges=merges,
        extra_special_tokens=WHISPER_SPECIAL_TOKENS[1:],
    )
    ids = dict(zip(WHISPER_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(WHISPER_SPECIAL_TOKENS)))
    vocab_size = len(tokenizer)
    feature_extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=SAMPLING_RATE, chunk_length=30)
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    eot = ids["<|endoftext|>"]
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=[ord(" "), eot],
    )
    torch.manual_seed(SEED)
    model = WhisperForConditionalGeneration(config).eval()
    # Random logits would pick one of the 1501 timestamp tokens nearly every step, where
    # a real model writes text. Make hidden unit 0 a constant 1 (final layer norm) and use
    # it as a -6 logit bias for timestamp tokens (output projection, tied to embeddings).
    with torch.no_grad():
        model.model.decoder.layer_norm.weight[0] = 0.0
        model.model.decoder.layer_norm.bias[0] = 1.0
        model.proj_out.weight[ids["<|notimestamps|>"] + 1 :, 0] = -6.0
    # Text (bytes and " x" pairs below eot), eot and the timestamp tokens stay generatable.
    allowed = {*PRINTABLE_ASCII, *range(256, eot + 1), *range(ids["<|notimestamps|>"] + 1, vocab_size)}
    model.generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        # The real model allows 448; a random one rarely predicts eot, so keep it short.
        max_length=48,
        is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        begin_suppress_tokens=config.begin_suppress_tokens,
        suppress_tokens=suppress_all_but(allowed, vocab_size),
        # (decoder layer, head) pairs whose cross-attention gives the DTW word alignment.
        alignment_heads=[[1, 0], [1, 1], [1, 2], [1, 3]],
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
