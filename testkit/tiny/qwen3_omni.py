"""A tiny random-weight Qwen3-Omni checkpoint folder, laid out as Qwen/Qwen3-Omni-30B-A3B-Instruct's.

    config.json, model.safetensors     Qwen3OmniMoeForConditionalGeneration: thinker (audio tower, vision tower,
                                       MoE language model), talker (MoE, code predictor), code2wav
    generation_config.json             replies end at <|im_end|> and hold printable ASCII only
    tokenizer.json, tokenizer_config.json, chat_template.jinja (only when a template is passed)
    preprocessor_config.json           WhisperFeatureExtractor, 128 mel bins, 300-s window

The thinker-only class (Qwen3OmniMoeThinkerForConditionalGeneration) loads from the same folder. Added tokens sit
in Qwen3-Omni's order (<|audio_start|> 151669, <tts_pad> 151671, <|audio_pad|> 151675 in the real vocab, as its
config.json names them), so the id of a token here is its real id - 151643 + omni.FIRST_ADDED_ID. The role ids the
full model's speech path looks for (system_token_id, user_token_id, assistant_token_id: "system", "user",
"assistant" in the real vocab) are the first byte of each role here, the token that follows <|im_start|>.

Run as a script to write one:  python -m testkit.tiny.qwen3_omni /tmp/tiny-qwen3-omni
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import Qwen2Tokenizer, Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

from testkit.tiny import omni
from testkit.tiny.common import Weights

ADDED_TOKENS = [  # (token, special), from id 151643 on in the real vocab
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
    ("<|audio_start|>", True), ("<|audio_end|>", True), ("<tts_pad>", True), ("<tts_text_bos>", True),
    ("<tts_text_eod>", True), ("<tts_text_bos_single>", True), ("<|audio_pad|>", True),
]
NAMED_TOKENS = {  # what Qwen3OmniMoeProcessor reads from the tokenizer
    "audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
}
ID = {token: omni.FIRST_ADDED_ID + i for i, (token, _) in enumerate(ADDED_TOKENS)}
ROLE_IDS = {"system_token_id": ord("s"), "user_token_id": ord("u"), "assistant_token_id": ord("a")}
MAX_POSITIONS = 65536

# mrope_section: the three rotary sections (time, height, width) sum to head_dim / 2 (16 / 2 here)
ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3], "interleaved": True,
        "mrope_interleaved": True}
TEXT = {"vocab_size": omni.VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "moe_intermediate_size": 32,
        "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "max_position_embeddings": MAX_POSITIONS, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_parameters": ROPE, "pad_token_id": ID["<|endoftext|>"]}
AUDIO = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
         "num_mel_bins": omni.N_MEL_BINS, "output_dim": 64, "downsample_hidden_size": 32,
         "max_source_positions": 1500, "n_window": 50, "n_window_infer": 800, "conv_chunksize": 500}
VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
          "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
          "deepstack_visual_indexes": [0]}
THINKER = {"text_config": TEXT, "audio_config": AUDIO, "vision_config": VISION, "position_id_per_seconds": 13,
           "audio_token_id": ID["<|audio_pad|>"], "image_token_id": ID["<|image_pad|>"],
           "video_token_id": ID["<|video_pad|>"], "audio_start_token_id": ID["<|audio_start|>"],
           # not declared by Qwen3OmniMoeThinkerConfig, but in the real config.json and read by the model
           "audio_end_token_id": ID["<|audio_end|>"], "vision_start_token_id": ID["<|vision_start|>"],
           "vision_end_token_id": ID["<|vision_end|>"], "user_token_id": ROLE_IDS["user_token_id"],
           "tie_word_embeddings": False}

CODEBOOK = 64  # codes per quantizer (the real 2048)
N_CODE_GROUPS = 4
# The talker's vocabulary is the codes and then 1024 codec ids, as the real 3072 = 2048 + 1024: generate() suppresses
# the last 1024 ids but eos, so a smaller tail would forbid the codes themselves. Codec ids at the real offsets.
N_CODEC_IDS = 1024
TALKER_TEXT = {"vocab_size": CODEBOOK + N_CODEC_IDS, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "moe_intermediate_size": 16,
               "shared_expert_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
               "max_position_embeddings": MAX_POSITIONS, "rope_parameters": ROPE}
CODE_PREDICTOR = {"vocab_size": CODEBOOK, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                  "num_code_groups": N_CODE_GROUPS}
TALKER = {"text_config": TALKER_TEXT, "code_predictor_config": CODE_PREDICTOR, "num_code_groups": N_CODE_GROUPS,
          "thinker_hidden_size": TEXT["hidden_size"], "accept_hidden_layer": 1,
          "codec_pad_id": CODEBOOK + 100, "codec_bos_id": CODEBOOK + 101, "codec_eos_token_id": CODEBOOK + 102,
          "codec_nothink_id": CODEBOOK + 107, "codec_think_bos_id": CODEBOOK + 108,
          "codec_think_eos_id": CODEBOOK + 109,
          "speaker_id": {"chelsie": CODEBOOK + 253, "ethan": CODEBOOK + 254, "aiden": CODEBOOK + 255},
          "audio_token_id": THINKER["audio_token_id"], "image_token_id": THINKER["image_token_id"],
          "video_token_id": THINKER["video_token_id"], "vision_start_token_id": ID["<|vision_start|>"],
          "audio_start_token_id": ID["<|audio_start|>"], "audio_end_token_id": ID["<|audio_end|>"],
          "position_id_per_seconds": 13, "seconds_per_chunk": 2,
          "spatial_merge_size": 2}  # undeclared in Qwen3OmniMoeTalkerConfig, read by the talker; the real file has it
CODE2WAV = {"codebook_size": CODEBOOK, "num_quantizers": N_CODE_GROUPS, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "sliding_window": 8,
            "max_position_embeddings": 8000, "decoder_dim": 32,
            "upsample_rates": [8, 5, 4, 3], "upsampling_ratios": [2, 2]}  # the real 1920 samples (24 kHz) per code
# the real window is 72 codes (5.8 s) over 8 layers; 8 codes (0.64 s) over 2 here, so a 3-s reply crosses it
TALKER_STD = 0.15  # codes that change with the voice and the text
CODE2WAV_STD = 0.1  # audio that moves with the codes (std about 0.05, peaks about 0.3), neither flat nor clipped
TOP = {"im_start_token_id": ID["<|im_start|>"], "im_end_token_id": ID["<|im_end|>"],
       "tts_pad_token_id": ID["<tts_pad>"], "tts_bos_token_id": ID["<tts_text_bos>"],
       "tts_eos_token_id": ID["<tts_text_eod>"], **ROLE_IDS}


def tiny_tokenizer(chat_template: str | None = None) -> Qwen2Tokenizer:
    """The byte-level tokenizer with Qwen3-Omni's added tokens (and a chat template when one is passed)."""
    return omni.tiny_tokenizer(ADDED_TOKENS, NAMED_TOKENS, MAX_POSITIONS, chat_template)


def tiny_config() -> Qwen3OmniMoeConfig:
    """The full model's config, every part as small as it builds."""
    return Qwen3OmniMoeConfig(thinker_config=THINKER, talker_config=TALKER, code2wav_config=CODE2WAV, **TOP)


def build_tiny_qwen3_omni(folder: Path, chat_template: str | None = None) -> Path:
    """Write the tiny checkpoint folder and return it; deterministic, well under a second."""
    model = Qwen3OmniMoeForConditionalGeneration(tiny_config()).eval()
    omni.fill(model, model.thinker, [ID["<|im_end|>"], ID["<|endoftext|>"]])
    speech = Weights(omni.SEED + 2)  # spread: at std 0.02 (omni.fill's) every voice and text gave the same codes
    speech.fill(model.talker, std=TALKER_STD)
    speech.fill(model.code2wav, std=CODE2WAV_STD)
    return omni.save(folder, model, tiny_tokenizer(chat_template))


if __name__ == "__main__":
    print(build_tiny_qwen3_omni(Path(sys.argv[1])))
