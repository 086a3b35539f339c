"""Qwen3-Omni's MoE experts in 4 bits (NF4), quantized while the checkpoint loads, so the 30B-A3B thinker fits 24 GB.

transformers 5 keeps each MoE layer's 128 experts as two fused 3-D parameters (gate_up_proj (E, 2I, H), down_proj
(E, H, I)); bitsandbytes' quantizer converts only nn.Linear, so BitsAndBytesConfig leaves those 29.0 B of the
thinker's 31.7 B parameters in bf16: 58 GB. The route here (figures: bench/qwen3_omni_experts.py):

    nf4-experts   Linear and experts NF4 with double quantization, the family's unquantized_modules in bf16:
                  19.1 GB of weights for the real shapes, 21.4 GB with an 8k-token KV cache and 1.5 GB of overhead.
                  On the tiny thinker its logits move as much as the app's NF4 of the Linear layers alone does
                  (relative RMS 0.50 against 0.48; the experts' own share 0.18).
    rejected      bf16 63.4 GB and NF4 of Linear only (today) 62.1 GB; FP8 (FineGrainedFP8Config) and torchao int8
                  on the experts 33.5 GB: none fits 24 GB. bitsandbytes' parametrization of 3-D parameters
                  (replace_parameter_4bit) stores the same bytes, but only quantizes a model already loaded whole
                  (58 GB first) and dequantizes all 128 experts of a layer on every forward: 16x the bytes of the
                  8 a token uses. torchao int4 (19.5 GB) is CUDA-only (tile-packed kernels for 2-D weights; on 3-D
                  expert tensors unmeasured until a GPU run) and needs a new pin. AWQ int4 (19.2 GB) needs gptqmodel
                  and a checkpoint whose per-expert weights transformers 5.23 fuses, which its AWQ and
                  compressed-tensors integrations do not do for quantized tensors.

Loading stays within memory because the experts are quantized inside from_pretrained, one fused tensor at a time:
Nf4ExpertsConfig is BitsAndBytesConfig with its own quant_method, whose quantizer (registered with transformers'
register_quantizer) swaps each `*.experts` module for Nf4Experts before the weights load and quantizes every fused
gate_up_proj / down_proj the moment the checkpoint's per-expert tensors are merged into it. transformers loads
synchronously when it quantizes on the fly, so the peak is what is resident plus one layer's gate_up_proj in bf16
and its per-expert pieces (2 x 0.8 GB). Each expert is quantized on its own, so a forward pass reads (and for
several tokens dequantizes) only the experts the router picked: 8 of 128.
"""

from __future__ import annotations

import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedModel
from transformers.integrations.bitsandbytes import Bnb4bitQuantize
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module

QUANT_METHOD = "bnb_4bit_experts"  # Nf4ExpertsConfig's quant_method: selects Nf4ExpertsQuantizer in from_pretrained
NF4_BLOCK = 64  # weights per absmax (bitsandbytes' 4-bit default)
NESTED_BLOCK = 256  # absmaxes per float32 scale of the double quantization (bitsandbytes' fixed choice)
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
STATE_SUFFIXES = ("_absmax", "_absmax2", "_offset")  # what each expert's quantization state adds beside its bytes


