"""Clips: every format and sample type decodes once to 16 kHz mono float32; bad input is refused clearly."""

import subprocess

import numpy as np
import pytest

from chat import Clip, ClipError
from chat.audio import MAX_CLIP_S, SAMPLE_RATE
from chat.clip import RECORDED, UPLOADED
from chat.families import FAMILIES
from tests.conftest import FORMATS, tone, write_audio


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_decodes_to_16k_mono(audio_files, fmt):
    clip = Clip.from_file(audio_files[fmt])
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    assert clip.duration_s == pytest.approx(2.0, abs=0.08)  # codecs pad a few ms
    assert clip.source == UPLOADED and clip.name == f"tone.{fmt}"
    spectrum = np.abs(np.fft.rfft(clip.samples))
    assert np.argmax(spectrum) * SAMPLE_RATE / len(clip.samples) == pytest.approx(440, abs=2)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_wav_sample_types(tmp_path, subtype):
    import soundfile

    path = tmp_path / f"{subtype}.wav"
    soundfile.write(path, tone(1.0, sample_rate=8000), 8000, subtype=subtype)
    clip = Clip.from_file(path)
    assert clip.duration_s == pytest.approx(1.0, abs=0.01)
    assert np.max(np.abs(clip.samples)) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(
    "samples",
    [
        (tone(1.0, sample_rate=48000) * 32767).astype(np.int16),
        (tone(1.0, sample_rate=48000) * 2**31).astype(np.int32),
        np.stack([tone(1.0, sample_rate=48000)] * 2, axis=1),  # (n_samples, 2) stereo
        np.stack([tone(1.0, sample_rate=48000)] * 2, axis=0),  # (2, n_samples) stereo
    ],
)
def test_arrays_of_any_type_and_layout(samples):
    clip = Clip.from_array(samples, 48000)
    assert clip.source == RECORDED
    assert len(clip.samples) == pytest.approx(SAMPLE_RATE, abs=2)
    assert np.max(np.abs(clip.samples)) == pytest.approx(0.5, abs=0.01)


def test_id_is_derived_from_content_and_samples_are_read_only():
    a, b = Clip.from_array(tone(1.0), SAMPLE_RATE, name="a"), Clip.from_array(tone(1.0), SAMPLE_RATE, name="b")
    assert a.id == b.id and len(a.id) == 16
    assert Clip.from_array(tone(1.0, 880), SAMPLE_RATE).id != a.id
    with pytest.raises(ValueError):
        a.samples[0] = 1.0


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES.keys())
def test_long_clip_is_split_into_equal_parts_of_the_familys_window(family):
    n_parts = 3 if 3 * family.window_s <= MAX_CLIP_S else 2  # a 300-s window (the Omni families): 2 at most
    clip = Clip.from_array(tone((n_parts - 0.5) * family.window_s), SAMPLE_RATE)
    parts = family.renderer.parts(clip, number=4)
    assert family.n_parts(clip) == n_parts
    assert [(p.number, p.index, p.n_parts) for p in parts] == [(4, k, n_parts) for k in range(n_parts)]
    assert all(len(p.samples) <= family.window_samples for p in parts)
    assert [p.label for p in parts] == [f"Audio 4 (part {k} of {n_parts})" for k in range(1, n_parts + 1)]
    np.testing.assert_array_equal(np.concatenate([p.samples for p in parts]), clip.samples)
    assert family.n_parts(Clip.from_array(tone(family.window_s), SAMPLE_RATE)) == 1


def test_an_over_long_wav_is_refused_by_its_header_before_decoding(tmp_path, monkeypatch):
    import soundfile

    path = tmp_path / "eleven-minutes.wav"
    soundfile.write(path, tone(660.0, 100, sample_rate=1000), 1000, subtype="PCM_U8")  # 660 kB
    reads = []
    monkeypatch.setattr(soundfile.SoundFile, "read", lambda *a, **k: reads.append(a) or np.zeros((1, 1)))
    with pytest.raises(ClipError, match=f"longer than the {MAX_CLIP_S // 60}-minute limit"):
        Clip.from_file(path)
    assert reads == []


