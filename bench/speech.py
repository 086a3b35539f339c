"""Spoken replies: how soon after "send" the first audio comes, and how fast the rest of it is made, per voice.

Each route answers a question about a short clip through LocalBackend and a Turn with a Voice, as the app speaks a
reply, and stamps every SpeechChunk as the Turn yields it:
  qwen2.5-omni  the tiny Qwen2.5-Omni's own talker: talker codes, token2wav's DiT and BigVGAN in chunks
  qwen3-omni    the tiny Qwen3-Omni's own talker: MoE talker, code predictor, code2wav in chunks
  kokoro        the tiny Qwen2-Audio's reply read aloud by Kokoro (chat.tts.KokoroSpeech), sentence by sentence;
                a tiny Kokoro, or its real 82 M-parameter shape with --real-shape-kokoro (random weights either
                way), with a tiny random spaCy tagger
The replies are sampled (the product's default settings, a fixed seed per run) so the text has spaces and
sentences; random talkers never say their end code, so each Omni talker is cut at TALKER_AUDIO_S of speech.
The talkers and Kokoro are loaded, and one reply is spoken (but with --quick), before anything is timed.
Per route, the median of --runs replies:
  first token ms   send to the first text token (Stats.time_to_first_token_s)
  first audio ms   send to the first audio chunk (Stats.time_to_first_audio_s)
  after token ms   first audio - first token: what speaking adds before anything is heard
  audio s          seconds of audio in the reply
  RTF rest         seconds from the first chunk to the last / seconds of audio after the first chunk: the compute
                   per second of audio once it plays; under 1 keeps ahead of playback
  first/all        first audio as a share of the time until the reply's last audio: the wait that streaming
                   leaves of the wait for the whole reply's audio (1.0: nothing is heard early)
With tiny models on the CPU the absolute times measure the app's plumbing, not a real model's speed; the ratios
(first/all, and whether RTF stays under 1) are what carries over.
Run: .venv/bin/python -m bench.speech [--runs N] [--quick] [--real-shape-kokoro] [--routes kokoro,...]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import print_table
from chat.audio import SAMPLE_RATE
from chat.clip import Clip
from chat.conversation import Conversation
from chat.local import LocalBackend
from chat.settings import GenerationSettings
from chat.speech import SpeechChunk, Voice
from chat.tts import KokoroSpeech
from chat.turn import Turn
from testkit.tiny import kokoro
from testkit.tiny.qwen2_5_omni import build_tiny_qwen2_5_omni
from testkit.tiny.qwen2_audio import build_tiny_qwen2_audio
from testkit.tiny.qwen3_omni import build_tiny_qwen3_omni

ROUTES = ("qwen2.5-omni", "qwen3-omni", "kokoro")
RUNS = 3
QUICK_RUNS = 1
CLIP_S = 2.0  # the question's clip: the prompt's audio tokens, which each talker reads too
QUESTION = "What do you hear? Describe it."
TALKER_REPLY_TOKENS = 48  # of the thinker's reply, each spoken by the talker
READ_REPLY_TOKENS = 128  # of the reply read aloud: long enough for Kokoro to cut it (a clause or 200 letters)
QUICK_REPLY_TOKENS = 16
TALKER_AUDIO_S = 4.0  # each Omni talker's speech, cut there (random talkers never end)
QUICK_TALKER_AUDIO_S = 1.0  # still past each talker's first chunk (0.72 s and 0.30 s of speech)
CODES_PER_S = {"qwen2.5-omni": 50.0, "qwen3-omni": 12.5}  # talker codes a second of speech
SEED = 0  # of the first timed run's sampling; run k uses SEED + k


@dataclass(frozen=True)
class Spoken:
    """One spoken reply's timing."""

    first_token_s: float
    first_audio_s: float
    audio_s: float
    rest_rtf: float | None  # None when all the audio came in one chunk
    first_share: float  # first audio / last audio, both from send


def question() -> Conversation:
    """A fresh conversation with the clip and the question (no attention cache to reuse)."""
    t = np.arange(int(CLIP_S * SAMPLE_RATE)) / SAMPLE_RATE
    conversation = Conversation()
    samples = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    conversation.add_user(QUESTION, [Clip.from_array(samples, SAMPLE_RATE, name="tone.wav")])
    return conversation


def speak(backend: LocalBackend, voice: Voice, n_tokens: int, seed: int) -> Spoken:
    """Answer the question aloud, stamping each chunk as the Turn yields it; exactly n_tokens of text."""
    backend.model.generation_config.min_new_tokens = n_tokens  # a random model's end must not come early
    turn = Turn(backend, question(), GenerationSettings(max_new_tokens=n_tokens, seed=seed), voice=voice)
    arrivals: list[tuple[float, SpeechChunk]] = []
    for event in turn:
        if isinstance(event, SpeechChunk):
            arrivals.append((time.monotonic(), event))
    stats = turn.response.stats
    if not arrivals or stats.time_to_first_audio_s is None or stats.time_to_first_token_s is None:
        raise RuntimeError(f"{voice.name}: the reply made no audio")
    seconds = [len(chunk.samples) / chunk.sample_rate for _, chunk in arrivals]
    rest_s, rest_wall_s = sum(seconds[1:]), arrivals[-1][0] - arrivals[0][0]
    last_s = arrivals[-1][0] - stats.started_at
    return Spoken(stats.time_to_first_token_s, stats.time_to_first_audio_s, sum(seconds),
                  rest_wall_s / rest_s if rest_s > 0 else None, stats.time_to_first_audio_s / last_s)


