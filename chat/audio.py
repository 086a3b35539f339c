"""Decoding any audio a person brings into 16 kHz mono float32, once, through one gate with limits.

Every way audio comes in (uploads, recordings, the API, imports, the terminal, edits) ends here, so
the limits hold everywhere and are checked before the expensive work: the format is recognised from
the file's first bytes (only real audio containers pass, never a playlist or a list of other files),
the declared length is checked before decoding, and decoding stops a second past the limit.
"""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile
import soxr

from chat.errors import ClipError

SAMPLE_RATE = 16000  # what the Whisper-style feature extractors of every supported model expect
MAX_CLIP_S = 600  # ten minutes: 20 windows, already more audio than the context comfortably holds
MIN_CLIP_S = 0.1  # the encoder emits one token per 40 ms; shorter clips carry nothing
MAX_FILE_BYTES = 1024**3  # 10 minutes of 32-bit 192 kHz stereo is 0.9 GB; anything larger is not one clip
SILENCE_PEAK = 1e-4  # -80 dBFS: below this a recording is a muted or missing microphone
MIN_SOURCE_RATE = 1000
MAX_SOURCE_RATE = 384000
HEADER_BYTES = 12
BLOCK_S = 10  # decoded at a time: 10 s of 48 kHz stereo float is 3.8 MB
MP3_HEADER_SCAN_BYTES = 1 << 16  # enough for an ID3 tag with a small cover image, then the first frame
MP3_SIZE_TOLERANCE = 0.99  # mpg123's own margin before it distrusts the stated size
# Containers libsndfile reads in-process (milliseconds, no subprocess); ffmpeg's demuxer for each format
IN_PROCESS = {"wav", "flac", "ogg", "mp3", "aiff"}
DEMUXERS = {"wav": "wav", "flac": "flac", "ogg": "ogg", "mp3": "mp3", "aiff": "aiff", "aac": "aac", "mp4": "mov",
            "webm": "matroska"}
FORMATS_HINT = "wav, mp3, flac, ogg/opus, m4a, aac, aiff or webm"

FFMPEG_INSTALL_HINT = "Install ffmpeg (Debian/Ubuntu: `apt-get install ffmpeg`) and try again."


