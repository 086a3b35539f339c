"""A tiny random-weight Qwen-Audio-Chat checkpoint in the ORIGINAL on-disk format (numpy, torch, safetensors only).

The folder holds what the official hub repository holds, minus the remote-code `.py` files:
`config.json` with `model_type: "qwen"` and an `auto_map`, `generation_config.json`, sharded
`model-0000N-of-0000M.safetensors` with `model.safetensors.index.json` and the original tensor
names (`transformer.h.N.attn.c_attn`, `transformer.audio.blocks.N.attn.query`, ...), the real
`qwen.tiktoken` and `mel_filters.npz`, and `tokenizer_config.json`.

Run as a script to write one for the parity run of the original code:
    python testkit/tiny/qwen_audio_chat.py /tmp/tiny-qwen-audio-chat

build_qwen_audio_chat(folder, FULL_SIZE, ...) writes the real 7B architecture with random weights the
same way, for bench/gpu.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from testkit import DATA as TESTKIT_DATA

DATA = TESTKIT_DATA / "qwen_audio_chat"
SEED = 0
N_SHARDS = 2
HIDDEN = 64
N_HEADS = 4
N_LAYERS = 2
INTERMEDIATE = 256  # the original's convention: each of w1 and w2 is half of it
VOCAB = 155947  # the real, padded vocabulary: 151643 BPE ranks + 3522 special tokens + padding
AUDIO = {"n_mels": 80, "n_ctx": 1500, "n_state": 64, "n_head": 4, "n_layer": 2, "output_dim": HIDDEN,
         "avg_pool": True, "add_audio_bos_eos_token": True, "audio_start_id": 155163}
CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "attn_dropout_prob": 0.0, "bf16": False, "fp16": False, "fp32": False, "emb_dropout_prob": 0.0,
    "intermediate_size": INTERMEDIATE, "initializer_range": 0.02, "kv_channels": HIDDEN // N_HEADS,
    # eps and RoPE base differ from the library defaults, so a loader that ignores them fails the parity tests
    "layer_norm_epsilon": 1e-6, "rotary_emb_base": 20000,
    "model_type": "qwen", "hidden_size": HIDDEN, "num_attention_heads": N_HEADS, "num_hidden_layers": N_LAYERS,
    "max_position_embeddings": 8192, "no_bias": True, "onnx_safe": None, "rotary_pct": 1.0,
    "scale_attn_weights": True, "seq_length": 2048, "tie_word_embeddings": False, "tokenizer_type": "QWenTokenizer",
    "transformers_version": "4.31.0", "use_cache": True, "vocab_size": VOCAB, "use_dynamic_ntk": True,
    "use_logn_attn": True, "use_flash_attn": False, "audio": AUDIO,
}
# Qwen/Qwen-Audio-Chat's config.json (the same in GitHub QwenLM/Qwen-Audio): 8.4 B parameters
FULL_SIZE = CONFIG | {
    "hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128, "num_hidden_layers": 32,
    "intermediate_size": 22016, "layer_norm_epsilon": 1e-5, "rotary_emb_base": 10000,
    "audio": AUDIO | {"n_state": 1280, "n_head": 20, "n_layer": 32, "output_dim": 4096},
}
GENERATION_CONFIG = {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643, "max_window_size": 6144,
                     "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.5,
                     "transformers_version": "4.31.0"}
TOKENIZER_CONFIG = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}


def _sinusoids(length: int, channels: int, max_timescale: float = 10000) -> torch.Tensor:
    """Whisper's positional table, which the original stores in its checkpoint."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def tensors(config: dict = CONFIG, seed: int = SEED, spread: bool = True, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its original name.

    spread: random but spread enough that greedy choices are far apart (the logits span several units),
    for parity tests; otherwise a small init (std 0.02) that keeps a deep model's activations finite.
    """
    generator = torch.Generator(device).manual_seed(seed)
    hidden, audio = config["hidden_size"], config["audio"]
    width, n_mels = audio["n_state"], audio["n_mels"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        std = std if spread else 0.02
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype) * std

    def norm_weight(n: int) -> torch.Tensor:
        return 1.0 + normal(n, std=0.1)

    out = {"transformer.wte.weight": normal(config["vocab_size"], hidden, std=1.0),
           "transformer.ln_f.weight": norm_weight(hidden),
           "lm_head.weight": normal(config["vocab_size"], hidden, std=0.5)}
    half = config["intermediate_size"] // 2
    for n in range(config["num_hidden_layers"]):
        layer = f"transformer.h.{n}"
        out |= {f"{layer}.ln_1.weight": norm_weight(hidden), f"{layer}.ln_2.weight": norm_weight(hidden),
                f"{layer}.attn.c_attn.weight": normal(3 * hidden, hidden, std=0.3),
                f"{layer}.attn.c_attn.bias": normal(3 * hidden, std=0.1),
                f"{layer}.attn.c_proj.weight": normal(hidden, hidden, std=0.1),
                f"{layer}.mlp.w1.weight": normal(half, hidden, std=0.1),
                f"{layer}.mlp.w2.weight": normal(half, hidden, std=0.1),
                f"{layer}.mlp.c_proj.weight": normal(hidden, half, std=0.1)}
    prefix = "transformer.audio"
    out |= {f"{prefix}.conv1.weight": normal(width, n_mels, 3, std=0.1), f"{prefix}.conv1.bias": normal(width, std=0.1),
            f"{prefix}.conv2.weight": normal(width, width, 3, std=0.1), f"{prefix}.conv2.bias": normal(width, std=0.1),
            f"{prefix}.positional_embedding": _sinusoids(audio["n_ctx"], width).to(device, dtype),
            f"{prefix}.ln_post.weight": norm_weight(width), f"{prefix}.ln_post.bias": normal(width, std=0.1),
            f"{prefix}.proj.weight": normal(hidden, width, std=0.3), f"{prefix}.proj.bias": normal(hidden, std=0.1),
            f"{prefix}.audio_bos_eos_token.weight": normal(2, hidden, std=1.0)}
    for n in range(audio["n_layer"]):
        block = f"{prefix}.blocks.{n}"
        for name in ("query", "value", "out"):
            out |= {f"{block}.attn.{name}.weight": normal(width, width, std=0.15),
                    f"{block}.attn.{name}.bias": normal(width, std=0.1)}
        out |= {f"{block}.attn.key.weight": normal(width, width, std=0.15),
                f"{block}.attn_ln.weight": norm_weight(width), f"{block}.attn_ln.bias": normal(width, std=0.1),
                f"{block}.mlp.0.weight": normal(4 * width, width, std=0.1), f"{block}.mlp.0.bias": normal(4 * width, std=0.1),
                f"{block}.mlp.2.weight": normal(width, 4 * width, std=0.1), f"{block}.mlp.2.bias": normal(width, std=0.1),
                f"{block}.mlp_ln.weight": norm_weight(width), f"{block}.mlp_ln.bias": normal(width, std=0.1)}
    return out


def build_tiny_qwen_audio_chat(folder: Path) -> Path:
    """Write the tiny checkpoint folder; deterministic, a few seconds, about 80 MB."""
    return build_qwen_audio_chat(folder)


def build_qwen_audio_chat(folder: Path, config: dict = CONFIG, spread: bool = True, device: str = "cpu",
                          dtype: torch.dtype = torch.float32, n_shards: int = N_SHARDS) -> Path:
    """Write a checkpoint folder of the given config in the original format."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = tensors(config, spread=spread, device=device, dtype=dtype)
    names = sorted(weights)
    weight_map, total = {}, 0
    for index in range(1, n_shards + 1):
        file = f"model-{index:05d}-of-{n_shards:05d}.safetensors"
        shard = {name: weights.pop(name).contiguous().cpu() for name in names[index - 1::n_shards]}
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map |= {name: file for name in shard}
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name, content in (("config.json", config), ("generation_config.json", GENERATION_CONFIG),
                          ("tokenizer_config.json", TOKENIZER_CONFIG)):
        (folder / name).write_text(json.dumps(content, indent=2))
    for name in ("qwen.tiktoken", "mel_filters.npz"):
        shutil.copyfile(DATA / name, folder / name)
    return folder


if __name__ == "__main__":
    print(build_tiny_qwen_audio_chat(Path(sys.argv[1])))
