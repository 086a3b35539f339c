"""Ingestion: wall time and peak memory to turn a 30 s, 5 min and 10 min file into a Clip.

Each case runs in a fresh subprocess so one case's memory high-water mark never hides another's.
Run: .venv/bin/python -m bench.ingest [--quick]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench.common import MB, ffmpeg, print_table
from chat.clip import Clip

DURATIONS_S = (30, 300, 600)
QUICK_DURATIONS_S = (30,)
FORMATS = ("wav", "mp3")
ROOT = Path(__file__).resolve().parent.parent  # the child runs `-m bench.ingest` from here
SOURCE_RATE = 44100  # a typical upload: 44.1 kHz stereo, so decoding also downmixes and resamples
SOURCE_CHANNELS = 2
REPEATS = 3
TONE_HZ = 440


def make_file(folder: Path, duration_s: int, fmt: str) -> Path:
    """A synthetic tone with a little noise (so mp3 has something to encode), written by ffmpeg."""
    path = folder / f"signal-{duration_s}s.{fmt}"
    signal = (
        f"sine=frequency={TONE_HZ}:duration={duration_s}:sample_rate={SOURCE_RATE},"
        f"volume=2[t];anoisesrc=duration={duration_s}:sample_rate={SOURCE_RATE}:amplitude=0.02[n];[t][n]amix"
    )
    ffmpeg("-filter_complex", signal, "-ac", str(SOURCE_CHANNELS), str(path))
    return path


def measure(path: Path, repeats: int) -> dict:
    """Run in the child: RSS growth of the first decode, then heap peak and median time over repeats."""
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clip = Clip.from_file(path)
    rss_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ffmpeg_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest ffmpeg child
    times_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        Clip.from_file(path)
        times_s.append(time.perf_counter() - start)
    del clip
    tracemalloc.start()
    clip = Clip.from_file(path)
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "duration_s": clip.duration_s,
        "samples_mb": clip.samples.nbytes / MB,
        "time_s": statistics.median(times_s),
        "heap_peak_mb": heap_peak / MB,
        "rss_delta_mb": (rss_peak_kb - rss_before_kb) / 1024,
        "ffmpeg_rss_mb": ffmpeg_rss_kb / 1024,
    }


def run_case(path: Path, repeats: int) -> dict:
    """Measure one file in a fresh interpreter."""
    command = [sys.executable, "-m", "bench.ingest", "--measure", str(path), "--repeats", str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 30 s clip, one repeat")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child process's entry
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed decodes per case (median)")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.repeats)))
        return
    durations, repeats = (QUICK_DURATIONS_S, 1) if args.quick else (DURATIONS_S, args.repeats)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for duration_s in durations:
            for fmt in FORMATS:
                path = make_file(Path(folder), duration_s, fmt)
                r = run_case(path, repeats)
                rows.append([
                    f"{duration_s} s", fmt, f"{path.stat().st_size / MB:.1f}", f"{r['time_s']:.3f}",
                    f"{r['duration_s'] / r['time_s']:.0f}x", f"{r['samples_mb']:.1f}", f"{r['heap_peak_mb']:.1f}",
                    f"{r['heap_peak_mb'] / r['samples_mb']:.1f}", f"{r['rss_delta_mb']:.1f}",
                    f"{r['ffmpeg_rss_mb']:.1f}",
                ])
    print_table(
        f"Clip.from_file: {SOURCE_RATE} Hz {SOURCE_CHANNELS}-channel files, median of {repeats} decodes",
        ["clip", "format", "file MB", "time s", "realtime", "clip MB", "heap peak MB", "peak/clip",
         "RSS delta MB", "ffmpeg RSS MB"],
        rows,
    )


if __name__ == "__main__":
    main()
