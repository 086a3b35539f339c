"""The conversations of the Qwen-Audio-Chat parity run, shared by the original's run and the tests (numpy only)."""

import numpy as np

SAMPLE_RATE = 16000
SYSTEM = "You are a helpful assistant."
REPLY_1 = "It is a rising tone."  # the first turn's reply in the two-turn case's history


def clip(kind: str, seconds: float, seed: int) -> np.ndarray:
    """Deterministic test audio as int16: a chirp, a tone burst pattern, or noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    if kind == "chirp":
        signal = np.sin(2 * np.pi * (200 + 300 * t) * t)
    elif kind == "bursts":
        signal = np.sin(2 * np.pi * 660 * t) * (np.sin(2 * np.pi * 2 * t) > 0)
    else:
        signal = rng.uniform(-1, 1, len(t))
    return np.round(0.4 * signal * 32767).astype(np.int16)


CLIPS = {  # name: (kind, seconds, seed); the lengths are not multiples of a mel frame on purpose
    "chirp.wav": ("chirp", 3.01234, 1),
    "bursts.wav": ("bursts", 7.5031, 2),
    "long1.wav": ("chirp", 30.0, 3),
    "long2.wav": ("noise", 30.0, 4),
    "long3.wav": ("bursts", 30.0, 5),
}
CASES = {  # name: (history [(query, reply)], query), queries in the web demo's format, clips numbered across turns
    "one_clip": ([], [("chirp.wav", 1)], "What do you hear?"),
    "two_turns": ([([("chirp.wav", 1)], "What is this?", REPLY_1)], [("bursts.wav", 2)], "And how does Audio 2 differ?"),
    "past_2048": ([], [("long1.wav", 1), ("long2.wav", 2), ("long3.wav", 3)], "Compare the three clips."),
}
