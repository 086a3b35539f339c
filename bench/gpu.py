"""GPU benchmark: a family's real architecture with random weights, through LocalBackend.

--family qwen2-audio (default), qwen-audio-chat, salmonn-7b, salmonn-13b, voxtral-mini, qwen2.5-omni-7b,
qwen3-omni, gemma4-e2b or gemma4-e4b: builds the model from the real config on the GPU (no download), saves it as a
checkpoint in that family's own format (SALMONN: its four parts and the decode yaml; Voxtral: with a full-size
tekken.json; the Omni families: the thinker only, which is all the app loads while the voice is off, with a
tokenizer covering every id; Gemma 4: Gemma4ForConditionalGeneration with a 262144-id tokenizer,
testkit.tiny.gemma4.build_gemma4_real), then
for each route loads it the product's way (LocalBackend, from_pretrained) and answers a short question
about a fresh 30 s clip with 256 generated tokens (min_new_tokens forces the length; the product's
default sampling settings). Per route: load time, memory, time to first token (Response's own measure:
features, prefill and the first token), decode tokens/s, and that speed against the memory-bandwidth
limit: bytes read per generated token (language-model weights + KV cache) / measured copy bandwidth.
Routes: none (bf16 on a GPU), nf4 (bitsandbytes, the default on a GPU), nf4-compiled (the same with a
static cache and torch.compile), int4-torchao-compiled (torchao int4 weight-only, tinygemm kernels;
CUDA only, needs torchao); for Gemma 4 also nf4-ple-cpu (below).
Gemma 4 E2B / E4B (google/gemma-4-E2B-it, -E4B-it): shapes from public copies of their config.json (E2B: hidden 1536,
35 layers, 20 of them sharing KV, double-wide MLPs, 1 KV head; E4B: hidden 2560, 42 layers, 18 sharing KV, 2 KV heads;
both: 8 heads of 256 (full-attention layers 512), per-layer embeddings (PLE) of 256 per layer over 262144 ids, audio
tower 1024 x 12 layers, vision tower 768 x 16), counted on the meta device (tests/test_bench.py):
    E2B 5.10 B parameters: PLE 2.35 B, embeddings 0.40 B (tied head), layers 1.86 B, audio 0.31 B, vision 0.17 B
        (2.76 B without PLE, 2.28 B without PLE and the towers: Google's "2B effective");
    E4B 7.94 B: PLE 2.82 B, embeddings 0.67 B, layers 3.95 B, audio 0.31 B, vision 0.17 B (5.12 B without PLE).
  Memory by arithmetic, NF4 layers (0.51 byte a weight with double-quantized scales) and everything else in bf16:
    E2B 0.94 + 6.48 = 7.4 GB, of which PLE 4.70 GB, so 2.7 GB with PLE on the CPU; E4B 1.98 + 7.99 = 10.0 GB, 4.3 GB
    with PLE on the CPU (weights only; the KV cache and activations come on top).
  nf4-ple-cpu: the app's 4-bit, with model.language_model.embed_tokens_per_layer on the CPU: a device_map dict that
    puts that module on "cpu" and the rest on the GPU, with llm_int8_enable_fp32_cpu_offload (bitsandbytes refuses a
    mixed map otherwise). LocalBackend's constructor takes a device string only (LoadOptions.device_map can hold a
    dict, but nothing sets one), so the bench builds the LocalBackend with load_model replaced by a call of the
    family's LocalModel (Gemma4Model) with that map. accelerate would offload a "cpu" module (weights kept on the
    CPU, copied to the GPU at every call: 4.7 GB a step); the bench swaps that hook for one that runs the lookup on
    the CPU and moves only the looked-up rows (35 x 256 values a token) to the GPU. Its verdict line answers: does
    E2B take under 4 GB of GPU memory this way, and how fast?
Qwen3-Omni's 30B-A3B thinker takes 63 GB in bf16, more than the device's disk, so its checkpoint has the real
per-layer shapes but 8 of the 48 layers. First bench.qwen3_omni_experts.gpu_rows measures its quantization routes
(the app's default, NF4 with the experts, first; resident memory scaled to 48 layers is what the 24 GB target
judges), then LocalBackend runs the app's 4-bit default on the same 8 layers (first token and tokens/s there are
not the full model's and are not judged); for it, --routes picks the LocalBackend routes.
Without a GPU, or with --tiny, it runs the tiny test model on the CPU: that checks the script, not speed.
Run: .venv/bin/python -m bench.gpu [--family NAME] [--tiny] [--quick] [--routes nf4,none] [--checkpoint DIR]
Both Omni families on a lent GPU, a few minutes each (install the carried wheels first, BENCHMARKS.md):
    for f in qwen2.5-omni-7b qwen3-omni; do python3 -m bench.gpu --quick --family "$f"; done
Everything on a lent GPU (each family builds its own random checkpoint; the two Gemma 4 ones a minute or two each):
    for f in qwen2-audio qwen-audio-chat salmonn-7b salmonn-13b voxtral-mini qwen2.5-omni-7b qwen3-omni \
        gemma4-e2b gemma4-e4b; do python3 -m bench.gpu --quick --family "$f"; done
"""

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    CompileConfig,
    GenerationConfig,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2Tokenizer,
    WhisperFeatureExtractor,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from bench.common import print_table  # noqa: E402
