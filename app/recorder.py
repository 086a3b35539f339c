"""Push-to-talk recording from the microphone and clip playback, through sounddevice (PortAudio)."""

from typing import Protocol

import numpy as np

from chat.audio import MAX_CLIP_S, SAMPLE_RATE
from chat.clip import Clip
from chat.errors import ClipError

MARGIN_S = 5  # record a little past the limit so Clip.from_array names it, rather than cutting silently
DTYPE = "int16"  # what microphones deliver; also the format of the fake ALSA device the tests use
PORTAUDIO_HINT = "Install PortAudio (Debian/Ubuntu: `apt-get install libportaudio2`)"
NO_MIC_HINT = "Connect a microphone or allow access to it, then try again; or attach a file with /add PATH."


class Recorder(Protocol):
    """Push-to-talk: start() begins capturing, stop() ends it and returns what was heard."""

    def start(self) -> None:
        """Start capturing; raises ClipError when there is no microphone to capture from."""

    def stop(self) -> tuple[np.ndarray, int]:
        """Stop capturing; returns (samples, sample_rate), or raises ClipError if the microphone was lost."""


class SoundDeviceRecorder:
    """Records one channel from an input device (the system default unless named), at most max_s seconds."""

    def __init__(self, device: int | str | None = None, max_s: float = MAX_CLIP_S + MARGIN_S) -> None:
        self.device, self.max_s = device, max_s
        self.sample_rate = SAMPLE_RATE
        self.full = False  # True once max_s was reached and capturing ended by itself
        self._stream = None
        self._blocks: list[np.ndarray] = []
        self._n_samples = 0

    def start(self) -> None:
        """Open the device and start collecting blocks in PortAudio's callback thread."""
        sd = _sounddevice()
        self._blocks, self._n_samples, self.full = [], 0, False
        try:
            self.sample_rate = _input_rate(sd, self.device)
            self._stream = sd.InputStream(
                device=self.device, samplerate=self.sample_rate, channels=1, dtype=DTYPE, callback=self._collect
            )
            self._stream.start()
        except (sd.PortAudioError, ValueError) as e:
            self._stream = None
            raise ClipError(f"No microphone could be opened ({e}). {NO_MIC_HINT}") from e

    def stop(self) -> tuple[np.ndarray, int]:
        """Close the stream and return the recording as (n_samples,) int16 at self.sample_rate."""
        if self._stream is None:
            raise RuntimeError("stop() called without a successful start()")
        stream, self._stream = self._stream, None
        # A stream that ended without reaching max_s lost its device (unplugged, taken by another app).
        lost = not stream.active and not self.full
        stream.close()
        if lost:
            raise ClipError("The microphone stopped delivering audio during the recording (was it unplugged?). "
                            "Check it and record again.")
        samples = np.concatenate(self._blocks) if self._blocks else np.zeros(0, dtype=DTYPE)
        return samples, self.sample_rate

    def _collect(self, indata: np.ndarray, n_frames: int, time, status) -> None:
        """PortAudio callback: keep (n_frames, 1) int16 blocks until max_s is reached."""
        n_left = int(self.max_s * self.sample_rate) - self._n_samples
        self._blocks.append(indata[:n_left, 0].copy())
        self._n_samples += min(n_frames, n_left)
        if n_frames >= n_left:
            self.full = True
            raise _sounddevice().CallbackStop


def play(clip: Clip) -> None:
    """Play a clip on the default output device and wait until it ends; Ctrl-C stops it."""
    sd = _sounddevice()
    try:
        sd.play(clip.samples, SAMPLE_RATE, blocking=True)
    except sd.PortAudioError as e:
        raise ClipError(f"No speakers could be opened ({e}). Export the clip with /export and play the file.") from e


def _input_rate(sd, device: int | str | None) -> int:
    """16 kHz where the device offers it (nothing to resample), else the device's own default rate."""
    try:
        sd.check_input_settings(device=device, samplerate=SAMPLE_RATE, channels=1, dtype=DTYPE)
        return SAMPLE_RATE
    except sd.PortAudioError:
        return int(sd.query_devices(device, kind="input")["default_samplerate"])


def _sounddevice():
    """The sounddevice module, imported on first use so a machine without PortAudio can still chat with files."""
    try:
        import sounddevice
    except OSError as e:  # sounddevice raises OSError when the PortAudio library is missing
        raise ClipError(f"Recording and playback need PortAudio, which is not installed. {PORTAUDIO_HINT}.") from e
    return sounddevice
