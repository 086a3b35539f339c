"""What the two Qwen Omni builders share (testkit.tiny.qwen2_5_omni, testkit.tiny.qwen3_omni).

Both families keep Qwen's layout: a byte-level BPE whose added tokens follow the ordinary vocabulary in the real
order (the real id minus 151643 is the tiny id minus FIRST_ADDED_ID), a Whisper feature extractor with 128 mel bins
and a 300-s window, and a thinker (audio tower, vision tower, language model) beside the speech parts. The
processors (Qwen2_5OmniProcessor, Qwen3OmniMoeProcessor) are not saved: they demand an image processor, and
AutoProcessor imports torchvision, which has no CPU build beside the pinned torch here. A test assembles what
the family needs from the tokenizer and the feature extractor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import GenerationConfig, PreTrainedModel, Qwen2Tokenizer, WhisperFeatureExtractor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from testkit.tiny.common import (
    PRINTABLE_ASCII, SAMPLING_RATE, SEED, Weights, byte_vocab, space_merges, suppress_all_but,
)

REAL_FIRST_ADDED_ID = 151643  # <|endoftext|> in every Qwen2.5 / Qwen3 vocabulary
REAL_VOCAB_SIZE = 152064  # both families' embedding rows, more than their tokenizers' ids
N_SPACED = len(space_merges())  # " x" tokens after the 256 bytes
FIRST_ADDED_ID = 256 + N_SPACED
VOCAB_SIZE = 512  # the embedding rows, more than the tokenizer's ids, as the real 152064 are
WINDOW_S = 300  # both real feature extractors: chunk_length 300, n_samples 4 800 000, nb_max_frames 30 000
N_MEL_BINS = 128
THINKER_STD = 0.2  # spread (testing.md): greedy choices far apart, and a model that notices a changed prompt
SPEECH_STD = 0.02  # transformers' own scale for the talker and the vocoder: finite audio, nothing more
QK_NORM_GAIN = 2.5  # Qwen3-style q/k RMS norms: sharper attention than near-uniform


def tiny_tokenizer(
    added: list[tuple[str, bool]], named: dict[str, str], model_max_length: int, chat_template: str | None = None
) -> Qwen2Tokenizer:
    """Byte-level Qwen tokenizer: 256 bytes, the " x" merges, then ``added`` (token, special) in that order.

    named: the model-specific token names the processors read (audio_token, audio_bos_token, ...).
    Tokens marked not special (<tool_call>, <think>, the fim tokens) stay in decoded text, as in the real vocab.
    """
    merges = space_merges()
    tokens = [token for token, _ in added]
    eos, pad = "<|im_end|>", "<|endoftext|>"
    tokenizer = Qwen2Tokenizer(
        vocab=byte_vocab([a + b for a, b in merges] + tokens),
        merges=merges,
        unk_token=None,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=[token for token, special in added if special and token not in (eos, pad)],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        errors="replace",
        **named,
    )
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token, special in added
                          if not special])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(FIRST_ADDED_ID, FIRST_ADDED_ID + len(tokens))):
        raise AssertionError(f"added tokens landed at {ids}")
    tokenizer.chat_template = chat_template
    return tokenizer


def full_vocab_tokenizer(added: list[tuple[str, bool]], named: dict[str, str], model_max_length: int,
                         vocab_size: int = REAL_VOCAB_SIZE) -> Qwen2Tokenizer:
    """A byte-level tokenizer with a token for each of the model's embedding rows, the added tokens at their real ids.

    The real tokenizer cannot be downloaded here. Every other id past the bytes decodes to a word (" t1234"), so a
    random model's replies stream as text; prompts split into bytes (no merges), some 60 more text tokens than the
    real tokenizer gives beside a clip's audio tokens. added and named as tiny_tokenizer takes them; both families'
    real-shape builders use it.
    """
    symbols = bytes_to_unicode()
    first, n_added = REAL_FIRST_ADDED_ID, len(added)
    vocab = {symbols[b]: b for b in range(256)}
    vocab.update({f"{symbols[ord(' ')]}t{i}": i for i in range(256, vocab_size) if not first <= i < first + n_added})
    vocab.update({token: first + i for i, (token, _) in enumerate(added)})
    eos, pad = "<|im_end|>", "<|endoftext|>"
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, eos_token=eos, pad_token=pad,
        extra_special_tokens=[token for token, special in added if special and token not in (eos, pad)],
        model_max_length=model_max_length, clean_up_tokenization_spaces=False, errors="replace", **named,
    )
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token, special in added
                          if not special])
    if tokenizer.convert_tokens_to_ids([token for token, _ in added]) != list(range(first, first + n_added)):
        raise AssertionError("the added tokens left their real ids")
    return tokenizer


def feature_extractor(window_s: int = WINDOW_S) -> WhisperFeatureExtractor:
    """The Whisper log-mel front end both families ship (128 bins, 16 kHz, 10-ms hop)."""
    return WhisperFeatureExtractor(
        feature_size=N_MEL_BINS, sampling_rate=SAMPLING_RATE, hop_length=160, n_fft=400, chunk_length=window_s,
        padding_value=0.0, return_attention_mask=True, dither=0.0,
    )


def fill(model: PreTrainedModel, thinker: torch.nn.Module, eot_ids: list[int]) -> None:
    """Every parameter from seeded generators: the thinker spread, the speech parts at transformers' scale.

    Filling everything matters: transformers leaves some tensors as torch.empty (Qwen3-Omni's experts), and
    two builds would differ. The end-of-turn rows of lm_head are zeroed, so a reply never ends at once by chance.
    """
    Weights(SEED).fill(thinker, std=THINKER_STD)
    speech = Weights(SEED + 1, spread=False)
    for _, part in sorted(model.named_children()):
        if part is not thinker:
            speech.fill(part, std=SPEECH_STD)
    with torch.no_grad():
        for name, parameter in thinker.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                parameter.mul_(QK_NORM_GAIN)
        thinker.lm_head.weight[eot_ids] = 0.0


def generation_config(tokenizer: Qwen2Tokenizer) -> GenerationConfig:
    """Replies end at <|im_end|> and hold printable ASCII only (single bytes and " x" pairs)."""
    im_end, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    spaced = range(256, FIRST_ADDED_ID)
    return GenerationConfig(
        eos_token_id=im_end, pad_token_id=pad,
        suppress_tokens=suppress_all_but({*PRINTABLE_ASCII, *spaced, im_end}, VOCAB_SIZE),
    )


def save(folder: Path, model: PreTrainedModel, tokenizer: Qwen2Tokenizer) -> Path:
    """config.json, model.safetensors, generation_config.json, the tokenizer files, preprocessor_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    feature_extractor().save_pretrained(folder)
    return folder
