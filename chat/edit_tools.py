"""The speech-editing tools: typed functions on clips, each a thin, labelled wrapper of an edit in chat.edits.

A tool's signature is its contract with the model (chat.tools derives the JSON schema from it):
clips arrive as Audio (the model writes their number), times in seconds, gains in dB.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import numpy as np

from chat import edits
from chat.clip import Clip
from chat.timestamps import WordTimestamper

MAX_WORDS_LISTED = 200  # find_words answers at most this many words per call, so the reply fits the context


@dataclass(frozen=True)
class Audio:
    """A clip as a tool receives it: declared in a signature, it is passed as its number N of `Audio N`."""

    number: int
    clip: Clip

    def __str__(self) -> str:
        return f"Audio {self.number}"


@dataclass(frozen=True)
class Edit:
    """What an edit tool returns: the new samples and how they were made."""

    samples: np.ndarray  # (n_samples,) float32 at SAMPLE_RATE
    how: str  # e.g. "Audio 2 with 3.04–3.23 s removed"


@dataclass(frozen=True)
class Limits:
    """JSON-schema limits added to an argument type as Annotated metadata."""

    minimum: float | None = None
    maximum: float | None = None
    min_items: int | None = None
    description: str | None = None

    def schema(self) -> dict:
        """The limits as JSON-schema fields (those that are set)."""
        fields = {"minimum": self.minimum, "maximum": self.maximum, "minItems": self.min_items}
        fields["description"] = self.description
        return {key: value for key, value in fields.items() if value is not None}


Time = Annotated[float, Limits(0, edits.MAX_RESULT_S)]
Gain = Annotated[float, Limits(edits.MIN_GAIN_DB, edits.MAX_GAIN_DB)]
Spans = Annotated[list[tuple[Time, Time]], Limits(description="[start_s, end_s] pairs")]
Speed = Annotated[float, Limits(edits.MIN_SPEED, edits.MAX_SPEED)]
Loudness = Annotated[float, Limits(edits.MIN_TARGET_DBFS, edits.MAX_TARGET_DBFS)]
Threshold = Annotated[float, Limits(edits.MIN_THRESHOLD_DB, edits.MAX_THRESHOLD_DB)]


def keep_range(audio: Audio, start_s: Time, end_s: Time) -> Edit:
    """Keep only the part of a clip between start_s and end_s."""
    return Edit(edits.keep_range(audio.clip.samples, start_s, end_s), f"{audio} cut to {_span(start_s, end_s)}")


def delete_ranges(audio: Audio, ranges: Spans) -> Edit:
    """Remove one or more time ranges from a clip; the rest closes up."""
    return Edit(edits.delete_ranges(audio.clip.samples, ranges), f"{audio} with {_spans(ranges)} removed")


def mute_ranges(audio: Audio, ranges: Spans) -> Edit:
    """Silence one or more time ranges of a clip, keeping its length."""
    return Edit(edits.mute_ranges(audio.clip.samples, ranges), f"{audio} with {_spans(ranges)} muted")


def insert_silence(audio: Audio, at_s: Time, duration_s: Time) -> Edit:
    """Insert duration_s seconds of silence at at_s."""
    samples = edits.insert_silence(audio.clip.samples, at_s, duration_s)
    return Edit(samples, f"{audio} with {duration_s:g} s of silence inserted at {at_s:g} s")


def change_volume(audio: Audio, gain_db: Gain, start_s: Time | None = None, end_s: Time | None = None) -> Edit:
    """Make a clip, or only start_s to end_s of it, louder (gain_db > 0) or quieter (< 0)."""
    samples = edits.change_volume(audio.clip.samples, gain_db, start_s, end_s)
    if start_s is None and end_s is None:
        return Edit(samples, f"{audio} at {gain_db:+g} dB")
    return Edit(samples, f"{audio} at {gain_db:+g} dB from {start_s or 0:g} to {end_s or audio.clip.duration_s:g} s")


def fade(audio: Audio, fade_in_s: Time = 0.0, fade_out_s: Time = 0.0) -> Edit:
    """Fade a clip in from silence over fade_in_s and/or out to silence over fade_out_s."""
    fades = [f"a {s:g} s fade-{kind}" for s, kind in ((fade_in_s, "in"), (fade_out_s, "out")) if s]
    return Edit(edits.fade(audio.clip.samples, fade_in_s, fade_out_s), f"{audio} with {' and '.join(fades)}")


def change_speed(audio: Audio, factor: Speed, keep_pitch: bool = True) -> Edit:
    """Play a clip factor times faster (below 1: slower), keeping its pitch or letting it shift."""
    samples = edits.change_speed(audio.clip.samples, factor, keep_pitch)
    return Edit(samples, f"{audio} at {factor:g}x speed, pitch {'kept' if keep_pitch else 'shifted'}")


def concatenate(clips: Annotated[list[Audio], Limits(min_items=2)], gap_s: Time = 0.0) -> Edit:
    """Join two or more clips one after another, with gap_s seconds of silence between them."""
    samples = edits.concatenate([audio.clip.samples for audio in clips], gap_s)
    names = f"{', '.join(map(str, clips[:-1]))} and {clips[-1]}"
    return Edit(samples, f"{names} joined" + (f" with {gap_s:g} s gaps" if gap_s else ""))


def overlay(base: Audio, other: Audio, offset_s: Time = 0.0, other_gain_db: Gain = 0.0) -> Edit:
    """Mix the other clip into the base clip starting offset_s seconds in."""
    samples = edits.overlay(base.clip.samples, other.clip.samples, offset_s, other_gain_db)
    gain = f" at {other_gain_db:+g} dB" if other_gain_db else ""
    return Edit(samples, f"{base} mixed with {other}{gain} from {offset_s:g} s")


def reverse(audio: Audio) -> Edit:
    """Play a clip backwards."""
    return Edit(edits.reverse(audio.clip.samples), f"{audio} reversed")


def normalize_loudness(audio: Audio, target_dbfs: Loudness = -20.0) -> Edit:
    """Make a clip's loudness target_dbfs (RMS, dB below full scale) without clipping its peaks."""
    samples = edits.normalize_loudness(audio.clip.samples, target_dbfs)
    return Edit(samples, f"{audio} normalized to {target_dbfs:g} dBFS")


