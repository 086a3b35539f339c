"""Push-to-talk recording from the microphone, clip playback and spoken replies, through sounddevice (PortAudio)."""

import collections
import threading
from typing import Protocol

import numpy as np

from chat.audio import MAX_CLIP_S, SAMPLE_RATE
from chat.clip import Clip
from chat.errors import ClipError

MARGIN_S = 5  # record a little past the limit so Clip.from_array names it, rather than cutting silently
DTYPE = "int16"  # what microphones deliver; also the format of the fake ALSA device the tests use
PORTAUDIO_HINT = "Install PortAudio (Debian/Ubuntu: `apt-get install libportaudio2`)"
WAIT_POLL_S = 0.1  # the longest a Ctrl-C waits to be raised while waiting for a spoken reply to end
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


class Speaker(Protocol):
    """Plays a spoken reply chunk by chunk as it is made."""

    def play(self, samples: np.ndarray, sample_rate: int) -> None:
        """Play (n_samples,) float32 audio after what is already playing; returns at once."""

    def wait(self) -> None:
        """Return once everything given has played; Ctrl-C (KeyboardInterrupt) interrupts the wait."""

    def stop(self) -> None:
        """Fall silent at once, dropping what was still to play."""


class SoundDeviceSpeaker:
    """Plays chunks on an output device (the system default unless named) through one stream that PortAudio pulls
    from in its callback thread, so chunks play back to back however they arrive."""

    def __init__(self, device: int | str | None = None) -> None:
        self.device = device
        self._stream = None
        self._sample_rate = 0
        self._queued: collections.deque[np.ndarray] = collections.deque()
        self._lock = threading.Lock()
        self._played = threading.Event()  # set while nothing is queued
        self._played.set()

    def play(self, samples: np.ndarray, sample_rate: int) -> None:
        """Queue the chunk, opening the device at its rate (a new rate reopens it)."""
        if self._stream is None or sample_rate != self._sample_rate:
            self._open(sample_rate)
        with self._lock:
            self._queued.append(np.asarray(samples, dtype=np.float32))
            self._played.clear()

    def wait(self) -> None:
        """Wait in short waits, so a Ctrl-C is raised at once."""
        while not self._played.wait(WAIT_POLL_S):
            pass

    def stop(self) -> None:
        """Drop what is queued: the device plays silence from its next block on."""
        with self._lock:
            self._queued.clear()
            self._played.set()

    def close(self) -> None:
        """Release the device."""
        self.stop()
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _open(self, sample_rate: int) -> None:
        sd = _sounddevice()
        self.close()
        try:
            self._stream = sd.OutputStream(device=self.device, samplerate=sample_rate, channels=1, dtype="float32",
                                           callback=self._fill)
            self._stream.start()
        except (sd.PortAudioError, ValueError) as e:
            self._stream = None
            raise ClipError(f"No speakers could be opened ({e}). Turn the voice off with /voice off.") from e
        self._sample_rate = sample_rate

    def _fill(self, outdata: np.ndarray, n_frames: int, time, status) -> None:
        """PortAudio callback: the next n_frames queued samples, silence where there are none."""
        filled = 0
        with self._lock:
            while filled < n_frames and self._queued:
                chunk = self._queued[0]
                n = min(n_frames - filled, len(chunk))
                outdata[filled:filled + n, 0] = chunk[:n]
                filled += n
                if n == len(chunk):
                    self._queued.popleft()
                else:
                    self._queued[0] = chunk[n:]
            if not self._queued:
                self._played.set()
        outdata[filled:, 0] = 0


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
