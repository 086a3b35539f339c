"""Word timestamps from a real (tiny, random) Whisper checkpoint, and the find_words tool that returns them."""

import json
from pathlib import Path

import pytest
from transformers import AutoProcessor, WhisperForConditionalGeneration, pipeline

from chat.audio import SAMPLE_RATE
from chat.clip import Clip
from chat.conversation import Conversation
from chat.timestamps import Word, WordTimestamper, _ordered_words
from chat.tools import ToolBox, run_tool_call
from tests.conftest import noise

N_TOKENS = 16  # random weights never stop on their own: keep generation short


@pytest.fixture(scope="module")
def speech(speech_wav) -> Clip:
    return Clip.from_file(speech_wav)


@pytest.fixture(scope="module")
def timestamper(tiny_whisper) -> WordTimestamper:
    return WordTimestamper(str(tiny_whisper), max_new_tokens=N_TOKENS)


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
    inputs = processor(noise(4), sampling_rate=SAMPLE_RATE, return_attention_mask=True, return_tensors="pt")
    out = model.generate(**inputs, return_token_timestamps=True, max_new_tokens=8, language="en", task="transcribe")
    assert out["token_timestamps"].shape == out["sequences"].shape
    assert processor.batch_decode(out["sequences"], skip_special_tokens=True)[0]


def test_words_lie_inside_the_clip_in_order(timestamper, speech):
    words = timestamper.words(speech)
    assert words and all(isinstance(w, Word) and w.word == w.word.strip() and w.word for w in words)
    assert all(0 <= w.start <= w.end <= speech.duration_s for w in words)
    assert [w.start for w in words] == sorted(w.start for w in words)
    assert timestamper.words(speech) is words  # cached by clip id: the model runs once per clip


def test_find_words_answers_with_json_lines(timestamper, speech):
    conversation = Conversation()
    conversation.add_user("Which words?", [speech])
    toolbox = ToolBox(words=timestamper)
    result = run_tool_call(conversation, "find_words", {"audio": 1}, toolbox)
    assert result.error is None and result.clip is None
    lines = [json.loads(line) for line in result.text.splitlines()]
    assert lines == [{"word": w.word, "start": w.start, "end": w.end} for w in timestamper.words(speech)]
    later = run_tool_call(conversation, "find_words", {"audio": 1, "start_s": speech.duration_s}, toolbox)
    assert len(later.text.splitlines()) <= len(lines)


def test_a_missing_model_is_a_clear_tool_error(tmp_path, speech):
    conversation = Conversation()
    conversation.add_user("", [speech])
    toolbox = ToolBox(words=WordTimestamper(str(tmp_path / "no-such-whisper")))
    result = run_tool_call(conversation, "find_words", {"audio": 1}, toolbox)
    assert "Could not load the word-timestamp model" in result.error
    assert "a folder holding a Whisper checkpoint" in result.error
    assert len(conversation.messages) == 1


def test_alignment_times_are_clamped_into_the_clip_and_ordered():
    chunks = [
        {"text": " um", "timestamp": (0.5, 0.7)},
        {"text": " ", "timestamp": (0.7, 0.8)},  # no word
        {"text": " so", "timestamp": (0.4, 0.9)},  # starts before the previous word
        {"text": " yes", "timestamp": (1.9, 2.6)},  # ends past the clip
        {"text": " end", "timestamp": (2.4, None)},  # end unknown, start past the clip
    ]
    assert _ordered_words(chunks, duration_s=2.0) == [
        Word("um", 0.5, 0.7), Word("so", 0.5, 0.9), Word("yes", 1.9, 2.0), Word("end", 2.0, 2.0),
    ]


def test_a_word_is_one_json_line():
    assert Word("um", 3.04, 3.23).to_json() == '{"word": "um", "start": 3.04, "end": 3.23}'