def trim_silence(audio: Audio, threshold_db: Threshold = -40.0) -> Edit:
    """Cut the quiet (below threshold_db) start and end off a clip."""
    samples = edits.trim_silence(audio.clip.samples, threshold_db)
    return Edit(samples, f"{audio} with silence below {threshold_db:g} dB trimmed from both ends")


EDITS = (keep_range, delete_ranges, mute_ranges, insert_silence, change_volume, fade, change_speed,
         concatenate, overlay, reverse, normalize_loudness, trim_silence)


def word_finder(timestamper: WordTimestamper) -> Callable[..., str]:
    """The find_words tool function, answering with the given timestamper."""

    def find_words(audio: Audio, start_s: Time = 0.0) -> str:
        """List the words said in a clip from start_s on, one JSON line each with start and end in seconds."""
        words = [w for w in timestamper.words(audio.clip) if w.end >= start_s]
        lines = [w.to_json() for w in words[:MAX_WORDS_LISTED]]
        if len(words) > MAX_WORDS_LISTED:
            more_s = words[MAX_WORDS_LISTED].start
            lines.append(f"(first {MAX_WORDS_LISTED} words; call find_words with start_s={more_s} for more)")
        return "\n".join(lines) if lines else f"No words found in {audio} after {start_s:g} s."

    return find_words


def _span(start_s: float, end_s: float) -> str:
    return f"{start_s:g}–{end_s:g} s"


def _spans(spans: list) -> str:
    names = [_span(start_s, end_s) for start_s, end_s in spans]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
