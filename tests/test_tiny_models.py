"""The tiny checkpoints load like real ones, and the transformers 5 APIs the product relies on behave as assumed."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoProcessor,
    BitsAndBytesConfig,
    Qwen2AudioForConditionalGeneration,
    TextIteratorStreamer,
    WhisperForConditionalGeneration,
    pipeline,
)

from testkit.tiny.qwen2_audio import build_tiny_qwen2_audio

SR = 16000
PRINTABLE = {chr(c) for c in range(0x20, 0x7F)}
# Rendered default template, one clip and a question (formats.md).
ONE_CLIP_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is said in this audio?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    """Quiet white noise, float32 at 16 kHz."""
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def audio_tokens(n_samples: int) -> int:
    """Audio tokens for a clip of n samples: mel frames (hop 160, cut at 3000), then two stride-2 steps."""
    frames = min(-(-n_samples // 160), 3000)
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def user_turn(n_clips: int, text: str) -> list[dict]:
    """A one-message conversation with n clips and a question."""
    return [{"role": "user", "content": [{"type": "audio", "path": f"{i}.wav"} for i in range(n_clips)]
             + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def qwen(tiny_qwen2_audio: Path):
    """(model, processor) loaded from the tiny folder exactly as from a real checkpoint."""
    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_audio)
    return model, AutoProcessor.from_pretrained(tiny_qwen2_audio)


@pytest.fixture(scope="module")
def two_clip_inputs(qwen):
    """Processor output for a 3-s and a 45-s clip (the second is cut to the 30-s window)."""
    _, processor = qwen
    text = processor.apply_chat_template(user_turn(2, "Compare them."), add_generation_prompt=True, tokenize=False)
    return processor(text=text, audio=[noise(3), noise(45, 1)], sampling_rate=SR, return_tensors="pt")


def test_build_is_deterministic_and_tiny(tiny_qwen2_audio: Path, tmp_path: Path):
    again = build_tiny_qwen2_audio(tmp_path)
    assert (again / "model.safetensors").read_bytes() == (tiny_qwen2_audio / "model.safetensors").read_bytes()
    assert {"config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"} <= {
        p.name for p in again.iterdir()}
    assert sum(p.stat().st_size for p in again.iterdir()) < 2_000_000


def test_processor_renders_the_default_template(qwen):
    _, processor = qwen
    text = processor.apply_chat_template(user_turn(1, "What is said in this audio?"), add_generation_prompt=True,
                                         tokenize=False)
    assert text == ONE_CLIP_PROMPT


def test_processor_expands_each_placeholder_to_the_clip_length(qwen, two_clip_inputs):
    _, processor = qwen
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert audio_id == processor.audio_token_id
    assert (two_clip_inputs["input_ids"] == audio_id).sum() == audio_tokens(3 * SR) + audio_tokens(45 * SR) == 75 + 750
    assert two_clip_inputs["input_features"].shape == (2, 128, 3000)
    assert two_clip_inputs["feature_attention_mask"].sum(-1).tolist() == [300, 3000]


@pytest.mark.parametrize("n_samples", [320, 321, 481, 16000, 47_999, 48_001, 480_000, 480_001])
def test_audio_token_formula(qwen, n_samples: int):
    _, processor = qwen
    out = processor(text="<|AUDIO|>", audio=[np.zeros(n_samples, np.float32)], sampling_rate=SR)
    assert out["input_ids"][0].count(processor.audio_token_id) == audio_tokens(n_samples)


def test_the_old_audios_keyword_is_not_audio(qwen):
    _, processor = qwen
    with pytest.raises(ValueError, match="no audio inputs were passed"):
        processor(text=ONE_CLIP_PROMPT, audios=[noise(1)], sampling_rate=SR)
    assert "input_features" not in processor(text="no placeholder", audios=[noise(1)], sampling_rate=SR)


def test_features_cached_per_clip_give_the_same_inputs(qwen, two_clip_inputs):
    """Features computed once per clip plus a hand-expanded prompt equal the processor's output."""
    _, processor = qwen
    clips = [noise(3), noise(45, 1)]
    per_clip = [processor.feature_extractor(c, sampling_rate=SR, padding="max_length", return_attention_mask=True,
                                            return_tensors="pt") for c in clips]
    text = processor.apply_chat_template(user_turn(2, "Compare them."), add_generation_prompt=True, tokenize=False)
    parts = text.split("<|AUDIO|>")
    text = parts[0] + "".join("<|AUDIO|>" * audio_tokens(len(c)) + rest for c, rest in zip(clips, parts[1:]))
    manual = dict(processor.tokenizer(text, return_tensors="pt"),
                  input_features=torch.cat([f["input_features"] for f in per_clip]),
                  feature_attention_mask=torch.cat([f["attention_mask"] for f in per_clip]))
    assert manual.keys() == two_clip_inputs.keys()
    for key, value in two_clip_inputs.items():
        assert torch.equal(manual[key], value), key


