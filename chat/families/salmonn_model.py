"""SALMONN loaded and run on transformers 5: the family of chat/families/salmonn.py.

Every part loads from its original files with today's libraries: Vicuna as a LlamaForCausalLM
(quantized by bitsandbytes as any transformers model), LoRA as peft adapters on its q_proj and v_proj,
Whisper's encoder through WhisperForAudioClassification (WhisperEncoder.from_pretrained would load
no weights at all: the prefix does not match), the Q-Former as transformers' Blip2QFormerModel, and
BEATs as this module's own code: no maintained library runs BEATs on this stack (speechbrain, espnet
and openbeats all import torchaudio's Kaldi fbank, and torchaudio has no build for torch 2.13), so the
fbank and the encoder are written here from the paper's released code's definitions.

Per audio part (at most 30 s, at least 1 s): Whisper hears it padded to 30 s (1500 frames), BEATs its
own length (zero-padded to 1500 frames after its LayerNorm); the two are paired frame by frame, cut
into 88 windows of 17 frames, and each window becomes one LLM token through the Q-Former's one query.
"""

import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece
import torch
import yaml
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.nn import functional as F
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    LlamaConfig,
    LlamaForCausalLM,
    WhisperFeatureExtractor,
    WhisperForAudioClassification,
)
from transformers.utils import cached_file

from chat.audio import SAMPLE_RATE
from chat.errors import BackendError, SettingsError
from chat.families.base import LoadOptions, LocalModel
from chat.families.salmonn import (
    BOS,
    EOS,
    REPLY_START,
    SPEECH_HERE,
    WHISPER_FRAMES,
    n_query_windows,
    window_frames,
)
from chat.prompts import Prompt
from chat.settings import GenerationSettings

MIN_SAMPLES = SAMPLE_RATE  # the original pads audio shorter than 1 s to 1 s
BERT_HEAD_WIDTH = 64  # BERT-base (the Q-Former's base): 12 heads of 64; the checkpoint's shapes do not say
BERT_LAYER_NORM_EPS = 1e-12
# BEATs' Kaldi fbank: 25-ms frames every 10 ms, 128 mel bins from 20 Hz, povey window, on 16-bit sample values
FBANK_BINS, FRAME_SAMPLES, HOP_SAMPLES, FFT_SIZE = 128, 400, 160, 512
FBANK_LOW_HZ, PREEMPHASIS, POVEY_POWER = 20.0, 0.97, 0.85
FBANK_MEAN, FBANK_STD = 15.41663, 6.55582  # BEATs' normalisation of its fbank
FBANK_FRAMES = 1 + (30 * SAMPLE_RATE - FRAME_SAMPLES) // HOP_SAMPLES  # of a 30-s part: 2998
LOG_FLOOR = torch.finfo(torch.float32).eps  # Kaldi's floor before the log, float32's epsilon even in float64
BEATS_ATTENTION_ALPHA = 32.0  # BEATs scales queries down by this and the logits back up, for fp16 range
LORA_TARGETS = r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"  # the LLM's only: Whisper and BEATs have q_proj too


@dataclass(frozen=True)
class DecodeConfig:
    """What a SALMONN decode yaml says, its paths resolved."""

    llama: str  # folder or hub id
    whisper: str  # folder or hub id
    beats: str  # file
    ckpt: str  # file
    lora_rank: int
    lora_alpha: int
    second_per_window: float
    second_stride: float
    query_tokens: int
    settings: GenerationSettings  # from its generate section


def read_decode_config(path: str) -> DecodeConfig:
    """The yaml's model section; BackendError names a part that is missing and what to do about it."""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
        model = config["model"]
    except (OSError, yaml.YAMLError, TypeError, KeyError) as e:
        raise BackendError(f"Cannot read {path} as a SALMONN decode yaml: {e}") from e
    folder = Path(path).parent

    def part(key: str, what: str, is_file: bool) -> str:
        value = model.get(key)
        if not value:
            raise BackendError(f"{path} names no {key} ({what}). Add it to its model section.")
        return _resolve(str(value), folder, key, what, path, is_file)

    if model.get("lora", True) is False or model.get("use_speech_Qformer", True) is False:
        raise BackendError(f"{path} turns off LoRA or the Q-Former; the released SALMONN checkpoints use both.")
    return DecodeConfig(
        llama=part("llama_path", "the Vicuna folder, e.g. lmsys/vicuna-13b-v1.1", False),
        whisper=part("whisper_path", "the Whisper folder, openai/whisper-large-v2", False),
        beats=part("beats_path", "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt", True),
        ckpt=part("ckpt", "SALMONN's checkpoint, salmonn_v1.pth or salmonn_7b_v0.pth", True),
        lora_rank=int(model.get("lora_rank", 8)), lora_alpha=int(model.get("lora_alpha", 32)),
        second_per_window=float(model.get("second_per_window", 0.333333)),
        second_stride=float(model.get("second_stride", 0.333333)),
        query_tokens=int(model.get("num_speech_query_token", 1)),
        settings=generation_settings(config.get("generate") or {}, path),
    )


