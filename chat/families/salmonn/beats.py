"""BEATs (Microsoft's audio encoder, iter3+), as SALMONN uses it: its Kaldi fbank and its transformer.

No maintained library runs BEATs on this stack: speechbrain, espnet and openbeats all import
torchaudio's Kaldi fbank, and torchaudio has no build for torch 2.13. So both are written here from
the definitions of BEATs' released code and Kaldi's fbank, and load BEATs' own checkpoint file
(`{'cfg': dict, 'model': state_dict}`) tensor for tensor; tests/families/test_salmonn.py holds them to the
original code's outputs.
"""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from chat.audio import SAMPLE_RATE

# BEATs' Kaldi fbank: 25-ms frames every 10 ms, 128 mel bins from 20 Hz, povey window, on 16-bit sample values
FBANK_BINS, FRAME_SAMPLES, HOP_SAMPLES, FFT_SIZE = 128, 400, 160, 512
FBANK_LOW_HZ, PREEMPHASIS, POVEY_POWER = 20.0, 0.97, 0.85
FBANK_MEAN, FBANK_STD = 15.41663, 6.55582  # BEATs' normalisation of its fbank
FBANK_FRAMES = 1 + (30 * SAMPLE_RATE - FRAME_SAMPLES) // HOP_SAMPLES  # of a 30-s part: 2998
LOG_FLOOR = torch.finfo(torch.float32).eps  # Kaldi's floor before the log, float32's epsilon even in float64
BEATS_ATTENTION_ALPHA = 32.0  # BEATs scales queries down by this and the logits back up, for fp16 range


def kaldi_mel_banks() -> torch.Tensor:
    """Kaldi's triangular mel filters (FBANK_BINS, FFT_SIZE // 2 + 1), computed in float32 as torchaudio does."""
    nyquist = SAMPLE_RATE / 2

    def mel(hz):
        return 1127.0 * (1.0 + hz / 700.0).log() if isinstance(hz, torch.Tensor) else 1127.0 * math.log(1 + hz / 700)

    low, high = mel(FBANK_LOW_HZ), mel(nyquist)
    delta = (high - low) / (FBANK_BINS + 1)
    index = torch.arange(FBANK_BINS).unsqueeze(1)
    left, center, right = low + index * delta, low + (index + 1.0) * delta, low + (index + 2.0) * delta
    bin_mels = mel(SAMPLE_RATE / FFT_SIZE * torch.arange(FFT_SIZE // 2)).unsqueeze(0)
    rising, falling = (bin_mels - left) / (center - left), (right - bin_mels) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(rising, falling))
    return F.pad(banks, (0, 1))  # no filter reaches the Nyquist bin


def beats_fbank(samples: np.ndarray) -> torch.Tensor:
    """BEATs' input: the normalised Kaldi log-mel fbank (n_frames, 128) of float samples, computed in float64."""
    wave = torch.from_numpy(samples.astype(np.float64)) * 2**15
    frames = wave.unfold(0, FRAME_SAMPLES, HOP_SAMPLES)  # (n_frames, 400), the last partial frame dropped
    frames = frames - frames.mean(dim=1, keepdim=True)
    frames = frames - PREEMPHASIS * torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames * torch.hann_window(FRAME_SAMPLES, periodic=False, dtype=torch.float64).pow(POVEY_POWER)
    power = torch.fft.rfft(F.pad(frames, (0, FFT_SIZE - FRAME_SAMPLES))).abs().pow(2)
    fbank = (power @ kaldi_mel_banks().to(torch.float64).T).clamp_min(LOG_FLOOR).log()
    return ((fbank - FBANK_MEAN) / (2 * FBANK_STD)).to(torch.float32)


class BeatsAttention(nn.Module):
    """BEATs' self-attention: scaled-down queries, a gated relative position bias (the bias shared by all layers)."""

    def __init__(self, width: int, n_heads: int, relative_bias: nn.Embedding | None) -> None:
        super().__init__()
        self.n_heads, self.head_width = n_heads, width // n_heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.grep_linear = nn.Linear(self.head_width, 8)
        self.grep_a = nn.Parameter(torch.ones(1, n_heads, 1, 1))
        if relative_bias is not None:
            self.relative_attention_bias = relative_bias

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.n_heads, self.head_width).transpose(1, 2)  # (batch, heads, T, width)

        query = heads(self.q_proj(x))
        scaled = query * (self.head_width**-0.5 / BEATS_ATTENTION_ALPHA)
        logits = scaled @ heads(self.k_proj(x)).transpose(-1, -2)
        logits = (logits - logits.amax(dim=-1, keepdim=True)) * BEATS_ATTENTION_ALPHA
        gate_a, gate_b = torch.sigmoid(self.grep_linear(query).view(batch, self.n_heads, length, 2, 4).sum(-1)).chunk(
            2, dim=-1)
        gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0  # (batch, heads, T, 1)
        weights = F.softmax(logits + gate * position_bias, dim=-1)
        out = (weights @ heads(self.v_proj(x))).transpose(1, 2).reshape(batch, length, width)
        return self.out_proj(out)