def test_sampled_generation_is_printable_and_seeded(qwen, two_clip_inputs):
    model, processor = qwen
    replies = []
    for _ in range(2):
        torch.manual_seed(0)
        out = model.generate(**two_clip_inputs, max_new_tokens=12, do_sample=True)
        replies.append(processor.decode(out[0, two_clip_inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    assert replies[0] == replies[1]
    assert replies[0] and set(replies[0]) <= PRINTABLE


def test_streamer_yields_several_chunks(qwen, two_clip_inputs):
    model, processor = qwen
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(0)
    worker = threading.Thread(target=model.generate, kwargs=dict(
        **two_clip_inputs, max_new_tokens=24, do_sample=True, streamer=streamer))
    worker.start()
    chunks = [c for c in streamer if c]  # the streamer also yields empty strings
    worker.join()
    assert len(chunks) >= 3 and set("".join(chunks)) <= PRINTABLE


def test_4bit_nf4_loads_and_generates_on_cpu(tiny_qwen2_audio: Path, qwen, two_clip_inputs):
    from bitsandbytes.nn import Linear4bit

    def load(skip: list[str]) -> Qwen2AudioForConditionalGeneration:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
        return Qwen2AudioForConditionalGeneration.from_pretrained(
            tiny_qwen2_audio, quantization_config=config, dtype=torch.bfloat16)

    model = load(["model.audio_tower", "model.multi_modal_projector", "lm_head"])
    assert isinstance(model.model.language_model.layers[0].mlp.up_proj, Linear4bit)
    assert type(model.model.audio_tower.layers[0].fc1) is torch.nn.Linear
    assert type(model.model.multi_modal_projector.linear) is torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear
    torch.manual_seed(0)
    out = model.generate(**two_clip_inputs, max_new_tokens=5, do_sample=True)
    assert set(qwen[1].decode(out[0, two_clip_inputs["input_ids"].shape[1]:], skip_special_tokens=True)) <= PRINTABLE
    # Bare names match neither from the start nor as a suffix: the audio tower gets quantized.
    bare = load(["audio_tower", "multi_modal_projector", "lm_head"])
    assert isinstance(bare.model.audio_tower.layers[0].fc1, Linear4bit)


def test_whisper_word_timestamps_through_the_pipeline(tiny_whisper: Path):
    asr = pipeline("automatic-speech-recognition", model=str(tiny_whisper))
    result = asr(noise(4), return_timestamps="word", generate_kwargs={"max_new_tokens": 12, "language": "en"})
    assert result["text"] and result["chunks"]
    for chunk in result["chunks"]:
        start, end = chunk["timestamp"]
        assert chunk["text"] and 0.0 <= start <= end <= 30.0


def test_whisper_token_timestamps_through_generate(tiny_whisper: Path):
    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper)
    processor = AutoProcessor.from_pretrained(tiny_whisper)
    inputs = processor(noise(4), sampling_rate=SR, return_attention_mask=True, return_tensors="pt")
    out = model.generate(**inputs, return_token_timestamps=True, max_new_tokens=8, language="en", task="transcribe")
    assert out["token_timestamps"].shape == out["sequences"].shape
    assert processor.batch_decode(out["sequences"], skip_special_tokens=True)[0]
