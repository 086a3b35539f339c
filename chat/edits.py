"""Pure audio edits on 16 kHz mono float32 clips; each returns a new array and never mutates its inputs."""

import math
import subprocess

import numpy as np

from chat.audio import MAX_CLIP_S, SAMPLE_RATE

MAX_RESULT_S = float(MAX_CLIP_S)  # longest clip any edit may produce: the clip limit
MIN_GAIN_DB = -60.0
MAX_GAIN_DB = 30.0
MIN_SPEED = 0.25
MAX_SPEED = 4.0
ATEMPO_MIN = 0.5  # one ffmpeg atempo stage only accepts factors in this range; others are chained
ATEMPO_MAX = 2.0
JOIN_FADE_S = 0.005  # total de-click fade at each delete join: half fades out before it, half fades in after
MIN_TARGET_DBFS = -60.0
MAX_TARGET_DBFS = 0.0
MIN_THRESHOLD_DB = -100.0
MAX_THRESHOLD_DB = 0.0
TRIM_FRAME_S = 0.010
LOWPASS_N_TAPS = 101  # anti-alias filter length for speeding up without keeping pitch
LOWPASS_CUTOFF_RATIO = 0.9  # cutoff as a fraction of the post-speed-up Nyquist, leaving room for the roll-off
ATEMPO_FLUSH_S = 0.1  # silence appended before atempo, which otherwise drops the last few tens of ms
FFMPEG_TIMEOUT_S = 120.0


def seconds_to_samples(s: float) -> int:
    """Convert seconds to the nearest whole number of samples."""
    _check_finite("seconds", s)
    return int(round(s * SAMPLE_RATE))


def keep_range(samples: np.ndarray, start_s: float, end_s: float) -> np.ndarray:
    """Keep only the audio between start_s and end_s."""
    clip = _as_clip(samples)
    start, end = _range_to_samples(clip, start_s, end_s)
    return clip[start:end].copy()


def delete_ranges(samples: np.ndarray, ranges: list[tuple[float, float]]) -> np.ndarray:
    """Cut out the ranges (overlaps merged) with a JOIN_FADE_S fade at joins; length is original minus removed."""
    clip = _as_clip(samples)
    removed = _merge(_ranges_to_samples(clip, ranges))
    kept = _complement(removed, len(clip))
    if not kept:
        raise ValueError("these ranges would delete the whole clip; keep at least some audio")
    # Fades rather than an overlapping crossfade keep the length exact and never leak deleted audio.
    half_fade = seconds_to_samples(JOIN_FADE_S / 2)
    pieces = [clip[start:end].copy() for start, end in kept]
    for left, right in zip(pieces, pieces[1:]):
        n_out = min(half_fade, len(left))
        n_in = min(half_fade, len(right))
        left[len(left) - n_out:] *= _ramp_down(n_out)
        right[:n_in] *= _ramp_up(n_in)
    return np.concatenate(pieces)


def mute_ranges(samples: np.ndarray, ranges: list[tuple[float, float]]) -> np.ndarray:
    """Replace the ranges with exact silence, keeping the length."""
    clip = _as_clip(samples)
    result = clip.copy()
    for start, end in _ranges_to_samples(clip, ranges):
        result[start:end] = 0.0
    return result


def insert_silence(samples: np.ndarray, at_s: float, duration_s: float) -> np.ndarray:
    """Insert duration_s of silence at at_s."""
    clip = _as_clip(samples)
    at = _position_to_sample(clip, "at_s", at_s)
    _check_finite("duration_s", duration_s)
    n_silence = seconds_to_samples(duration_s)
    if n_silence <= 0:
        raise ValueError(f"duration_s must be at least one sample (1/{SAMPLE_RATE} s), got {duration_s:g} s")
    _check_result_length(len(clip) + n_silence)
    return np.concatenate([clip[:at], np.zeros(n_silence, np.float32), clip[at:]])


def change_volume(
    samples: np.ndarray, gain_db: float, start_s: float | None = None, end_s: float | None = None
) -> np.ndarray:
    """Apply gain_db to the whole clip or to [start_s, end_s), clipping to [-1, 1]."""
    clip = _as_clip(samples)
    _check_gain("gain_db", gain_db)
    start, end = _range_to_samples(
        clip, 0.0 if start_s is None else start_s, len(clip) / SAMPLE_RATE if end_s is None else end_s
    )
    result = clip.copy()
    result[start:end] = np.clip(result[start:end] * _db_to_ratio(gain_db), -1.0, 1.0)
    return result


