"""A tiny random-weight Qwen2.5-Omni checkpoint folder, laid out as Qwen/Qwen2.5-Omni-7B's.

    config.json, model.safetensors     Qwen2_5OmniForConditionalGeneration: thinker (audio tower, vision tower,
                                       language model), talker, token2wav (DiT and BigVGAN)
    spk_dict.pt                        the voices: {"Chelsie": {"bos_token", "cond", "ref_mel"}, "Ethan": ...};
                                       the full class's from_pretrained refuses a folder without it
    generation_config.json             replies end at <|im_end|> and hold printable ASCII only
    tokenizer.json, tokenizer_config.json, chat_template.jinja (only when a template is passed)
    preprocessor_config.json           WhisperFeatureExtractor, 128 mel bins, 300-s window

The thinker-only class (Qwen2_5OmniThinkerForConditionalGeneration) loads from the same folder; the full class
generates text only with generation_mode="text". Added tokens sit in Qwen2.5's order with Omni's names
(<|AUDIO|> 151646, <|audio_bos|> 151647, <|audio_eos|> 151648, <|vision_bos|> 151652, <|IMAGE|> 151655,
<|VIDEO|> 151656 in the real vocab, as its config defaults name them), so the id of a token here is its real
id - 151643 + omni.FIRST_ADDED_ID. The talker's text ids (<tts_text_*>, each voice's bos_token) have no string
in the real tokenizer either: they sit near the end of the embedding rows, as 151859.. do in the real 152064.

Run as a script to write one:  python -m testkit.tiny.qwen2_5_omni /tmp/tiny-qwen2.5-omni

build_qwen2_5_omni_7b(folder, device) writes Qwen2.5-Omni-7B's thinker at its real shapes with random bf16 weights
(for bench/gpu.py): 8.93 B parameters (language model with lm_head 7.62 B, audio encoder 0.64 B, vision encoder
0.68 B), 17.9 GB; in 4 bit (NF4 layers, the rest bf16) 8.2 GB.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5OmniConfig,
    Qwen2_5OmniForConditionalGeneration,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2Tokenizer,
)

from testkit.tiny import omni
from testkit.tiny.common import SEED

ADDED_TOKENS = [  # (token, special), from id 151643 on in the real vocab
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|AUDIO|>", True), ("<|audio_bos|>", True), ("<|audio_eos|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_bos|>", True), ("<|vision_eos|>", True),
    ("<|vision_pad|>", True), ("<|IMAGE|>", True), ("<|VIDEO|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
NAMED_TOKENS = {  # what Qwen2_5OmniProcessor reads from the tokenizer
    "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
}
ID = {token: omni.FIRST_ADDED_ID + i for i, (token, _) in enumerate(ADDED_TOKENS)}
TTS_TEXT_PAD, TTS_TEXT_START, TTS_TEXT_END = 480, 481, 482  # 151859, 151860, 151861 in the real vocab
SPEAKERS = {"Chelsie": 490, "Ethan": 491}  # each voice's talker text bos token
MAX_POSITIONS = 32768

# mrope_section: the three rotary sections (time, height, width) sum to head_dim / 2 (64 / 4 heads / 2 here)
ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
TEXT = {"vocab_size": omni.VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_parameters": ROPE}
AUDIO = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
         "num_mel_bins": omni.N_MEL_BINS, "output_dim": 64, "max_source_positions": 1500, "n_window": 100}
VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
          "fullatt_block_indexes": [0]}
THINKER = {"text_config": TEXT, "audio_config": AUDIO, "vision_config": VISION,
           "audio_token_index": ID["<|AUDIO|>"], "image_token_index": ID["<|IMAGE|>"],
           "video_token_index": ID["<|VIDEO|>"], "audio_start_token_id": ID["<|audio_bos|>"],
           "audio_end_token_id": ID["<|audio_eos|>"], "position_id_per_seconds": 25, "seconds_per_chunk": 2,
           # not declared by Qwen2_5OmniThinkerConfig, but in the real config.json and read by the model
           "vision_start_token_id": ID["<|vision_bos|>"], "vision_end_token_id": ID["<|vision_eos|>"],
           "tie_word_embeddings": False}

CODEBOOK = 128  # speech codes; the talker's codec ids follow them as the real ones follow 8192
TALKER = {"vocab_size": 160, "embedding_size": TEXT["hidden_size"], "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
          "max_position_embeddings": MAX_POSITIONS, "rope_parameters": ROPE,
          "tts_codec_pad_token_id": CODEBOOK + 4, "tts_codec_start_token_id": CODEBOOK + 5,
          "tts_codec_end_token_id": CODEBOOK + 6, "tts_codec_mask_token_id": CODEBOOK + 8,
          "tts_text_pad_token_id": TTS_TEXT_PAD, "tts_text_start_token_id": TTS_TEXT_START,
          "tts_text_end_token_id": TTS_TEXT_END,
          "audio_token_index": THINKER["audio_token_index"], "image_token_index": THINKER["image_token_index"],
          "video_token_index": THINKER["video_token_index"], "audio_start_token_id": ID["<|audio_bos|>"],
          "audio_end_token_id": ID["<|audio_eos|>"], "vision_start_token_id": ID["<|vision_bos|>"],
          "vision_end_token_id": ID["<|vision_eos|>"], "position_id_per_seconds": 25, "seconds_per_chunk": 2}
# talker outputs that are neither a code the DiT embeds (0..num_embeds) nor the end: never chosen by the tiny talker
NOT_SPOKEN = [i for i in range(CODEBOOK + 2, TALKER["vocab_size"]) if i != TALKER["tts_codec_end_token_id"]]
MEL_BINS_OUT = 80  # the vocoder's mel (the real 80)
DIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16, "ff_mult": 2,
       "emb_dim": 16, "num_embeds": CODEBOOK + 1, "mel_dim": MEL_BINS_OUT, "enc_emb_dim": 16, "enc_dim": 16,
       "enc_channels": [16, 16, 16, 16, 48], "enc_attention_channels": 8, "enc_se_channels": 8,
       "block_size": 24, "look_ahead_layers": [1], "look_backward_layers": [0], "repeats": 2}
BIGVGAN = {"mel_dim": MEL_BINS_OUT, "upsample_initial_channel": 64, "resblock_kernel_sizes": [3],
           "resblock_dilation_sizes": [[1, 3, 5]],  # one residual block per stage (the real: kernels 3, 7, 11)
           "upsample_rates": [5, 3, 2, 2, 2, 2], "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4]}  # the real 240x
N_REF_MEL_FRAMES = 32

# Qwen/Qwen2.5-Omni-7B's thinker_config (config.json), as public copies of it and transformers' config defaults
# (documented as that checkpoint's) give it; the vision tower is Qwen2.5-VL-7B's (its config.json: 1280 wide).
FULL_ROPE = ROPE | {"mrope_section": [16, 24, 24]}  # sums to head_dim / 2 = 3584 / 28 / 2
FULL_TEXT = TEXT | {"vocab_size": omni.REAL_VOCAB_SIZE, "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                    "rope_parameters": FULL_ROPE}
FULL_AUDIO = AUDIO | {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120,
                      "output_dim": 3584}  # Whisper-large-v3 sized
FULL_VISION = VISION | {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                        "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31]}
REAL_ID = {token: omni.REAL_FIRST_ADDED_ID + i for i, (token, _) in enumerate(ADDED_TOKENS)}
FULL_THINKER = THINKER | {
    "text_config": FULL_TEXT, "audio_config": FULL_AUDIO, "vision_config": FULL_VISION,
    "audio_token_index": REAL_ID["<|AUDIO|>"], "image_token_index": REAL_ID["<|IMAGE|>"],
    "video_token_index": REAL_ID["<|VIDEO|>"], "audio_start_token_id": REAL_ID["<|audio_bos|>"],
    "audio_end_token_id": REAL_ID["<|audio_eos|>"], "vision_start_token_id": REAL_ID["<|vision_bos|>"],
    "vision_end_token_id": REAL_ID["<|vision_eos|>"],
}


def tiny_tokenizer(chat_template: str | None = None) -> Qwen2Tokenizer:
    """The byte-level tokenizer with Qwen2.5-Omni's added tokens (and a chat template when one is passed)."""
    return omni.tiny_tokenizer(ADDED_TOKENS, NAMED_TOKENS, MAX_POSITIONS, chat_template)


