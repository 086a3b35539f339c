"""Tiny random-weight SALMONN parts in the ORIGINAL formats, and the decode yaml that names them.

    vicuna/           a LLaMA folder: config.json, safetensors, tokenizer.model (a sentencepiece BPE
                      with byte fallback, tests/data/salmonn/tokenizer.model, trained by train_tokenizer())
    whisper/          a Whisper folder as openai/whisper-large-v2's: config, weights, preprocessor_config.json
    beats.pt          {'cfg': dict, 'model': state_dict}: the names BEATs' own code gives, weight norm as
                      weight_g/weight_v, the relative position bias repeated under every layer, a classifier
    salmonn.pth       what SALMONN's save_checkpoint writes: {'model': trainable tensors and buffers, ...}
    decode_config.yaml  SALMONN's configs/decode_config.yaml with these parts' paths, relative to its folder

Run as a script to write them for the parity run of the original code:
    python -m tests.tiny_salmonn /tmp/tiny-salmonn

Weights come from one seeded generator in a fixed order, spread enough that greedy choices are far apart.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

DATA = Path(__file__).resolve().parent / "data" / "salmonn"
SEED = 0
LLM = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}
WHISPER = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
           "decoder_layers": 1, "decoder_attention_heads": 4, "decoder_ffn_dim": 128, "num_mel_bins": 80,
           "max_source_positions": 1500, "max_target_positions": 448, "vocab_size": 51865}
# BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt's cfg, made small (the real one: 512/768 wide, 12 layers)
BEATS_CFG = {
    "input_patch_size": 16, "embed_dim": 32, "conv_bias": False, "encoder_layers": 2, "encoder_embed_dim": 48,
    "encoder_ffn_embed_dim": 96, "encoder_attention_heads": 4, "activation_fn": "gelu",
    "layer_wise_gradient_decay_ratio": 0.6, "layer_norm_first": False, "deep_norm": True, "dropout": 0.0,
    "attention_dropout": 0.0, "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.0,
    "conv_pos": 16, "conv_pos_groups": 4, "relative_position_embedding": True, "num_buckets": 32,
    "max_distance": 128, "gru_rel_pos": True, "finetuned_model": True, "predictor_dropout": 0.0,
    "predictor_class": 5,
}
QFORMER = {"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 512}  # 2 heads of BERT's 64
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
TOKENIZER_TEXT = (  # what the tiny tokenizer learns its merges from
    "USER: ASSISTANT: <Speech><SpeechHere></Speech> What is said in the audio? Describe the sound. "
    "Please transcribe the speech. What instrument plays the tune? Is the speaker happy or sad? "
    "The audio is a person speaking about the weather; a dog barks; music with a piano and drums. "
)


class Weights:
    """Random tensors from one seeded generator; the order of calls fixes every value."""

    def __init__(self, seed: int = SEED) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * std

    def norm(self, n: int) -> dict[str, torch.Tensor]:
        return {"weight": 1.0 + self.normal(n, std=0.1), "bias": self.normal(n, std=0.1)}

    def linear(self, n_out: int, n_in: int, std: float = 0.15, bias: bool = True) -> dict[str, torch.Tensor]:
        return {"weight": self.normal(n_out, n_in, std=std)} | ({"bias": self.normal(n_out, std=0.1)} if bias else {})

    def fill(self, module: torch.nn.Module, std: float = 0.15) -> None:
        """Every parameter of a transformers model, in name order: norms about 1, the rest spread."""
        with torch.no_grad():
            for name, tensor in sorted(module.state_dict().items()):
                if not tensor.is_floating_point():
                    continue
                if "norm" in name.lower() and name.endswith("weight"):
                    tensor.copy_(1.0 + self.normal(*tensor.shape, std=0.1))
                elif "embed_positions" not in name:  # Whisper's sinusoids stay as they are
                    tensor.copy_(self.normal(*tensor.shape, std=std))


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor for name, tensor in tensors.items()}


def train_tokenizer(path: Path = DATA / "tokenizer.model") -> Path:
    """The tiny Vicuna-style tokenizer: BPE, byte fallback (newline is id 13), LLaMA's normalisation settings."""
    import sentencepiece

    path.parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([TOKENIZER_TEXT] * 50), model_prefix=str(path.with_suffix("")),
        vocab_size=TOKENIZER_VOCAB, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        hard_vocab_limit=False,
    )
    path.with_suffix(".vocab").unlink()
    return path


