"""What every benchmark shares: the machine it ran on, percentiles, ffmpeg, and a plain-text table."""

import datetime
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np

MB = 1024 * 1024


def machine() -> str:
    """One line naming the date, the CPU count and model, RAM, and the Python and torch versions."""
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return (
        f"{datetime.date.today()}: nproc {os.cpu_count()}, CPU {_cpu_model()}, RAM {ram_gib:.1f} GiB, "
        f"Python {platform.python_version()}, torch {version('torch')}"
    )


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly, raising if it fails."""
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between samples."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows as left-aligned text columns under a title and the machine line."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"{title}\n{machine()}\n")
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print()