def fade(samples: np.ndarray, fade_in_s: float = 0.0, fade_out_s: float = 0.0) -> np.ndarray:
    """Apply a linear fade-in from silence and/or a linear fade-out to silence."""
    clip = _as_clip(samples)
    duration_s = len(clip) / SAMPLE_RATE
    for name, value in (("fade_in_s", fade_in_s), ("fade_out_s", fade_out_s)):
        _check_finite(name, value)
        if not 0.0 <= value <= duration_s:
            raise ValueError(f"{name} must be between 0 s and the clip length ({duration_s:g} s), got {value:g} s")
    n_in, n_out = seconds_to_samples(fade_in_s), seconds_to_samples(fade_out_s)
    if n_in == 0 and n_out == 0:
        raise ValueError("give fade_in_s or fade_out_s greater than 0 s; nothing to fade")
    result = clip.copy()
    result[:n_in] *= _ramp_up(n_in)
    result[len(result) - n_out:] *= _ramp_down(n_out)
    return result


def change_speed(samples: np.ndarray, factor: float, keep_pitch: bool) -> np.ndarray:
    """Play factor times faster (length / factor); keep_pitch uses ffmpeg atempo, otherwise resample so pitch shifts."""
    clip = _as_clip(samples)
    _check_between("speed factor", factor, MIN_SPEED, MAX_SPEED)
    n_result = int(round(len(clip) / factor))
    if n_result == 0:
        raise ValueError("the clip is too short to change its speed by this factor; the result would be empty")
    _check_result_length(n_result)
    stretched = _atempo(clip, factor) if keep_pitch else _resample(clip, factor, n_result)
    return _fit_length(stretched, n_result)


def concatenate(clips: list[np.ndarray], gap_s: float = 0.0) -> np.ndarray:
    """Join clips in order with gap_s of silence between consecutive clips."""
    if len(clips) == 0:
        raise ValueError("give at least one clip to concatenate")
    checked = [_as_clip(clip, f"clip {i}") for i, clip in enumerate(clips)]
    _check_finite("gap_s", gap_s)
    if gap_s < 0:
        raise ValueError(f"gap_s must be >= 0 s, got {gap_s:g} s")
    gap = np.zeros(seconds_to_samples(gap_s), np.float32)
    _check_result_length(sum(len(c) for c in checked) + len(gap) * (len(checked) - 1))
    pieces = [checked[0]]
    for clip in checked[1:]:
        pieces += [gap, clip]
    return np.concatenate(pieces)


def overlay(base: np.ndarray, other: np.ndarray, offset_s: float, other_gain_db: float = 0.0) -> np.ndarray:
    """Mix other into base starting at offset_s (summed, clipped to [-1, 1]); the result covers both."""
    base_clip = _as_clip(base, "base")
    other_clip = _as_clip(other, "other")
    _check_finite("offset_s", offset_s)
    if offset_s < 0:
        raise ValueError(f"offset_s must be >= 0 s, got {offset_s:g} s")
    _check_gain("other_gain_db", other_gain_db)
    offset = seconds_to_samples(offset_s)
    n_result = max(len(base_clip), offset + len(other_clip))
    _check_result_length(n_result)
    result = np.zeros(n_result, np.float32)
    result[: len(base_clip)] = base_clip
    result[offset : offset + len(other_clip)] += other_clip * _db_to_ratio(other_gain_db)
    return np.clip(result, -1.0, 1.0)


def reverse(samples: np.ndarray) -> np.ndarray:
    """Play the clip backwards."""
    return _as_clip(samples)[::-1].copy()


def normalize_loudness(samples: np.ndarray, target_dbfs: float = -20.0) -> np.ndarray:
    """Scale to target_dbfs RMS (20*log10(rms), full scale 1.0), with less gain if needed to keep peaks in [-1, 1]."""
    clip = _as_clip(samples)
    _check_between("target_dbfs", target_dbfs, MIN_TARGET_DBFS, MAX_TARGET_DBFS, " dBFS")
    rms = _rms(clip)
    if rms == 0.0:
        raise ValueError("the clip is silent, so there is no loudness to normalize")
    ratio = min(_db_to_ratio(target_dbfs) / rms, 1.0 / float(np.max(np.abs(clip))))
    return np.clip(clip * np.float32(ratio), -1.0, 1.0)


