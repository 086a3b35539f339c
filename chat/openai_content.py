"""Content parts of OpenAI-compatible chat messages: text, and audio as base64 wav."""

import base64
import io
import wave

import numpy as np

from chat.audio import SAMPLE_RATE


def text_content(text: str) -> dict:
    """A text part."""
    return {"type": "text", "text": text}


def audio_content(samples: np.ndarray) -> dict:
    """An input_audio part holding the samples as wav."""
    return {"type": "input_audio", "input_audio": {"data": wav_base64(samples), "format": "wav"}}


def wav_base64(samples: np.ndarray) -> str:
    """Mono float samples at SAMPLE_RATE as a base64 16-bit PCM wav (half the size of float; every reader takes it)."""
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(SAMPLE_RATE)
        file.writeframes(pcm.tobytes())
    return base64.b64encode(buffer.getvalue()).decode("ascii")
