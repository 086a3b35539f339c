"""Qwen3-Omni-30B-A3B's MoE experts: which quantization route holds the thinker on one 24 GB GPU.

Two parts:
1. The tiny random-weight thinker (testkit.tiny.qwen3_omni) on the CPU, each route loaded as it would be in the app:
   max |logit difference| against the float32 model over a short prompt, whether greedy decoding picks the same
   tokens, and time per generated token (a CPU, a tiny model: it checks the routes run, not their speed).
2. Arithmetic on the real shapes (REAL_THINKER: Qwen/Qwen3-Omni-30B-A3B-Instruct's config.json): the thinker
   built on the meta device, its parameters counted by kind, and the bytes each route stores them in.

--gpu (needs CUDA; bench/gpu.py can call gpu_rows()): a thinker of the real per-layer shapes with --layers of its
48 layers and random weights, saved and loaded per route as the app loads it: load time, peak GPU memory while
loading, resident memory, decode time per token, and resident memory scaled to 48 layers.

Run: .venv/bin/python -m bench.qwen3_omni_experts [--routes nf4-experts,none] [--gpu [--layers 8]]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BitsAndBytesConfig,
    FineGrainedFP8Config,
    Qwen3OmniMoeThinkerConfig,
    Qwen3OmniMoeThinkerForConditionalGeneration,
)

from bench.common import print_table  # noqa: E402
from chat.families.qwen3_omni.experts import (  # noqa: E402
    NESTED_BLOCK,
    NF4_BLOCK,
    is_fused_experts,
    quantize_experts,
    with_experts,
)

warnings.filterwarnings("ignore", category=UserWarning)
GB = 1e9
GPU_BYTES = 24 * 2**30  # a "24 GB" card (RTX 3090 / 4090) has 24 GiB
OVERHEAD_BYTES = 1.5 * GB  # CUDA context, activations of a 30-s clip's prefill, allocator slack (an estimate)
CONTEXT_TOKENS = 8192  # the KV cache budgeted beside the weights
SKIPPED = ("model.audio_tower", "model.visual", "lm_head")  # the family's unquantized_modules (family.py)
N_PROMPT_TOKENS = 32
N_NEW_TOKENS = 16
GPU_NEW_TOKENS = 64
FP8_BLOCK = 128  # FineGrainedFP8Config's default weight_block_size (128, 128)
INT4_GROUP = 128  # torchao Int4WeightOnlyConfig and AWQ's usual group size

# Qwen/Qwen3-Omni-30B-A3B-Instruct config.json (thinker_config), as a pinned public extract of it gives it
# (hidden 2048, 48 layers, 32 query / 4 KV heads of 128, 128 experts of 768, 8 active, vocab 152064; the audio
# encoder Whisper-large sized with output 2048; the vision tower 27 layers of 1152 with out_hidden_size 2048).
REAL_THINKER = {
    "text_config": {"vocab_size": 152064, "hidden_size": 2048, "intermediate_size": 768, "num_hidden_layers": 48,
                    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                    "norm_topk_prob": True, "decoder_sparse_step": 1, "max_position_embeddings": 65536,
                    "tie_word_embeddings": False,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [24, 20, 20],
                                        "interleaved": True, "mrope_interleaved": True}},
    "audio_config": {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                     "num_mel_bins": 128, "output_dim": 2048, "downsample_hidden_size": 480},
    "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                      "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "deepstack_visual_indexes": [8, 16, 24]},
    "tie_word_embeddings": False,
    # its token ids (<|audio_pad|>, <|audio_start|>, ...; "user" is 872), which transformers' defaults do not have
    "audio_token_id": 151675, "image_token_id": 151655, "video_token_id": 151656,
    "audio_start_token_id": 151669, "audio_end_token_id": 151670,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "user_token_id": 872, "position_id_per_seconds": 13,
}

# ---- bytes per stored weight of each format, as (bytes per weight, bytes per block, block size) ----
NF4_DOUBLE = (0.5, 1 + 4 / NESTED_BLOCK, NF4_BLOCK)  # 4-bit codes; uint8 absmax a block, fp32 per 256 absmaxes
FP8_BLOCKWISE = (1.0, 4.0, FP8_BLOCK * FP8_BLOCK)  # e4m3 weights, fp32 scale a 128 x 128 tile
INT4_GROUPWISE = (0.5, 4.0, INT4_GROUP)  # torchao int4: bf16 scale and zero point a group of 128
AWQ_GROUPWISE = (0.5, 2.5, INT4_GROUP)  # AWQ: fp16 scale and a packed 4-bit zero a group of 128
INT8_ROWWISE = (1.0, 0.0, 1)  # torchao int8 weight-only: one scale a row, negligible


def format_bytes(n_weights: int, fmt: tuple[float, float, int] | None) -> float:
    """Bytes n_weights take in a format; None: bf16."""
    if fmt is None:
        return 2.0 * n_weights
    per_weight, per_block, block = fmt
    return per_weight * n_weights + per_block * math.ceil(n_weights / block)


# --------------------------------------------------------------- arithmetic on the real shapes

def real_thinker_counts(config: dict = REAL_THINKER) -> dict[str, int]:
    """Parameters of the real thinker by kind, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = Qwen3OmniMoeThinkerForConditionalGeneration(Qwen3OmniMoeThinkerConfig(**config))
    counts = {"experts": 0, "linear": 0, "skipped": 0, "other": 0}
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if any(name == s or name.startswith(s + ".") for s in SKIPPED):
            counts["skipped"] += own
        elif is_fused_experts(module):
            counts["experts"] += own
        elif type(module) is torch.nn.Linear:
            counts["linear"] += own
        else:
            counts["other"] += own  # embeddings, routers, norms
    return counts