def test_an_over_long_low_bitrate_mp3_is_decoded_only_to_the_limit(tmp_path):
    path = tmp_path / "lecture.mp3"  # 15 minutes in 0.9 MB
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=300:duration=900",
                    "-ar", "8000", "-b:a", "8k", str(path)], check=True)
    with pytest.raises(ClipError, match=f"longer than the {MAX_CLIP_S // 60}-minute limit"):
        Clip.from_file(path)


@pytest.mark.parametrize(
    "content",
    [
        "#EXTM3U\n#EXTINF:2,tone\n{target}\n",  # a playlist naming a file on the server
        "ffconcat version 1.0\nfile '{target}'\n",  # ffmpeg's concatenation list
        "{target}\n",  # a bare path
    ],
    ids=["m3u", "ffconcat", "path"],
)
def test_a_list_that_names_a_server_file_is_refused(tmp_path, audio_files, content):
    path = tmp_path / "playlist.m3u"
    path.write_text(content.format(target=audio_files["wav"]))
    with pytest.raises(ClipError, match=r"^playlist\.m3u is not an audio file this app reads"):
        Clip.from_file(path)


def test_the_content_decides_the_format_not_the_name(tmp_path, audio_files):
    disguised = tmp_path / "really-m4a.wav"
    disguised.write_bytes(audio_files["m4a"].read_bytes())
    assert Clip.from_file(disguised).duration_s == pytest.approx(2.0, abs=0.08)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("this is not audio"), r"^bad\.wav is not an audio file this app reads\. Export it as wav"),
        (lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage"), r"^bad\.wav could not be read as audio"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: write_audio(p, np.zeros(SAMPLE_RATE, dtype=np.float32)), "silent"),
        (lambda p: None, "no such file"),
    ],
    ids=["not-audio", "broken-wav", "zero-bytes", "silent", "missing"],
)
def test_bad_files_are_refused_with_a_message(tmp_path, make, message):
    path = tmp_path / "bad.wav"
    make(path)
    with pytest.raises(ClipError, match=message):
        Clip.from_file(path)


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_a_header_that_states_more_than_the_file_holds_is_noticed(tmp_path, audio_files, fmt):
    from chat.audio import _shorter_than_stated

    data = audio_files[fmt].read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert not _shorter_than_stated(audio_files[fmt], fmt) and _shorter_than_stated(cut, fmt)


def test_truncated_files_are_refused(tmp_path, audio_files):
    for fmt in ("wav", "mp3", "flac"):
        data = audio_files[fmt].read_bytes()
        path = tmp_path / f"truncated.{fmt}"
        path.write_bytes(data[: len(data) // 3])
        with pytest.raises(ClipError, match="damaged, truncated or not audio"):
            Clip.from_file(path)


@pytest.mark.parametrize(
    "samples, rate, message",
    [
        (np.zeros(0, dtype=np.float32), SAMPLE_RATE, "zero length"),
        (np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE, "silent"),
        (np.full(SAMPLE_RATE, np.nan, dtype=np.float32), SAMPLE_RATE, "NaN or infinity"),
        (np.full(SAMPLE_RATE, np.inf, dtype=np.float32), SAMPLE_RATE, "NaN or infinity"),
        (tone(1.0), 10, "not plausible"),
        (tone(1.0), 10_000_000, "not plausible"),
        (tone(0.01), SAMPLE_RATE, "at least"),
        (np.zeros((2, 2, 2), dtype=np.float32), SAMPLE_RATE, "1-D or 2-D"),
        (tone(MAX_CLIP_S + 1.0), SAMPLE_RATE, "limit per clip"),
    ],
    ids=["empty", "silent", "nan", "inf", "low-rate", "absurd-rate", "too-short", "bad-shape", "too-long"],
)
def test_bad_arrays_are_refused_with_a_message(samples, rate, message):
    with pytest.raises(ClipError, match=message):
        Clip.from_array(samples, rate)