from chat.audio import SAMPLE_RATE  # noqa: E402
from chat.backend import Response, Stats  # noqa: E402
from chat.clip import Clip  # noqa: E402
from chat.conversation import Conversation  # noqa: E402
from chat.local import LocalBackend  # noqa: E402
from chat.settings import GenerationSettings  # noqa: E402
from testkit.tiny import gemma4, omni, qwen2_5_omni, qwen3_omni  # noqa: E402
from testkit.tiny.qwen2_audio import build_tiny_qwen2_audio  # noqa: E402
from testkit.tiny.qwen_audio_chat import FULL_SIZE, build_qwen_audio_chat, build_tiny_qwen_audio_chat  # noqa: E402
from testkit.tiny.salmonn import FULL_SIZES, build_salmonn, build_tiny_salmonn  # noqa: E402
from testkit.tiny.voxtral import build_tiny_voxtral, build_voxtral_mini  # noqa: E402

# Qwen/Qwen2-Audio-7B(-Instruct) config.json, as checked against public copies of it and the
# Qwen2AudioEncoderConfig defaults (which are documented as that checkpoint's): 8.40 B parameters, 16.8 GB in bf16.
TEXT_CONFIG = {
    "model_type": "qwen2", "vocab_size": 156032, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,  # no grouped-query attention
    "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": False,
}
AUDIO_CONFIG = {  # Whisper-large-v3 sized encoder
    "model_type": "qwen2_audio_encoder", "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120, "num_mel_bins": 128, "max_source_positions": 1500,
}
# The real tokenizer's special tokens and ids; <|AUDIO|> 151646 is the config's audio_token_index.
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|AUDIO|>": 151646,
                  "<|audio_bos|>": 151647, "<|audio_eos|>": 151648}

ROUTES = ("none", "nf4", "nf4-compiled", "int4-torchao-compiled", "nf4-ple-cpu")
QUICK_ROUTES = ("none", "nf4")
GEMMA4_SIZES = {"gemma4-e2b": "e2b", "gemma4-e4b": "e4b"}
PLE_ROUTE = "nf4-ple-cpu"  # Gemma 4 only: 4-bit, per-layer embeddings on the CPU
PLE_MODULE = "model.language_model.embed_tokens_per_layer"
PLE_GPU_TARGET_GB = 4.0  # the question: E2B under 4 GB of GPU memory with PLE on the CPU?
CLIP_S = 30
QUESTION = "What is said in this audio? Answer in detail."
N_NEW_TOKENS = 256
QUICK_NEW_TOKENS = 16
REPEATS = 3
TORCHAO_GROUP_SIZE = 128
GB = 1e9
TARGETS = {"memory_gb": 7.0, "ttft_s": 0.150, "tokens_per_s": 100.0}  # for the default route (nf4) on an H100
# Qwen2.5-Omni-7B's thinker in 4 bit, by arithmetic: NF4 layers 3.37 GB + bf16 embeddings, lm_head, audio and vision
# towers 4.81 GB = 8.2 GB; Qwen3-Omni: a 24 GB card (bench/qwen3_omni_experts.py: 19.1 GB of weights)
MEMORY_TARGETS_GB = {"salmonn-7b": 7.0, "salmonn-13b": 11.0, "voxtral-mini": 7.0, "qwen2.5-omni-7b": 10.0,
                     "qwen3-omni": 24.0, "gemma4-e2b": 7.5, "gemma4-e4b": 10.0}
