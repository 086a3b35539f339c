"""The recorder: prepared takes for tests, and real recording and playback through sounddevice.

The real test runs in a subprocess whose HOME holds an .asoundrc that makes ALSA's default device a
fake one reading speech from a raw file (see the reference testing.md), so no other test sees it.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.recorder import SoundDeviceRecorder, SoundDeviceSpeaker
from testkit.recorder import ArrayRecorder
from chat import ClipError
from chat.audio import SAMPLE_RATE

REPO = Path(__file__).resolve().parents[1]
TAIL_S = 1.0  # the fake device goes on with silence after the speech; the test records this much of it
ASOUNDRC = """\
pcm.!default {{ type plug; slave.pcm "fakefile" }}
pcm.fakefile {{ type file; slave.pcm "null"; file "{played}"; infile "{speech}"; format "raw" }}
"""
# The fake device is not real time: it delivers the whole file at once, so the recording is bounded by
# max_s rather than by how long the script waits.
RECORD_AND_PLAY = """\
import sys, time
import numpy as np
from app.recorder import SoundDeviceRecorder, play
from chat.clip import Clip

folder, max_s = sys.argv[1], float(sys.argv[2])
recorder = SoundDeviceRecorder(max_s=max_s)
recorder.start()
deadline = time.monotonic() + 30
while not recorder.full and time.monotonic() < deadline:
    time.sleep(0.01)
samples, sample_rate = recorder.stop()
clip = Clip.from_array(samples, sample_rate)
np.save(f"{folder}/recorded.npy", clip.samples)
print(sample_rate, samples.dtype)
play(clip)
"""


def test_array_recorder_returns_its_takes_then_has_no_microphone():
    first = (np.ones(10, dtype=np.int16), 8000)
    recorder = ArrayRecorder([first, ClipError("unplugged")])
    recorder.start()
    assert recorder.stop() is first
    recorder.start()
    with pytest.raises(ClipError, match="unplugged"):
        recorder.stop()
    with pytest.raises(ClipError, match="No microphone"):
        recorder.start()


def test_a_missing_input_device_is_a_clip_error_that_says_what_to_do():
    with pytest.raises(ClipError, match=r"No microphone could be opened .*Connect a microphone"):
        SoundDeviceRecorder(device="no such microphone").start()


def test_records_speech_from_the_default_alsa_device_and_plays_it_back(tmp_path, speech_wav):
    speech_raw = tmp_path / "speech16k.raw"  # 16-bit, 16 kHz, mono: what the fake device's format says
    subprocess.run(["sox", speech_wav, "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", "-t", "raw",
                    speech_raw], check=True)
    (tmp_path / ".asoundrc").write_text(ASOUNDRC.format(played=tmp_path / "played.raw", speech=speech_raw))
    speech = np.fromfile(speech_raw, dtype="<i2").astype(np.float32) / 32768  # (n_samples,)
    expected_s = len(speech) / SAMPLE_RATE + TAIL_S

    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", RECORD_AND_PLAY, str(tmp_path), str(expected_s)],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(SAMPLE_RATE), "int16"]  # the device was opened at 16 kHz, nothing resampled

    recorded = np.load(tmp_path / "recorded.npy")
    assert len(recorded) / SAMPLE_RATE == pytest.approx(expected_s, abs=0.01)
    assert np.max(np.abs(recorded)) > 0.1  # loud speech, not a muted microphone
    np.testing.assert_array_equal(recorded[: len(speech)], speech)  # exactly the file, scaled to [-1, 1)
    assert np.max(np.abs(recorded[len(speech):])) < 1e-3  # then the device's silence

    played = from_first_sound(np.fromfile(tmp_path / "played.raw", dtype="<f4"))  # play() sends float32
    heard = from_first_sound(recorded)
    np.testing.assert_array_equal(played[: len(heard)], heard)


def from_first_sound(samples: np.ndarray) -> np.ndarray:
    """Samples from the first non-zero one on (devices pad the start with silence)."""
    return samples[np.flatnonzero(samples)[0]:]


SPEAK_RATE = 24_000  # every voice's rate: the fake device writes float32 at it, as given (nothing resampled)
# Writes played.raw as the fake device takes it, which is not real time: it takes each block as soon as it is
# filled. close() drops what is still queued, so a chunk that is in the file whole was played before wait() returned.
SPEAK = """\
import sys
import numpy as np
from app.recorder import SoundDeviceSpeaker

chunks = [np.load(path) for path in sys.argv[2:]]
speaker = SoundDeviceSpeaker()
if sys.argv[1] == "stop":
    speaker.play(chunks[0], 24000)
    speaker.stop()
else:
    for chunk in chunks:
        speaker.play(chunk, 24000)
speaker.wait()
speaker.close()
"""


def speak(tmp_path: Path, mode: str, chunks: list[np.ndarray]) -> np.ndarray:
    """Run SPEAK with the fake device as ALSA's default; returns the samples it was sent."""
    (tmp_path / ".asoundrc").write_text(ASOUNDRC.format(played=tmp_path / "played.raw", speech="/dev/null"))
    paths = [tmp_path / f"chunk{k}.npy" for k in range(len(chunks))]
    for path, chunk in zip(paths, chunks):
        np.save(path, chunk)
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", SPEAK, mode, *map(str, paths)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return np.fromfile(tmp_path / "played.raw", dtype="<f4")


def test_chunks_play_back_to_back_in_order_and_whole_before_wait_returns(tmp_path):
    chunks = [np.linspace(0.1 * k, 0.1 * k + 0.05, SPEAK_RATE // 2, dtype=np.float32) for k in (1, 2, 3)]
    played = from_first_sound(speak(tmp_path, "play", chunks))
    expected = np.concatenate(chunks)
    np.testing.assert_array_equal(played[: len(expected)], expected)  # no gap, no resampling, nothing lost
    assert not played[len(expected):].any()  # then the device's silence


def test_stop_drops_what_was_queued(tmp_path):
    queued = np.full(SPEAK_RATE * 60, 0.5, dtype=np.float32)  # a minute, stopped at once
    played = speak(tmp_path, "stop", [queued])
    assert np.count_nonzero(played) < len(queued) // 10


def test_a_missing_output_device_is_a_clip_error_that_says_what_to_do():
    with pytest.raises(ClipError, match=r"No speakers could be opened .*Turn the voice off with /voice off"):
        SoundDeviceSpeaker(device="no such speakers").play(np.zeros(10, dtype=np.float32), SPEAK_RATE)
