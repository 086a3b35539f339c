"""A recorder for tests: prepared takes instead of a microphone (app.recorder.Recorder)."""

import numpy as np

from app.recorder import NO_MIC_HINT
from chat.errors import ClipError


class ArrayRecorder:
    """A recorder for tests: each stop() returns the next prepared take; an Exception take is raised instead.

    With no takes left, start() fails like a machine without a microphone.
    """

    def __init__(self, takes: list[tuple[np.ndarray, int] | Exception]) -> None:
        self.takes = list(takes)
        self.recording = False

    def start(self) -> None:
        """Begin a take; raises ClipError once the takes run out."""
        if not self.takes:
            raise ClipError(f"No microphone could be opened (no input device). {NO_MIC_HINT}")
        self.recording = True

    def stop(self) -> tuple[np.ndarray, int]:
        """Return (or raise) the next take."""
        if not self.recording:
            raise RuntimeError("stop() called without a successful start()")
        self.recording = False
        take = self.takes.pop(0)
        if isinstance(take, Exception):
            raise take
        return take