def generation_settings(generate: dict, path: str) -> GenerationSettings:
    """The yaml's generate section as the app's settings. A streamed reply is one beam, so num_beams is not
    used: without sampling the reply is the greedy one."""
    try:
        return GenerationSettings(
            max_new_tokens=int(generate.get("max_new_tokens", 200)),
            temperature=float(generate.get("temperature", 1.0)) if generate.get("do_sample", False) else 0.0,
            top_p=float(generate.get("top_p", 0.9)), top_k=0,
            repetition_penalty=float(generate.get("repetition_penalty", 1.0)),
        )
    except (TypeError, ValueError, SettingsError) as e:
        raise BackendError(f"{path}: its generate section is not usable ({e}).") from e


def _resolve(value: str, folder: Path, key: str, what: str, yaml_path: str, is_file: bool) -> str:
    """A path relative to the yaml's folder, an absolute one, or a hub id (`owner/name`, or `owner/name/file`)."""
    for candidate in (folder / value, Path(value).expanduser()):
        if candidate.exists():
            return str(candidate)
    parts = value.split("/")
    looks_like_hub = not value.startswith((".", "/", "~")) and len(parts) >= 2
    if looks_like_hub and not is_file:
        return value  # from_pretrained finds it on the hub or in its cache
    if looks_like_hub:
        try:
            return cached_file("/".join(parts[:2]), "/".join(parts[2:]))
        except OSError:
            pass
    raise BackendError(
        f"{yaml_path}: {key} is {value}, which is neither a {'file' if is_file else 'folder'} there nor on the "
        f"hub here. It should be {what}: download it and set {key} to its path (relative to the yaml's folder)."
    )


class LlamaSentencePiece:
    """Vicuna's tokenizer as the original used it: sentencepiece over tokenizer.model, special tokens as ids only."""

    def __init__(self, model_file: str) -> None:
        self.sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        """Ids of a piece of text, with sentencepiece's leading `▁`."""
        return self.sp.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **_) -> str:
        """Text of ids; ids past the vocabulary (the audio placeholder) are no text."""
        special = {self.bos_id, self.eos_id} if skip_special_tokens else set()
        return self.sp.decode([i for i in ids if i < self.sp.get_piece_size() and i not in special])


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


class SalmonnAudio(nn.Module):
    """Everything between a part's audio and its LLM tokens; its parameter names are the checkpoint's."""

    def __init__(self, whisper: nn.Module, beats: Beats, qformer: Blip2QFormerConfig, llm_width: int,
                 config: DecodeConfig) -> None:
        super().__init__()
        self.speech_encoder, self.beats = whisper, beats
        self.ln_speech = nn.LayerNorm(whisper.config.d_model)
        self.ln_audio = nn.LayerNorm(beats.post_extract_proj.out_features)
        self.speech_Qformer = Blip2QFormerModel(qformer)
        self.speech_query_tokens = nn.Parameter(torch.zeros(1, config.query_tokens, qformer.hidden_size))
        self.speech_llama_proj = nn.Linear(qformer.hidden_size, llm_width)
        self.window, self.stride = window_frames(config.second_per_window), window_frames(config.second_stride)
        self.n_windows = n_query_windows(config.second_per_window, config.second_stride)

    def forward(self, mel: torch.Tensor, fbank: torch.Tensor, fbank_mask: torch.Tensor) -> torch.Tensor:
        """LLM embeddings of each part, concatenated: (n_parts · n_windows, llm width)."""
        speech = self.ln_speech(self.speech_encoder(mel.to(self.ln_speech.weight.dtype)).last_hidden_state)
        out = []
        for whisper_frames, part_fbank, n_frames in zip(speech, fbank, fbank_mask.sum(-1).tolist()):
            audio = self.ln_audio(self.beats(part_fbank[None, :n_frames].to(self.ln_audio.weight.dtype)))[0]
            audio = F.pad(audio, (0, 0, 0, WHISPER_FRAMES - audio.shape[0]))
            paired = torch.cat([whisper_frames, audio], dim=-1)
            starts = range(0, self.stride * self.n_windows, self.stride)
            windows = torch.stack([paired[s: s + self.window] for s in starts])  # (n_windows, window, width)
            hidden = self.speech_Qformer(
                query_embeds=self.speech_query_tokens.expand(len(windows), -1, -1), encoder_hidden_states=windows,
                encoder_attention_mask=torch.ones(windows.shape[:2], dtype=torch.long, device=windows.device),
            ).last_hidden_state
            out.append(self.speech_llama_proj(hidden.to(self.speech_llama_proj.weight.dtype)).flatten(0, 1))
        return torch.cat(out)


