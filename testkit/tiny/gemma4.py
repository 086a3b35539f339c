"""A tiny random-weight Gemma 4 checkpoint folder, laid out as google/gemma-4-E2B-it's.

    config.json, model.safetensors     Gemma4ForConditionalGeneration: language model with per-layer embeddings and
                                       shared-KV layers (E2B's pattern), audio tower (USM conformer), vision tower
    generation_config.json             as the real one: stops at <eos>, <turn|>, <|tool_response> (ids 1, 106, 50)
                                       and samples (temperature 1, top_k 64, top_p 0.95) unless told otherwise;
                                       here it also suppresses every id but printable text and those three
    tokenizer.json, tokenizer_config.json, chat_template.jinja (only when a template is passed)
                                       GemmaTokenizer: BPE with byte fallback, spaces as "▁"
    processor_config.json              Gemma4Processor's keys with a nested "feature_extractor" section
                                       (Gemma4AudioFeatureExtractor, 128 mel bins); no image/video sections

The tokenizer keeps Gemma 4's low ids exactly: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, <|tool> 46,
<tool|> 47, <|tool_call> 48, <tool_call|> 49, <|tool_response> 50, <tool_response|> 51, <|"|> 52, <|think|> 98,
<|channel> 100, <channel|> 101, <|turn> 105, <turn|> 106; the other ids below 107 hold "<unusedN>" fillers (their
real content is not established here). Then the 256 byte-fallback tokens, "▁", printable ASCII and "▁x" pairs, and
last the multimodal tokens in their real order: <|image> <|audio> (255999, 256000 in the real vocab), <|image|>
<|audio|> <image|> <audio|> <|video|> (258880..258884), at MM_IDS here. Text ids other than the low specials
differ from the real tokenizer's (the real one is a 262144-piece SentencePiece model).

Gemma4ForConditionalGeneration and its audio tower (Gemma4AudioModel, eager attention only) load from the folder
with from_pretrained. Gemma4ForCausalLM.from_pretrained finds none of the weights (they sit under
model.language_model) and starts from random ones, as it would with the real folder. AutoProcessor
imports torchvision, which has no CPU build beside the pinned torch here: build_processor() assembles a
Gemma4Processor from the tokenizer and the feature extractor alone.

Run as a script to write one:  python -m testkit.tiny.gemma4 /tmp/tiny-gemma4
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    Gemma4AudioFeatureExtractor, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4Processor, GemmaTokenizer,
    GenerationConfig,
)

from testkit.tiny.common import SEED, suppress_all_but

SPECIAL_LOW = {  # real id: token, as google/gemma-4-E2B-it's tokenizer has them
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>",
}
N_LOW = 107
MULTIMODAL = ["<|image>", "<|audio>", "<|image|>", "<|audio|>", "<image|>", "<audio|>", "<|video|>"]
REAL_MM_IDS = [255999, 256000, 258880, 258881, 258882, 258883, 258884]
NAMED_TOKENS = {  # tokenizer_config.json's names, as transformers' convert_gemma4_weights.py sets them
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>", "eoc_token": "<channel|>",
    "think_token": "<|think|>", "escape_token": '<|"|>', "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>", "stc_token": "<|tool_call>", "etc_token": "<tool_call|>",
    "std_token": "<|tool>", "etd_token": "<tool|>",
}
SPACE = "▁"
CHARS = [chr(c) for c in range(0x21, 0x7F)]
FIRST_BYTE_ID = N_LOW
FIRST_CHAR_ID = FIRST_BYTE_ID + 256 + 1  # after the bytes and "▁"
FIRST_SPACED_ID = FIRST_CHAR_ID + len(CHARS)
FIRST_MM_ID = FIRST_SPACED_ID + len(CHARS)
MM_IDS = dict(zip(MULTIMODAL, range(FIRST_MM_ID, FIRST_MM_ID + len(MULTIMODAL))))
VOCAB_SIZE = FIRST_MM_ID + len(MULTIMODAL)
EOS_IDS = [1, 106, 50]  # <eos>, <turn|>, <|tool_response>: generation_config.json's eos_token_id, in this order

MAX_POSITIONS = 131072
WEIGHT_STD = 0.2  # spread (testing.md): greedy choices far apart, and a model that notices a changed prompt
QK_NORM_GAIN = 2.5  # the q/k RMS norms' gains: sharper attention than near-uniform
ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}
# E2B: 35 layers, (4 sliding + 1 full) x 7, the last 20 reuse the KV of the last unshared layer of their type
# and have double-wide MLPs. Here 4 layers, the last 2 shared: every path of the real stack runs.
TEXT = {"vocab_size": VOCAB_SIZE, "vocab_size_per_layer_input": VOCAB_SIZE, "hidden_size": 64,
        "hidden_size_per_layer_input": 8, "intermediate_size": 128, "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2, "num_kv_shared_layers": 2,
        "use_double_wide_mlp": True, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
        "global_head_dim": 32, "sliding_window": 512, "final_logit_softcapping": 30.0,
        "max_position_embeddings": MAX_POSITIONS, "rope_parameters": ROPE, "attention_k_eq_v": False,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
# The real audio tower: hidden 1024, 12 layers, 8 heads, subsampling channels [128, 32], output 1536 (E2B's text
# width). The first subsampling width must stay 128, the mel bins: the projection's input is (128 // 4) * channels[1].
AUDIO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "subsampling_conv_channels": [128, 4],
         "output_proj_dims": 48, "conv_kernel_size": 5, "attention_chunk_size": 12, "attention_context_left": 13,
         "attention_context_right": 0, "use_clipped_linears": True}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 16, "patch_size": 16,
          "pooling_kernel_size": 3, "position_embedding_size": 64, "use_clipped_linears": True,
          "default_output_length": 280}
TOP = {"image_token_id": MM_IDS["<|image|>"], "audio_token_id": MM_IDS["<|audio|>"],
       "video_token_id": MM_IDS["<|video|>"], "boi_token_id": MM_IDS["<|image>"], "eoi_token_id": MM_IDS["<image|>"],
       "boa_token_id": MM_IDS["<|audio>"], "eoa_token_index": MM_IDS["<audio|>"],
       "eoa_token_id": MM_IDS["<audio|>"],  # what the conversion script sets; the config class declares the other
       "eos_token_id": [1, 106], "tie_word_embeddings": True}
PROCESSOR = {"audio_ms_per_token": 40, "audio_seq_length": 750, "image_seq_length": 280}  # Gemma4Processor's own
_CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")  # clipped linears: left at +-inf


def tiny_tokenizer(chat_template: str | None = None) -> GemmaTokenizer:
    """GemmaTokenizer with Gemma 4's special tokens (low ids real, multimodal ids in real order at MM_IDS)."""
    vocab = {SPECIAL_LOW.get(i, f"<unused{i}>"): i for i in range(N_LOW)}
    vocab.update({f"<0x{b:02X}>": FIRST_BYTE_ID + b for b in range(256)})
    vocab[SPACE] = FIRST_BYTE_ID + 256
    vocab.update({c: FIRST_CHAR_ID + i for i, c in enumerate(CHARS)})
    vocab.update({SPACE + c: FIRST_SPACED_ID + i for i, c in enumerate(CHARS)})
    vocab.update(MM_IDS)
    specials = [t for i, t in sorted(SPECIAL_LOW.items()) if i > 4] + MULTIMODAL
    tokenizer = GemmaTokenizer(
        vocab=vocab, merges=[(SPACE, c) for c in CHARS], add_bos_token=False, padding_side="left",
        model_max_length=MAX_POSITIONS, extra_special_tokens=NAMED_TOKENS,
    )
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    if len(tokenizer) != VOCAB_SIZE or tokenizer.convert_tokens_to_ids(MULTIMODAL) != list(MM_IDS.values()):
        raise AssertionError("a token left its id")
    tokenizer.chat_template = chat_template
    return tokenizer


