"""The text-to-speech voice (chat.tts): sentences cut as text streams, a tiny random Kokoro speaking them."""

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from chat.errors import BackendError, SettingsError
from chat.tts import HAN_COST, HARD_COST, SAMPLE_RATE, KokoroSpeech, sentence_language, sentences
from testkit.tiny.kokoro import REAL_CONFIG, WEIGHTS_FILE, build_english_tagger, build_kokoro
from tests.conftest import one_intra_op_thread

PIECE_CHARS = 3  # a reply streams a few characters at a time


class Recorder:
    """A text stream that remembers how many of its pieces have been asked for."""

    def __init__(self, text: str) -> None:
        self.pieces = [text[i:i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)]
        self.asked = 0

    def __iter__(self) -> Iterator[str]:
        for piece in self.pieces:
            self.asked += 1
            yield piece


def streamed(text: str) -> list[str]:
    return list(sentences(Recorder(text)))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Kokoro checkpoint folder and a tiny spaCy tagger folder."""
    folder = tmp_path_factory.mktemp("tts")
    return build_kokoro(folder / "kokoro"), build_english_tagger(folder / "tagger")


@pytest.fixture(scope="module")
def speech(folders) -> Iterator[KokoroSpeech]:
    with one_intra_op_thread():
        yield KokoroSpeech(str(folders[0]), tagger=str(folders[1]))


def test_english_sentences_are_cut_as_they_stream():
    text = "Hello there, Mr. Smith. It costs 3.14 dollars! Is it? Yes.\nA new line"
    assert streamed(text) == ["Hello there, Mr. Smith.", "It costs 3.14 dollars!", "Is it?", "Yes.", "A new line"]


def test_chinese_and_mixed_sentences():
    text = "你好，世界。今天天气很好！我们用Python写代码。Then English. 最后一句"
    assert streamed(text) == ["你好，世界。", "今天天气很好！", "我们用Python写代码。", "Then English.", "最后一句"]
    assert [sentence_language(s) for s in streamed(text)] == ["zh", "zh", "zh", "en", "zh"]


@pytest.mark.parametrize("run", ["word " * 100, "没有标点的句子" * 30])
def test_a_long_unpunctuated_run_is_cut_before_it_ends(run):
    stream = Recorder(run)
    pieces = sentences(stream)
    first = next(pieces)
    assert stream.asked < len(stream.pieces)
    rest = list(pieces)
    assert len(rest) >= 1
    assert all(sum(HAN_COST if "\u4e00" <= c <= "\u9fff" else 1 for c in p) <= HARD_COST for p in [first, *rest])
    assert "".join([first, *rest]).replace(" ", "") == run.replace(" ", "")


def test_a_clause_mark_cuts_a_long_sentence():
    text = "the first clause of a long sentence runs on for a while, " + "and then more words follow it " * 5
    assert streamed(text)[0] == "the first clause of a long sentence runs on for a while"


def test_markdown_is_read_as_prose():
    text = ("# Title\n1. **Bold** and _slanted_ words\n- a [link](https://example.com) and `code`\n"
            "See https://example.com/a?b=1 now.\n```python\nprint('not read'). Never.\n```\n"
            "| name | age |\n|---|---|\n<br>snake_case stays.")
    assert streamed(text) == ["Title", "Bold and slanted words", "a link and code", "See now.", "name, age",
                              "snake_case stays."]


def test_the_tiny_checkpoint_has_the_real_layout(folders, speech):
    """KModel loads a part's weights without strictness after stripping "module.", so a wrong key would go unseen:
    every part must load strictly."""
    weights = torch.load(folders[0] / WEIGHTS_FILE, weights_only=True)
    assert set(weights) == {"bert", "bert_encoder", "predictor", "text_encoder", "decoder"}
    for part, state in weights.items():
        assert all(key.startswith("module.") for key in state)
        getattr(speech.model, part).load_state_dict({key[len("module."):]: v for key, v in state.items()})
    assert json.loads((folders[0] / "config.json").read_text(encoding="utf-8")).keys() == REAL_CONFIG.keys()
    assert torch.load(folders[0] / "voices" / "af_heart.pt", weights_only=True).shape == (510, 1, 256)
    assert speech.voices[0] == "af_heart"


def test_the_tiny_model_speaks_and_longer_text_lasts_longer(speech):
    cancel = threading.Event()
    short = list(speech.speak(iter(["Hi."]), "af_heart", cancel))
    long = list(speech.speak(iter(["Hello there, how are you doing today?"]), "af_heart", cancel))
    assert speech.sample_rate == SAMPLE_RATE
    for audio in short + long:
        assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) > 0
        assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert len(long[0]) > len(short[0])


def test_first_audio_comes_before_the_text_has_ended(speech):
    stream = Recorder("One. Two three four five six seven.")
    chunks = speech.speak(stream, "af_heart", threading.Event())
    next(chunks)
    assert stream.asked < len(stream.pieces)
    assert len(list(chunks)) == 1


def test_each_language_is_spoken_by_its_own_g2p_and_voice(speech, monkeypatch):
    spoken = []
    synthesize = speech._synthesize
    monkeypatch.setattr(speech, "_synthesize", lambda ps, voice, cancel: spoken.append((ps, voice)) or synthesize(
        ps, voice, cancel))
    list(speech.speak(iter("Good morning. 早上好，朋友。"), "am_michael", threading.Event()))
    (english, english_voice), (chinese, chinese_voice) = spoken
    assert english_voice == "am_michael" and chinese_voice == "zm_yunxi"
    assert not set("↓→↗↘") & set(english) and set("↓→↗↘") & set(chinese)  # pinyin tones: the Chinese G2P
    assert speech.voice_for("zf_xiaoxiao", "en") == "af_heart"
    assert speech.voice_for("bf_emma", "en") == "bf_emma"


def test_cancel_stops_between_and_within_sentences(speech):
    cancel = threading.Event()
    chunks = speech.speak(iter("One. Two. Three."), "af_heart", cancel)
    next(chunks)
    cancel.set()
    assert list(chunks) == []
    cancel = threading.Event()
    hook = speech.model.decoder.register_forward_pre_hook(lambda module, args: cancel.set())
    try:
        assert list(speech.speak(iter("Stopped while it is made."), "af_heart", cancel)) == []
    finally:
        hook.remove()


def test_an_unknown_voice_is_refused(speech):
    with pytest.raises(SettingsError, match="af_heart"):
        speech.speak(iter(["Hi."]), "xx_nobody", threading.Event())


def test_missing_weights_offline_say_what_to_download():
    with pytest.raises(BackendError, match="hf download nobody/no-such-kokoro"):
        KokoroSpeech("nobody/no-such-kokoro")