def sniff(header: bytes) -> str | None:
    """The audio container a file's first bytes announce, or None for anything else."""
    if header[:4] in (b"RIFF", b"RF64") and header[8:12] == b"WAVE":
        return "wav"
    if header[:4] == b"FORM" and header[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if header[:4] == b"fLaC":
        return "flac"
    if header[:4] == b"OggS":
        return "ogg"
    if header[:3] == b"ID3":
        return "mp3"
    if header[4:8] == b"ftyp":
        return "mp4"  # m4a, mp4, 3gp
    if header[:4] == b"\x1aE\xdf\xa3":
        return "webm"  # and Matroska
    if len(header) > 1 and header[0] == 0xFF and header[1] & 0xE0 == 0xE0:  # an MPEG audio frame sync
        return "aac" if header[1] & 0x06 == 0 else "mp3"  # layer bits 00 are ADTS AAC
    return None


def decode_file(path: str | Path) -> np.ndarray:
    """Decode an audio file into 16 kHz mono float32 samples; raises ClipError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ClipError(f"{path.name}: no such file. Check the path and try again.")
    size = path.stat().st_size
    if size == 0:
        raise ClipError(f"{path.name} is empty (0 bytes). Record or upload the audio again.")
    if size > MAX_FILE_BYTES:
        raise ClipError(f"{path.name} is {size / 1024**3:.1f} GB, more than one clip of up to "
                        f"{MAX_CLIP_S // 60} minutes can be. Cut it into shorter pieces.")
    with path.open("rb") as file:
        container = sniff(file.read(HEADER_BYTES))
    if container is None:
        raise ClipError(f"{path.name} is not an audio file this app reads. Export it as {FORMATS_HINT}.")
    if container in IN_PROCESS:
        try:
            return check_samples(_read_in_process(path, container), path.name)
        except soundfile.LibsndfileError:
            pass  # a codec libsndfile lacks (e.g. ADPCM wav): ffmpeg reads more
    return check_samples(_read_with_ffmpeg(path, DEMUXERS[container]), path.name)


def _read_in_process(path: Path, container: str) -> np.ndarray:
    """libsndfile's decoding, checked against the header's length first, then read block by block (mixed down and
    resampled as it goes, so memory stays near the 16 kHz result); at most the limit plus a second is read."""
    with soundfile.SoundFile(path) as file:
        rate, n_declared = file.samplerate, file.frames
        if n_declared / rate > MAX_CLIP_S + 1:
            raise ClipError(_too_long(path.name))
        resampler = None if rate == SAMPLE_RATE else soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32",
                                                                         quality="HQ")
        pieces, n_read = [], 0
        for block in file.blocks(BLOCK_S * rate, frames=min(n_declared, (MAX_CLIP_S + 1) * rate), dtype="float32",
                                 always_2d=True):
            n_read += len(block)
            if not np.isfinite(block).all():  # what libsndfile makes of a frame cut off mid-way
                raise ClipError(_unreadable(path.name, "part of it decodes to invalid samples"))
            mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0].copy()
            pieces.append(resampler.resample_chunk(mono) if resampler else mono)
        if resampler:
            pieces.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    # libsndfile returns what it could decode: less than the header states is a truncated file
    if n_read < n_declared - max(0.5 * rate, 0.1 * n_declared) or _shorter_than_stated(path, container):
        raise ClipError(_unreadable(path.name, f"only part of its {n_declared / rate:.1f} s could be decoded"))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)


def _read_with_ffmpeg(path: Path, demuxer: str) -> np.ndarray:
    """ffmpeg's decoding with the demuxer of the sniffed format and local files only, so it opens nothing else."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise ClipError(f"Cannot decode {path.name}: ffmpeg is not installed. {FFMPEG_INSTALL_HINT}")
    # Decoding stops a second past the limit, so a 2-hour file costs no more than a 10-minute one.
    command = [
        ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "level+info", "-protocol_whitelist", "file",
        "-f", demuxer, "-i", f"file:{path}", "-t", str(MAX_CLIP_S + 1), "-f", "f32le", "-ac", "1",
        "-ar", str(SAMPLE_RATE), "-",
    ]
    result = subprocess.run(command, capture_output=True, check=False)
    log = result.stderr.decode(errors="replace").splitlines()
    # ffmpeg starts some errors with the file's full path, which says nothing to a person who uploaded it
    errors = [line.split("] ", 1)[-1].replace(f"file:{path}: ", "").replace(f"{path}: ", "")
              for line in log if line.startswith(("[error]", "[fatal]"))]
    samples = np.frombuffer(result.stdout, dtype=np.float32).copy()
    declared_s = _declared_duration_s(log)
    truncated = declared_s is not None and len(samples) / SAMPLE_RATE < (
        min(declared_s, MAX_CLIP_S) - max(0.5, 0.1 * declared_s))
    if result.returncode != 0 or errors or truncated:
        raise ClipError(_unreadable(path.name, errors[0] if errors else
                                    f"only part of its {declared_s or 0:.1f} s could be decoded"))
    return samples


def _unreadable(name: str, reason: str) -> str:
    return (f"{name} could not be read as audio ({reason}). The file may be damaged, truncated or not audio "
            f"at all: export it again as {FORMATS_HINT}.")


def _too_long(name: str) -> str:
    return (f"{name} is longer than the {MAX_CLIP_S // 60}-minute limit per clip. "
            "Cut it into shorter pieces and add them one by one.")


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
        raise ClipError(_too_long(name))
    if not np.all(np.isfinite(samples)):
        raise ClipError(f"{name} contains invalid samples (NaN or infinity). Export it again.")
    if np.max(np.abs(samples)) < SILENCE_PEAK:
        raise ClipError(f"{name} is silent. Check that the microphone is on and not muted, then record again.")
    samples = samples.astype(np.float32, copy=False)
    return np.clip(samples, -1.0, 1.0, out=samples if samples.flags.writeable else None)


def resample(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Resample float32 audio to 16 kHz with libsoxr (high quality, in-process)."""
    return soxr.resample(samples, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32, copy=False)


def split_windows(samples: np.ndarray, window_samples: int) -> list[np.ndarray]:
    """Split into the fewest consecutive, equally long parts that each fit one encoder window."""
    if len(samples) <= window_samples:
        return [samples]  # the usual clip: no split, so no array_split per clip of the history on every turn
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


def _shorter_than_stated(path: Path, container: str) -> bool:
    """True when the file is shorter than the size its header states: a RIFF (wav) header's size (streaming
    writers leave 0 or ~0), or the stream size in an mp3's Xing/Info frame (libsndfile estimates an mp3's
    length from the file's size when they disagree, so its frame count cannot tell)."""
    with path.open("rb") as file:
        head = file.read(MP3_HEADER_SCAN_BYTES)
    size = path.stat().st_size
    if container == "wav":
        riff_size = int.from_bytes(head[4:8], "little") if head[:4] == b"RIFF" else 0
        return 0 < riff_size < 0xFFFFFFFF and size < riff_size + 8
    if container == "mp3":
        start = 10 + int.from_bytes(bytes(b & 0x7F for b in head[6:10]), "big") if head[:3] == b"ID3" else 0
        for tag in (b"Xing", b"Info"):
            at = head.find(tag, start, start + 200)  # inside the first frame, after its side information
            if at >= 0:
                flags = int.from_bytes(head[at + 4: at + 8], "big")
                if flags & 2:  # a byte count, after the frame count when there is one
                    offset = at + 8 + (4 if flags & 1 else 0)
                    stated = int.from_bytes(head[offset: offset + 4], "big")
                    return size - start < MP3_SIZE_TOLERANCE * stated
    return False


def _int_to_float(samples: np.ndarray) -> np.ndarray:
    """Scale integer PCM of any width (8-bit unsigned included) to [-1, 1] float32."""
    info = np.iinfo(samples.dtype)
    offset = (info.max + 1) / 2 if info.min == 0 else 0.0
    scale = (info.max + 1) / 2 if info.min == 0 else -float(info.min)
    return ((samples.astype(np.float64) - offset) / scale).astype(np.float32)