def feature_extractor() -> Gemma4AudioFeatureExtractor:
    """The real front end: 128 log-mel bins from 20-ms frames every 10 ms, clips cut at 30 s."""
    return Gemma4AudioFeatureExtractor()


def build_processor(folder: Path) -> Gemma4Processor:
    """Gemma4Processor from the folder's tokenizer and feature extractor, without image or video processors.

    Gemma4Processor's constructor demands both, and the video processor needs torchvision; the audio and text
    paths of __call__ read neither, so the instance is made as the constructor would make it, minus those two.
    """
    folder = Path(folder)
    tokenizer = GemmaTokenizer.from_pretrained(folder)
    processor = Gemma4Processor.__new__(Gemma4Processor)
    settings = json.loads((folder / "processor_config.json").read_text())
    processor.feature_extractor = Gemma4AudioFeatureExtractor.from_pretrained(folder)
    processor.tokenizer = tokenizer
    processor.chat_template = tokenizer.chat_template
    processor.image_seq_length = settings["image_seq_length"]
    processor.audio_seq_length = settings["audio_seq_length"]
    processor.audio_ms_per_token = settings["audio_ms_per_token"]
    processor.image_token, processor.image_token_id = tokenizer.image_token, tokenizer.image_token_id
    processor.boi_token, processor.eoi_token = tokenizer.boi_token, tokenizer.eoi_token
    processor.video_token = "<|video|>"
    processor.video_token_id = tokenizer.convert_tokens_to_ids("<|video|>")
    processor.audio_token, processor.audio_token_id = tokenizer.audio_token, tokenizer.audio_token_id
    processor.boa_token, processor.eoa_token = tokenizer.boa_token, tokenizer.eoa_token
    return processor


