"""Qwen-Audio-Chat loaded and run on transformers 5: the family of chat/families/qwen_audio_chat/family.py.

The checkpoint (`model_type: "qwen"`, `transformer.*` tensor names, `qwen.tiktoken`, `mel_filters.npz`)
loads into transformers 5 modules: the language model is a Qwen2ForCausalLM (the same architecture
under other names: fused q/k/v split in three, w2/w1 as gate/up), the audio encoder is built from
Qwen2AudioEncoder's parts with 80 mel bins, and the stored weights are renamed on load, so
bitsandbytes quantizes it like any transformers model. What the stock Qwen2 lacks is added here:
past `seq_length` (2048) tokens the original scales queries by log(position)/log(2048) ("logn") and
picks a larger RoPE base from the prompt's length (dynamic NTK); without both the logits differ
from the first token once three 30-s clips are in the prompt.
"""

import json
import math
import unicodedata
from pathlib import Path

import numpy as np
import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe
from torch import nn
from transformers import (
    AttentionInterface,
    Qwen2AudioEncoder,
    Qwen2AudioEncoderConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperFeatureExtractor,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.utils import cached_file

from chat.audio import SAMPLE_RATE
from chat.families.base import LoadOptions, LocalModel
from chat.families.qwen_audio_chat.family import AUDIO_END, AUDIO_PAD, AUDIO_START, SAMPLES_PER_FRAME

RANKS_FILE = "qwen.tiktoken"
MEL_FILTERS_FILE = "mel_filters.npz"
# The original tokenizer's pre-tokenizer: single digits, unlike the cl100k pattern transformers assumes
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
           r"""\s+(?!\S)|\s+""")
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
LANGUAGES = ("en", "zh", "de", "es", "ko", "fr", "ja", "it")
# The audio special tokens in their id order (ids follow the 151643 BPE ranks and CHATML_TOKENS); only these
# may come from text, as in the original's make_context. <|t|> for t = 0.00 ... 30.00 are the word timestamps.
AUDIO_TOKENS = (
    AUDIO_PAD, "<|startoftranscript|>", "<|startofanalysis|>", "<|translate|>", "<|transcribe|>", "<|caption|>",
    "<|keyword|>", "<|unknown|>", *(f"<|{code}|>" for code in LANGUAGES), "<|zh_tr|>", "<|notimestamps|>", "<|sil|>",
    "<|timestamps|>", *(f"<|{i / 100:.2f}|>" for i in range(3001)), "<|caption_audiocaps|>", "<|caption_clotho|>",
    "<|audioset_ontology|>", "<|caption_plain|>", "<|itn|>", "<|wo_itn|>", "<|startofentityvalue|>",
    "<|endofentityvalue|>", "<|startofentitytype|>", "<|endofentitytype|>", "<|named_entity_recognition|>",
    "<|audio_grounding|>", "<|startofword|>", "<|endofword|>", "<|delim|>", "<|emotion_recognition|>",
    "<|music_description|>", "<|note_analysis|>", "<|pitch|>", *(f"<|midi_pitch_{i}|>" for i in range(128)),
    "<|velocity|>", *(f"<|midi_velocity_{i}|>" for i in range(128)), "<|sonic|>", "<|instrument|>",
    "<|speaker_meta|>", "<|song_meta|>", "<|question|>", "<|answer|>", "<|choice|>", "<|scene|>", "<|event|>",
    "<|vocal_classification|>", "<|speech_understanding|>", "<|scenario|>", "<|action|>", "<|entities|>",
    "<|speech_edit|>", AUDIO_START, AUDIO_END,
)
N_MELS = 80
ATTENTION = "qwen_logn_sdpa"


class QwenTokenizer:
    """The original tokenizer exactly: tiktoken with qwen.tiktoken's ranks, its pattern and its special tokens.

    decode(skip_special_tokens=True) drops only the ChatML tokens: timestamps and the other audio
    tokens are what the model says, so they stay in the text.
    """

    def __init__(self, ranks_file: str) -> None:
        ranks = load_tiktoken_bpe(ranks_file)
        specials = {token: len(ranks) + i for i, token in enumerate(CHATML_TOKENS + AUDIO_TOKENS)}
        self.encoding = tiktoken.Encoding("qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)
        self.ids = specials
        self.chatml_ids = {specials[token] for token in CHATML_TOKENS}

    def encode(self, text: str) -> list[int]:
        """Ids of chat text, where audio tokens are special and every other special token is plain text."""
        return self.encoding.encode(unicodedata.normalize("NFC", text), allowed_special=set(AUDIO_TOKENS),
                                    disallowed_special=())

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **_) -> str:
        """Text of ids; invalid UTF-8 becomes U+FFFD, as in the original.

        Ids past the vocabulary (the embedding table is padded to 155947 rows; 155165 are tokens) are no
        text: the original's tiktoken decode fails on them, which would fail the whole reply.
        """
        ids = [i for i in ids if i < self.encoding.n_vocab and not (skip_special_tokens and i in self.chatml_ids)]
        return self.encoding.decode(ids, errors="replace")


