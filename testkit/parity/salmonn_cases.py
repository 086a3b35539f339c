"""The clips and questions of the SALMONN parity run, shared by the original's run and the tests (numpy only)."""

import numpy as np

SAMPLE_RATE = 16000
N_NEW_TOKENS = 12
N_SAMPLED_FRAMES = 16  # frames compared per stage: spread evenly over its length
CASES = {  # name: (kind, seconds, seed, question); lengths are not multiples of a frame on purpose
    "short": ("chirp", 2.50313, 1, "Describe the sound."),
    "25_s": ("bursts", 25.0071, 2, "What is said in the audio?"),
    "under_1_s": ("noise", 0.61237, 3, ""),  # padded to 1 s; an empty question, as a spoken one is sent
}


def clip(kind: str, seconds: float, seed: int) -> np.ndarray:
    """Deterministic test audio as int16: a chirp, a tone burst pattern, or noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    if kind == "chirp":
        signal = np.sin(2 * np.pi * (200 + 300 * t) * t)
    elif kind == "bursts":
        signal = np.sin(2 * np.pi * 660 * t) * (np.sin(2 * np.pi * 2 * t) > 0) + 0.1 * rng.uniform(-1, 1, len(t))
    else:
        signal = rng.uniform(-1, 1, len(t))
    return np.round(0.4 * signal * 32767).astype(np.int16)


def sampled_frames(n_frames: int) -> list:
    """The indices of the frames compared in a stage of n_frames."""
    return [int(i) for i in np.linspace(0, n_frames - 1, N_SAMPLED_FRAMES).round()]