def tiny_config() -> Gemma4Config:
    """E2B's structure at toy widths."""
    return Gemma4Config(text_config=TEXT, audio_config=AUDIO, vision_config=VISION, **TOP)


def fill(model: Gemma4ForConditionalGeneration) -> None:
    """Every saved float tensor from one seeded generator, in name order: norms about 1, the rest spread.

    Left as built: the clipped linears' bounds (+-inf, no clipping) and the layer scalars (1). The rows of the three
    stop tokens are zeroed, so a reply never ends at once by chance; the head is tied to the embedding, as in E2B,
    so those tokens' input embeddings are zero too (their per-layer embeddings are not).
    """
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if not tensor.is_floating_point() or name.endswith(_CLIP_BOUNDS) or name.endswith("layer_scalar"):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                tensor.copy_(QK_NORM_GAIN * (1.0 + 0.1 * noise))
            elif "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            else:
                tensor.copy_(WEIGHT_STD * noise)
        model.get_input_embeddings().weight[EOS_IDS] = 0.0


def generation_config() -> GenerationConfig:
    """The real file's settings; replies hold printable ASCII only, in the pieces the tokenizer itself makes.

    Only the character tokens and the "▁x" pairs can be generated (no byte-fallback or lone "▁" pieces), so a
    reply's text tokenizes back to the very ids that were generated.
    """
    text = range(FIRST_CHAR_ID, FIRST_MM_ID)
    return GenerationConfig(
        bos_token_id=2, pad_token_id=0, eos_token_id=EOS_IDS, do_sample=True, temperature=1.0, top_k=64, top_p=0.95,
        suppress_tokens=suppress_all_but({*text, *EOS_IDS}, VOCAB_SIZE),
    )


