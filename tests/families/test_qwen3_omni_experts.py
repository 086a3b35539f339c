"""Qwen3-Omni's MoE experts in NF4 (chat/families/qwen3_omni/experts.py), on the tiny real-format thinker, CPU.

The experts are quantized while from_pretrained loads them (their storage is 4-bit), the forward pass computes
exactly with the weights that storage holds, the quantization error stays within a stated tolerance, and greedy
generation runs.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig, Qwen3OmniMoeThinkerForConditionalGeneration

from chat.families.qwen3_omni.experts import (
    EXPERT_PARAMS, Nf4Experts, Nf4ExpertsConfig, is_fused_experts, quantize_experts, with_experts,
)
from testkit.tiny.qwen3_omni import build_tiny_qwen3_omni

SKIPPED = ["model.audio_tower", "model.visual", "lm_head"]  # the family's unquantized_modules
N_PROMPT_TOKENS = 24
N_NEW_TOKENS = 8
EXACT_ATOL = 1e-4  # NF4 forward against float32 with the dequantized weights: rounding only
# The tiny thinker's random weights (std 0.2, two layers) amplify any rounding, so the tolerances are relative and
# stated against what the app already ships. Measured: NF4 of the experts alone moves the logits by 0.18 of their
# root-mean-square; bitsandbytes' NF4 of the Linear layers alone (the app's 4-bit today) by 0.48; both by 0.50.
EXPERTS_RELATIVE_RMS = 0.25
ROUTE_OVER_LINEAR_ONLY = 1.25
BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # NF4 codes, a uint8 absmax per 64, a float32 per 256 absmaxes


def nf4(quantize_experts_too: bool) -> BitsAndBytesConfig:
    """The app's 4-bit settings on the CPU (float32 compute), with or without the experts."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=SKIPPED)
    return with_experts(config) if quantize_experts_too else config


def load(checkpoint: Path, quantization_config: BitsAndBytesConfig | None = None) -> torch.nn.Module:
    """The tiny thinker on the CPU in float32."""
    return Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32, device_map="cpu", quantization_config=quantization_config).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_qwen3_omni(tmp_path_factory.mktemp("tiny-qwen3-omni"))


@pytest.fixture(scope="module")
def reference(checkpoint) -> torch.nn.Module:
    return load(checkpoint)


@pytest.fixture(scope="module")
def quantized(checkpoint) -> Iterator[torch.nn.Module]:
    yield load(checkpoint, nf4(quantize_experts_too=True))


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 256, (1, N_PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0]  # (n_tokens, vocab)


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def test_with_experts_turns_only_a_4bit_config_into_the_experts_one():
    assert isinstance(nf4(quantize_experts_too=True), Nf4ExpertsConfig)
    eight_bit = BitsAndBytesConfig(load_in_8bit=True)
    assert with_experts(eight_bit) is eight_bit
    assert with_experts(None) is None


def test_the_experts_are_stored_in_4_bits_by_from_pretrained(quantized, reference):
    experts = [m for m in quantized.modules() if isinstance(m, Nf4Experts)]
    originals = [m for m in reference.modules() if is_fused_experts(m)]
    assert len(experts) == len(originals) == 2
    assert not [m for m in quantized.modules() if is_fused_experts(m)]  # no full-precision experts left
    for module, original in zip(experts, originals):
        for name in EXPERT_PARAMS:
            weight = getattr(original, name)
            packed = getattr(module, name)
            assert packed.dtype == torch.uint8 and packed.numel() * 2 == weight.numel()  # two codes a byte
            stored = sum(getattr(module, name + s).numel() * getattr(module, name + s).element_size()
                         for s in ("", "_absmax", "_absmax2", "_offset"))
            assert stored <= BYTES_PER_WEIGHT * weight.numel() + 8 * module.num_experts  # + per-expert rounding
    linear = quantized.model.language_model.layers[0].self_attn.q_proj.weight
    assert linear.dtype == torch.uint8  # bitsandbytes still quantizes the Linear layers
    assert quantized.lm_head.weight.dtype == torch.float32  # and leaves the skipped modules alone


def test_the_forward_pass_computes_with_the_stored_weights(checkpoint, prompt):
    quantized = load(checkpoint)
    assert quantize_experts(quantized) == 2
    dequantized = load(checkpoint)
    for module, target in zip([m for m in quantized.modules() if isinstance(m, Nf4Experts)],
                              [m for m in dequantized.modules() if is_fused_experts(m)]):
        for name in EXPERT_PARAMS:
            getattr(target, name).data.copy_(module.dequantized(name))
    torch.testing.assert_close(logits(quantized, prompt), logits(dequantized, prompt), atol=EXACT_ATOL, rtol=0)


def test_the_logits_stay_within_the_tolerance_of_full_precision(quantized, reference, checkpoint, prompt):
    expected = logits(reference, prompt)
    experts_only = load(checkpoint)
    quantize_experts(experts_only)
    assert 0 < relative_rms(logits(experts_only, prompt), expected) <= EXPERTS_RELATIVE_RMS
    linear_only = relative_rms(logits(load(checkpoint, nf4(quantize_experts_too=False)), prompt), expected)
    assert relative_rms(logits(quantized, prompt), expected) <= ROUTE_OVER_LINEAR_ONLY * linear_only


def test_greedy_generation_runs_and_repeats(quantized, prompt):
    def generate() -> list[int]:
        with torch.no_grad():
            out = quantized.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=N_NEW_TOKENS, min_new_tokens=N_NEW_TOKENS)
        return out[0, N_PROMPT_TOKENS:].tolist()

    first = generate()
    assert len(first) == N_NEW_TOKENS
    assert generate() == first
