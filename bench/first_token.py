"""Time to first token of a follow-up turn: starting from the last reply's attention cache, or from scratch.

Each conversation holds N earlier turns with a 10-s clip each (the model really answered each of
them), then a new 10-s clip and a question. "cached" is the product's normal case: the previous
reply of the same conversation was the last thing the model did, so only the new turn is encoded
and prefilled. "from scratch" is the same turn right after another conversation's reply, which
leaves nothing reusable (what every turn costs without the cache, as in the official demo).
Both are measured alternately on one backend, with greedy decoding, on the tiny Qwen2-Audio with
the real 30-s audio window (so the audio encoder does the real number of frames per clip).

    .venv/bin/python -m bench.first_token [--quick]
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from bench.common import print_table
from chat.audio import SAMPLE_RATE
from chat.backend import Response
from chat.clip import Clip
from chat.conversation import Conversation
from chat.local import LocalBackend
from chat.settings import GenerationSettings
from testkit.tiny.qwen2_audio import build_tiny_qwen2_audio

CLIP_S = 10
HISTORY_CLIPS = (1, 5, 10)  # ten 10-s clips are 2,500 audio tokens: the context holds about thirty
QUICK_HISTORY_CLIPS = (1, 2)
REPEATS = 5
GREEDY = GenerationSettings(temperature=0, max_new_tokens=4)


def clip(index: int) -> Clip:
    """A distinct 10-s clip per index (a chord of two tones and a little noise)."""
    t = np.arange(CLIP_S * SAMPLE_RATE) / SAMPLE_RATE
    rng = np.random.default_rng(index)
    samples = 0.3 * np.sin(2 * np.pi * (200 + 10 * index) * t) + 0.2 * np.sin(2 * np.pi * 550 * t)
    return Clip.from_array((samples + 0.01 * rng.standard_normal(len(t))).astype(np.float32), SAMPLE_RATE)


def reply(backend: LocalBackend, conversation: Conversation) -> Response:
    """Let the model answer the open turn; returns the finished response."""
    response = Response(backend, conversation, GREEDY)
    "".join(response)
    return response


def conversation_with(backend: LocalBackend, n_clips: int, first_index: int) -> Conversation:
    """n_clips answered turns, each with its own clip."""
    conversation = Conversation()
    for k in range(n_clips):
        conversation.add_user("What is this?", [clip(first_index + k)])
        reply(backend, conversation)
    return conversation


def follow_up(backend: LocalBackend, conversation: Conversation, index: int) -> Response:
    """A new clip and question, answered, then undone so the conversation is as it was."""
    conversation.add_user("And this one?", [clip(index)])
    response = reply(backend, conversation)
    conversation.undo()
    return response


def measure(backend: LocalBackend, points: tuple[int, ...], repeats: int) -> list[list[str]]:
    """One row per history length: median time to first token cached and from scratch, and tokens reused."""
    rows, other = [], conversation_with(backend, 1, 10_000)
    for n in points:
        conversation = conversation_with(backend, n, 100 * n)
        cached, scratch, reused = [], [], []
        for repeat in range(repeats):
            response = follow_up(backend, conversation, 100 * n + 50 + repeat)  # its own reply was the last
            cached.append(response.stats.time_to_first_token_s)
            reused.append(response.stats.n_reused_prompt_tokens / response.stats.n_prompt_tokens)
            follow_up(backend, other, 20_000 + repeat)  # another session's turn in between
            scratch.append(follow_up(backend, conversation, 100 * n + 80 + repeat).stats.time_to_first_token_s)
        c, s = statistics.median(cached) * 1000, statistics.median(scratch) * 1000
        rows.append([n, f"{c:.0f}", f"{s:.0f}", f"{s / c:.1f}x", f"{statistics.median(reused):.0%}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small points, two repeats")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        backend = LocalBackend(str(build_tiny_qwen2_audio(Path(folder) / "tiny")), quantization="none")
        points, repeats = (QUICK_HISTORY_CLIPS, 2) if args.quick else (HISTORY_CLIPS, REPEATS)
        rows = measure(backend, points, repeats)
    print_table(
        f"Time to first token of a follow-up turn with a new {CLIP_S}-s clip: median of {repeats}",
        ["earlier clips", "cached ms", "from scratch ms", "scratch/cached", "prompt tokens reused"],
        rows,
    )


if __name__ == "__main__":
    main()