DEFAULT_ROUTE = "nf4"
BENCH_FAMILIES = {"qwen2-audio": "Qwen2-Audio 7B", "qwen-audio-chat": "Qwen-Audio-Chat 7B",
                  "salmonn-7b": "SALMONN 7B", "salmonn-13b": "SALMONN 13B", "voxtral-mini": "Voxtral Mini 3B",
                  "qwen2.5-omni-7b": "Qwen2.5-Omni-7B thinker", "qwen3-omni": "Qwen3-Omni-30B-A3B thinker",
                  "gemma4-e2b": "Gemma 4 E2B", "gemma4-e4b": "Gemma 4 E4B"}
QWEN3_OMNI_LAYERS = 8  # of the thinker's 48: 13.6 GB in bf16 (48 would take 63 GB, the device has 64 GB of disk)
QWEN3_OMNI_ROUTES = ("nf4",)  # through LocalBackend: the app's default; the other routes are in the experts table
# bench.qwen3_omni_experts' routes, the app's default (nf4-experts, what "4bit" loads) first
QWEN3_EXPERT_ROUTES = ("nf4-experts", "none", "nf4-linear", "bnb-parametrize", "fp8", "torchao-int4")
QWEN3_QUICK_EXPERT_ROUTES = ("nf4-experts", "none")
_QWEN3_REAL_ID = {token: omni.REAL_FIRST_ADDED_ID + i for i, (token, _) in enumerate(qwen3_omni.ADDED_TOKENS)}


def full_vocab_tokenizer() -> Qwen2Tokenizer:
    """A byte-level tokenizer with an entry for every one of the model's 156032 ids.

    The real tokenizer cannot be downloaded here. Every id decodes to a word (" t1234"), so the random
    model's replies stream as text, and the special tokens sit at their real ids. Prompts split into bytes
    (no merges), about 60 more text tokens than the real tokenizer gives next to 750 audio tokens.
    """
    symbols = bytes_to_unicode()
    by_id = {i: token for token, i in SPECIAL_TOKENS.items()}
    vocab = {symbols[b]: b for b in range(256)}
    vocab.update({by_id.get(i, f"{symbols[ord(' ')]}t{i}"): i for i in range(256, TEXT_CONFIG["vocab_size"])})
    return Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=list(SPECIAL_TOKENS)[1:])


def build_checkpoint(folder: Path, family: str, device: torch.device, tiny: bool) -> Path:
    """The family's checkpoint (a folder, or SALMONN's yaml): full size with random bf16 weights made on the device,
    or the tiny test one."""
    if family.startswith("salmonn"):
        if tiny:
            return build_tiny_salmonn(folder)
        return build_salmonn(folder, FULL_SIZES[family.removeprefix("salmonn-")], device.type, torch.bfloat16)
    if family == "voxtral-mini":
        return build_tiny_voxtral(folder) if tiny else build_voxtral_mini(folder, device.type)
    if family == "qwen2.5-omni-7b":
        return (qwen2_5_omni.build_tiny_qwen2_5_omni(folder) if tiny
                else qwen2_5_omni.build_qwen2_5_omni_7b(folder, device))
    if family in GEMMA4_SIZES:
        if tiny:
            return gemma4.build_tiny_gemma4(folder)
        return gemma4.build_gemma4_real(folder, GEMMA4_SIZES[family], device)
    if family == "qwen3-omni":
        return qwen3_omni.build_tiny_qwen3_omni(folder) if tiny else build_qwen3_omni_layers(folder, QWEN3_OMNI_LAYERS)
    if family == "qwen-audio-chat":
        if tiny:
            return build_tiny_qwen_audio_chat(folder)
        return build_qwen_audio_chat(folder, FULL_SIZE, spread=False, device=device.type, dtype=torch.bfloat16,
                                     n_shards=9)  # the official files are 9 shards too
    return build_tiny_qwen2_audio(folder) if tiny else build_full_qwen2_audio(folder, device)


