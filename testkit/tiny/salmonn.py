"""Tiny random-weight SALMONN parts in the ORIGINAL formats, and the decode yaml that names them.

    vicuna/           a LLaMA folder: config.json, safetensors, tokenizer.model (a sentencepiece BPE
                      with byte fallback, testkit/data/salmonn/tokenizer.model, trained by train_tokenizer())
    whisper/          a Whisper folder as openai/whisper-large-v2's: config, weights, preprocessor_config.json
    beats.pt          {'cfg': dict, 'model': state_dict}: the names BEATs' own code gives, weight norm as
                      weight_g/weight_v, the relative position bias repeated under every layer, a classifier
    salmonn.pth       what SALMONN's save_checkpoint writes: {'model': trainable tensors and buffers, ...}
    decode_config.yaml  SALMONN's configs/decode_config.yaml with these parts' paths, relative to its folder

Run as a script to write them for the parity run of the original code:
    python -m testkit.tiny.salmonn /tmp/tiny-salmonn

Weights come from one seeded generator in a fixed order, spread enough that greedy choices are far apart.
build_salmonn(folder, FULL_SIZES["13b"], ...) writes the real 7B or 13B architecture with small random
weights the same way, for bench/gpu.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from testkit import DATA as TESTKIT_DATA
from testkit.tiny.common import Weights

DATA = TESTKIT_DATA / "salmonn"
LLM = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
       "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
WHISPER = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
           "decoder_layers": 1, "decoder_attention_heads": 4, "decoder_ffn_dim": 128, "num_mel_bins": 80,
           "max_source_positions": 1500, "max_target_positions": 448, "vocab_size": 51865}
# BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt's cfg, made small (FULL_BEATS_CFG is the real one)
BEATS_CFG = {
    "input_patch_size": 16, "embed_dim": 32, "conv_bias": False, "encoder_layers": 2, "encoder_embed_dim": 48,
    "encoder_ffn_embed_dim": 96, "encoder_attention_heads": 4, "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 0.6, "layer_norm_first": False, "deep_norm": True, "dropout": 0.0,
    "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.0,
    "conv_pos": 16, "conv_pos_groups": 4, "relative_position_embedding": True, "num_buckets": 32,
    "max_distance": 128, "gru_rel_pos": True, "finetuned_model": True, "predictor_dropout": 0.0,
    "predictor_class": 5,
}
QFORMER = {"hidden_size": 96, "num_hidden_layers": 2, "intermediate_size": 192}  # BERT-base's 12 heads, of 8


@dataclass(frozen=True)
class Sizes:
    """The shapes of the four parts."""

    llm: dict  # LlamaConfig arguments
    whisper: dict  # WhisperConfig arguments
    beats: dict  # BEATs' cfg
    qformer: dict
    vocab: int | None = None  # None: the tiny tokenizer's; else a tokenizer of this many pieces


TINY = Sizes(LLM, WHISPER, BEATS_CFG, QFORMER)
# The released parts' shapes: Whisper-large-v2, BEATs iter3+ (AS2M) cpt2, BERT-base's Q-Former, Vicuna v1.5 / v1.1
FULL_WHISPER = WHISPER | {"d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20, "encoder_ffn_dim": 5120}
FULL_BEATS_CFG = BEATS_CFG | {"embed_dim": 512, "encoder_layers": 12, "encoder_embed_dim": 768,
                              "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12, "conv_pos": 128,
                              "conv_pos_groups": 16, "num_buckets": 320, "max_distance": 800, "predictor_class": 527}
FULL_QFORMER = {"hidden_size": 768, "num_hidden_layers": 2, "intermediate_size": 3072}
FULL_SIZES = {
    "7b": Sizes({"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
                 "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}, FULL_WHISPER, FULL_BEATS_CFG, FULL_QFORMER,
                vocab=32000),
    "13b": Sizes({"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                  "num_hidden_layers": 40, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}, FULL_WHISPER,
                 FULL_BEATS_CFG, FULL_QFORMER, vocab=32000),
}
LORA_RANK, LORA_ALPHA = 8, 32
BERT_POSITIONS = 512
DECODE_CONFIG = {  # SALMONN's configs/decode_config.yaml, paths filled in
    "model": {
        "llama_path": "vicuna", "whisper_path": "whisper", "beats_path": "beats.pt", "ckpt": "salmonn.pth",
        "freeze_whisper": True, "freeze_beats": True, "use_speech_Qformer": True, "freeze_speech_QFormer": False,
        "window_level_Qformer": True, "num_speech_query_token": 1, "second_per_window": 0.333333,
        "second_stride": 0.333333, "speech_llama_proj_model": "", "freeze_speech_llama_proj": False, "lora": True,
        "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.1, "multi_prompt": True,
        "prompt_template": "USER: {}\nASSISTANT:", "prompt_path": "prompts/train_prompt.json",
        "test_prompt_path": "prompts/test_prompt.json", "max_txt_len": 300, "end_sym": "</s>",
    },
    "generate": {"max_new_tokens": 200, "num_beams": 4, "do_sample": False, "min_length": 1, "temperature": 1.0,
                 "top_p": 0.9, "repetition_penalty": 1.0, "length_penalty": 1.0},
}
TOKENIZER_VOCAB = 400
SYMBOLS_SHORTFALL = 2  # the text has fewer merges than 400 pieces ask for; symbols make up the difference
TOKENIZER_TEXT = (  # what the tiny tokenizer learns its merges from
    "USER: ASSISTANT: <Speech><SpeechHere></Speech> What is said in the audio? Describe the sound. "
    "Please transcribe the speech. What instrument plays the tune? Is the speaker happy or sad? "
    "The audio is a person speaking about the weather; a dog barks; music with a piano and drums. "
)


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in tensors.items()}


def train_tokenizer(path: Path = DATA / "tokenizer.model", vocab: int = TOKENIZER_VOCAB) -> Path:
    """A Vicuna-style tokenizer: BPE, byte fallback (newline is id 13), LLaMA's normalisation settings.

    The tiny one (committed) has 400 pieces; for a full vocabulary (bench/gpu.py) most pieces are symbols
    ` wN`, so almost every id a random model emits decodes to a word and streams as a reply would.
    """
    import sentencepiece

    path.parent.mkdir(parents=True, exist_ok=True)
    n_symbols = vocab - TOKENIZER_VOCAB + SYMBOLS_SHORTFALL if vocab > TOKENIZER_VOCAB else 0
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([TOKENIZER_TEXT] * 50), model_prefix=str(path.with_suffix("")),
        vocab_size=vocab, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        hard_vocab_limit=False, user_defined_symbols=[f"\u2581w{i}" for i in range(n_symbols)],
    )
    path.with_suffix(".vocab").unlink()
    return path


def build_vicuna(folder: Path, weights: Weights, sizes: Sizes, device: str, dtype: torch.dtype) -> None:
    """A LLaMA folder as Vicuna's: the tiny one filled from weights, a full-size one initialised on the device."""
    import sentencepiece
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    if sizes.vocab is None:
        (folder / "tokenizer.model").write_bytes((DATA / "tokenizer.model").read_bytes())
    else:
        train_tokenizer(folder / "tokenizer.model", sizes.vocab)
    vocab = sizes.vocab or sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()
    config = LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                         **sizes.llm)
    if sizes is TINY:
        model = LlamaForCausalLM(config)
        weights.fill(model, std=0.3)
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(weights.normal(vocab, config.hidden_size, std=1.0))
    else:
        with torch.device(device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "model_max_length": config.max_position_embeddings,
         "legacy": True}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def build_whisper(folder: Path, weights: Weights, sizes: Sizes, device: str, dtype: torch.dtype) -> None:
    """A Whisper folder as openai/whisper-large-v2's (80 mel bins), with a feature extractor config.

    A full-size one holds the encoder alone (as WhisperForAudioClassification saves it): the decoder is not used.
    """
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForAudioClassification,
        WhisperForConditionalGeneration,
    )

    if sizes is TINY:
        model = WhisperForConditionalGeneration(WhisperConfig(**sizes.whisper))
        weights.fill(model)
    else:
        with torch.device(device):
            model = WhisperForAudioClassification._from_config(WhisperConfig(**sizes.whisper), dtype=dtype)
    model.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)