class SalmonnForCausalLM(LlamaForCausalLM):
    """Vicuna with SALMONN's audio (attached after loading) in place of each audio placeholder."""

    audio: SalmonnAudio

    def forward(self, input_ids=None, input_features=None, feature_attention_mask=None, fbank=None, fbank_mask=None,
                inputs_embeds=None, **kwargs):
        """LLaMA's forward on embeddings with each part's audio tokens in place of its placeholders."""
        if inputs_embeds is None:
            is_audio = input_ids == self.config.audio_token_id  # past the vocabulary: no embedding row
            inputs_embeds = self.model.embed_tokens(input_ids.masked_fill(is_audio, 0))
            if is_audio.any():
                audio = self.audio(input_features, fbank, fbank_mask)
                inputs_embeds[is_audio] = audio.to(inputs_embeds.dtype)
        return super().forward(inputs_embeds=inputs_embeds, **kwargs)


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The tensors of SALMONN's .pth (`{'model': ..., 'optimizer': ..., ...}` as its save_checkpoint writes it)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        raise BackendError(f"Cannot read {path} as SALMONN's checkpoint: {str(e).splitlines()[0]}") from e
    tensors = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(tensors, dict) or "speech_query_tokens" not in tensors:
        raise BackendError(f"{path} holds no SALMONN weights (no model.speech_query_tokens): name salmonn_v1.pth or "
                           "salmonn_7b_v0.pth as ckpt in the yaml.")
    return tensors