def tiny_config() -> Qwen2_5OmniConfig:
    """The full model's config, every part as small as it builds."""
    return Qwen2_5OmniConfig(thinker_config=THINKER, talker_config=TALKER,
                             token2wav_config={"dit_config": DIT, "bigvgan_config": BIGVGAN})


def speakers() -> dict[str, dict]:
    """spk_dict.pt's content: per voice the talker's text bos id, a speaker vector and a reference mel."""
    generator = torch.Generator().manual_seed(SEED + 2)
    return {name: {"bos_token": bos,
                   "cond": torch.randn(1, DIT["enc_emb_dim"], generator=generator),  # (1, enc_emb_dim)
                   "ref_mel": torch.randn(1, N_REF_MEL_FRAMES, MEL_BINS_OUT, generator=generator)}  # (1, T, mel)
            for name, bos in SPEAKERS.items()}


def build_tiny_qwen2_5_omni(folder: Path, chat_template: str | None = None) -> Path:
    """Write the tiny checkpoint folder and return it; deterministic, well under a second."""
    model = Qwen2_5OmniForConditionalGeneration(tiny_config()).eval()
    omni.fill(model, model.thinker, [ID["<|im_end|>"], ID["<|endoftext|>"]])
    with torch.no_grad():  # the talker speaks codes the vocoder has (the real one's are trained to) or ends
        model.talker.codec_head.weight[NOT_SPOKEN] = 0.0
    folder = omni.save(folder, model, tiny_tokenizer(chat_template))
    torch.save(speakers(), folder / "spk_dict.pt")
    return folder


def build_qwen2_5_omni_7b(folder: Path, device: str | torch.device, thinker: dict = FULL_THINKER) -> Path:
    """Qwen2.5-Omni-7B's thinker at its real shapes, random bf16 weights made on the device, saved as the real
    checkpoint lays the thinker out; returns the folder.

    Only the thinker is built: the app loads nothing else while the voice is off. config.json is the whole model's
    (model_type qwen2_5_omni, which the family recognizes; the talker and token2wav sections at transformers'
    defaults, enable_audio_output false); the weights are named as transformers saves a thinker (model.*,
    audio_tower.*, visual.*, lm_head.*: the real shards' names without their thinker. prefix, which the loader
    strips). thinker: the thinker_config (a narrowed one checks the whole path on a CPU).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)  # no talker weights to speak with
    tokenizer = omni.full_vocab_tokenizer(ADDED_TOKENS, NAMED_TOKENS, MAX_POSITIONS,
                                          thinker["text_config"]["vocab_size"])
    torch.manual_seed(SEED)
    with torch.device(device):
        model = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config.thinker_config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=REAL_ID["<|im_end|>"],
                                               pad_token_id=REAL_ID["<|endoftext|>"])
    model.save_pretrained(folder)
    del model
    config.save_pretrained(folder)  # the whole model's config.json over the thinker's own
    tokenizer.save_pretrained(folder)
    omni.feature_extractor().save_pretrained(folder)
    return folder


if __name__ == "__main__":
    print(build_tiny_qwen2_5_omni(Path(sys.argv[1])))