def beats_state(weights: Weights, cfg: dict) -> dict[str, torch.Tensor]:
    """BEATs' state_dict under the names its own code gives them."""
    embed, width, ffn = cfg["embed_dim"], cfg["encoder_embed_dim"], cfg["encoder_ffn_embed_dim"]
    patch, heads, kernel = cfg["input_patch_size"], cfg["encoder_attention_heads"], cfg["conv_pos"]
    state = {"patch_embedding.weight": weights.normal(embed, 1, patch, patch, std=0.1),
             **prefixed("layer_norm", weights.norm(embed)),
             **prefixed("post_extract_proj", weights.linear(width, embed)),
             "encoder.pos_conv.0.bias": weights.normal(width, std=0.1),
             "encoder.pos_conv.0.weight_g": 1.0 + weights.normal(1, 1, kernel, std=0.2),
             "encoder.pos_conv.0.weight_v": weights.normal(width, width // cfg["conv_pos_groups"], kernel, std=0.2)}
    bias = weights.normal(cfg["num_buckets"], heads, std=0.5)
    for n in range(cfg["encoder_layers"]):
        layer = f"encoder.layers.{n}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            state |= prefixed(f"{layer}.self_attn.{name}", weights.linear(width, width, std=0.3))
        state |= {f"{layer}.self_attn.relative_attention_bias.weight": bias,  # one module, listed under every layer
                  **prefixed(f"{layer}.self_attn.grep_linear", weights.linear(8, width // heads, std=0.3)),
                  f"{layer}.self_attn.grep_a": 1.0 + weights.normal(1, heads, 1, 1, std=0.2),
                  **prefixed(f"{layer}.self_attn_layer_norm", weights.norm(width)),
                  **prefixed(f"{layer}.fc1", weights.linear(ffn, width)),
                  **prefixed(f"{layer}.fc2", weights.linear(width, ffn)),
                  **prefixed(f"{layer}.final_layer_norm", weights.norm(width))}
    state |= prefixed("encoder.layer_norm", weights.norm(width))
    state |= prefixed("predictor", weights.linear(cfg["predictor_class"], width))
    return state


def salmonn_state(weights: Weights, sizes: Sizes, beats_bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """What save_checkpoint keeps of the SALMONN module: trainable tensors, buffers, shared-module aliases."""
    llm_width, whisper_width = sizes.llm["hidden_size"], sizes.whisper["d_model"]
    width, beats_width = sizes.qformer["hidden_size"], sizes.beats["encoder_embed_dim"]
    encoder_width = whisper_width + beats_width
    state = {**prefixed("ln_speech", weights.norm(whisper_width)), **prefixed("ln_audio", weights.norm(beats_width)),
             "speech_query_tokens": weights.normal(1, 1, width, std=1.0),
             "speech_Qformer.bert.embeddings.position_ids": torch.arange(BERT_POSITIONS).expand((1, -1)),
             **prefixed("speech_Qformer.bert.embeddings.LayerNorm", weights.norm(width))}
    for n in range(sizes.qformer["num_hidden_layers"]):
        layer = f"speech_Qformer.bert.encoder.layer.{n}"
        for attention, key_width in (("attention", width), ("crossattention", encoder_width)):
            state |= prefixed(f"{layer}.{attention}.self.query", weights.linear(width, width))
            state |= prefixed(f"{layer}.{attention}.self.key", weights.linear(width, key_width))
            state |= prefixed(f"{layer}.{attention}.self.value", weights.linear(width, key_width))
            state |= prefixed(f"{layer}.{attention}.output.dense", weights.linear(width, width))
            state |= prefixed(f"{layer}.{attention}.output.LayerNorm", weights.norm(width))
        ffn = sizes.qformer["intermediate_size"]
        state |= prefixed(f"{layer}.intermediate_query.dense", weights.linear(ffn, width))
        state |= prefixed(f"{layer}.output_query.dense", weights.linear(width, ffn))
        state |= prefixed(f"{layer}.output_query.LayerNorm", weights.norm(width))
    state |= prefixed("speech_llama_proj", weights.linear(llm_width, width, std=0.5))
    head_width = llm_width // sizes.llm["num_attention_heads"]
    for n in range(sizes.llm["num_hidden_layers"]):
        layer = f"llama_model.base_model.model.model.layers.{n}.self_attn"
        for projection in ("q_proj", "v_proj"):
            state |= {f"{layer}.{projection}.lora_A.default.weight": weights.normal(LORA_RANK, llm_width, std=0.2),
                      f"{layer}.{projection}.lora_B.default.weight": weights.normal(llm_width, LORA_RANK, std=0.2)}
        state[f"{layer}.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head_width, 2).float() / head_width)
    bias = "beats.encoder.layers.0.self_attn.relative_attention_bias.weight"
    for n in range(1, sizes.beats["encoder_layers"]):  # frozen, but not in named_parameters: save_checkpoint keeps it
        state[bias.replace(".0.", f".{n}.")] = beats_bias
    return state


def build_tiny_salmonn(folder: Path) -> Path:
    """Write every part and the decode yaml; returns the yaml's path. Deterministic, a few seconds."""
    return build_salmonn(folder, TINY)


def build_salmonn(folder: Path, sizes: Sizes, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Write the parts of the given sizes and the decode yaml; returns the yaml's path."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = Weights(spread=sizes is TINY)
    build_vicuna(folder / "vicuna", weights, sizes, device, dtype)
    build_whisper(folder / "whisper", weights, sizes, device, dtype)
    beats = beats_state(weights, sizes.beats)
    torch.save({"cfg": sizes.beats, "model": beats}, folder / "beats.pt")
    state = salmonn_state(weights, sizes, beats["encoder.layers.0.self_attn.relative_attention_bias.weight"])
    torch.save({"model": state, "optimizer": {}, "config": {"model": DECODE_CONFIG["model"]}, "scaler": None,
                "epoch": 0}, folder / "salmonn.pth")
    path = folder / "decode_config.yaml"
    path.write_text(yaml.safe_dump(DECODE_CONFIG, sort_keys=False))
    return path


if __name__ == "__main__":
    print(build_tiny_salmonn(Path(sys.argv[1])))