def logn_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA with the original's logn scaling: queries past seq_length scaled by log(position) / log(seq_length)."""
    config = module.config
    n_keys, n_queries = key.shape[2], query.shape[2]
    if getattr(config, "use_logn_attn", False) and n_keys > config.seq_length:
        positions = torch.arange(n_keys - n_queries + 1, n_keys + 1, dtype=torch.float64, device=query.device)
        scale = torch.where(positions > config.seq_length, positions.log() / math.log(config.seq_length), 1.0)
        query = query * scale.to(query.dtype)[None, None, :, None]  # (batch, heads, queries, head_dim)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, logn_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


class QwenAudioChatForCausalLM(Qwen2ForCausalLM):
    """Qwen2ForCausalLM plus the original's audio encoder, projection and `<audio>`/`</audio>` embeddings."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        audio = Qwen2AudioEncoderConfig(**config.audio_config)
        self.audio_tower = Qwen2AudioEncoder(audio)
        self.audio_projector = nn.Linear(audio.d_model, config.hidden_size)
        self.audio_bos_eos = nn.Embedding(2, config.hidden_size)  # rows for <audio> and </audio>
        self.post_init()

    def forward(self, input_ids=None, input_features=None, feature_attention_mask=None, inputs_embeds=None, **kwargs):
        """Qwen2's forward on embeddings with each part's audio in place of its pads (on a prefill, not a decode)."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
            if input_ids.shape[1] != 1:
                ids = self.config.audio_token_ids
                inputs_embeds[input_ids == ids["start"]] = self.audio_bos_eos.weight[0].to(inputs_embeds.dtype)
                inputs_embeds[input_ids == ids["end"]] = self.audio_bos_eos.weight[1].to(inputs_embeds.dtype)
                if input_features is not None:
                    audio = self.encode_audio(input_features, feature_attention_mask)
                    inputs_embeds[input_ids == ids["pad"]] = audio.to(inputs_embeds.dtype)
        return super().forward(inputs_embeds=inputs_embeds, **kwargs)

    def encode_audio(self, features: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """Every part's audio embeddings, concatenated (n_audio_tokens, hidden); each part is encoded on its own length.

        features (n_parts, n_mels, n_frames) are padded to 30 s; a part's mel is trimmed to 2·T frames,
        T = (mel_len - 1) // 2 + 1 being its length after the stride-2 convolution, as the original does.
        """
        encoder, out = self.audio_tower, []
        for mel, n_frames in zip(features, frame_mask.sum(-1).tolist()):
            n_steps = (n_frames - 1) // 2 + 1
            x = mel[None, :, : 2 * n_steps].to(encoder.conv1.weight.dtype)
            x = nn.functional.gelu(encoder.conv2(nn.functional.gelu(encoder.conv1(x)))).permute(0, 2, 1)
            x = x + encoder.embed_positions.weight[:n_steps]  # (1, T, width)
            for layer in encoder.layers:
                x = layer(x, attention_mask=None)
            x = encoder.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)  # (1, T // 2, width)
            out.append(self.audio_projector(encoder.layer_norm(x))[0])
        return torch.cat(out)


# The original's tensor names → the modules above. Renamings apply in order, then at most one converter.
register_checkpoint_conversion_mapping(QwenAudioChatForCausalLM.__name__, [
    WeightRenaming(r"^transformer\.audio\.blocks\.", "audio_tower.layers."),
    WeightRenaming(r"\.attn\.query\.", ".self_attn.q_proj."),
    WeightRenaming(r"\.attn\.key\.", ".self_attn.k_proj."),
    WeightRenaming(r"\.attn\.value\.", ".self_attn.v_proj."),
    WeightRenaming(r"\.attn\.out\.", ".self_attn.out_proj."),
    WeightRenaming(r"\.attn_ln\.", ".self_attn_layer_norm."),
    WeightRenaming(r"\.mlp\.0\.", ".fc1."),
    WeightRenaming(r"\.mlp\.2\.", ".fc2."),
    WeightRenaming(r"\.mlp_ln\.", ".final_layer_norm."),
    WeightRenaming(r"^transformer\.audio\.ln_post\.", "audio_tower.layer_norm."),
    WeightRenaming(r"^transformer\.audio\.positional_embedding$", "audio_tower.embed_positions.weight"),
    WeightRenaming(r"^transformer\.audio\.proj\.", "audio_projector."),
    WeightRenaming(r"^transformer\.audio\.audio_bos_eos_token\.", "audio_bos_eos."),
    WeightRenaming(r"^transformer\.audio\.", "audio_tower."),  # conv1, conv2
    WeightRenaming(r"^transformer\.wte\.", "model.embed_tokens."),
    WeightRenaming(r"^transformer\.ln_f\.", "model.norm."),
    WeightRenaming(r"^transformer\.h\.", "model.layers."),
    WeightRenaming(r"\.ln_1\.", ".input_layernorm."),
    WeightRenaming(r"\.ln_2\.", ".post_attention_layernorm."),
    WeightRenaming(r"\.attn\.c_proj\.", ".self_attn.o_proj."),
    WeightRenaming(r"\.mlp\.w2\.", ".mlp.gate_proj."),  # w2 is the SiLU input
    WeightRenaming(r"\.mlp\.w1\.", ".mlp.up_proj."),
    WeightRenaming(r"\.mlp\.c_proj\.", ".mlp.down_proj."),
    WeightConverter("attn.c_attn", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], [Chunk(dim=0)]),
])


