"""What the tiny-checkpoint builders share: a seed, byte-level vocabularies, seeded random weights."""

from __future__ import annotations

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

SEED = 0
SAMPLING_RATE = 16000
PRINTABLE_ASCII = range(0x20, 0x7F)


def byte_vocab(extra: list[str]) -> dict[str, int]:
    """Byte-level BPE vocabulary: id == byte value, then ``extra`` from 256."""
    symbols = bytes_to_unicode()
    vocab = {symbols[b]: b for b in range(256)}
    vocab.update({token: 256 + i for i, token in enumerate(extra)})
    return vocab


def space_merges() -> list[tuple[str, str]]:
    """BPE merges for " x" (space + printable ASCII char), like real word-initial tokens.

    With them about half of the tokens a random model samples start with a space, so
    its text has words and ``TextIteratorStreamer`` yields several chunks. (Greedy
    output of a random model soon loops, often on a run without spaces.)
    """
    symbols = bytes_to_unicode()
    return [(symbols[0x20], symbols[c]) for c in range(0x21, 0x7F)]


def suppress_all_but(allowed: set[int], vocab_size: int) -> list[int]:
    """Ids to pass as ``suppress_tokens`` so that only ``allowed`` ids can be generated."""
    return [i for i in range(vocab_size) if i not in allowed]


class Weights:
    """Random tensors from one seeded generator; the order of calls fixes every value.

    spread: wide enough that greedy choices are far apart (parity tests); otherwise std 0.02, which keeps a
    deep model's activations finite.
    """

    def __init__(self, seed: int = SEED, spread: bool = True) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.spread = spread

    def normal(self, *shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * (std if self.spread else 0.02)

    def norm(self, n: int) -> dict[str, torch.Tensor]:
        return {"weight": 1.0 + self.normal(n, std=0.1), "bias": self.normal(n, std=0.1)}

    def linear(self, n_out: int, n_in: int, std: float = 0.15, bias: bool = True) -> dict[str, torch.Tensor]:
        return {"weight": self.normal(n_out, n_in, std=std)} | ({"bias": self.normal(n_out, std=0.1)} if bias else {})

    def fill(self, module: torch.nn.Module, std: float = 0.15) -> None:
        """Every parameter of a transformers model, in name order: norms about 1, the rest spread."""
        with torch.no_grad():
            for name, tensor in sorted(module.state_dict().items()):
                if not tensor.is_floating_point():
                    continue
                if "norm" in name.lower() and name.endswith("weight"):
                    tensor.copy_(1.0 + self.normal(*tensor.shape, std=0.1))
                elif "encoder.embed_positions" not in name:  # Whisper's encoder sinusoids stay as they are
                    tensor.copy_(self.normal(*tensor.shape, std=std))
