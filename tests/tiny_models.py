"""Tiny random-weight checkpoints for offline tests.

Both builders write a complete checkpoint folder (model, generation config, processor)
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
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

SEED = 0
SAMPLING_RATE = 16000
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
]
QWEN_VOCAB_SIZE = 384  # > 356 tokenizer ids, padded like the real model's vocabulary
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
PRINTABLE_ASCII = range(0x20, 0x7F)


def _byte_vocab(extra: list[str]) -> dict[str, int]:
    """Byte-level BPE vocabulary: id == byte value, then ``extra`` from 256."""
    symbols = bytes_to_unicode()
    vocab = {symbols[b]: b for b in range(256)}
    vocab.update({token: 256 + i for i, token in enumerate(extra)})
    return vocab


def _space_merges() -> list[tuple[str, str]]:
    """BPE merges for " x" (space + printable ASCII char), like real word-initial tokens.

    With them about half of the tokens a random model samples start with a space, so
    its text has words and ``TextIteratorStreamer`` yields several chunks. (Greedy
    output of a random model soon loops, often on a run without spaces.)
    """
    symbols = bytes_to_unicode()
    return [(symbols[0x20], symbols[c]) for c in range(0x21, 0x7F)]


def _suppress_all_but(allowed: set[int], vocab_size: int) -> list[int]:
    """Ids to pass as ``suppress_tokens`` so that only ``allowed`` ids can be generated."""
    return [i for i in range(vocab_size) if i not in allowed]


def build_tiny_qwen2_audio(folder: Path, chunk_length_s: int = 30) -> Path:
    """Save a tiny random Qwen2-Audio model and processor to ``folder`` and return it.

    ``chunk_length_s=30`` reproduces the real 30-s window (3000 mel frames, 750 audio
    tokens at most per clip); smaller values shrink the window and the encoder with it.
    Generation can only emit printable ASCII (single bytes and " x" pairs) and
    ``<|im_end|>`` (the eos token).
    """
    folder = Path(folder)
    merges = _space_merges()
    tokenizer = Qwen2Tokenizer(
        vocab=_byte_vocab(QWEN_SPECIAL_TOKENS + [a + b for a, b in merges]),
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
        suppress_tokens=_suppress_all_but({*PRINTABLE_ASCII, *spaced_ids, ids["<|im_end|>"]}, QWEN_VOCAB_SIZE),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


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
    merges = _space_merges()
    timestamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    tokenizer = WhisperTokenizer(
        vocab=_byte_vocab([a + b for a, b in merges] + WHISPER_SPECIAL_TOKENS + timestamps),
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
        suppress_tokens=_suppress_all_but(allowed, vocab_size),
        # (decoder layer, head) pairs whose cross-attention gives the DTW word alignment.
        alignment_heads=[[1, 0], [1, 1], [1, 2], [1, 3]],
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