def qwen2_config(original: dict, tokenizer: QwenTokenizer) -> Qwen2Config:
    """The Qwen2 config of an original config.json, with the original's extra settings kept on it."""
    audio = original["audio"]
    return Qwen2Config(
        vocab_size=original["vocab_size"], hidden_size=original["hidden_size"],
        intermediate_size=original["intermediate_size"] // 2, num_hidden_layers=original["num_hidden_layers"],
        num_attention_heads=original["num_attention_heads"], num_key_value_heads=original["num_attention_heads"],
        head_dim=original["kv_channels"], max_position_embeddings=original["max_position_embeddings"],
        rms_norm_eps=original["layer_norm_epsilon"], tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(original["rotary_emb_base"])},
        seq_length=original["seq_length"], use_dynamic_ntk=original["use_dynamic_ntk"],
        use_logn_attn=original["use_logn_attn"],
        audio_config={"num_mel_bins": audio["n_mels"], "max_source_positions": audio["n_ctx"],
                      "d_model": audio["n_state"], "encoder_attention_heads": audio["n_head"],
                      "encoder_layers": audio["n_layer"], "encoder_ffn_dim": 4 * audio["n_state"]},
        audio_token_ids={"pad": tokenizer.ids[AUDIO_PAD], "start": tokenizer.ids[AUDIO_START],
                         "end": tokenizer.ids[AUDIO_END]},
    )


class QwenAudioChatModel(LocalModel):
    """The loaded checkpoint: QwenAudioChatForCausalLM, the tiktoken tokenizer and Whisper's 80-bin log-mel."""

    def __init__(self, checkpoint: str, options: LoadOptions) -> None:
        self.tokenizer = QwenTokenizer(cached_file(checkpoint, RANKS_FILE))
        original = json.loads(Path(cached_file(checkpoint, "config.json")).read_text())
        self.config = qwen2_config(original, self.tokenizer)
        self.model = QwenAudioChatForCausalLM.from_pretrained(
            checkpoint, config=self.config, dtype=options.dtype, device_map=options.device_map,
            quantization_config=options.quantization_config, attn_implementation=ATTENTION,
        ).eval()
        self.feature_extractor = WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=SAMPLE_RATE)
        with np.load(cached_file(checkpoint, MEL_FILTERS_FILE)) as filters:  # the checkpoint's own filter bank
            self.feature_extractor.mel_filters = filters[f"mel_{N_MELS}"].T.astype(np.float64)
        self.audio_token_id = self.tokenizer.ids[AUDIO_PAD]
        self.context_tokens = original["max_position_embeddings"]
        self.stop_ids = [self.tokenizer.ids[token] for token in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of each piece of text, as the original encodes a role or a turn's content."""
        return [self.tokenizer.encode(text) for text in texts]

    def control_id(self, token: str) -> int:
        """The id of a ChatML or audio control token."""
        return self.tokenizer.ids[token]

    def features(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """The log-mel of the part padded to 30 s, and a mask of its own n_samples // 160 frames."""
        out = self.feature_extractor(samples, sampling_rate=SAMPLE_RATE, padding="max_length", return_tensors="pt")
        features = out["input_features"][0]  # (n_mels, 3000)
        mask = torch.zeros(features.shape[-1], dtype=torch.long)
        mask[: len(samples) // SAMPLES_PER_FRAME] = 1
        return {"input_features": features, "feature_attention_mask": mask}

    def position_encoding(self, n_tokens: int) -> float:
        """Dynamic NTK: the RoPE base for a prompt of n_tokens, set before its prefill and kept while decoding."""
        alpha = ntk_alpha(n_tokens, self.config.seq_length) if self.config.use_dynamic_ntk else 1.0
        rotary = self.model.model.rotary_emb
        dim = self.config.head_dim
        base = self.config.rope_parameters["rope_theta"] * alpha ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=rotary.inv_freq.device).float() / dim))
        rotary.inv_freq.copy_(inv_freq)
        return alpha


def ntk_alpha(n_tokens: int, seq_length: int) -> float:
    """The original's NTK factor: 1 up to seq_length tokens, then 2^ceil(log2(n / seq_length) + 1) - 1."""
    return max(2 ** math.ceil(math.log(n_tokens / seq_length, 2) + 1) - 1, 1)