def qformer_config(ckpt: dict, encoder_width: int) -> Blip2QFormerConfig:
    """The Q-Former's shape from the checkpoint's tensors; BERT-base's head width, which no tensor shows."""
    width = ckpt["speech_query_tokens"].shape[-1]
    layers = {int(m.group(1)) for n in ckpt if (m := re.match(r"speech_Qformer\.bert\.encoder\.layer\.(\d+)\.", n))}
    return Blip2QFormerConfig(
        hidden_size=width, num_hidden_layers=len(layers), num_attention_heads=width // BERT_HEAD_WIDTH,
        intermediate_size=ckpt["speech_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        cross_attention_frequency=1, encoder_hidden_size=encoder_width, layer_norm_eps=BERT_LAYER_NORM_EPS,
        hidden_act="gelu",
    )


def load_whisper_encoder(path: str, dtype: torch.dtype) -> nn.Module:
    """Whisper's encoder alone, every weight from the file (WhisperEncoder.from_pretrained would load none)."""
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its reports list the decoder and the classification head, neither of them used
    try:
        model, info = WhisperForAudioClassification.from_pretrained(path, dtype=dtype, output_loading_info=True)
    finally:
        quiet.setLevel(level)
    missing = [name for name in info["missing_keys"] if name.startswith("encoder.")]
    if missing:
        raise BackendError(f"{path} lacks Whisper encoder weights, e.g. {missing[0]}: is it a Whisper model?")
    return model.encoder


def qformer_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's BERT-named Q-Former tensors under Blip2QFormerModel's names."""
    state = {}
    for name, tensor in ckpt.items():
        if not name.startswith("speech_Qformer.bert.") or name.endswith("position_ids"):
            continue
        name = name.replace("speech_Qformer.bert.embeddings.LayerNorm.", "speech_Qformer.layernorm.")
        state[name.replace("speech_Qformer.bert.", "speech_Qformer.").replace(".self.", ".attention.")] = tensor
    return state


class SalmonnModel(LocalModel):
    """The loaded parts: SalmonnForCausalLM with LoRA and its audio, sentencepiece, Whisper's and BEATs' features."""

    def __init__(self, decode_yaml: str, options: LoadOptions) -> None:
        config = read_decode_config(decode_yaml)
        self.tokenizer = LlamaSentencePiece(cached_file(config.llama, "tokenizer.model"))
        llama_config = LlamaConfig.from_pretrained(config.llama)
        llama_config.audio_token_id = llama_config.vocab_size  # the placeholder: one past the vocabulary
        self.model = SalmonnForCausalLM.from_pretrained(
            config.llama, config=llama_config, dtype=options.dtype, device_map=options.device_map,
            quantization_config=options.quantization_config,
        ).eval()
        ckpt = load_checkpoint(config.ckpt)
        self._add_lora(ckpt, config)
        whisper, beats = load_whisper_encoder(config.whisper, options.dtype), load_beats(config.beats)
        qformer = qformer_config(ckpt, whisper.config.d_model + beats.post_extract_proj.out_features)
        audio = SalmonnAudio(whisper, beats, qformer, llama_config.hidden_size, config)
        own = {n: t for n, t in ckpt.items() if n.split(".")[0] in ("ln_speech", "ln_audio", "speech_query_tokens",
                                                                  "speech_llama_proj")}
        expected = {n for n in audio.state_dict() if not n.startswith(("speech_encoder.", "beats."))}
        _load_exactly(audio, own | qformer_state(ckpt), expected, config.ckpt)
        self.model.audio = audio.to(device=self.model.device, dtype=options.dtype).eval()
        self.features_extractor = WhisperFeatureExtractor.from_pretrained(config.whisper)
        self.audio_token_id = llama_config.audio_token_id
        self.n_windows = audio.n_windows
        self.context_tokens = llama_config.max_position_embeddings
        self.stop_ids = [self.tokenizer.eos_id]
        self.settings = config.settings

    def _add_lora(self, ckpt: dict, config: DecodeConfig) -> None:
        """LoRA adapters on the LLM's q_proj and v_proj, loaded from the checkpoint's peft-0.3 tensors."""
        lora = {}
        for name, tensor in ckpt.items():
            match = re.fullmatch(r"llama_model\.base_model\.model\.(.+)\.(lora_[AB])\.default\.weight", name)
            if match:
                lora[f"{match.group(1)}.{match.group(2)}.default.weight"] = tensor
        inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                           target_modules=LORA_TARGETS), self.model)
        expected = {n for n, _ in self.model.named_parameters() if ".lora_" in n}
        _load_exactly(self.model, lora, expected, config.ckpt)

    def token_ids(self, prompt: Prompt) -> list[int]:
        """BOS, then each piece between the markers tokenized apart; a reply's piece starts after `ASSISTANT: `."""
        ids = []
        markers = {BOS: self.tokenizer.bos_id, EOS: self.tokenizer.eos_id, SPEECH_HERE: self.audio_token_id}
        for piece in re.split(f"({re.escape(BOS)}|{re.escape(EOS)}|{re.escape(SPEECH_HERE)})", prompt.text):
            if piece in markers:
                ids.append(markers[piece])
                continue
            for text in re.split(f"(?<={re.escape(REPLY_START)}) ", piece):
                ids += self.tokenizer.encode(text) if text else []
        return ids

    def count_tokens(self, text: str) -> int:
        """Token count of text."""
        return len(self.tokenizer.encode(text))

    def features(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """Whisper's log-mel of the part padded to 30 s, and BEATs' fbank of the part itself (padded to 30 s' frames).

        A part shorter than 1 s is zero-padded to 1 s first, as the original does.
        """
        samples = np.pad(samples, (0, max(0, MIN_SAMPLES - len(samples))))
        mel = self.features_extractor(samples.astype(np.float64), sampling_rate=SAMPLE_RATE, padding="max_length",
                                      return_tensors="pt")["input_features"][0]
        fbank = beats_fbank(samples)
        fbank_mask = torch.zeros(FBANK_FRAMES, dtype=torch.long)
        fbank_mask[: len(fbank)] = 1
        return {"input_features": mel, "feature_attention_mask": torch.ones(mel.shape[-1], dtype=torch.long),
                "fbank": F.pad(fbank, (0, 0, 0, FBANK_FRAMES - len(fbank))), "fbank_mask": fbank_mask}

    def n_audio_tokens(self, n_frames: torch.Tensor) -> torch.Tensor:
        """One token per Q-Former window, for every part."""
        return torch.full_like(n_frames, self.n_windows)


def _load_exactly(module: nn.Module, state: dict, expected: set[str], source: str) -> None:
    """Load state into module; BackendError unless every expected tensor came from it (the original's
    strict=False load would hide a renamed or missing one)."""
    missing = sorted(expected - state.keys())
    if missing:
        raise BackendError(f"{source} lacks {len(missing)} tensors SALMONN needs, e.g. {missing[0]}: "
                           "it is not a SALMONN checkpoint, or it is damaged.")
    unexpected = module.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise BackendError(f"{source} has tensors this SALMONN cannot place, e.g. {unexpected[0]}.")