class BeatsLayer(nn.Module):
    """A post-norm transformer layer with DeepNorm's residual scaling."""

    def __init__(self, cfg: dict, relative_bias: nn.Embedding | None) -> None:
        super().__init__()
        width = cfg["encoder_embed_dim"]
        self.self_attn = BeatsAttention(width, cfg["encoder_attention_heads"], relative_bias)
        self.self_attn_layer_norm = nn.LayerNorm(width)
        ffn = cfg["encoder_ffn_embed_dim"]
        self.fc1, self.fc2 = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.final_layer_norm = nn.LayerNorm(width)
        self.residual_scale = (2 * cfg["encoder_layers"]) ** 0.25 if cfg.get("deep_norm") else 1.0

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_layer_norm(x * self.residual_scale + self.self_attn(x, position_bias))
        hidden = self.fc2(F.gelu(self.fc1(x).float()).type_as(x))
        return self.final_layer_norm(x * self.residual_scale + hidden)


class BeatsEncoder(nn.Module):
    """BEATs' transformer: convolutional positional embedding, LayerNorm, then the layers."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        width = cfg["encoder_embed_dim"]
        conv = nn.Conv1d(width, width, cfg["conv_pos"], padding=cfg["conv_pos"] // 2, groups=cfg["conv_pos_groups"])
        self.pos_conv = nn.utils.parametrizations.weight_norm(conv, dim=2)  # g·v/‖v‖, the norm over dims 0 and 1
        self.trim = 1 if cfg["conv_pos"] % 2 == 0 else 0  # an even kernel makes one frame too many
        self.layer_norm = nn.LayerNorm(width)
        self.num_buckets, self.max_distance = cfg["num_buckets"], cfg["max_distance"]
        shared = nn.Embedding(cfg["num_buckets"], cfg["encoder_attention_heads"])
        self.layers = nn.ModuleList(BeatsLayer(cfg, shared if i == 0 else None) for i in range(cfg["encoder_layers"]))
        self.relative_attention_bias = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = self.pos_conv(x.transpose(1, 2))
        positions = positions[:, :, : positions.shape[-1] - self.trim]
        x = self.layer_norm(x + F.gelu(positions).transpose(1, 2))
        bias = self.relative_attention_bias(self._buckets(x.shape[1]).to(x.device)).permute(2, 0, 1)[None]
        for layer in self.layers:
            x = layer(x, bias.to(x.dtype))
        return x

    def _buckets(self, length: int) -> torch.Tensor:
        """T5-style bidirectional buckets of key minus query position (length, length)."""
        relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        half = self.num_buckets // 2
        buckets = (relative > 0).long() * half
        distance = relative.abs()
        exact = half // 2
        far = exact + (torch.log(distance.float().clamp_min(1) / exact) / math.log(self.max_distance / exact)
                       * (half - exact)).long()
        return buckets + torch.where(distance < exact, distance, far.clamp_max(half - 1))


class Beats(nn.Module):
    """BEATs: 16x16 patches of the fbank, embedded, projected, encoded; (batch, T/16 · 8, encoder width)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        patch = cfg["input_patch_size"]
        self.patch_embedding = nn.Conv2d(1, cfg["embed_dim"], patch, stride=patch, bias=cfg.get("conv_bias", False))
        self.layer_norm = nn.LayerNorm(cfg["embed_dim"])
        self.post_extract_proj = nn.Linear(cfg["embed_dim"], cfg["encoder_embed_dim"])
        self.encoder = BeatsEncoder(cfg)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(fbank.unsqueeze(1))  # (batch, embed, T/16, 128/16)
        patches = patches.reshape(patches.shape[0], patches.shape[1], -1).transpose(1, 2)
        return self.encoder(self.post_extract_proj(self.layer_norm(patches)))


def load_beats(path: str) -> Beats:
    """BEATs from its original `{'cfg': ..., 'model': ...}` file, every tensor checked.

    The file repeats the shared relative position bias under each layer (equal tensors) and holds the
    AudioSet classifier that SALMONN does not use; both are left out. Anything else must match exactly.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    cfg, state = checkpoint["cfg"], dict(checkpoint["model"])
    beats = Beats(cfg)
    shared = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    for name in [n for n in state if n.startswith("predictor.") or (n.endswith("relative_attention_bias.weight")
                                                                     and n != shared)]:
        del state[name]
    state["encoder.relative_attention_bias.weight"] = state[shared]
    for stored, ours in (("weight_g", "original0"), ("weight_v", "original1")):
        state[f"encoder.pos_conv.parametrizations.weight.{ours}"] = state.pop(f"encoder.pos_conv.0.{stored}")
    state["encoder.pos_conv.bias"] = state.pop("encoder.pos_conv.0.bias")
    beats.load_state_dict(state, strict=True)
    return beats.eval()