def omni_voice(backend: LocalBackend, route: str, audio_s: float) -> Voice:
    """The backend's default voice, its talker loaded now and cut at audio_s of speech."""
    talker = backend.talker()
    n_codes = int(audio_s * CODES_PER_S[route])
    if route == "qwen2.5-omni":
        talker.max_new_codes = n_codes
    else:
        talker.max_new_tokens = n_codes + 1  # its count includes the end it never reaches
    return Voice(backend.voices[0])


def kokoro_voice(folder: Path, real_shape: bool) -> Voice:
    """Kokoro (tiny, or at the real shape) with the tiny tagger, in its default voice."""
    config = kokoro.REAL_CONFIG if real_shape else kokoro.TINY_CONFIG
    reader = KokoroSpeech(str(kokoro.build_kokoro(folder / "kokoro", config)),
                          tagger=str(kokoro.build_english_tagger(folder / "tagger")))
    return Voice(reader.voices[0], reader)


def route_setup(route: str, folder: Path, quick: bool, real_shape_kokoro: bool
                ) -> tuple[LocalBackend, Voice, int, str]:
    """The route's backend, voice, reply length and a label naming its models."""
    if route == "kokoro":
        backend = LocalBackend(str(build_tiny_qwen2_audio(folder / "qwen2-audio")), quantization="none",
                               cpu_only=True)
        shape = "real-shape" if real_shape_kokoro else "tiny"
        return (backend, kokoro_voice(folder, real_shape_kokoro), QUICK_REPLY_TOKENS if quick else READ_REPLY_TOKENS,
                f"Qwen2-Audio + {shape} Kokoro")
    builders: dict[str, Callable[[Path], Path]] = {"qwen2.5-omni": build_tiny_qwen2_5_omni,
                                                   "qwen3-omni": build_tiny_qwen3_omni}
    backend = LocalBackend(str(builders[route](folder / route)), quantization="none", cpu_only=True)
    voice = omni_voice(backend, route, QUICK_TALKER_AUDIO_S if quick else TALKER_AUDIO_S)
    return backend, voice, QUICK_REPLY_TOKENS if quick else TALKER_REPLY_TOKENS, f"{backend.family.title} talker"


def measure(route: str, folder: Path, runs: int, quick: bool, real_shape_kokoro: bool) -> list[str]:
    """One table row: a warm-up reply (not with --quick), then the median of `runs` timed ones."""
    backend, voice, n_tokens, label = route_setup(route, folder, quick, real_shape_kokoro)
    try:
        if not quick:
            speak(backend, voice, n_tokens, seed=SEED + 1000)  # first calls: lazy set-up, kernels, G2P lexicons
        spoken = [speak(backend, voice, n_tokens, seed=SEED + k) for k in range(runs)]
    finally:
        backend.close()

    def median(values: list[float]) -> float:
        return statistics.median(values)

    rtfs = [s.rest_rtf for s in spoken if s.rest_rtf is not None]
    first_token, first_audio = median([s.first_token_s for s in spoken]), median([s.first_audio_s for s in spoken])
    return [route, label, voice.name, n_tokens, f"{first_token * 1000:.0f}", f"{first_audio * 1000:.0f}",
            f"{median([s.first_audio_s - s.first_token_s for s in spoken]) * 1000:.0f}",
            f"{median([s.audio_s for s in spoken]):.2f}", f"{median(rtfs):.2f}" if rtfs else "-",
            f"{median([s.first_share for s in spoken]):.2f}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=RUNS, help=f"timed replies per route (default {RUNS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_REPLY_TOKENS}-token replies, {QUICK_TALKER_AUDIO_S} s of talker speech, "
                             f"{QUICK_RUNS} run, no warm-up")
    parser.add_argument("--real-shape-kokoro", action="store_true",
                        help="Kokoro at its real 82 M-parameter shape (random weights) instead of a tiny one")
    parser.add_argument("--routes", default=",".join(ROUTES), help=f"comma-separated subset of {','.join(ROUTES)}")
    args = parser.parse_args(argv)
    routes = args.routes.split(",")
    if unknown := set(routes) - set(ROUTES):
        parser.error(f"unknown routes {', '.join(sorted(unknown))}; choose from {', '.join(ROUTES)}")
    runs = QUICK_RUNS if args.quick else args.runs
    print(f"$ .venv/bin/python -m bench.speech {shlex.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(f"torch threads {torch.get_num_threads()}\n")
    with tempfile.TemporaryDirectory() as scratch:
        rows = [measure(route, Path(scratch), runs, args.quick, args.real_shape_kokoro) for route in routes]
    print_table(
        f"Spoken replies on the CPU, tiny models (random weights): send to first audio and the rest's real-time "
        f"factor, median of {runs}",
        ["route", "models", "voice", "reply tokens", "first token ms", "first audio ms", "after token ms", "audio s",
         "RTF rest", "first/all"],
        rows,
    )


if __name__ == "__main__":
    main()
