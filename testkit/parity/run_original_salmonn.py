"""Run the ORIGINAL SALMONN code on the tiny parts and save what each stage computes, as test data.

Not part of the project and never imported by it: it runs once, by hand, in a side virtual environment
with the original's own pins, and its output file is committed (testkit/data/salmonn/parity.json).

    .venv/bin/python -m testkit.tiny.salmonn /tmp/tiny-salmonn         # the parts, built by the project's venv
    ~/.pyenv/versions/3.9.18/bin/python -m venv /tmp/salmonn-orig/venv
    /tmp/salmonn-orig/venv/bin/pip install torch==2.0.1 torchaudio==2.0.2 "numpy<2" transformers==4.28.0 \\
        peft==0.3.0 sentencepiece==0.1.97 accelerate==0.20.3 soundfile pyyaml safetensors
    # the original code: GitHub bytedance/SALMONN, branch salmonn, e.g. a bare clone at $REPO
    /tmp/salmonn-orig/venv/bin/python testkit/parity/run_original_salmonn.py $REPO /tmp/tiny-salmonn \\
        testkit/data/salmonn/parity.json

Shims, all here and none in the original files, which change the original in nothing but what cannot run
here: BertConfig.from_pretrained("bert-base-uncased") cannot download, so it returns bert-base-uncased's own
config.json values (BERT_BASE_UNCASED: 12 heads, its layer norm eps, activation, vocabulary, ...) with only
the sizes the tiny checkpoint's tensors dictate (hidden_size, intermediate_size) changed; no value is set to
what the project assumes. The LLaMA loads in fp32 (torch 2.0.1 has no fp16 matmul on the CPU) and the parts
are moved nowhere (`.cuda()` is a no-op), as the original runs its model on the CPU with the same code path.
"""

import json
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import soundfile
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from salmonn_cases import CASES, N_NEW_TOKENS, SAMPLE_RATE, clip, sampled_frames  # noqa: E402

BERT_BASE_UNCASED = {  # bert-base-uncased's config.json, which the original downloads
    "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "position_embedding_type": "absolute",
    "type_vocab_size": 2, "use_cache": True, "vocab_size": 30522,
}


def tiny_sizes(ckpt: dict) -> dict:
    """The Q-Former's sizes that the tiny checkpoint's tensors dictate: all that differs from bert-base-uncased."""
    return {"hidden_size": ckpt["speech_query_tokens"].shape[-1],
            "intermediate_size": ckpt["speech_Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0]}


def original_code(repo: Path) -> Path:
    """The salmonn branch's files, extracted into a temporary folder."""
    folder = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "--git-dir", str(repo), "archive", "salmonn"], capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(folder)
    return folder


def rows(tensor: torch.Tensor) -> list:
    """The sampled frames of a (frames, width) stage output."""
    return tensor[sampled_frames(tensor.shape[0])].tolist()


def main(repo: Path, parts: Path, output: Path) -> None:
    sys.path.insert(0, str(original_code(repo)))
    import models.Qformer as qformer
    import models.salmonn as salmonn
    from transformers import WhisperFeatureExtractor
    from utils import prepare_one_sample

    config = yaml.safe_load((parts / "decode_config.yaml").read_text())
    model_config = dict(config["model"], prompt_path="")  # training prompts: not read for decoding
    for key in ("llama_path", "whisper_path", "beats_path", "ckpt"):
        model_config[key] = str(parts / model_config[key])
    ckpt = torch.load(model_config["ckpt"], map_location="cpu")["model"]

    def bert_config(cls, name):
        assert name == "bert-base-uncased", name
        return cls(**BERT_BASE_UNCASED | tiny_sizes(ckpt))

    qformer.BertConfig.from_pretrained = classmethod(bert_config)
    llama_from_pretrained = salmonn.LlamaForCausalLM.from_pretrained
    salmonn.LlamaForCausalLM.from_pretrained = lambda path, **kw: llama_from_pretrained(
        path, **{**kw, "torch_dtype": torch.float32})
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    torch.manual_seed(0)
    model = salmonn.SALMONN.from_config(model_config).eval()
    placed = model.load_state_dict(ckpt, strict=False)
    assert not placed.unexpected_keys, placed.unexpected_keys  # every tensor of the fixture's .pth has its place
    processor = WhisperFeatureExtractor.from_pretrained(model_config["whisper_path"])
    tokenizer = model.llama_tokenizer
    generated = []
    tokenizer_decode = tokenizer.batch_decode
    tokenizer.batch_decode = lambda ids, **kw: generated.append(ids[0].tolist()) or tokenizer_decode(ids, **kw)

    results = {}
    for name, (kind, seconds, seed, question) in CASES.items():
        wav = Path(tempfile.mkdtemp()) / f"{name}.wav"
        soundfile.write(str(wav), clip(kind, seconds, seed), SAMPLE_RATE, subtype="PCM_16")
        samples = prepare_one_sample(str(wav), processor, cuda_enabled=False)
        prompt = model_config["prompt_template"].format("<Speech><SpeechHere></Speech> " + question.strip())
        with torch.no_grad():
            whisper = model.speech_encoder(samples["spectrogram"], return_dict=True).last_hidden_state[0]
            fbank = model.beats.preprocess(samples["raw_wav"])[0]
            beats = model.beats.extract_features(samples["raw_wav"], padding_mask=samples["padding_mask"],
                                                 feature_only=True)[0][0]
            speech, speech_atts = model.encode_speech(samples["spectrogram"], raw_wav=samples["raw_wav"],
                                                      audio_padding_mask=samples["padding_mask"])
            wrapped, wrapped_atts = model.prompt_wrap(speech, speech_atts, [prompt], multi_prompt=True)
            bos = model.llama_model.model.model.embed_tokens(torch.tensor([[tokenizer.bos_token_id]]))
            logits = model.llama_model(inputs_embeds=torch.cat([bos, wrapped], dim=1)).logits[0, -1]
            model.generate(samples, {"max_new_tokens": N_NEW_TOKENS, "num_beams": 1, "do_sample": False},
                           prompts=[prompt])
        before, after = prompt.split("<SpeechHere>")
        results[name] = {
            "prompt": prompt,
            "prompt_ids": [tokenizer.bos_token_id, *tokenizer(before, add_special_tokens=False).input_ids, "speech",
                           *tokenizer(after, add_special_tokens=False).input_ids],
            "mel": rows(samples["spectrogram"][0].T),
            "whisper": rows(whisper),
            "fbank": rows(fbank),
            "beats": rows(beats),
            "speech_embeds": speech[0].tolist(),
            "logits": logits[: len(tokenizer) - 1].tolist(),  # the [PAD] row the original adds is left out
            "greedy_tokens": generated[-1],
        }
        print(name, "greedy:", generated[-1], "text:", tokenizer.decode(generated[-1]))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"versions": {"torch": torch.__version__, "transformers": __import__(
        "transformers").__version__, "peft": __import__("peft").__version__}, "cases": results}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
