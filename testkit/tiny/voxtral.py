"""A tiny random-weight Voxtral checkpoint folder, as mistralai/Voxtral-Mini-3B-2507 lays its files out.

    config.json, model.safetensors, generation_config.json   VoxtralForConditionalGeneration, saved by transformers
    tekken.json                                              mistral-common's tokenizer file, with its audio section
    preprocessor_config.json                                 WhisperFeatureExtractor, 128 mel bins

The tekken file is made from the one mistral-common ships (tekken_240911.json): its pattern and first
TEKKEN_VOCAB ranks, and Voxtral's special tokens at their ranks ([AUDIO] is 24, as VoxtralProcessor
assumes). `version` picks the tokenizer generation, which decides how tool calls are written: v7 writes
`[TOOL_CALLS][{"name": ..., "arguments": ...}]`, v11 and later `[TOOL_CALLS]name[ARGS]{...}`.

Run as a script to write one:  python -m testkit.tiny.voxtral /tmp/tiny-voxtral [v7|v11]
build_voxtral(folder, FULL_MINI, ...) writes Voxtral Mini's real shapes with random weights, for bench/gpu.py.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path

import torch
from transformers import GenerationConfig, VoxtralConfig, VoxtralForConditionalGeneration, WhisperFeatureExtractor

from testkit.tiny.common import Weights

TEKKEN_VOCAB = 400  # the first ranks: 256 bytes and the commonest merges
N_SPECIAL = 40
SPECIAL_TOKENS = {  # rank: token, as Voxtral's tekken.json has them; the rest are <SPECIAL_n> fillers
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]",
    13: "[IMG_END]", 14: "[PREFIX]", 15: "[MIDDLE]", 16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]", 24: "[AUDIO]", 25: "[BEGIN_AUDIO]", 32: "[ARGS]", 33: "[CALL_ID]", 34: "[TRANSCRIBE]",
}
AUDIO_TOKEN_ID = 24
AUDIO = {"sampling_rate": 16000, "frame_rate": 12.5, "chunk_length_s": 30.0,
         "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400}}
ENCODER = {"model_type": "voxtral_encoder", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_mel_bins": 128, "max_source_positions": 1500}
TEXT = {"model_type": "llama", "vocab_size": N_SPECIAL + TEKKEN_VOCAB, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e8, "tie_word_embeddings": False}


# Voxtral Mini 3B's shapes (VoxtralConfig's documented defaults): a Whisper-large-v3 encoder and a 30-layer LLM
FULL_SPECIAL, FULL_VOCAB = 1000, 131072
FULL_ENCODER = ENCODER | {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                          "num_attention_heads": 20}
FULL_TEXT = TEXT | {"vocab_size": FULL_VOCAB, "hidden_size": 3072, "intermediate_size": 8192,
                    "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "max_position_embeddings": 131072}


def tekken(version: str, n_special: int = N_SPECIAL, vocab_size: int = N_SPECIAL + TEKKEN_VOCAB) -> dict:
    """The tokenizer file's content: n_special control tokens, then the shipped file's first ranks."""
    shipped = json.loads(resources.files("mistral_common.data").joinpath("tekken_240911.json").read_text())
    special = [{"rank": rank, "token_str": SPECIAL_TOKENS.get(rank, f"<SPECIAL_{rank}>"), "is_control": True}
               for rank in range(n_special)]
    return {
        "config": {"pattern": shipped["config"]["pattern"], "num_vocab_tokens": vocab_size - n_special,
                   "default_vocab_size": vocab_size, "default_num_special_tokens": n_special, "version": version},
        "vocab": shipped["vocab"][: vocab_size - n_special],
        "special_tokens": special,
        "audio": AUDIO,
    }


def build_tiny_voxtral(folder: Path, version: str = "v7") -> Path:
    """Write the tiny checkpoint folder; deterministic, about a second."""
    config = VoxtralConfig(audio_config=ENCODER, text_config=TEXT, audio_token_id=AUDIO_TOKEN_ID)
    model = VoxtralForConditionalGeneration(config)
    Weights().fill(model, std=0.3)
    return _save(folder, model, tekken(version))


def build_voxtral_mini(folder: Path, device: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Voxtral Mini's real shapes with random weights made on the device."""
    config = VoxtralConfig(audio_config=FULL_ENCODER, text_config=FULL_TEXT, audio_token_id=AUDIO_TOKEN_ID)
    with torch.device(device):
        model = VoxtralForConditionalGeneration._from_config(config, dtype=dtype)
    return _save(folder, model, tekken("v7", FULL_SPECIAL, FULL_VOCAB))


def _save(folder: Path, model: VoxtralForConditionalGeneration, tokenizer: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=11)
    model.save_pretrained(folder)
    (folder / "tekken.json").write_text(json.dumps(tokenizer))
    WhisperFeatureExtractor(feature_size=128).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(build_tiny_voxtral(Path(sys.argv[1]), *sys.argv[2:]))
