"""Regenerate the example clips shown on the page: `python assets/make_assets.py` (needs espeak-ng and ffmpeg).

Everything is synthesized here, so the clips carry no one else's rights and stay small (< 100 KB each):
question.wav (espeak-ng speech), knock.wav (a door knock), tune.ogg (a short melody).
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chat.audio import SAMPLE_RATE, decode_file  # noqa: E402

FOLDER = Path(__file__).resolve().parent
QUESTION = "Which animal is known as the king of the jungle?"
KNOCK_TIMES_S = (0.3, 0.55, 0.8, 1.45, 1.7)  # shave and a haircut: two groups of knocks
KNOCK_HZ = 110.0  # the door panel's low thump
MELODY = ["C4", "C4", "G4", "G4", "A4", "A4", "G4", None, "F4", "F4", "E4", "E4", "D4", "D4", "C4"]  # Twinkle, Twinkle
NOTE_S = 0.3
SEMITONES = {"C": -9, "D": -7, "E": -5, "F": -4, "G": -2, "A": 0, "B": 2}  # from A of the same octave
A4_HZ = 440.0


def question() -> np.ndarray:
    """A spoken question from espeak-ng, at 16 kHz."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "question.wav"
        subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), QUESTION], check=True)
        return decode_file(path)


def knock() -> np.ndarray:
    """Knuckles on a wooden door: short noise bursts shaped by a low, fast-decaying resonance."""
    rng = np.random.default_rng(0)
    samples = np.zeros(int(2.2 * SAMPLE_RATE), dtype=np.float32)
    t = np.arange(int(0.25 * SAMPLE_RATE)) / SAMPLE_RATE
    for start_s in KNOCK_TIMES_S:
        body = np.sin(2 * np.pi * KNOCK_HZ * t) * np.exp(-t / 0.03)  # the panel rings for ~30 ms
        click = rng.normal(0, 1, len(t)) * np.exp(-t / 0.004)  # the knuckle's hit
        start = int(start_s * SAMPLE_RATE)
        samples[start : start + len(t)] += (0.7 * body + 0.25 * click).astype(np.float32)
    return (0.8 * samples / np.max(np.abs(samples))).astype(np.float32)


def tune() -> np.ndarray:
    """The first line of Twinkle, Twinkle, Little Star on a plucked-string-like tone."""
    t = np.arange(int(NOTE_S * SAMPLE_RATE)) / SAMPLE_RATE
    notes = []
    for note in MELODY:
        if note is None:
            notes.append(np.zeros_like(t))
            continue
        hz = A4_HZ * 2 ** ((SEMITONES[note[0]] + 12 * (int(note[1]) - 4)) / 12)
        tone = sum(np.sin(2 * np.pi * hz * k * t) / k**1.5 for k in range(1, 5))  # a few overtones
        notes.append(tone * np.exp(-t / 0.15) * np.minimum(1, t / 0.005))  # pluck: fast attack, decay
    samples = np.concatenate(notes)
    return (0.7 * samples / np.max(np.abs(samples))).astype(np.float32)


def main() -> None:
    soundfile.write(FOLDER / "question.wav", question(), SAMPLE_RATE, subtype="PCM_16")
    soundfile.write(FOLDER / "knock.wav", knock(), SAMPLE_RATE, subtype="PCM_16")
    soundfile.write(FOLDER / "tune.ogg", tune(), SAMPLE_RATE, format="OGG", subtype="VORBIS")
    for path in sorted(FOLDER.glob("*.wav")) + sorted(FOLDER.glob("*.ogg")):
        print(f"{path.name}: {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