class Nf4Experts(nn.Module):
    """transformers' fused MoE experts with each expert's gate_up_proj and down_proj stored as NF4.

    For a projection p of (rows, cols) per expert, n = rows * cols:
        p            (E, n / 2)       uint8, two 4-bit codes a byte, the expert's matrix in row-major order
        p_absmax     (E, n / 64)      uint8, each block's scale, quantized with the dynamic 8-bit map
        p_absmax2    (E, n / 16384)   float32, scale of each 256 absmaxes (rounded up)
        p_offset     (E,)             float32, the mean absmax the double quantization took out
    """

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn = act_fn
        self.shapes = {"gate_up_proj": (2 * intermediate_dim, hidden_dim), "down_proj": (hidden_dim, intermediate_dim)}
        for name, (rows, cols) in self.shapes.items():
            n_blocks = _exact_div(rows * cols, NF4_BLOCK, f"{name}'s {rows} x {cols} weights")
            for suffix, size, dtype in (("", rows * cols // 2, torch.uint8), ("_absmax", n_blocks, torch.uint8),
                                        ("_absmax2", math.ceil(n_blocks / NESTED_BLOCK), torch.float32)):
                self.register_parameter(name + suffix, _frozen(torch.empty(num_experts, size, dtype=dtype)))
            self.register_parameter(name + "_offset", _frozen(torch.empty(num_experts, dtype=torch.float32)))
        self._states: dict[tuple[torch.dtype, torch.device], dict[str, list]] = {}

    @classmethod
    def like(cls, experts: nn.Module) -> Nf4Experts:
        """An empty Nf4Experts of the same sizes as transformers' experts module."""
        num_experts, rows, hidden_dim = experts.gate_up_proj.shape
        return cls(num_experts, hidden_dim, rows // 2, experts.act_fn)

    @torch.no_grad()
    def quantized(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters (by name) that store weight (E, rows, cols), the fused projection `name`, as NF4."""
        if tuple(weight.shape) != (self.num_experts, *self.shapes[name]):
            raise ValueError(f"{name} is {tuple(weight.shape)}, not {(self.num_experts, *self.shapes[name])}")
        parts: dict[str, list[torch.Tensor]] = {name + suffix: [] for suffix in ("", *STATE_SUFFIXES)}
        for expert in weight:  # one expert at a time: a forward pass reads only the experts it routes to
            packed, state = bnb_functional.quantize_4bit(
                expert, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4")
            for suffix, value in (("", packed), ("_absmax", state.absmax), ("_absmax2", state.state2.absmax),
                                  ("_offset", state.offset)):
                parts[name + suffix].append(value.reshape(-1))
        self._states.clear()
        return {key: torch.cat(values) if key.endswith("_offset") else torch.stack(values)
                for key, values in parts.items()}

    def load_quantized(self, name: str, weight: torch.Tensor) -> None:
        """Quantize weight (E, rows, cols) into this module's parameters of projection `name`."""
        for key, value in self.quantized(name, weight).items():
            setattr(self, key, _frozen(value))

    def _expert_states(self, dtype: torch.dtype) -> dict[str, list]:
        """Per projection, each expert's bitsandbytes QuantState (views of the stored tensors), built once a dtype."""
        device = self.gate_up_proj.device
        if (dtype, device) not in self._states:
            nf4_code = bnb_functional.get_4bit_type("nf4", device=device)
            nested_code = bnb_functional.create_dynamic_map(signed=True).to(device)
            self._states[dtype, device] = {name: [
                bnb_functional.QuantState(
                    absmax=getattr(self, name + "_absmax")[e], shape=torch.Size(shape), code=nf4_code,
                    blocksize=NF4_BLOCK, quant_type="nf4", dtype=dtype, offset=getattr(self, name + "_offset")[e],
                    state2=bnb_functional.QuantState(absmax=getattr(self, name + "_absmax2")[e], code=nested_code,
                                                     blocksize=NESTED_BLOCK, dtype=torch.float32))
                for e in range(self.num_experts)] for name, shape in self.shapes.items()}
        return self._states[dtype, device]

    def _linear(self, x: torch.Tensor, name: str, expert: int, states: dict[str, list]) -> torch.Tensor:
        """x (n, cols) @ expert's projection `name`.T: bitsandbytes' fused 4-bit GEMV for one token on a GPU,
        dequantize-then-matmul otherwise."""
        packed = getattr(self, name)[expert].view(-1, 1)  # (n / 2, 1), the layout Linear4bit's weight has
        return bnb.matmul_4bit(x, packed.t(), quant_state=states[name][expert])

    def dequantized(self, name: str) -> torch.Tensor:
        """Projection `name` as (E, rows, cols) in float32: what the forward pass computes with."""
        states = self._expert_states(torch.float32)[name]
        return torch.stack([bnb_functional.dequantize_4bit(getattr(self, name)[e].view(-1, 1), states[e])
                            for e in range(self.num_experts)])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """transformers' eager experts loop (Qwen3OmniMoeThinkerTextExperts.forward), on the NF4 weights."""
        states = self._expert_states(hidden_states.dtype)
        final_hidden_states = torch.zeros_like(hidden_states)  # (n_tokens, hidden)
        with torch.no_grad():
            # (E + 1, top_k, n_tokens): which tokens chose each expert, at which of their top-k places
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
        for expert in expert_hit:
            if expert == self.num_experts:  # the sentinel of expert parallelism
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            gate, up = self._linear(hidden_states[token_idx], "gate_up_proj", expert, states).chunk(2, dim=-1)
            out = self._linear(self.act_fn(gate) * up, "down_proj", expert, states)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        return final_hidden_states


class Nf4ExpertsConfig(BitsAndBytesConfig):
    """BitsAndBytesConfig (4-bit) whose quantizer also stores the MoE experts' fused 3-D weights as NF4."""

    def __init__(self, **kwargs) -> None:
        kwargs.pop("quant_method", None)
        super().__init__(**kwargs)
        if not self.load_in_4bit:
            raise ValueError("Nf4ExpertsConfig is 4-bit: pass load_in_4bit=True")
        self.quant_method = QUANT_METHOD

    @classmethod
    def of(cls, config: BitsAndBytesConfig) -> Nf4ExpertsConfig:
        """The same 4-bit settings (quant type, double quantization, compute dtype, skipped modules) with experts."""
        return cls(load_in_4bit=True, bnb_4bit_quant_type=config.bnb_4bit_quant_type,
                   bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
                   bnb_4bit_compute_dtype=config.bnb_4bit_compute_dtype,
                   llm_int8_skip_modules=config.llm_int8_skip_modules)


class _QuantizeLinearOrExperts(Bnb4bitQuantize):
    """transformers' on-load 4-bit op for Linear weights, and Nf4Experts.quantized for the fused expert weights."""

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model: torch.nn.Module | None = None,
                **kwargs) -> dict[str, torch.Tensor]:
        name, value = next(iter(input_dict.items()))
        module, param = get_module_from_name(model, name)
        if not isinstance(module, Nf4Experts):
            return super().convert(input_dict, full_layer_name=full_layer_name, model=model, **kwargs)
        value = value[0] if isinstance(value, list) else value
        prefix = name.removesuffix(param)
        return {prefix + key: tensor for key, tensor in module.quantized(param, value).items()}


class Nf4ExpertsQuantizer(Bnb4BitHfQuantizer):
    """Bnb4BitHfQuantizer that also swaps each `*.experts` module for Nf4Experts and quantizes it while loading."""

    def _process_model_before_weight_loading(self, model: PreTrainedModel, device_map, **kwargs) -> None:
        super()._process_model_before_weight_loading(model, device_map, **kwargs)
        for name, module in list(model.named_modules()):
            if is_fused_experts(module) and should_convert_module(name, self.modules_to_not_convert):
                with torch.device("meta"):
                    model.set_submodule(name, Nf4Experts.like(module))

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        if isinstance(module, Nf4Experts):
            return name in EXPERT_PARAMS
        return super().param_needs_quantization(model, param_name, **kwargs)

    def param_element_size(self, model: PreTrainedModel, param_name: str, param: torch.Tensor) -> float:
        """Bytes per element for device-map planning: Nf4Experts' parameters already have their stored size."""
        module, _ = get_module_from_name(model, param_name)
        if isinstance(module, Nf4Experts):
            return param.element_size()
        return super().param_element_size(model, param_name, param)

    def get_quantize_ops(self) -> _QuantizeLinearOrExperts:
        return _QuantizeLinearOrExperts(self)

    def is_serializable(self) -> bool:
        return False  # saving would need a loader for Nf4Experts' keys, which transformers does not have

    @property
    def is_trainable(self) -> bool:
        return False


# transformers' public registry for custom quantization (transformers.quantizers.register_quantizer); guarded
# so that importing this module twice (tests, reloads) does not raise "already registered"
AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, Nf4ExpertsConfig)
AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, Nf4ExpertsQuantizer)


