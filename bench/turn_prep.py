"""Turn preparation against history length: from "user pressed send" to the model's first forward pass.

Each turn sends one new 10 s clip file. Two ways to get the model's inputs, timed side by side in one run:
  ours      decode only the new file into a Clip, render the prompt, LocalBackend.prepare (features
            cached per clip, so only the new clip's mel features are computed)
  official  what the official Qwen2-Audio demo does every turn: decode every clip file of the history
            from disk again (same decoder) and run the processor on all of them
The model is the tiny random Qwen2-Audio with the real 30 s window, so the feature extractor does the
same work as the real one. Both produce identical inputs, which the script checks.
Run: .venv/bin/python -m bench.turn_prep [--quick]
"""

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import ffmpeg, print_table  # noqa: E402
from chat.audio import SAMPLE_RATE, decode_file  # noqa: E402
from chat.backend import Response  # noqa: E402
from chat.clip import Clip  # noqa: E402
from chat.conversation import Conversation  # noqa: E402
from chat.local import LocalBackend  # noqa: E402
from chat.settings import GenerationSettings  # noqa: E402
from testkit.tiny.qwen2_audio import build_tiny_qwen2_audio  # noqa: E402

CLIP_S = 10
HISTORY_CLIPS = (1, 5, 10, 20)
QUICK_HISTORY_CLIPS = (1, 2)
REPEATS = 7
SOURCE_RATE = 44100  # files as a browser upload would bring them
QUESTION = "What is said in this audio?"
REPLY = "The speaker talks about the weather for about ten seconds."
TARGET_RATIO = 1.5


def make_clip_file(folder: Path, index: int) -> Path:
    """A 10 s tone whose pitch depends on index, so every clip has its own content id."""
    path = folder / f"clip-{index:03d}.wav"
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency={200 + 10 * index}:duration={CLIP_S}:sample_rate={SOURCE_RATE}",
           str(path))
    return path


def ours(backend: LocalBackend, conversation: Conversation, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The product's send path: decode the new file, add the turn, render, prepare inputs; with each step's seconds."""
    steps, start = {}, time.perf_counter()
    conversation.add_user(QUESTION, [Clip.from_file(path)])
    steps["decode"], start = time.perf_counter() - start, time.perf_counter()
    response = Response(backend, conversation, GenerationSettings())
    steps["render"], start = time.perf_counter() - start, time.perf_counter()
    inputs = backend.prepare(response.prompt)
    steps["prepare"] = time.perf_counter() - start
    return inputs, steps


def official(backend: LocalBackend, paths: list[Path]) -> dict[str, torch.Tensor]:
    """The official demo's turn: every clip decoded again and every clip through the processor."""
    messages = []
    for path in paths:
        messages.append({"role": "user", "content": [{"type": "audio", "audio_url": str(path)},
                                                     {"type": "text", "text": QUESTION}]})
        messages.append({"role": "assistant", "content": REPLY})
    messages.pop()  # the last user turn is waiting for its reply
    processor = backend.loaded.processor
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    audio = [decode_file(path) for path in paths]
    return processor(text=text, audio=audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True)


def history(backend: LocalBackend, paths: list[Path]) -> Conversation:
    """A conversation of finished turns, one clip each, built the product's way (so features are cached)."""
    conversation = Conversation()
    for path in paths:
        ours(backend, conversation, path)
        conversation.add_assistant(REPLY)
    return conversation


def check_same_inputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Both routes must give the model the same tokens and the same audio features."""
    assert torch.equal(a["input_ids"], b["input_ids"]), "token ids differ between the two routes"
    assert torch.allclose(a["input_features"], b["input_features"], atol=1e-5), "audio features differ"


def cpu_s() -> float:
    """CPU seconds used so far by this process and its finished children (the ffmpeg decoders)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(function, *args) -> tuple[object, float, float]:
    """function(*args) with its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), cpu_s()
    result = function(*args)
    return result, time.perf_counter() - wall, cpu_s() - cpu


def measure(backend: LocalBackend, files: list[Path], points: tuple[int, ...], repeats: int) -> dict[int, dict]:
    """Per point, wall and CPU seconds of each route over `repeats` turns.

    Points are visited round-robin within each repeat, so a burst of load on a shared machine
    hits every point alike and the ratios between them stay meaningful.
    """
    history_files, new_files = files[: max(points) - 1], iter(files[max(points) - 1:])
    conversations = {n: history(backend, history_files[: n - 1]) for n in points}
    times = {n: {key: [] for key in ("ours", "ours cpu", "decode", "render", "prepare", "official")} for n in points}
    for _ in range(repeats):
        for n in points:
            new = next(new_files)  # never seen before, so its features are not cached yet
            (inputs, steps), wall, cpu = timed(ours, backend, conversations[n], new)
            times[n]["ours"].append(wall), times[n]["ours cpu"].append(cpu)
            for step, seconds in steps.items():
                times[n][step].append(seconds)
            expected, wall, _ = timed(official, backend, history_files[: n - 1] + [new])
            times[n]["official"].append(wall)
            check_same_inputs(inputs, expected)
            conversations[n].undo()
    return {n: {route: statistics.median(values) for route, values in t.items()} for n, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="conversations of 1 and 2 clips, one repeat")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="turns timed per point (median)")
    args = parser.parse_args(argv)
    points, repeats = (QUICK_HISTORY_CLIPS, 1) if args.quick else (HISTORY_CLIPS, args.repeats)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        backend = LocalBackend(str(build_tiny_qwen2_audio(folder / "model")), quantization="none", cpu_only=True)
        files = [make_clip_file(folder, i) for i in range(max(points) + repeats * len(points))]
        ours(backend, Conversation(), files.pop())  # warm-up: first calls pay for lazy imports and allocations
        timings = measure(backend, files, points, repeats)
    first, last = timings[points[0]], timings[points[-1]]
    rows = [
        [n, f"{t['ours'] * 1000:.0f}", *(f"{t[step] * 1000:.0f}" for step in ("decode", "render", "prepare")),
         f"{t['official'] * 1000:.0f}", f"{t['official'] / t['ours']:.1f}x", f"{t['ours'] / first['ours']:.2f}",
         f"{t['official'] / first['official']:.2f}", f"{t['ours cpu'] * 1000:.0f}",
         f"{t['ours cpu'] / first['ours cpu']:.2f}"]
        for n, t in timings.items()
    ]
    print_table(
        f"Turn preparation, {CLIP_S} s clips, one per turn: median of {repeats} turns per point, "
        "points interleaved (inputs of both routes checked identical)",
        ["clips", "ours ms", "decode", "render", "prepare", "official ms", "official/ours", f"ours vs {points[0]}",
         f"official vs {points[0]}", "ours CPU ms", f"ours CPU vs {points[0]}"],
        rows,
    )
    for label, key in (("wall", "ours"), ("CPU", "ours cpu")):
        ratio = last[key] / first[key]
        verdict = "met" if ratio <= TARGET_RATIO else "missed"
        print(f"ours, {label} time of a turn with {points[-1]} clips / with {points[0]}: {ratio:.2f}x "
              f"(target <= {TARGET_RATIO}x: {verdict})")


if __name__ == "__main__":
    main()