ARITHMETIC_ROUTES = {  # route: (format of the language model's Linear weights, format of the experts)
    "bf16 (none)": (None, None),
    "nf4 Linear only (BitsAndBytesConfig today)": (NF4_DOUBLE, None),
    "nf4 incl. experts (nf4-experts, chosen)": (NF4_DOUBLE, NF4_DOUBLE),
    "fp8 (FineGrainedFP8Config)": (FP8_BLOCKWISE, FP8_BLOCKWISE),
    "int8 torchao on experts + Linear": (INT8_ROWWISE, INT8_ROWWISE),
    "int4 torchao (group 128)": (INT4_GROUPWISE, INT4_GROUPWISE),
    "AWQ int4 checkpoint (group 128)": (AWQ_GROUPWISE, AWQ_GROUPWISE),
}


def arithmetic_rows(counts: dict[str, int]) -> list[list[str]]:
    """GPU memory of the thinker per route and whether it fits a 24 GB card beside an 8k-token KV cache."""
    text = REAL_THINKER["text_config"]
    kv_bytes = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * 2 * CONTEXT_TOKENS
    rows = []
    for route, (linear_fmt, experts_fmt) in ARITHMETIC_ROUTES.items():
        experts = format_bytes(counts["experts"], experts_fmt)
        linear = format_bytes(counts["linear"], linear_fmt)
        rest = 2.0 * (counts["skipped"] + counts["other"])
        weights = experts + linear + rest
        total = weights + kv_bytes + OVERHEAD_BYTES
        rows.append([route, f"{experts / GB:.1f}", f"{linear / GB:.2f}", f"{rest / GB:.2f}", f"{weights / GB:.1f}",
                     f"{total / GB:.1f}", "yes" if total <= GPU_BYTES else "no"])
    return rows


# --------------------------------------------------------------- the tiny model on the CPU

def nf4_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The app's 4-bit settings (chat/local.py _quantization_config) with the family's skipped modules."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(SKIPPED))


