"""A clip: audio decoded once to 16 kHz mono float32, with a content-derived id."""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chat import audio

UPLOADED = "uploaded"
RECORDED = "recorded"
EDITED = "edited"
SOURCES = (UPLOADED, RECORDED, EDITED)
ID_HEX_CHARS = 16


@dataclass(frozen=True)
class Clip:
    """Immutable audio: samples never change, so the id is a stable name for the content."""

    samples: np.ndarray = field(repr=False, compare=False)  # (n_samples,) float32 at SAMPLE_RATE
    name: str
    source: str = UPLOADED
    note: str = ""  # how an edited clip was made, e.g. "Audio 2 with 3.04–3.23 s removed"
    id: str = field(init=False)
    missing: bool = field(default=False, init=False)  # its audio was lost from storage (see Clip.lost)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, not {self.source!r}")
        samples = np.ascontiguousarray(self.samples, dtype=np.float32)
        samples.flags.writeable = False
        object.__setattr__(self, "samples", samples)
        digest = hashlib.sha256(samples.data).hexdigest()[:ID_HEX_CHARS]
        object.__setattr__(self, "id", digest)

    @classmethod
    def lost(cls, clip_id: str, name: str, source: str = UPLOADED, note: str = "") -> "Clip":
        """A clip whose stored audio is gone: it keeps its place, number and id, and holds no samples.

        The conversation stays usable: the clip is shown as missing and the model no longer hears it.
        """
        clip = cls(np.zeros(0, dtype=np.float32), name, source, note)
        object.__setattr__(clip, "id", clip_id)
        object.__setattr__(clip, "missing", True)
        return clip

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None, source: str = UPLOADED) -> "Clip":
        """Decode a file (wav, mp3, flac, ogg/opus, m4a, webm, ...); raises ClipError if unusable."""
        path = Path(path)
        return cls(audio.decode_file(path), name=name or path.name, source=source)

    @classmethod
    def from_array(
        cls, samples: np.ndarray, sample_rate: int, name: str = "recording", source: str = RECORDED, note: str = ""
    ) -> "Clip":
        """Build from an array of any rate, channel count and sample type; raises ClipError if unusable."""
        return cls(audio.from_array(samples, sample_rate, name), name=name, source=source, note=note)

    @property
    def duration_s(self) -> float:
        """Length in seconds."""
        return len(self.samples) / audio.SAMPLE_RATE