def trim_silence(samples: np.ndarray, threshold_db: float = -40.0) -> np.ndarray:
    """Drop leading and trailing TRIM_FRAME_S frames whose RMS is below threshold_db."""
    clip = _as_clip(samples)
    _check_between("threshold_db", threshold_db, MIN_THRESHOLD_DB, MAX_THRESHOLD_DB, " dB")
    n_frame = seconds_to_samples(TRIM_FRAME_S)
    threshold = _db_to_ratio(threshold_db)
    starts = np.arange(0, len(clip), n_frame)
    # reduceat sums each frame, including a shorter last one, without a Python loop over long clips.
    frame_power = np.add.reduceat(np.square(clip, dtype=np.float64), starts) / np.diff(starts, append=len(clip))
    loud = starts[np.sqrt(frame_power) >= threshold]
    if len(loud) == 0:
        raise ValueError(f"the whole clip is below {threshold_db:g} dB; trimming would leave nothing")
    return clip[loud[0] : loud[-1] + n_frame].copy()


def _as_clip(samples: np.ndarray, name: str = "samples") -> np.ndarray:
    """Validate a mono float clip and return it as float32 (possibly a view, so never write to it)."""
    if not isinstance(samples, np.ndarray) or samples.ndim != 1:
        raise ValueError(f"{name} must be a 1-D numpy array of mono samples")
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"{name} must hold float samples in [-1, 1], got dtype {samples.dtype}")
    if len(samples) == 0:
        raise ValueError(f"{name} is empty; there is no audio to edit")
    return samples.astype(np.float32, copy=False)


def _check_finite(name: str, value: float) -> None:
    """Reject NaN and infinities, which would slip through range comparisons."""
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_between(name: str, value: float, low: float, high: float, unit: str = "") -> None:
    """Require a finite value within [low, high]; the message names both bounds."""
    _check_finite(name, value)
    if not low <= value <= high:
        sign = "+" if low < 0 < high else ""  # "-60 and +30 dB" reads as a range of gains
        raise ValueError(f"{name} must be between {low:g} and {sign}{high:g}{unit}, got {value:g}{unit}")


def _check_gain(name: str, gain_db: float) -> None:
    """Require a gain within [MIN_GAIN_DB, MAX_GAIN_DB]."""
    _check_between(name, gain_db, MIN_GAIN_DB, MAX_GAIN_DB, " dB")


def _check_result_length(n_samples: int) -> None:
    """Refuse results longer than MAX_RESULT_S."""
    if n_samples > seconds_to_samples(MAX_RESULT_S):
        raise ValueError(
            f"the result would be {n_samples / SAMPLE_RATE:g} s long; the limit is {MAX_RESULT_S:g} s"
        )


def _position_to_sample(clip: np.ndarray, name: str, at_s: float) -> int:
    """Convert a time within [0, clip length] to a sample index."""
    _check_finite(name, at_s)
    duration_s = len(clip) / SAMPLE_RATE
    at = seconds_to_samples(at_s)
    if at_s < 0 or at > len(clip):
        raise ValueError(f"{name} must be between 0 s and the clip length ({duration_s:g} s), got {at_s:g} s")
    return at


def _range_to_samples(clip: np.ndarray, start_s: float, end_s: float) -> tuple[int, int]:
    """Convert a non-empty time range inside the clip to sample indices [start, end)."""
    _check_finite("start_s", start_s)
    _check_finite("end_s", end_s)
    duration_s = len(clip) / SAMPLE_RATE
    start, end = seconds_to_samples(start_s), seconds_to_samples(end_s)
    if start_s < 0:
        raise ValueError(f"start_s must be >= 0 s, got {start_s:g} s")
    if end > len(clip):
        # to the hundredth, rounded down, as captions show lengths: never a length past end_s itself
        raise ValueError(f"end_s {end_s:g} s is past the end of the clip ({math.floor(duration_s * 100) / 100:g} s)")
    if start >= end:
        raise ValueError(
            f"start_s must be before end_s by at least one sample (1/{SAMPLE_RATE} s), "
            f"got {start_s:g} s and {end_s:g} s"
        )
    return start, end


