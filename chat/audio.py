"""Decoding any audio a person brings into 16 kHz mono float32, once, with checks."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from chat.errors import ClipError

SAMPLE_RATE = 16000  # what the Whisper-style feature extractors of every supported model expect
MAX_CLIP_S = 600  # ten minutes: 20 windows, already more audio than the context comfortably holds
MIN_CLIP_S = 0.1  # the encoder emits one token per 40 ms; shorter clips carry nothing
SILENCE_PEAK = 1e-4  # -80 dBFS: below this a recording is a muted or missing microphone
MIN_SOURCE_RATE = 1000
MAX_SOURCE_RATE = 384000

FFMPEG_INSTALL_HINT = "Install ffmpeg (Debian/Ubuntu: `apt-get install ffmpeg`) and try again."


def decode_file(path: str | Path) -> np.ndarray:
    """Decode a file of any format ffmpeg reads into 16 kHz mono float32 samples."""
    path = Path(path)
    if not path.is_file():
        raise ClipError(f"{path.name}: no such file. Check the path and try again.")
    if path.stat().st_size == 0:
        raise ClipError(f"{path.name} is empty (0 bytes). Record or upload the audio again.")
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise ClipError(f"Cannot decode {path.name}: ffmpeg is not installed. {FFMPEG_INSTALL_HINT}")
    # Decoding stops a second past the limit, so a 2-hour file costs no more than a 10-minute one.
    command = [
        ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "level+info", "-i", str(path), "-t", str(MAX_CLIP_S + 1),
        "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "-",
    ]
    result = subprocess.run(command, capture_output=True, check=False)
    log = result.stderr.decode(errors="replace").splitlines()
    # ffmpeg starts some errors with the file's full path, which says nothing to a person who uploaded it
    errors = [line.split("] ", 1)[-1].removeprefix(f"{path}: ") for line in log if line.startswith(("[error]", "[fatal]"))]
    samples = np.frombuffer(result.stdout, dtype=np.float32).copy()
    declared_s = _declared_duration_s(log)
    if result.returncode != 0 or errors or _is_truncated(path, len(samples) / SAMPLE_RATE, declared_s):
        reason = errors[0] if errors else f"only part of its {declared_s or 0:.1f} s could be decoded"
        raise ClipError(
            f"{path.name} could not be read as audio ({reason}). The file may be damaged, "
            "truncated or not audio at all: export it again as wav, mp3, flac, ogg or m4a."
        )
    return check_samples(samples, path.name)


def from_array(samples: np.ndarray, sample_rate: int, name: str = "recording") -> np.ndarray:
    """Convert a microphone array (any rate, any channels, int or float) to 16 kHz mono float32."""
    if not MIN_SOURCE_RATE <= sample_rate <= MAX_SOURCE_RATE:
        raise ClipError(
            f"{name}: a sample rate of {sample_rate} Hz is not plausible audio "
            f"(expected {MIN_SOURCE_RATE}..{MAX_SOURCE_RATE} Hz). Record again."
        )
    samples = np.asarray(samples)
    if samples.ndim not in (1, 2):
        raise ClipError(f"{name}: expected a 1-D or 2-D array of samples, got shape {samples.shape}.")
    samples = _int_to_float(samples) if samples.dtype.kind in "iu" else samples.astype(np.float32)
    if samples.ndim == 2:
        # sounddevice and gradio give (n_samples, n_channels); some libraries give it transposed
        channel_axis = 1 if samples.shape[0] >= samples.shape[1] else 0
        samples = samples.mean(axis=channel_axis, dtype=np.float32)
    if not np.all(np.isfinite(samples)):
        raise ClipError(f"{name} contains invalid samples (NaN or infinity). Record again.")
    if len(samples) and sample_rate != SAMPLE_RATE:
        samples = resample(samples, sample_rate)
    return check_samples(samples, name)


def check_samples(samples: np.ndarray, name: str) -> np.ndarray:
    """Refuse audio the model cannot use: empty, too short, too long, silent or not finite."""
    duration_s = len(samples) / SAMPLE_RATE
    if len(samples) == 0:
        raise ClipError(f"{name} holds no audio (zero length). Record or upload it again.")
    if duration_s < MIN_CLIP_S:
        raise ClipError(f"{name} is only {duration_s * 1000:.0f} ms long; clips need at least {MIN_CLIP_S:g} s.")
    if duration_s > MAX_CLIP_S:
        raise ClipError(
            f"{name} is longer than the {MAX_CLIP_S // 60}-minute limit per clip. "
            "Cut it into shorter pieces and add them one by one."
        )
    if not np.all(np.isfinite(samples)):
        raise ClipError(f"{name} contains invalid samples (NaN or infinity). Export it again.")
    if np.max(np.abs(samples)) < SILENCE_PEAK:
        raise ClipError(f"{name} is silent. Check that the microphone is on and not muted, then record again.")
    samples = samples.astype(np.float32, copy=False)
    return np.clip(samples, -1.0, 1.0, out=samples if samples.flags.writeable else None)


def resample(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Resample float32 audio to 16 kHz with ffmpeg's resampler (the same one files go through)."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise ClipError(f"Cannot resample {sample_rate} Hz audio: ffmpeg is not installed. {FFMPEG_INSTALL_HINT}")
    command = [
        ffmpeg, "-nostdin", "-v", "error", "-f", "f32le", "-ar", str(sample_rate), "-ac", "1", "-i", "-",
        "-f", "f32le", "-ar", str(SAMPLE_RATE), "-",
    ]
    result = subprocess.run(command, input=samples.astype(np.float32).tobytes(), capture_output=True, check=False)
    if result.returncode != 0:
        raise ClipError(f"Resampling failed: {result.stderr.decode(errors='replace').strip()}")
    return np.frombuffer(result.stdout, dtype=np.float32).copy()


def split_windows(samples: np.ndarray, window_samples: int) -> list[np.ndarray]:
    """Split into the fewest consecutive, equally long parts that each fit one encoder window."""
    return np.array_split(samples, n_windows(len(samples), window_samples))


def n_windows(n_samples: int, window_samples: int) -> int:
    """How many encoder windows of window_samples a clip of n_samples is sent as."""
    return max(1, -(-n_samples // window_samples))


def _declared_duration_s(ffmpeg_log: list[str]) -> float | None:
    """The duration the container claims, from ffmpeg's `Duration: HH:MM:SS.ss` line."""
    for line in ffmpeg_log:
        match = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", line)
        if match:
            hours, minutes, seconds = match.groups()
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return None


def _is_truncated(path: Path, decoded_s: float, declared_s: float | None) -> bool:
    """True when less audio came out than the file's header promised."""
    if declared_s is not None and decoded_s < min(declared_s, MAX_CLIP_S) - max(0.5, 0.1 * declared_s):
        return True
    with path.open("rb") as file:
        header = file.read(8)
    # a RIFF (wav) header states the file's size; streaming writers leave it 0 or 0xFFFFFFFF
    riff_size = int.from_bytes(header[4:8], "little") if header[:4] == b"RIFF" and len(header) == 8 else 0
    return 0 < riff_size < 0xFFFFFFFF and path.stat().st_size < riff_size + 8


def _int_to_float(samples: np.ndarray) -> np.ndarray:
    """Scale integer PCM of any width (8-bit unsigned included) to [-1, 1] float32."""
    info = np.iinfo(samples.dtype)
    offset = (info.max + 1) / 2 if info.min == 0 else 0.0
    scale = (info.max + 1) / 2 if info.min == 0 else -float(info.min)
    return ((samples.astype(np.float64) - offset) / scale).astype(np.float32)
