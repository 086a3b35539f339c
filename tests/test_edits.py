"""Tests for chat.edits: the audio each edit produces, its lengths, and its argument checks."""

import subprocess

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from chat import edits
from chat.edits import SAMPLE_RATE

SR = SAMPLE_RATE
HALF_FADE = round(edits.JOIN_FADE_S / 2 * SR)  # samples faded on each side of a delete join
GAIN_6DB = 20 * np.log10(2)  # ~6.02 dB doubles amplitude


def ramp(n_samples: int) -> np.ndarray:
    """Distinct known values: sample i is i / n_samples."""
    return (np.arange(n_samples) / n_samples).astype(np.float32)


def const(value: float, seconds: float) -> np.ndarray:
    """A DC clip, so every sample's expected value is obvious."""
    return np.full(round(seconds * SR), value, np.float32)


def sine(freq_hz: float, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    """A pure tone."""
    t = np.arange(round(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def dominant_hz(samples: np.ndarray) -> float:
    """The strongest frequency, by windowed FFT."""
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * SR / len(samples))


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


# seconds_to_samples


def test_seconds_to_samples_rounds():
    assert edits.seconds_to_samples(1.0) == 16000
    assert edits.seconds_to_samples(0.5) == 8000
    assert edits.seconds_to_samples(0.4 / SR) == 0
    assert edits.seconds_to_samples(0.6 / SR) == 1
    assert isinstance(edits.seconds_to_samples(0.25), int)


def test_seconds_to_samples_rejects_nan():
    with pytest.raises(ValueError, match="finite"):
        edits.seconds_to_samples(float("nan"))


# keep_range


def test_keep_range_values():
    x = ramp(2 * SR)
    out = edits.keep_range(x, 0.5, 1.5)
    assert len(out) == SR
    assert out[0] == x[8000]
    assert out[-1] == x[23999]
    np.testing.assert_array_equal(out, x[8000:24000])


def test_keep_range_whole_clip():
    x = ramp(SR)
    np.testing.assert_array_equal(edits.keep_range(x, 0.0, 1.0), x)


@given(n=st.integers(2, 5000), data=st.data())
def test_keep_range_length_property(n, data):
    start = data.draw(st.integers(0, n - 1))
    end = data.draw(st.integers(start + 1, n))
    x = ramp(n)
    out = edits.keep_range(x, start / SR, end / SR)
    assert len(out) == end - start
    np.testing.assert_array_equal(out, x[start:end])


@pytest.mark.parametrize(
    ("start_s", "end_s", "match"),
    [
        (-0.1, 0.5, r">= 0 s"),
        (0.5, 1.5, r"past the end of the clip \(1 s\)"),
        (0.5, 0.5, "before end_s"),
        (0.6, 0.5, "before end_s"),
        (0.5, 0.5 + 0.2 / SR, "at least one sample"),
        (float("nan"), 0.5, "finite"),
        (0.0, float("inf"), "finite"),
    ],
)
def test_keep_range_invalid(start_s, end_s, match):
    with pytest.raises(ValueError, match=match):
        edits.keep_range(ramp(SR), start_s, end_s)


def test_a_range_past_the_end_names_the_length_as_captions_show_it():
    with pytest.raises(ValueError, match=r"end_s 3.36 s is past the end of the clip \(2.34 s\)$"):
        edits.keep_range(ramp(round(2.34881 * SR)), 0.18, 3.36)


# delete_ranges


def test_delete_single_range_length_and_values():
    x = ramp(SR)
    out = edits.delete_ranges(x, [(0.25, 0.5)])
    assert len(out) == SR - 4000
    # Untouched away from the join.
    np.testing.assert_array_equal(out[: 4000 - HALF_FADE], x[: 4000 - HALF_FADE])
    np.testing.assert_array_equal(out[4000 + HALF_FADE :], x[8000 + HALF_FADE :])
    # The join fades to silence on both sides, and the fade only attenuates.
    assert out[3999] == 0.0
    assert out[4000] == 0.0
    assert np.all(np.abs(out[4000 - HALF_FADE : 4000]) <= x[4000 - HALF_FADE : 4000])
    assert np.all(np.abs(out[4000 : 4000 + HALF_FADE]) <= x[8000 : 8000 + HALF_FADE])


def test_delete_at_edges_has_no_join():
    x = ramp(SR)
    np.testing.assert_array_equal(edits.delete_ranges(x, [(0.0, 0.25)]), x[4000:])
    np.testing.assert_array_equal(edits.delete_ranges(x, [(0.75, 1.0)]), x[:12000])


def test_delete_overlapping_ranges_are_merged():
    x = ramp(SR)
    out = edits.delete_ranges(x, [(0.2, 0.4), (0.1, 0.3)])
    assert len(out) == SR - round(0.3 * SR)
    np.testing.assert_array_equal(out[: 1600 - HALF_FADE], x[: 1600 - HALF_FADE])
    np.testing.assert_array_equal(out[1600 + HALF_FADE :], x[6400 + HALF_FADE :])


def test_delete_touching_ranges_count_once():
    out = edits.delete_ranges(ramp(SR), [(0.1, 0.2), (0.2, 0.3), (0.15, 0.25)])
    assert len(out) == SR - 3200


@given(n=st.integers(10, 4000), data=st.data())
def test_delete_ranges_property(n, data):
    pairs = data.draw(
        st.lists(st.tuples(st.integers(0, n), st.integers(0, n)).filter(lambda p: p[0] != p[1]), min_size=1, max_size=6)
    )
    ranges = [(min(a, b), max(a, b)) for a, b in pairs]
    keep = np.ones(n, bool)
    for start, end in ranges:
        keep[start:end] = False
    assume(keep.any())
    x = ramp(n)
    out = edits.delete_ranges(x, [(a / SR, b / SR) for a, b in ranges])
    expected = x[keep]
    assert len(out) == n - int((~keep).sum())
    # Joins sit where consecutive kept samples were not adjacent in the original.
    kept_index = np.flatnonzero(keep)
    joins = np.flatnonzero(np.diff(kept_index) > 1) + 1
    near_join = np.zeros(len(out), bool)
    for j in joins:
        near_join[max(j - HALF_FADE, 0) : j + HALF_FADE] = True
    np.testing.assert_array_equal(out[~near_join], expected[~near_join])
    assert np.all(np.abs(out) <= np.abs(expected))


def test_delete_whole_clip_rejected():
    with pytest.raises(ValueError, match="whole clip"):
        edits.delete_ranges(ramp(SR), [(0.0, 0.6), (0.5, 1.0)])


@pytest.mark.parametrize(
    ("ranges", "match"),
    [
        ([], "at least one"),
        ([(0.1, 1.2)], r"past the end of the clip \(1 s\)"),
        ([(0.3, 0.2)], "before end_s"),
        ([(-0.1, 0.2)], ">= 0 s"),
        ([(0.1,)], "pair"),
        ([0.1], "pair"),
    ],
)
def test_delete_ranges_invalid(ranges, match):
    with pytest.raises(ValueError, match=match):
        edits.delete_ranges(ramp(SR), ranges)


# mute_ranges


def test_mute_ranges_exact_zeros():
    x = const(0.5, 1.0)
    out = edits.mute_ranges(x, [(0.1, 0.2), (0.5, 0.6), (0.55, 0.65)])
    assert len(out) == SR
    assert np.all(out[1600:3200] == 0.0)
    assert np.all(out[8000:10400] == 0.0)
    assert np.all(out[:1600] == 0.5)
    assert np.all(out[3200:8000] == 0.5)
    assert np.all(out[10400:] == 0.5)


@pytest.mark.parametrize(("ranges", "match"), [([], "at least one"), ([(0.9, 1.1)], r"past the end")])
def test_mute_ranges_invalid(ranges, match):
    with pytest.raises(ValueError, match=match):
        edits.mute_ranges(ramp(SR), ranges)


# insert_silence


def test_insert_silence_middle():
    x = ramp(SR)
    out = edits.insert_silence(x, 0.5, 0.25)
    assert len(out) == SR + 4000
    np.testing.assert_array_equal(out[:8000], x[:8000])
    assert np.all(out[8000:12000] == 0.0)
    np.testing.assert_array_equal(out[12000:], x[8000:])


def test_insert_silence_at_edges():
    x = ramp(SR)
    start = edits.insert_silence(x, 0.0, 0.1)
    assert np.all(start[:1600] == 0.0)
    np.testing.assert_array_equal(start[1600:], x)
    end = edits.insert_silence(x, 1.0, 0.1)
    np.testing.assert_array_equal(end[:SR], x)
    assert np.all(end[SR:] == 0.0)
    assert len(end) == SR + 1600


@pytest.mark.parametrize(
    ("at_s", "duration_s", "match"),
    [
        (1.5, 0.1, r"clip length \(1 s\)"),
        (-0.1, 0.1, r"between 0 s"),
        (0.5, 0.0, "at least one sample"),
        (0.5, -1.0, "at least one sample"),
        (0.5, edits.MAX_RESULT_S, "limit is 600 s"),
        (0.5, float("nan"), "finite"),
    ],
)
def test_insert_silence_invalid(at_s, duration_s, match):
    with pytest.raises(ValueError, match=match):
        edits.insert_silence(ramp(SR), at_s, duration_s)


# change_volume


def test_change_volume_doubles_and_halves():
    x = const(0.25, 1.0)
    np.testing.assert_allclose(edits.change_volume(x, GAIN_6DB), 0.5, rtol=1e-5)
    np.testing.assert_allclose(edits.change_volume(x, -GAIN_6DB), 0.125, rtol=1e-5)
    np.testing.assert_allclose(edits.change_volume(x, -20.0), 0.025, rtol=1e-5)


def test_change_volume_ratio_on_sine():
    x = sine(440)
    out = edits.change_volume(x, 6.0)
    nonzero = np.abs(x) > 1e-3
    np.testing.assert_allclose(out[nonzero] / x[nonzero], 10 ** (6 / 20), rtol=1e-5)


def test_change_volume_range_only():
    x = const(0.25, 1.0)
    out = edits.change_volume(x, GAIN_6DB, 0.25, 0.5)
    assert np.all(out[:4000] == 0.25)
    np.testing.assert_allclose(out[4000:8000], 0.5, rtol=1e-5)
    assert np.all(out[8000:] == 0.25)


def test_change_volume_open_ended_ranges():
    x = const(0.25, 1.0)
    from_start = edits.change_volume(x, GAIN_6DB, end_s=0.5)
    np.testing.assert_allclose(from_start[:8000], 0.5, rtol=1e-5)
    assert np.all(from_start[8000:] == 0.25)
    to_end = edits.change_volume(x, GAIN_6DB, start_s=0.5)
    assert np.all(to_end[:8000] == 0.25)
    np.testing.assert_allclose(to_end[8000:], 0.5, rtol=1e-5)


def test_change_volume_clips():
    x = np.array([0.8, -0.8, 0.01], np.float32)
    out = edits.change_volume(x, 20.0)
    np.testing.assert_allclose(out, [1.0, -1.0, 0.1], rtol=1e-5)
    assert out.max() <= 1.0 and out.min() >= -1.0


def test_change_volume_limits_inclusive():
    x = const(0.5, 0.1)
    np.testing.assert_allclose(edits.change_volume(x, -60.0), 0.0005, rtol=1e-5)
    assert np.all(edits.change_volume(x, 30.0) == 1.0)


@pytest.mark.parametrize(
    ("gain_db", "start_s", "end_s", "match"),
    [
        (30.5, None, None, r"-60 and \+30 dB"),
        (-61.0, None, None, r"-60 and \+30 dB"),
        (float("nan"), None, None, "finite"),
        (6.0, 0.5, 0.2, "before end_s"),
        (6.0, 0.5, 2.0, r"past the end of the clip \(1 s\)"),
    ],
)
def test_change_volume_invalid(gain_db, start_s, end_s, match):
    with pytest.raises(ValueError, match=match):
        edits.change_volume(const(0.25, 1.0), gain_db, start_s, end_s)


# fade


def test_fade_in_linear():
    out = edits.fade(const(1.0, 1.0), fade_in_s=0.1)
    assert out[0] == 0.0
    assert out[800] == pytest.approx(0.5)
    np.testing.assert_allclose(np.diff(out[:1600]), 1 / 1600, rtol=1e-4)
    assert np.all(out[1600:] == 1.0)


def test_fade_out_linear():
    out = edits.fade(const(1.0, 1.0), fade_out_s=0.1)
    assert out[-1] == 0.0
    assert out[-801] == pytest.approx(0.5)
    np.testing.assert_allclose(np.diff(out[-1600:]), -1 / 1600, rtol=1e-4)
    assert np.all(out[: SR - 1600] == 1.0)


def test_fade_in_and_out_are_mirror_images():
    x = ramp(SR) - 0.5
    faded_in = edits.fade(x, fade_in_s=0.3)
    faded_out = edits.fade(edits.reverse(x), fade_out_s=0.3)
    np.testing.assert_array_equal(edits.reverse(faded_in), faded_out)


def test_fade_both_overlapping_whole_clip():
    out = edits.fade(const(1.0, 1.0), fade_in_s=1.0, fade_out_s=1.0)
    assert out[0] == 0.0 and out[-1] == 0.0
    assert out.max() == pytest.approx(0.25, abs=1e-3)


@pytest.mark.parametrize(
    ("fade_in_s", "fade_out_s", "match"),
    [
        (0.0, 0.0, "nothing to fade"),
        (-0.1, 0.0, r"between 0 s and the clip length \(1 s\)"),
        (0.0, 1.5, r"between 0 s and the clip length \(1 s\)"),
        (float("inf"), 0.0, "finite"),
    ],
)
def test_fade_invalid(fade_in_s, fade_out_s, match):
    with pytest.raises(ValueError, match=match):
        edits.fade(const(1.0, 1.0), fade_in_s, fade_out_s)


# change_speed


@pytest.mark.parametrize(("factor", "freq_hz"), [(2.0, 440.0), (0.5, 440.0), (4.0, 300.0), (0.25, 440.0), (1.5, 440)])
def test_change_speed_resample_shifts_pitch(factor, freq_hz):
    out = edits.change_speed(sine(freq_hz), factor, keep_pitch=False)
    assert len(out) == round(SR / factor)
    assert dominant_hz(out) == pytest.approx(freq_hz * factor, rel=0.02)
    assert rms(out) == pytest.approx(rms(sine(freq_hz)), rel=0.1)


@pytest.mark.parametrize("factor", [2.0, 0.5, 4.0, 0.25, 1.25, 3.0])
def test_change_speed_keep_pitch(factor):
    x = sine(440)
    out = edits.change_speed(x, factor, keep_pitch=True)
    assert out.dtype == np.float32
    assert len(out) == round(SR / factor)
    assert dominant_hz(out) == pytest.approx(440, rel=0.03)
    # atempo keeps the level of a steady tone; compare the middle to skip its edge ramps.
    middle = out[len(out) // 4 : 3 * len(out) // 4]
    assert rms(middle) == pytest.approx(rms(x), rel=0.2)
    # The tone lasts to the end: atempo's tail is flushed, not replaced by padding.
    assert rms(out[-len(out) // 10 :]) > 0.7 * rms(x)


def test_change_speed_factor_one_resample_is_identity():
    x = ramp(SR)
    np.testing.assert_array_equal(edits.change_speed(x, 1.0, keep_pitch=False), x)


def test_change_speed_resample_known_values():
    # Halving the speed of a ramp interpolates midway between neighbours.
    x = ramp(1000)
    out = edits.change_speed(x, 0.5, keep_pitch=False)
    assert out[0] == x[0]
    assert out[2] == x[1]
    assert out[3] == pytest.approx((x[1] + x[2]) / 2)


def test_change_speed_anti_aliasing():
    # 6 kHz played twice as fast would fold back to 4 kHz; it must be filtered out instead.
    out = edits.change_speed(sine(6000), 2.0, keep_pitch=False)
    assert rms(out) < 0.01 * rms(sine(6000))


def test_atempo_stages_stay_in_range():
    for factor in [0.25, 0.3, 0.5, 1.0, 2.0, 3.0, 4.0]:
        stages = edits._atempo_stages(factor)
        assert all(edits.ATEMPO_MIN <= s <= edits.ATEMPO_MAX for s in stages)
        assert np.prod(stages) == pytest.approx(factor)


@pytest.mark.parametrize(
    ("factor", "match"),
    [(0.2, r"0\.25 and 4"), (4.5, r"0\.25 and 4"), (0.0, r"0\.25 and 4"), (float("nan"), "finite")],
)
@pytest.mark.parametrize("keep_pitch", [False, True])
def test_change_speed_invalid(factor, match, keep_pitch):
    with pytest.raises(ValueError, match=match):
        edits.change_speed(sine(440), factor, keep_pitch)


def test_change_speed_result_too_long():
    with pytest.raises(ValueError, match="limit is 600 s"):
        edits.change_speed(np.zeros(200 * SR, np.float32), 0.25, keep_pitch=True)


def test_change_speed_reports_missing_ffmpeg(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("ffmpeg")

    monkeypatch.setattr(edits.subprocess, "run", missing)
    with pytest.raises(RuntimeError, match="ffmpeg is not installed"):
        edits.change_speed(sine(440), 2.0, keep_pitch=True)


def test_change_speed_reports_ffmpeg_failure(monkeypatch):
    def failing(command, **kwargs):
        assert command[0] == "ffmpeg" and "atempo=2" in command
        return subprocess.CompletedProcess(command, 1, b"", b"boom")

    monkeypatch.setattr(edits.subprocess, "run", failing)
    with pytest.raises(RuntimeError, match="ffmpeg failed to change the speed: boom"):
        edits.change_speed(sine(440), 2.0, keep_pitch=True)


def test_change_speed_empty_result():
    with pytest.raises(ValueError, match="empty"):
        edits.change_speed(np.zeros(1, np.float32), 4.0, keep_pitch=False)


# concatenate


def test_concatenate_with_gap():
    a, b = ramp(1000), ramp(500) - 1.0
    out = edits.concatenate([a, b], gap_s=0.01)
    assert len(out) == 1000 + 160 + 500
    np.testing.assert_array_equal(out[:1000], a)
    assert np.all(out[1000:1160] == 0.0)
    np.testing.assert_array_equal(out[1160:], b)


def test_concatenate_no_gap_and_single():
    a, b, c = ramp(10), ramp(20), ramp(30)
    np.testing.assert_array_equal(edits.concatenate([a, b, c]), np.concatenate([a, b, c]))
    np.testing.assert_array_equal(edits.concatenate([a]), a)


def test_concatenate_gap_between_every_pair():
    out = edits.concatenate([const(0.5, 0.01)] * 3, gap_s=0.005)
    assert len(out) == 3 * 160 + 2 * 80
    assert np.all(out[160:240] == 0.0) and np.all(out[400:480] == 0.0)
    assert np.all(out[480:] == 0.5)


@pytest.mark.parametrize(
    ("clips", "gap_s", "match"),
    [
        ([], 0.0, "at least one clip"),
        ([ramp(10)], -0.1, ">= 0 s"),
        ([np.zeros(301 * SR, np.float32)] * 2, 0.0, "limit is 600 s"),
        ([ramp(10), np.zeros(0, np.float32)], 0.0, "clip 1 is empty"),
    ],
)
def test_concatenate_invalid(clips, gap_s, match):
    with pytest.raises(ValueError, match=match):
        edits.concatenate(clips, gap_s)


# overlay


def test_overlay_inside_base():
    out = edits.overlay(const(0.25, 1.0), const(0.125, 0.5), 0.25)
    assert len(out) == SR
    assert np.all(out[:4000] == 0.25)
    assert np.all(out[4000:12000] == 0.375)
    assert np.all(out[12000:] == 0.25)


def test_overlay_extends_past_base():
    out = edits.overlay(const(0.25, 1.0), const(0.125, 0.5), 0.75)
    assert len(out) == round(1.25 * SR)
    assert np.all(out[:12000] == 0.25)
    assert np.all(out[12000:16000] == 0.375)
    assert np.all(out[16000:] == 0.125)


def test_overlay_after_gap_leaves_silence():
    out = edits.overlay(const(0.25, 1.0), const(0.125, 0.5), 1.5)
    assert len(out) == 2 * SR
    assert np.all(out[SR : SR + 8000] == 0.0)
    assert np.all(out[SR + 8000 :] == 0.125)


def test_overlay_gain_and_clipping():
    quiet = edits.overlay(const(0.25, 1.0), const(0.25, 1.0), 0.0, other_gain_db=-GAIN_6DB)
    np.testing.assert_allclose(quiet, 0.375, rtol=1e-5)
    loud = edits.overlay(const(0.8, 1.0), const(0.8, 1.0), 0.0)
    assert np.all(loud == 1.0)
    neg = edits.overlay(const(-0.8, 1.0), const(-0.8, 1.0), 0.0)
    assert np.all(neg == -1.0)


@pytest.mark.parametrize(
    ("offset_s", "gain_db", "match"),
    [
        (-0.1, 0.0, ">= 0 s"),
        (0.0, 31.0, r"-60 and \+30 dB"),
        (0.0, -70.0, r"-60 and \+30 dB"),
        (edits.MAX_RESULT_S, 0.0, "limit is 600 s"),
        (float("nan"), 0.0, "finite"),
    ],
)
def test_overlay_invalid(offset_s, gain_db, match):
    with pytest.raises(ValueError, match=match):
        edits.overlay(const(0.25, 1.0), const(0.125, 0.5), offset_s, gain_db)


# reverse


def test_reverse_values():
    x = ramp(100)
    out = edits.reverse(x)
    assert out[0] == x[-1] and out[-1] == x[0]
    np.testing.assert_array_equal(out, x[::-1])


@given(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=500))
def test_reverse_twice_is_identity(values):
    x = np.array(values, np.float32)
    np.testing.assert_array_equal(edits.reverse(edits.reverse(x)), x)


# normalize_loudness


def test_normalize_hits_target_rms():
    out = edits.normalize_loudness(sine(440, amplitude=0.1), target_dbfs=-20.0)
    assert 20 * np.log10(rms(out)) == pytest.approx(-20.0, abs=0.01)
    assert dominant_hz(out) == pytest.approx(440, rel=0.01)


def test_normalize_quietens_loud_clip():
    out = edits.normalize_loudness(sine(440, amplitude=0.9), target_dbfs=-30.0)
    assert 20 * np.log10(rms(out)) == pytest.approx(-30.0, abs=0.01)


def test_normalize_is_peak_limited():
    # A lone spike in near-silence would need huge gain to reach the RMS target; peaks must stay in range.
    x = np.zeros(SR, np.float32)
    x[100] = 0.5
    x[200] = -0.25
    out = edits.normalize_loudness(x, target_dbfs=-3.0)
    assert np.max(np.abs(out)) == pytest.approx(1.0, rel=1e-6)
    assert out.max() <= 1.0 and out.min() >= -1.0
    assert out[200] == pytest.approx(-0.5, rel=1e-6)


@pytest.mark.parametrize(("target_dbfs", "match"), [(1.0, r"-60 and 0 dBFS"), (-61.0, r"-60 and 0 dBFS")])
def test_normalize_invalid_target(target_dbfs, match):
    with pytest.raises(ValueError, match=match):
        edits.normalize_loudness(sine(440), target_dbfs)


def test_normalize_silent_clip():
    with pytest.raises(ValueError, match="silent"):
        edits.normalize_loudness(np.zeros(SR, np.float32))


# trim_silence


def test_trim_silence_frame_aligned():
    tone = sine(440, 1.0)
    x = np.concatenate([np.zeros(8000, np.float32), tone, np.zeros(4800, np.float32)])
    np.testing.assert_array_equal(edits.trim_silence(x), tone)


def test_trim_silence_unaligned_keeps_whole_sound():
    tone = const(0.5, 0.5)
    lead, tail = 8080, 4850  # not multiples of the 160-sample frame
    x = np.concatenate([np.zeros(lead, np.float32), tone, np.zeros(tail, np.float32)])
    out = edits.trim_silence(x)
    n_frame = round(edits.TRIM_FRAME_S * SR)
    # Trimming is frame-based: at most one frame of silence remains on each side.
    assert len(tone) <= len(out) < len(tone) + 2 * n_frame
    start = lead // n_frame * n_frame
    np.testing.assert_array_equal(out, x[start : start + len(out)])
    assert np.all(out[lead - start : lead - start + len(tone)] == 0.5)


def test_trim_silence_removes_quiet_noise():
    rng = np.random.default_rng(0)
    noise = (rng.uniform(-1, 1, 8000) * 0.001).astype(np.float32)  # about -65 dB
    tone = sine(440, 0.5)
    x = np.concatenate([noise, tone, noise])
    np.testing.assert_array_equal(edits.trim_silence(x, threshold_db=-40.0), tone)
    assert len(edits.trim_silence(x, threshold_db=-80.0)) == len(x)


def test_trim_silence_nothing_to_trim():
    x = const(0.5, 0.3)
    np.testing.assert_array_equal(edits.trim_silence(x), x)


def test_trim_silence_short_last_frame():
    # 1050 samples: the last frame is only 90 long and its RMS is taken over those 90, not padded.
    x = np.concatenate([np.zeros(1000, np.float32), const(0.5, 50 / SR)])
    out = edits.trim_silence(x)
    assert len(out) == 90
    assert np.all(out[:40] == 0.0) and np.all(out[40:] == 0.5)


def test_trim_silence_all_silent():
    with pytest.raises(ValueError, match=r"below -40 dB"):
        edits.trim_silence(np.zeros(SR, np.float32))


@pytest.mark.parametrize("threshold_db", [1.0, -101.0, float("nan")])
def test_trim_silence_invalid_threshold(threshold_db):
    with pytest.raises(ValueError, match=r"-100 and 0 dB|finite"):
        edits.trim_silence(sine(440), threshold_db)


# Properties shared by every edit


CALLS = {
    "keep_range": lambda a, b: edits.keep_range(a, 0.1, 0.5),
    "delete_ranges": lambda a, b: edits.delete_ranges(a, [(0.1, 0.2), (0.4, 0.5)]),
    "mute_ranges": lambda a, b: edits.mute_ranges(a, [(0.1, 0.2)]),
    "insert_silence": lambda a, b: edits.insert_silence(a, 0.3, 0.2),
    "change_volume": lambda a, b: edits.change_volume(a, 6.0, 0.1, 0.3),
    "fade": lambda a, b: edits.fade(a, 0.1, 0.1),
    "change_speed": lambda a, b: edits.change_speed(a, 1.5, keep_pitch=False),
    "change_speed_keep_pitch": lambda a, b: edits.change_speed(a, 1.5, keep_pitch=True),
    "concatenate": lambda a, b: edits.concatenate([a, b], 0.1),
    "concatenate_single": lambda a, b: edits.concatenate([a]),
    "overlay": lambda a, b: edits.overlay(a, b, 0.2, -3.0),
    "reverse": lambda a, b: edits.reverse(a),
    "normalize_loudness": lambda a, b: edits.normalize_loudness(a),
    "trim_silence": lambda a, b: edits.trim_silence(a),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CALLS))
def test_inputs_never_mutated_and_result_is_new_float32(name, dtype):
    a = (sine(440, 1.0) + 0.1 * ramp(SR)).astype(dtype)
    b = sine(880, 0.5).astype(dtype)
    a_before, b_before = a.copy(), b.copy()
    out = CALLS[name](a, b)
    np.testing.assert_array_equal(a, a_before)
    np.testing.assert_array_equal(b, b_before)
    assert out.dtype == np.float32 and out.ndim == 1
    assert not np.shares_memory(out, a) and not np.shares_memory(out, b)
    # Writing to the result must not reach the inputs either.
    out[:] = 0.123
    np.testing.assert_array_equal(a, a_before)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros((2, 100), np.float32), "1-D"),
        (np.zeros(100, np.int16), "float samples"),
        (np.zeros(0, np.float32), "empty"),
        ([0.0, 0.1], "1-D numpy array"),
    ],
)
@pytest.mark.parametrize("name", list(CALLS))
def test_invalid_clip_rejected(name, bad, match):
    with pytest.raises(ValueError, match=match):
        CALLS[name](bad, sine(880, 0.5))