def build_full_qwen2_audio(folder: Path, device: torch.device) -> Path:
    """Save the full-size model with random bf16 weights, initialized directly on the device, and its processor."""
    config = Qwen2AudioConfig(audio_config=AUDIO_CONFIG, text_config=TEXT_CONFIG,
                              audio_token_index=SPECIAL_TOKENS["<|AUDIO|>"])
    torch.manual_seed(0)
    with device:
        model = Qwen2AudioForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=SPECIAL_TOKENS["<|im_end|>"], pad_token_id=SPECIAL_TOKENS["<|endoftext|>"]
    )
    model.save_pretrained(folder)
    feature_extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLE_RATE, chunk_length=CLIP_S)
    Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=full_vocab_tokenizer()).save_pretrained(folder)
    del model
    free_memory()
    return folder


def build_qwen3_omni_layers(folder: Path, n_layers: int) -> Path:
    """Qwen3-Omni's thinker at its real per-layer shapes with n_layers of its 48 (random bf16 weights on the GPU),
    and what LocalBackend needs beside it: a full-vocabulary tokenizer, the 300-s feature extractor."""
    from bench.qwen3_omni_experts import build_real_shape_thinker

    build_real_shape_thinker(folder, n_layers)
    GenerationConfig(eos_token_id=_QWEN3_REAL_ID["<|im_end|>"],
                     pad_token_id=_QWEN3_REAL_ID["<|endoftext|>"]).save_pretrained(folder)
    tokenizer = omni.full_vocab_tokenizer(qwen3_omni.ADDED_TOKENS, qwen3_omni.NAMED_TOKENS,
                                                  qwen3_omni.MAX_POSITIONS)
    tokenizer.save_pretrained(folder)
    omni.feature_extractor().save_pretrained(folder)
    return folder


def checkpoint_path(folder: Path, family: str) -> Path:
    """What -c names for the family's checkpoint in folder."""
    return folder / "decode_config.yaml" if family.startswith("salmonn") else folder