def is_fused_experts(module: nn.Module) -> bool:
    """Whether a module holds transformers 5's fused MoE experts (3-D gate_up_proj and down_proj)."""
    weight = getattr(module, "gate_up_proj", None)
    return (not isinstance(module, Nf4Experts) and isinstance(weight, torch.Tensor) and weight.dim() == 3
            and isinstance(getattr(module, "down_proj", None), torch.Tensor))


def with_experts(quantization_config: object | None) -> object | None:
    """The quantization config to load a Qwen3-Omni thinker with: a 4-bit BitsAndBytesConfig gains the experts;
    anything else (None, 8-bit, FP8) is returned as it is."""
    if isinstance(quantization_config, BitsAndBytesConfig) and quantization_config.load_in_4bit:
        return Nf4ExpertsConfig.of(quantization_config)
    return quantization_config


@torch.no_grad()
def quantize_experts(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Replace the fused experts of a model already loaded by Nf4Experts on the same device, one layer at a time
    (each layer's full-precision weights are freed as soon as it is done); returns how many modules were replaced.
    For a model that already fits; from_pretrained with with_experts(config) never holds the full weights."""
    n_replaced = 0
    for name, module in list(model.named_modules()):
        if not is_fused_experts(module) or not should_convert_module(name, list(skip)):
            continue
        with torch.device("meta"):
            quantized = Nf4Experts.like(module)
        for projection in EXPERT_PARAMS:
            quantized.load_quantized(projection, getattr(module, projection).data)
        model.set_submodule(name, quantized)
        n_replaced += 1
    return n_replaced


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    """A parameter that is data, not something to train (integer storage cannot require grad)."""
    return nn.Parameter(tensor, requires_grad=False)


def _exact_div(x: int, y: int, what: str) -> int:
    """x / y, which must be whole."""
    if x % y:
        raise ValueError(f"{what} are not a whole number of {y}-weight NF4 blocks")
    return x // y
