"""A backend that replays fixed chunks at a fixed rate: for UI plumbing tests, demos and benchmarks."""

import threading
from collections.abc import Iterator

from chat.backend import Backend, Stats
from chat.families import DEFAULT_FAMILY, Family
from chat.prompts import Prompt
from chat.settings import GenerationSettings


class ScriptedBackend(Backend):
    """Replies with the next enqueued list of chunks, one every `interval_s`."""

    def __init__(self, interval_s: float = 0.0, family: Family = DEFAULT_FAMILY) -> None:
        self.interval_s, self.family = interval_s, family
        self.name = "scripted"
        self.replies: list[list[str]] = []
        self.prompts: list[Prompt] = []

    def enqueue(self, chunks: list[str]) -> None:
        """Queue the chunks of one future reply."""
        self.replies.append(list(chunks))

    def execute(
        self, prompt: Prompt, settings: GenerationSettings, stats: Stats, cancel: threading.Event,
        voice: str | None = None,  # never one: it has no voices of its own
    ) -> Iterator[str]:
        """Yield the next queued reply chunk by chunk; an empty queue replies with a fixed sentence."""
        self.prompts.append(prompt)
        chunks = self.replies.pop(0) if self.replies else ["This ", "is ", "a ", "scripted ", "reply."]
        for chunk in chunks:
            if cancel.wait(self.interval_s):
                return
            stats.n_tokens += 1
            yield chunk