def save_processor_files(folder: Path, tokenizer) -> Path:
    """The tokenizer files and processor_config.json, whose "feature_extractor" section the real repository keeps
    the audio feature extractor in; returns the folder."""
    tokenizer.init_kwargs["processor_class"] = "Gemma4Processor"
    tokenizer.save_pretrained(folder)
    extractor = json.loads(feature_extractor().to_json_string())
    settings = {**PROCESSOR, "feature_extractor": extractor, "processor_class": "Gemma4Processor"}
    (folder / "processor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return folder


def build_tiny_gemma4(folder: Path, chat_template: str | None = None) -> Path:
    """Write the tiny checkpoint folder (1.5 MB) and return it; deterministic, well under a second."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = Gemma4ForConditionalGeneration(tiny_config()).eval()
    fill(model)
    model.generation_config = generation_config()
    model.save_pretrained(folder)
    return save_processor_files(folder, tiny_tokenizer(chat_template))


# The real E2B and E4B at full size: their config.json's shapes, as public copies of google/gemma-4-E2B-it's and
# google/gemma-4-E4B-it's (-qat-w4a16-ct) config.json give them; the audio and vision towers are the config classes'
# defaults, which transformers documents as google/gemma-4-e2b-it's. bench/gpu.py builds these with random weights.
REAL_VOCAB_SIZE = 262144
_REAL_TEXT = {"vocab_size": REAL_VOCAB_SIZE, "vocab_size_per_layer_input": REAL_VOCAB_SIZE,
              "hidden_size_per_layer_input": 256, "num_attention_heads": 8, "head_dim": 256, "global_head_dim": 512,
              "sliding_window": 512, "final_logit_softcapping": 30.0, "max_position_embeddings": MAX_POSITIONS,
              "rope_parameters": ROPE, "attention_k_eq_v": False, "enable_moe_block": False,
              "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
              "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
REAL_TEXT = {
    # 35 layers, (4 sliding + 1 full) x 7; the last 20 share KV and have double-wide MLPs
    "e2b": _REAL_TEXT | {"hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": 35,
                         "num_key_value_heads": 1, "num_kv_shared_layers": 20, "use_double_wide_mlp": True,
                         "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 7},
    # 42 layers, (5 sliding + 1 full) x 7; the last 18 share KV
    "e4b": _REAL_TEXT | {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 42,
                         "num_key_value_heads": 2, "num_kv_shared_layers": 18, "use_double_wide_mlp": False,
                         "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 7},
}
REAL_AUDIO = {"hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 8,
              "subsampling_conv_channels": [128, 32], "output_proj_dims": 1536, "use_clipped_linears": True}
REAL_VISION = {"use_clipped_linears": True, "default_output_length": 280}  # otherwise Gemma4VisionConfig's defaults
REAL_TOP = {"image_token_id": 258880, "audio_token_id": 258881, "video_token_id": 258884, "boi_token_id": 255999,
            "eoi_token_id": 258882, "boa_token_id": 256000, "eoa_token_index": 258883, "eoa_token_id": 258883,
            "eos_token_id": [1, 106], "tie_word_embeddings": True}


def real_config(size: str, **text_overrides) -> Gemma4Config:
    """E2B's or E4B's configuration ("e2b", "e4b"); text_overrides narrow it (a test's smaller widths)."""
    return Gemma4Config(text_config=REAL_TEXT[size] | text_overrides, audio_config=REAL_AUDIO,
                        vision_config=REAL_VISION, **REAL_TOP)


def full_vocab_tokenizer() -> GemmaTokenizer:
    """tiny_tokenizer's pieces with every one of the real 262144 ids: the low specials and the multimodal tokens at
    their real ids (REAL_MM_IDS), every other id above the tiny pieces a word "▁t<id>" (decodes as " t<id>"), so a
    random model's replies stream as text. Prompts encode into characters, as with the tiny tokenizer."""
    vocab = {SPECIAL_LOW.get(i, f"<unused{i}>"): i for i in range(N_LOW)}
    vocab.update({f"<0x{b:02X}>": FIRST_BYTE_ID + b for b in range(256)})
    vocab[SPACE] = FIRST_BYTE_ID + 256
    vocab.update({c: FIRST_CHAR_ID + i for i, c in enumerate(CHARS)})
    vocab.update({SPACE + c: FIRST_SPACED_ID + i for i, c in enumerate(CHARS)})
    real_mm = dict(zip(MULTIMODAL, REAL_MM_IDS))
    by_id = {i: token for token, i in real_mm.items()}
    vocab.update({by_id.get(i, f"{SPACE}t{i}"): i for i in range(FIRST_MM_ID, REAL_VOCAB_SIZE)})
    specials = [t for i, t in sorted(SPECIAL_LOW.items()) if i > 4] + MULTIMODAL
    tokenizer = GemmaTokenizer(
        vocab=vocab, merges=[(SPACE, c) for c in CHARS], add_bos_token=False, padding_side="left",
        model_max_length=MAX_POSITIONS, extra_special_tokens=NAMED_TOKENS,
    )
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    if len(tokenizer) != REAL_VOCAB_SIZE or tokenizer.convert_tokens_to_ids(MULTIMODAL) != REAL_MM_IDS:
        raise AssertionError("a token left its id")
    return tokenizer


def build_gemma4_real(folder: Path, size: str, device: str | torch.device = "cpu",
                      config: Gemma4Config | None = None) -> Path:
    """E2B or E4B at its real shapes (or config's) with random bf16 weights made on device, saved as the real folder
    is laid out (sharded safetensors, generation_config.json with the real stop ids and sampling, the full-vocabulary
    tokenizer, processor_config.json); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = Gemma4ForConditionalGeneration._from_config(config or real_config(size), dtype=torch.bfloat16).eval()
    model.generation_config = GenerationConfig(bos_token_id=2, pad_token_id=0, eos_token_id=EOS_IDS, do_sample=True,
                                               temperature=1.0, top_k=64, top_p=0.95)
    model.save_pretrained(folder)
    del model
    return save_processor_files(folder, full_vocab_tokenizer())


if __name__ == "__main__":
    print(build_tiny_gemma4(Path(sys.argv[1])))
