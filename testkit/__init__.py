"""What the tests and the benchmarks share and the app never imports: test doubles, tiny checkpoints of each family
(tiny/), and the original implementations' parity runs with their inputs and outputs (parity/, data/)."""

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
