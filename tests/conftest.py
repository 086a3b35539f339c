"""Shared fixtures: real audio files in every format, and tiny real-architecture checkpoints."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from chat.audio import SAMPLE_RATE  # noqa: E402
from chat.backend import Response  # noqa: E402
from chat.clip import Clip  # noqa: E402
from chat.local import LocalBackend  # noqa: E402
from chat.speech import SpeechChunk  # noqa: E402
from testkit.tiny.kokoro import build_english_tagger, build_kokoro  # noqa: E402
from testkit.tiny.qwen2_audio import build_tiny_qwen2_audio  # noqa: E402
from testkit.tiny.qwen_audio_chat import build_tiny_qwen_audio_chat  # noqa: E402
from testkit.tiny.salmonn import build_tiny_salmonn  # noqa: E402
from testkit.tiny.whisper import build_tiny_whisper  # noqa: E402

FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "webm")


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """torch with one intra-op thread while a module's tiny model is in use: on a loaded 2-core machine, torch's
    thread team in the main thread made a 12-token generate 10-20 times slower (the backend's own worker thread
    was unaffected)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n_threads)


def tone(seconds: float, frequency_hz: float = 440.0, sample_rate: int = SAMPLE_RATE, amplitude: float = 0.5) -> np.ndarray:
    """A float32 sine wave."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency_hz * t)).astype(np.float32)


def spoken(response: Response) -> tuple[str, np.ndarray]:
    """A spoken Response's text and its audio, the chunks joined in the order they came."""
    chunks = list(response)
    audio = [chunk.samples for chunk in chunks if isinstance(chunk, SpeechChunk)]
    return "".join(chunk for chunk in chunks if isinstance(chunk, str)), np.concatenate(audio)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    """Quiet white noise, float32 at 16 kHz."""
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def tone_clip(seconds: float, frequency_hz: float, name: str) -> Clip:
    """A tone clip; distinct frequencies give distinct clip ids."""
    return Clip.from_array(tone(seconds, frequency_hz), SAMPLE_RATE, name=name)


def numbered_clip(k: int, seconds: float = 0.5) -> Clip:
    """Clip k of a conversation, named c{k}.wav, its own pitch giving it its own id."""
    return tone_clip(seconds, 100 + 7 * k, f"c{k}.wav")


def write_audio(path: Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> Path:
    """Encode float samples to whatever format path's suffix names, with ffmpeg."""
    data = np.repeat(samples[:, None], channels, axis=1) if channels > 1 else samples
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", str(sample_rate), "-ac", str(channels),
         "-i", "-", str(path)],
        input=np.ascontiguousarray(data, dtype=np.float32).tobytes(), check=True,
    )
    return path


@pytest.fixture(scope="session")
def audio_files(tmp_path_factory) -> dict[str, Path]:
    """A 2-s 440 Hz tone at 44.1 kHz stereo in every supported format."""
    folder = tmp_path_factory.mktemp("audio")
    samples = tone(2.0, sample_rate=44100)
    return {fmt: write_audio(folder / f"tone.{fmt}", samples, 44100, channels=2) for fmt in FORMATS}


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> Path:
    """Real synthetic speech from espeak-ng (22.05 kHz mono 16-bit)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: run ./test.sh, which installs it.")
    path = tmp_path_factory.mktemp("speech") / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "What is said in this recording?"], check=True)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_audio(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen2-Audio checkpoint folder with the real 30-s audio window."""
    return build_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny-qwen2-audio"))


@pytest.fixture(scope="session")
def tiny_qwen_audio_chat(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen-Audio-Chat checkpoint in the original on-disk format (real qwen.tiktoken)."""
    return build_tiny_qwen_audio_chat(tmp_path_factory.mktemp("tiny-qwen-audio-chat"))


@pytest.fixture(scope="session")
def tiny_salmonn(tmp_path_factory) -> Path:
    """Tiny random-weight SALMONN parts in their original formats; the path of the decode yaml naming them."""
    return build_tiny_salmonn(tmp_path_factory.mktemp("tiny-salmonn"))


@pytest.fixture(scope="session")
def tiny_kokoro(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Kokoro checkpoint folder and the tiny spaCy tagger its English G2P reads (KokoroSpeech(kokoro,
    tagger=tagger))."""
    folder = tmp_path_factory.mktemp("tiny-kokoro")
    return build_kokoro(folder / "kokoro"), build_english_tagger(folder / "tagger")


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """A tiny random-weight Whisper checkpoint folder."""
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="module")
def backend(tiny_qwen2_audio) -> Iterator[LocalBackend]:
    """The tiny Qwen2-Audio in 4-bit on the CPU, loaded once per module; a module testing another model overrides
    it with its own."""
    with one_intra_op_thread():
        yield LocalBackend(str(tiny_qwen2_audio), quantization="4bit")