def load(route: str, checkpoint: Path, on_gpu: bool) -> LocalBackend:
    """The product's loader, plus the one change each faster route makes on top of it."""
    if route == PLE_ROUTE:
        return load_ple_on_cpu(checkpoint, on_gpu)
    backend = LocalBackend(str(checkpoint), quantization="4bit" if route.startswith("nf4") else "none",
                           cpu_only=not on_gpu)
    model = backend.model
    if route == "int4-torchao-compiled":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        # only the language model's layers become int4: what the family keeps unquantized stays in bf16
        config = Int4WeightOnlyConfig(group_size=TORCHAO_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")
        quantize_(language_model(model), config)
    if route.endswith("compiled"):
        # generate() compiles the decoding step when the cache has a fixed shape
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = CompileConfig(mode="reduce-overhead" if on_gpu else "default")
        model.generation_config.compile_config._compile_all_devices = not on_gpu  # CPU: only to test the route
        # transformers refuses to compile any bitsandbytes model; bitsandbytes registers its kernels as torch
        # custom ops (bitsandbytes/_ops.py), so compiling is worth measuring
        model.hf_quantizer = None
    return backend


def ple_device_map(model_class: type, config, main: int | str) -> dict[str, int | str]:
    """A device_map with PLE_MODULE on "cpu" and every other module on main: each module along PLE_MODULE's path
    names its other children (found on the meta device), plus the top level's other children."""
    with torch.device("meta"):
        model = model_class._from_config(config)
    device_map, module, prefix = {}, model, ""
    for part in PLE_MODULE.split("."):
        device_map.update({prefix + name: main for name, _ in module.named_children() if name != part})
        device_map.update({prefix + name: main for name, _ in module.named_parameters(recurse=False)})
        device_map.update({prefix + name: main for name, _ in module.named_buffers(recurse=False)})
        module, prefix = getattr(module, part), prefix + part + "."
    device_map[PLE_MODULE] = "cpu"
    return device_map


def run_on_cpu(module: torch.nn.Module) -> None:
    """Make a module that accelerate dispatched as CPU-offloaded run on the CPU: its weights restored there, its
    inputs moved to the CPU and its output back to the inputs' device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    remove_hook_from_module(module)  # the offload hook puts the weights back on the CPU as it detaches
    tensors = [*module.named_parameters(), *module.named_buffers()]
    missing = [name for name, t in tensors if t.device.type == "meta"]
    if missing:
        raise RuntimeError(f"{PLE_MODULE}'s {', '.join(missing)} stayed on the meta device after loading")
    module.to("cpu")  # accelerate leaves an offloaded module's buffers (the embedding's scale) on the GPU
    add_hook_to_module(module, AlignDevicesHook(execution_device="cpu", io_same_device=True))


def load_ple_on_cpu(checkpoint: Path, on_gpu: bool) -> LocalBackend:
    """The app's 4-bit load with PLE_MODULE on the CPU. LocalBackend cannot ask for it (its device is a string), so
    its load_model is replaced for the call by the family's LocalModel class given a device_map dict."""
    import copy
    import dataclasses
    from unittest import mock

    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    from chat.families.gemma4.model import Gemma4Model

    def load_with_ple_on_cpu(family, path, options):
        config = Gemma4Config.from_pretrained(path)
        device_map = ple_device_map(Gemma4ForConditionalGeneration, config, 0 if on_gpu else "cpu")
        quantization = copy.deepcopy(options.quantization_config)
        # bitsandbytes refuses a map mixing "cpu" and a GPU otherwise; it then leaves the "cpu" modules unquantized
        # (all of them on a CPU-only map: there, for --tiny, the flag stays off)
        quantization.llm_int8_enable_fp32_cpu_offload = on_gpu
        quantization.llm_int8_skip_modules = [*(quantization.llm_int8_skip_modules or []), PLE_MODULE]
        return Gemma4Model(path, dataclasses.replace(options, device_map=device_map, quantization_config=quantization))

    with mock.patch("chat.local.load_model", load_with_ple_on_cpu):
        backend = LocalBackend(str(checkpoint), quantization="4bit", cpu_only=not on_gpu)
    if on_gpu:
        run_on_cpu(language_model(backend.model).embed_tokens_per_layer)
    return backend


def ple_cpu_gb(model: torch.nn.Module) -> float:
    """GB of the per-layer embeddings held in CPU memory."""
    ple = getattr(language_model(model), "embed_tokens_per_layer", None)
    return module_bytes(ple) / GB if ple is not None and ple.weight.device.type == "cpu" else 0.0


def fresh_clip(seed: int) -> Clip:
    """A fresh 30 s clip (tone plus noise): new content, so its features are not cached yet."""
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_S * SAMPLE_RATE) / SAMPLE_RATE
    samples = 0.3 * np.sin(2 * np.pi * (200 + seed) * t) + 0.05 * rng.standard_normal(len(t))
    return Clip.from_array(samples.astype(np.float32), SAMPLE_RATE, name=f"clip-{seed}.wav")


def reply(backend: LocalBackend, seed: int, n_new_tokens: int) -> Stats:
    """Ask about a new clip and read the whole streamed reply; exactly n_new_tokens are generated."""
    conversation = Conversation()
    conversation.add_user(QUESTION, [fresh_clip(seed)])
    backend.model.generation_config.min_new_tokens = n_new_tokens  # a random model's eos must not end it early
    response = Response(backend, conversation, GenerationSettings(max_new_tokens=n_new_tokens, seed=seed))
    for _ in response:
        pass
    assert response.stats.n_tokens == n_new_tokens, f"generated {response.stats.n_tokens} of {n_new_tokens} tokens"
    return response.stats


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really occupies: quantized subclasses by their packed parts, bitsandbytes with its scales."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    n = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)  # bitsandbytes NF4: block scales, nested when double-quantized
    for part in (state, getattr(state, "state2", None)):
        if part is not None:
            n += sum(t.numel() * t.element_size() for t in (part.absmax, part.code))
    return n