def load_route(route: str, checkpoint: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The thinker loaded the way a route loads it (everything but the post-load routes quantizes while loading)."""
    kwargs: dict = {"dtype": dtype, "device_map": device}
    if route in ("nf4-linear", "bnb-parametrize"):
        kwargs["quantization_config"] = nf4_config(dtype)
    elif route == "nf4-experts":
        kwargs["quantization_config"] = with_experts(nf4_config(dtype))
    elif route == "fp8":
        kwargs["quantization_config"] = FineGrainedFP8Config(modules_to_not_convert=list(SKIPPED))
    elif route.startswith("torchao"):
        kwargs["quantization_config"] = torchao_config(route)
        # the default experts kernel (grouped_mm) transposes the 3-D weight, which torchao's tensors do not implement
        kwargs["experts_implementation"] = "eager"
    model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(checkpoint, **kwargs).eval()
    if route == "nf4-experts-only":
        quantize_experts(model)
    elif route == "bnb-parametrize":
        from bitsandbytes.nn.parametrize import replace_parameter_4bit

        for module in [m for m in model.modules() if is_fused_experts(m)]:
            for name in ("gate_up_proj", "down_proj"):
                replace_parameter_4bit(module, name, compress_statistics=True, quant_type="nf4",
                                       blocksize=NF4_BLOCK)
    return model


def torchao_config(route: str) -> object:
    """TorchAoConfig quantizing the experts' 3-D parameters (by name) and the language model's Linear weights."""
    from torchao.quantization import FqnToConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    weights = (Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d")
               if route == "torchao-int4" else Int8WeightOnlyConfig())
    return TorchAoConfig(FqnToConfig({r"re:.*language_model\..*experts\.(gate_up_proj|down_proj)": weights,
                                      r"re:.*language_model\..*self_attn\.[qkvo]_proj": weights}))


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as stored (bitsandbytes' packed bytes and scales, torchao's tensor parts)."""
    from bench.gpu import module_bytes

    return module_bytes(model)


def time_per_token(model: torch.nn.Module, ids: torch.Tensor, n_new: int) -> float:
    """Seconds per generated token: (generate n_new) - (generate 1), over n_new - 1, so prefill drops out."""
    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(2)  # warm-up
    return (run(n_new) - run(1)) / (n_new - 1)


def tiny_rows(routes: list[str]) -> list[list[str]]:
    """Each route on the tiny thinker against the float32 one: logits, greedy tokens, time per token, bytes."""
    from testkit.tiny.qwen3_omni import build_tiny_qwen3_omni

    torch.manual_seed(0)
    ids = torch.randint(0, 256, (1, N_PROMPT_TOKENS))  # printable bytes of the tiny vocabulary
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = build_tiny_qwen3_omni(Path(scratch))
        reference = load_route("none", checkpoint, torch.float32, "cpu")
        with torch.no_grad():
            ref_logits = reference(input_ids=ids).logits[0]  # (n_tokens, vocab)
            ref_tokens = reference.generate(input_ids=ids, max_new_tokens=N_NEW_TOKENS, min_new_tokens=N_NEW_TOKENS,
                                            do_sample=False)[0, N_PROMPT_TOKENS:]
        spread = (ref_logits.max(-1).values - ref_logits.min(-1).values).mean().item()
        for route in routes:
            try:
                model = load_route(route, checkpoint, torch.float32, "cpu")
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[0]
                    tokens = model.generate(input_ids=ids, max_new_tokens=N_NEW_TOKENS, min_new_tokens=N_NEW_TOKENS,
                                            do_sample=False)[0, N_PROMPT_TOKENS:]
                diff = (logits.float() - ref_logits).abs().max().item()
                same = int((tokens == ref_tokens).cumprod(0).sum())
                per_token_ms = 1000 * time_per_token(model, ids, N_NEW_TOKENS)
                rows.append([route, f"{diff:.3f}", f"{spread:.1f}", f"{same}/{N_NEW_TOKENS}", f"{per_token_ms:.1f}",
                             f"{stored_bytes(model) / 1e6:.3f}"])
                del model
            except Exception as e:  # a route that cannot run here is a finding, not a crash
                rows.append([route, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:110]}"])
            gc.collect()
    return rows


# --------------------------------------------------------------- real shapes on a GPU

def build_real_shape_thinker(folder: Path, n_layers: int) -> Path:
    """A thinker of the real shapes (n_layers of its 48 language-model layers) with random bf16 weights, saved."""
    config = dict(REAL_THINKER, text_config=dict(REAL_THINKER["text_config"], num_hidden_layers=n_layers))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(
            Qwen3OmniMoeThinkerConfig(**config), dtype=torch.bfloat16)
    with torch.no_grad():  # transformers leaves the experts as torch.empty: give them a weight's scale
        for module in [m for m in model.modules() if is_fused_experts(m)]:
            module.gate_up_proj.normal_(std=0.02)
            module.down_proj.normal_(std=0.02)
    model.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def gpu_rows(routes: list[str], n_layers: int = 8, folder: Path | None = None) -> list[list[str]]:
    """Per route on a real-shape thinker of n_layers on the GPU: load s, peak GB while loading, resident GB,
    ms per token, and resident GB scaled to 48 layers (the per-layer part times 48 / n_layers)."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = folder or Path(scratch) / "thinker"
        if not (checkpoint / "config.json").exists():
            build_real_shape_thinker(checkpoint, n_layers)
        ids = torch.randint(0, 151643, (1, N_PROMPT_TOKENS), device="cuda")
        for route in routes:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                start = time.perf_counter()
                model = load_route(route, checkpoint, torch.bfloat16, "cuda")
                load_s = time.perf_counter() - start
                peak, resident = torch.cuda.max_memory_allocated() / GB, torch.cuda.memory_allocated() / GB
                layer = stored_bytes(model.model.language_model.layers[0]) / GB
                full = resident + layer * (REAL_THINKER["text_config"]["num_hidden_layers"] - n_layers)
                per_token_ms = 1000 * time_per_token(model, ids, GPU_NEW_TOKENS)
                rows.append([route, f"{load_s:.1f}", f"{peak:.2f}", f"{resident:.2f}", f"{per_token_ms:.1f}",
                             f"{full:.1f}"])
                del model
            except Exception as e:
                rows.append([route, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:110]}"])
    return rows


TINY_ROUTES = ("nf4-linear", "nf4-experts", "nf4-experts-only", "bnb-parametrize", "torchao-int8", "fp8")
GPU_ROUTES = ("nf4-linear", "nf4-experts", "bnb-parametrize", "fp8", "torchao-int4")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routes", help="comma-separated routes (CPU: %s; GPU: %s)" % (
        ",".join(TINY_ROUTES), ",".join(GPU_ROUTES)))
    parser.add_argument("--gpu", action="store_true", help="real per-layer shapes on the GPU instead of the tiny model")
    parser.add_argument("--layers", type=int, default=8, help="language-model layers of the --gpu thinker (of 48)")
    args = parser.parse_args(argv)
    counts = real_thinker_counts()
    print_table(
        f"Qwen3-Omni-30B-A3B thinker, real shapes: {sum(counts.values()) / 1e9:.2f} B parameters "
        f"(experts {counts['experts'] / 1e9:.2f} B, language-model Linear {counts['linear'] / 1e9:.2f} B, "
        f"kept bf16 {', '.join(SKIPPED)} {counts['skipped'] / 1e9:.2f} B, embeddings/routers/norms "
        f"{counts['other'] / 1e9:.2f} B); budget: {GPU_BYTES / GB:.1f} GB card, KV cache of {CONTEXT_TOKENS} "
        f"tokens, {OVERHEAD_BYTES / GB:.1f} GB overhead",
        ["route", "experts GB", "Linear GB", "bf16 rest GB", "weights GB", "with KV + overhead GB", "fits 24 GB"],
        arithmetic_rows(counts))
    if args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu needs a CUDA GPU")
        routes = args.routes.split(",") if args.routes else list(GPU_ROUTES)
        print_table(f"Real-shape thinker, {args.layers} of 48 layers, random bf16 weights, on "
                    f"{torch.cuda.get_device_name()}: {N_PROMPT_TOKENS}-token prompt, {GPU_NEW_TOKENS} new tokens",
                    ["route", "load s", "load peak GB", "resident GB", "ms/token", "resident at 48 layers GB"],
                    gpu_rows(routes, args.layers))
        return
    routes = args.routes.split(",") if args.routes else list(TINY_ROUTES)
    rows = tiny_rows(routes)
    print_table(f"Tiny Qwen3-Omni thinker on the CPU against float32: {N_PROMPT_TOKENS}-token prompt, "
                f"{N_NEW_TOKENS} greedy tokens (checks the routes, not their speed)",
                ["route", "max |logit diff|", "mean logit range", "same greedy prefix", "ms/token", "weights MB"],
                [row + [""] * (6 - len(row)) for row in rows])


if __name__ == "__main__":
    main()