def build_vicuna(folder: Path, weights: Weights) -> int:
    """A LLaMA folder as Vicuna's; returns its vocabulary size."""
    import sentencepiece
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes((DATA / "tokenizer.model").read_bytes())
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **LLM)
    model = LlamaForCausalLM(config)
    weights.fill(model, std=0.3)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(weights.normal(vocab, LLM["hidden_size"], std=1.0))
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048, "legacy": True}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return vocab


def build_whisper(folder: Path, weights: Weights) -> None:
    """A Whisper folder as openai/whisper-large-v2's (80 mel bins), with a feature extractor config."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(WhisperConfig(**WHISPER))
    weights.fill(model)
    model.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)


def beats_state(weights: Weights) -> dict[str, torch.Tensor]:
    """BEATs' state_dict under the names its own code gives them."""
    cfg = BEATS_CFG
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


def salmonn_state(weights: Weights, llm_width: int, whisper_width: int,
                  beats_bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """What save_checkpoint keeps of the SALMONN module: trainable tensors, buffers, shared-module aliases."""
    width, beats_width = QFORMER["hidden_size"], BEATS_CFG["encoder_embed_dim"]
    encoder_width = whisper_width + beats_width
    state = {**prefixed("ln_speech", weights.norm(whisper_width)), **prefixed("ln_audio", weights.norm(beats_width)),
             "speech_query_tokens": weights.normal(1, 1, width, std=1.0),
             "speech_Qformer.bert.embeddings.position_ids": torch.arange(BERT_POSITIONS).expand((1, -1)),
             **prefixed("speech_Qformer.bert.embeddings.LayerNorm", weights.norm(width))}
    for n in range(QFORMER["num_hidden_layers"]):
        layer = f"speech_Qformer.bert.encoder.layer.{n}"
        for attention, key_width in (("attention", width), ("crossattention", encoder_width)):
            state |= prefixed(f"{layer}.{attention}.self.query", weights.linear(width, width))
            state |= prefixed(f"{layer}.{attention}.self.key", weights.linear(width, key_width))
            state |= prefixed(f"{layer}.{attention}.self.value", weights.linear(width, key_width))
            state |= prefixed(f"{layer}.{attention}.output.dense", weights.linear(width, width))
            state |= prefixed(f"{layer}.{attention}.output.LayerNorm", weights.norm(width))
        state |= prefixed(f"{layer}.intermediate_query.dense", weights.linear(QFORMER["intermediate_size"], width))
        state |= prefixed(f"{layer}.output_query.dense", weights.linear(width, QFORMER["intermediate_size"]))
        state |= prefixed(f"{layer}.output_query.LayerNorm", weights.norm(width))
    state |= prefixed("speech_llama_proj", weights.linear(llm_width, width, std=0.5))
    head_width = llm_width // LLM["num_attention_heads"]
    for n in range(LLM["num_hidden_layers"]):
        layer = f"llama_model.base_model.model.model.layers.{n}.self_attn"
        for projection in ("q_proj", "v_proj"):
            state |= {f"{layer}.{projection}.lora_A.default.weight": weights.normal(LORA_RANK, llm_width, std=0.2),
                      f"{layer}.{projection}.lora_B.default.weight": weights.normal(llm_width, LORA_RANK, std=0.2)}
        state[f"{layer}.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head_width, 2).float() / head_width)
    bias = "beats.encoder.layers.0.self_attn.relative_attention_bias.weight"
    for n in range(1, BEATS_CFG["encoder_layers"]):  # frozen, but not in named_parameters: save_checkpoint keeps it
        state[bias.replace(".0.", f".{n}.")] = beats_bias
    return state


def build_tiny_salmonn(folder: Path) -> Path:
    """Write every part and the decode yaml; returns the yaml's path. Deterministic, a few seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = Weights()
    build_vicuna(folder / "vicuna", weights)
    build_whisper(folder / "whisper", weights)
    beats = beats_state(weights)
    torch.save({"cfg": BEATS_CFG, "model": beats}, folder / "beats.pt")
    state = salmonn_state(weights, LLM["hidden_size"], WHISPER["d_model"],
                          beats["encoder.layers.0.self_attn.relative_attention_bias.weight"])
    torch.save({"model": state, "optimizer": {}, "config": {"model": DECODE_CONFIG["model"]}, "scaler": None,
                "epoch": 0}, folder / "salmonn.pth")
    path = folder / "decode_config.yaml"
    path.write_text(yaml.safe_dump(DECODE_CONFIG, sort_keys=False))
    return path


if __name__ == "__main__":
    print(build_tiny_salmonn(Path(sys.argv[1])))
