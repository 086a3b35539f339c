"""SALMONN loaded and run on transformers 5: the family of chat/families/salmonn/family.py.

Every part loads from its original files with today's libraries: Vicuna as a LlamaForCausalLM
(quantized by bitsandbytes as any transformers model), LoRA as peft adapters on its q_proj and v_proj,
Whisper's encoder through WhisperForAudioClassification (WhisperEncoder.from_pretrained would load
no weights at all: the prefix does not match), the Q-Former as transformers' Blip2QFormerModel, and
BEATs as the project's own code (beats.py: no library runs it on this stack).

Per audio part (at most 30 s, at least 1 s): Whisper hears it padded to 30 s (1500 frames), BEATs its
own length (zero-padded to 1500 frames after its LayerNorm); the two are paired frame by frame, cut
into 88 windows of 17 frames, and each window becomes one LLM token through the Q-Former's one query.
"""

import logging
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
from chat.families.salmonn.beats import FBANK_FRAMES, Beats, beats_fbank, load_beats
from chat.families.salmonn.family import (
    BOS,
    EOS,
    FAMILY,
    SECOND_PER_WINDOW,
    WHISPER_FRAMES,
    n_query_windows,
    window_frames,
)
from chat.settings import GenerationSettings

MIN_SAMPLES = SAMPLE_RATE  # the original pads audio shorter than 1 s to 1 s
BERT_BASE_HEADS = 12  # the original builds the Q-Former from bert-base-uncased's config whatever the checkpoint's width
BERT_LAYER_NORM_EPS = 1e-12
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
    windows = tuple(float(model.get(key, SECOND_PER_WINDOW)) for key in ("second_per_window", "second_stride"))
    if n_query_windows(*windows) != FAMILY.n_audio_tokens(FAMILY.window_samples):
        raise BackendError(f"{path} sets Q-Former windows of {windows[0]:g} s every {windows[1]:g} s; SALMONN's released "
                           f"checkpoints use {SECOND_PER_WINDOW:g} s, the only windows this app runs.")
    return DecodeConfig(
        llama=part("llama_path", "the Vicuna folder, e.g. lmsys/vicuna-13b-v1.1", False),
        whisper=part("whisper_path", "the Whisper folder, openai/whisper-large-v2", False),
        beats=part("beats_path", "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt", True),
        ckpt=part("ckpt", "SALMONN's checkpoint, salmonn_v1.pth or salmonn_7b_v0.pth", True),
        lora_rank=int(model.get("lora_rank", 8)), lora_alpha=int(model.get("lora_alpha", 32)),
        second_per_window=windows[0], second_stride=windows[1],
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

    def forward(self, input_ids=None, input_features=None, fbank=None, fbank_mask=None, inputs_embeds=None, **kwargs):
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
    """The Q-Former's shape from the checkpoint's tensors; BERT-base's head count, which no tensor shows."""
    width = ckpt["speech_query_tokens"].shape[-1]
    layers = {int(m.group(1)) for n in ckpt if (m := re.match(r"speech_Qformer\.bert\.encoder\.layer\.(\d+)\.", n))}
    return Blip2QFormerConfig(
        hidden_size=width, num_hidden_layers=len(layers), num_attention_heads=BERT_BASE_HEADS,
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
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(config.whisper)
        self.audio_token_id = llama_config.audio_token_id
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

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of each piece of text, with sentencepiece's leading `▁`, as the original encodes each piece apart."""
        return [self.tokenizer.encode(text) for text in texts]

    def control_id(self, token: str) -> int:
        """The id of `<s>` or `</s>`."""
        return {BOS: self.tokenizer.bos_id, EOS: self.tokenizer.eos_id}[token]

    def features(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """Whisper's log-mel of the part padded to 30 s, and BEATs' fbank of the part itself (padded to 30 s' frames).

        A part shorter than 1 s is zero-padded to 1 s first, as the original does.
        """
        samples = np.pad(samples, (0, max(0, MIN_SAMPLES - len(samples))))
        mel = self.feature_extractor(samples.astype(np.float64), sampling_rate=SAMPLE_RATE, padding="max_length",
                                      return_tensors="pt")["input_features"][0]
        fbank = beats_fbank(samples)
        fbank_mask = torch.zeros(FBANK_FRAMES, dtype=torch.long)
        fbank_mask[: len(fbank)] = 1
        return {"input_features": mel, "fbank": F.pad(fbank, (0, 0, 0, FBANK_FRAMES - len(fbank))),
                "fbank_mask": fbank_mask}


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