def _ranges_to_samples(clip: np.ndarray, ranges: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """Validate a non-empty list of (start_s, end_s) pairs and convert each to sample indices."""
    if len(ranges) == 0:
        raise ValueError("give at least one (start_s, end_s) range")
    converted = []
    for pair in ranges:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"each range must be a (start_s, end_s) pair, got {pair!r}")
        converted.append(_range_to_samples(clip, pair[0], pair[1]))
    return converted


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping or touching sample ranges into sorted disjoint ones."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _complement(ranges: list[tuple[int, int]], n_samples: int) -> list[tuple[int, int]]:
    """Return the non-empty sample ranges of [0, n_samples) not covered by sorted disjoint ranges."""
    bounds = [0] + [i for pair in ranges for i in pair] + [n_samples]
    return [(start, end) for start, end in zip(bounds[::2], bounds[1::2]) if end > start]


def _ramp_up(n_samples: int) -> np.ndarray:
    """Linear gain from 0 (first sample) towards 1."""
    return (np.arange(n_samples) / max(n_samples, 1)).astype(np.float32)


def _ramp_down(n_samples: int) -> np.ndarray:
    """Linear gain from near 1 down to 0 (last sample); the mirror of _ramp_up."""
    return _ramp_up(n_samples)[::-1].copy()


def _db_to_ratio(db: float) -> float:
    """Convert decibels to an amplitude ratio."""
    return 10.0 ** (db / 20.0)


def _rms(samples: np.ndarray) -> float:
    """Root mean square, accumulated in float64 for accuracy on long clips."""
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


def _fit_length(samples: np.ndarray, n_samples: int) -> np.ndarray:
    """Trim or zero-pad the tail so the result has exactly n_samples."""
    if len(samples) >= n_samples:
        return samples[:n_samples].astype(np.float32)
    return np.concatenate([samples, np.zeros(n_samples - len(samples), np.float32)]).astype(np.float32)


def _resample(clip: np.ndarray, factor: float, n_result: int) -> np.ndarray:
    """Read the clip factor times faster by linear interpolation, low-passing first when speeding up (anti-alias)."""
    source = _lowpass(clip, LOWPASS_CUTOFF_RATIO * 0.5 / factor) if factor > 1.0 else clip
    positions = np.arange(n_result, dtype=np.float64) * factor
    resampled = np.interp(positions, np.arange(len(source), dtype=np.float64), source)
    # The filter's ripple can overshoot full scale slightly.
    return np.clip(resampled, -1.0, 1.0).astype(np.float32)


def _lowpass(clip: np.ndarray, cutoff: float) -> np.ndarray:
    """Hann-windowed sinc low-pass; cutoff in cycles per sample."""
    t = np.arange(LOWPASS_N_TAPS) - (LOWPASS_N_TAPS - 1) / 2
    taps = 2 * cutoff * np.sinc(2 * cutoff * t) * np.hanning(LOWPASS_N_TAPS)
    taps /= taps.sum()  # unity gain at DC
    return np.convolve(clip, taps, mode="same").astype(np.float32)


def _atempo_stages(factor: float) -> list[float]:
    """Split factor into a product of stages each within [ATEMPO_MIN, ATEMPO_MAX]."""
    stages = []
    while factor > ATEMPO_MAX:
        stages.append(ATEMPO_MAX)
        factor /= ATEMPO_MAX
    while factor < ATEMPO_MIN:
        stages.append(ATEMPO_MIN)
        factor /= ATEMPO_MIN
    return stages + [factor]


def _atempo(clip: np.ndarray, factor: float) -> np.ndarray:
    """Change tempo without changing pitch by piping raw f32le through ffmpeg's atempo filter."""
    audio_filter = ",".join(f"atempo={stage:.10g}" for stage in _atempo_stages(factor))
    raw_format = ["-f", "f32le", "-ar", str(SAMPLE_RATE), "-ac", "1"]
    command = ["ffmpeg", "-hide_banner", "-loglevel", "error", *raw_format, "-i", "pipe:0"]
    command += ["-filter:a", audio_filter, *raw_format, "pipe:1"]
    # The flush silence pushes the real tail out of atempo's window; change_speed trims what follows it.
    padded = np.concatenate([clip, np.zeros(seconds_to_samples(ATEMPO_FLUSH_S), np.float32)])
    try:
        completed = subprocess.run(
            command, input=padded.astype("<f4").tobytes(), capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False
        )
    except FileNotFoundError as error:
        raise RuntimeError("ffmpeg is not installed, so speed changes that keep pitch are unavailable") from error
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"ffmpeg took longer than {FFMPEG_TIMEOUT_S:g} s to change the speed") from error
    if completed.returncode != 0:
        message = completed.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"ffmpeg failed to change the speed: {message}")
    return np.frombuffer(completed.stdout, dtype="<f4").astype(np.float32)