def module_bytes(module: torch.nn.Module, skip: tuple[torch.nn.Module, ...] = ()) -> int:
    """Weights and buffers of a module, leaving out the modules in skip."""
    skipped = {id(t) for m in skip for t in [*m.parameters(), *m.buffers()]}
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()] if id(t) not in skipped)


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (embeddings, layers, norm) of either family's model."""
    return getattr(model.model, "language_model", model.model)


def bytes_per_token(model: torch.nn.Module, mean_positions: float) -> float:
    """Bytes one decode step must read: every language-model weight but the embedding table (one row of it is
    read) and, in a mixture of experts, only the routed share of each layer's experts; lm_head; and the KV cache
    of the positions so far."""
    decoder = language_model(model)
    text = model.config.get_text_config()
    experts = tuple(m for name, m in decoder.named_modules() if name.endswith(".experts"))
    per_layer = getattr(decoder, "embed_tokens_per_layer", None)  # Gemma 4's PLE: a lookup too
    lookups = (decoder.embed_tokens,) if per_layer is None else (decoder.embed_tokens, per_layer)
    # Qwen3-Omni: 8 of 128; Gemma 4's dense configs hold None for both
    routed = (getattr(text, "num_experts_per_tok", None) or 0) / (getattr(text, "num_experts", None) or 1)
    weights = (module_bytes(decoder, skip=(*lookups, *experts)) + module_bytes(model.lm_head)
               + routed * sum(module_bytes(m) for m in experts))
    kv_bytes = model.lm_head.weight.element_size()  # the cache is kept in the unquantized layers' dtype
    # Gemma 4: layers that reuse another layer's KV keep none, and each layer's config has its own head_dim (full-
    # attention layers 512, sliding 256)
    kept = text.num_hidden_layers - (getattr(text, "num_kv_shared_layers", None) or 0)
    layers = text.per_layer_config[:kept] if getattr(text, "is_heterogeneous", False) else [text] * kept
    kv_per_position = 2 * kv_bytes * sum(
        layer.num_key_value_heads * (getattr(layer, "head_dim", None) or layer.hidden_size // layer.num_attention_heads)
        for layer in layers)
    return weights + kv_per_position * mean_positions


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a large device-to-device copy moves, counting reads and writes."""
    n_bytes = 2**30 if device.type == "cuda" else 2**28
    source = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    repeats = 10
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * n_bytes * repeats / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timers read the host clock)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Return everything a finished route held, so the next one starts from nothing."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def weights_label(backend: LocalBackend, route: str) -> str:
    """What the language model's weights are stored as."""
    if route.startswith("nf4"):
        return "nf4"
    if route.startswith("int4"):
        return "int4"
    return str(backend.model.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")


def measure(route: str, checkpoint: Path, on_gpu: bool, n_new_tokens: int, repeats: int, bandwidth: float) -> list:
    """One table row: load, a first (warm-up, compiling) reply, then the median of `repeats` replies."""
    start = time.perf_counter()
    backend = load(route, checkpoint, on_gpu)
    load_s = time.perf_counter() - start
    resident_gb = (torch.cuda.memory_allocated() if on_gpu else module_bytes(backend.model)) / GB
    start = time.perf_counter()
    reply(backend, seed=1000, n_new_tokens=n_new_tokens)
    first_reply_s = time.perf_counter() - start
    stats, peaks = [], []
    for seed in range(repeats):
        stats.append(reply(backend, seed=seed, n_new_tokens=n_new_tokens))
        peaks.append(torch.cuda.max_memory_reserved() if on_gpu else 0)  # LocalBackend resets the peak per reply
    ttft_s = statistics.median(s.time_to_first_token_s for s in stats)
    tokens_per_s = statistics.median(s.tokens_per_s for s in stats)
    peak_gb = f"{max(peaks) / GB:.2f}" if on_gpu else "-"
    read_per_token = bytes_per_token(backend.model, stats[0].n_prompt_tokens + n_new_tokens / 2)
    limit = bandwidth / read_per_token
    if route == PLE_ROUTE:
        ple_on_cpu_gb.append(ple_cpu_gb(backend.model))
    row = [route, weights_label(backend, route), f"{load_s:.1f}", f"{first_reply_s:.1f}", f"{resident_gb:.2f}", peak_gb,
           stats[0].n_prompt_tokens, f"{ttft_s * 1000:.0f}", f"{tokens_per_s:.1f}", f"{read_per_token / GB:.3f}",
           f"{limit:.0f}", f"{100 * tokens_per_s / limit:.0f}%"]
    backend.close()
    del backend
    free_memory()
    return row


ple_on_cpu_gb: list[float] = []  # measure's report of the PLE route's CPU-held embeddings


def ple_verdict(row: list, ple_gb: float) -> str:
    """The issue's question, for the PLE route: GPU memory under PLE_GPU_TARGET_GB, and at what speed."""
    memory, tokens_per_s = float(row[5]), float(row[8])
    return (f"{PLE_ROUTE}: GPU memory (peak reserved) {memory:.2f} GB with {ple_gb:.2f} GB of per-layer embeddings on "
            f"the CPU, decode {tokens_per_s:.1f} tokens/s (target < {PLE_GPU_TARGET_GB} GB: "
            f"{'met' if memory < PLE_GPU_TARGET_GB else 'missed'}; speed against the nf4 row above)")


def verdicts(row: list, family: str) -> list[str]:
    """The default route against its targets."""
    memory, ttft_ms, tokens_per_s = float(row[5]), float(row[7]), float(row[8])
    memory_target = MEMORY_TARGETS_GB.get(family, TARGETS["memory_gb"])
    checks = [
        (f"GPU memory (peak reserved) {memory:.2f} GB", memory <= memory_target, f"<= {memory_target} GB"),
        (f"first token {ttft_ms:.0f} ms", ttft_ms <= TARGETS["ttft_s"] * 1000, f"<= {TARGETS['ttft_s'] * 1000:.0f} ms"),
        (f"decode {tokens_per_s:.1f} tokens/s", tokens_per_s >= TARGETS["tokens_per_s"],
         f">= {TARGETS['tokens_per_s']:.0f}"),
    ]
    return [f"{what} (target {target}: {'met' if ok else 'missed'})" for what, ok, target in checks]


def qwen3_expert_rows(checkpoint: Path, quick: bool) -> list[list[str]]:
    """bench.qwen3_omni_experts' routes on the reduced-layer thinker, the app's default first; prints their table."""
    from bench.qwen3_omni_experts import GPU_NEW_TOKENS, N_PROMPT_TOKENS, gpu_rows

    rows = gpu_rows(list(QWEN3_QUICK_EXPERT_ROUTES if quick else QWEN3_EXPERT_ROUTES), QWEN3_OMNI_LAYERS, checkpoint)
    free_memory()
    print_table(f"{BENCH_FAMILIES['qwen3-omni']}, real shapes, {QWEN3_OMNI_LAYERS} of 48 layers, random weights, on "
                f"{torch.cuda.get_device_name()}: each route loaded as the app loads it, {N_PROMPT_TOKENS}-token "
                f"prompt, {GPU_NEW_TOKENS} new tokens",
                ["route", "load s", "load peak GB", "resident GB", "ms/token", "resident at 48 layers GB"],
                [row + [""] * (6 - len(row)) for row in rows])
    return rows


def qwen3_verdicts(expert_rows: list[list[str]]) -> list[str]:
    """The default route's memory at 48 layers against the target; the reduced model's speed is not judged."""
    route, target = QWEN3_EXPERT_ROUTES[0], MEMORY_TARGETS_GB["qwen3-omni"]
    row = next((row for row in expert_rows if row[0] == route and len(row) == 6), None)
    lines = [f"{DEFAULT_ROUTE}: first token and tokens/s are those of {QWEN3_OMNI_LAYERS} of 48 layers, not judged"]
    if row is not None:
        memory = float(row[5])
        lines.insert(0, f"{route}: GPU memory (resident, scaled to 48 layers) {memory:.1f} GB "
                        f"(target <= {target} GB: {'met' if memory <= target else 'missed'})")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2-audio", choices=list(BENCH_FAMILIES), help="which architecture")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny test model on the CPU (the default without a GPU)")
    parser.add_argument("--quick", action="store_true", help=f"routes {','.join(QUICK_ROUTES)}, "
                        f"{QUICK_NEW_TOKENS} tokens, one timed reply")
    parser.add_argument("--routes", help=f"comma-separated subset of {','.join(ROUTES)}")
    parser.add_argument("--checkpoint", type=Path, help="folder to build the random checkpoint in, or reuse it from")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.tiny
    if not on_gpu and not args.tiny:
        print("No CUDA GPU here: running the tiny model on the CPU (--tiny).\n")
    reduced = args.family == "qwen3-omni" and on_gpu  # the experts table, then the app's default on the same layers
    gemma = args.family in GEMMA4_SIZES
    family_routes = [r for r in ROUTES if gemma or r != PLE_ROUTE]
    quick_routes = [*QUICK_ROUTES, PLE_ROUTE] if gemma else list(QUICK_ROUTES)
    routes = (args.routes.split(",") if args.routes else list(QWEN3_OMNI_ROUTES) if reduced
              else quick_routes if args.quick else family_routes)
    if PLE_ROUTE in routes and not gemma:
        parser.error(f"{PLE_ROUTE} is for the Gemma 4 families ({', '.join(GEMMA4_SIZES)})")
    unknown = set(routes) - set(ROUTES)
    if unknown:
        parser.error(f"unknown routes {', '.join(sorted(unknown))}; choose from {', '.join(ROUTES)}")
    n_new_tokens, repeats = (QUICK_NEW_TOKENS, 1) if args.quick else (N_NEW_TOKENS, REPEATS)
    device = torch.device("cuda" if on_gpu else "cpu")
    bandwidth = copy_bandwidth(device)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.checkpoint or Path(scratch) / "checkpoint"
        checkpoint = checkpoint_path(folder, args.family)
        if not (checkpoint / "config.json").exists() and not checkpoint.is_file():
            start = time.perf_counter()
            build_checkpoint(folder, args.family, device, tiny=not on_gpu)
            print(f"built the random checkpoint in {time.perf_counter() - start:.1f} s: {checkpoint}")
            free_memory()
        expert_rows = qwen3_expert_rows(checkpoint, args.quick) if reduced else []
        rows, ple_gb = [], 0.0
        for route in routes:
            if route.startswith("int4") and not on_gpu:
                rows.append([route, "skipped: tinygemm int4 kernels are CUDA only"])
                continue
            try:
                rows.append(measure(route, checkpoint, on_gpu, n_new_tokens, repeats, bandwidth))
                if route == PLE_ROUTE:
                    ple_gb = ple_on_cpu_gb.pop()
            except Exception as e:  # one route failing (a missing package, a kernel) must not hide the others
                rows.append([route, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"])
                free_memory()
    name = torch.cuda.get_device_name(device) if on_gpu else "CPU, tiny model (checks the script, not speed)"
    model = f"{BENCH_FAMILIES[args.family]}, {'random weights' if on_gpu else 'tiny'}"
    if reduced:
        model += f", {QWEN3_OMNI_LAYERS} of 48 layers"
    print_table(
        f"{model} on {name}: {CLIP_S} s clip + question, {n_new_tokens} new tokens, median of {repeats}; "
        f"copy bandwidth {bandwidth / GB:.0f} GB/s (read + write)",
        ["route", "weights", "load s", "first reply s", "resident GB", "reply peak GB", "prompt tokens", "TTFT ms",
         "tokens/s", "read/token GB", "limit tokens/s", "of limit"],
        [row + [""] * (12 - len(row)) for row in rows],
    )
    default = next((row for row in rows if row[0] == DEFAULT_ROUTE and len(row) == 12), None)
    ple_row = next((row for row in rows if row[0] == PLE_ROUTE and len(row) == 12), None)
    if reduced:
        print("\n".join(qwen3_verdicts(expert_rows)))
    elif on_gpu and default is not None:
        print("\n".join(f"{DEFAULT_ROUTE}: {line}" for line in verdicts(default, args.family)))
    if on_gpu and ple_row is not None:
        print(ple_verdict(ple_row, ple_gb))
    elif default is not None:
        print("Targets are for a GPU and are not judged on the CPU.")


if __name__ == "__main__":
    main()
