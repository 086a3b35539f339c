"""Streaming overhead: how long a chunk takes from the backend making it to a client receiving it.

The real Gradio app (app.web.build_demo) runs in this process on 127.0.0.1 with a scripted backend that
makes one word ready every 50 ms, or every 13 ms (100 tokens/s, the GPU target, at about 1.3 tokens per
streamed word), on a fixed schedule as a model's generate thread does, and stamps each with
time.monotonic(). gradio_client sends a message (/add_message) and streams the reply (/respond), stamping
each chunk as it arrives. Same clock, so the difference is what the app adds, waiting behind a slow update
included: the turn and response wrappers, re-rendering the chat, gradio's queue and server-sent events.
  socket   when the client's reader thread gets the message, as a browser would
  client   when gradio_client hands it over, after its own polling (every 50 ms) on top
  send to first chunk   from the /add_message call to the first chunk at the socket, less the backend's
           own wait for that chunk: the app's cost of starting a reply, HTTP round trip included
Each rate is measured with an empty history and with 20 earlier turns of a 10 s clip each, since every
chunk re-renders the whole conversation.
Run: .venv/bin/python -m bench.streaming [--quick]
"""

import argparse
import os
import re
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client, handle_file  # noqa: E402

from app.web import CSS, THEME, build_demo  # noqa: E402
from bench.common import ffmpeg, percentile, print_table  # noqa: E402
from chat.backend import Stats  # noqa: E402
from chat.prompts import Prompt  # noqa: E402
from testkit.scripted import ScriptedBackend  # noqa: E402
from chat.settings import GenerationSettings  # noqa: E402
from chat.store import Store  # noqa: E402

CHUNK_PERIODS_S = (0.05, 0.013)
N_CHUNKS = 40
N_REPLIES = 3
HISTORY_TURNS = (0, 20)
QUICK = {"n_chunks": 5, "n_replies": 1, "rows": [(0.05, 0)]}
CLIP_S = 10
TARGET_ADDED_S = 0.05
CHUNK = re.compile(r"w\d{3}\b")  # each scripted chunk is a numbered word, so a client can tell which have arrived


class StampedBackend(ScriptedBackend):
    """Scripted chunks on a model's schedule: chunk i is ready at start + (i + 1) * period_s whether or not the
    app has taken the one before, as LocalBackend's generate thread fills its streamer queue; late ones wait."""

    def __init__(self, period_s: float) -> None:
        super().__init__(interval_s=0.0)
        self.period_s = period_s
        self.started_at: list[float] = []
        self.ready_at: list[float] = []

    def execute(self, prompt: Prompt, settings: GenerationSettings, stats: Stats, cancel: threading.Event) -> Iterator[str]:
        """The scripted chunks, each handed over once its time has come, and stamped with that time."""
        start = time.monotonic()
        self.started_at.append(start)
        for index, chunk in enumerate(super().execute(prompt, settings, stats, cancel)):
            ready = start + (index + 1) * self.period_s
            if cancel.wait(max(0.0, ready - time.monotonic())):
                return
            self.ready_at.append(ready)
            yield chunk


class StampedQueue(deque):
    """One event's message queue in gradio_client, noting when each streamed output arrives."""

    def __init__(self, items, arrivals: list[float]) -> None:
        super().__init__(items)
        self.arrivals = arrivals

    def append(self, message) -> None:
        if isinstance(message, dict) and message.get("msg") == "process_generating":
            self.arrivals.append(time.monotonic())
        super().append(message)


class ArrivalLog(dict):
    """Stands in for gradio_client's per-event message queues (Client.pending_messages_per_event).

    Its reader thread appends each server message there as it comes off the socket; the caller's
    thread polls them only every 50 ms (gradio_client.utils.stream_sse_v1plus), which a browser does not.
    Streamed outputs reach the caller in the order they arrived, so the n-th arrival is the n-th output.
    """

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    def __setitem__(self, event_id: str, queue: deque) -> None:
        super().__setitem__(event_id, StampedQueue(queue, self.arrivals))

    def setdefault(self, event_id: str, default: deque | None = None) -> deque:
        if event_id not in self:
            self[event_id] = default if default is not None else deque()
        return self[event_id]


def free_port() -> int:
    """A port nothing listens on (gradio 6 cannot be given port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(client: Client, text: str, files: list[Path] = ()) -> None:
    """Type a message (with attachments) and press send, as the page does."""
    defaults = GenerationSettings()
    client.predict(
        {"text": text, "files": [handle_file(str(f)) for f in files]}, "", defaults.max_new_tokens,
        defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty, None,
        api_name="/add_message",
    )


def reply_text(chat: list[dict]) -> str:
    """The text of the last assistant message of the Chatbot value."""
    last = chat[-1] if chat else {}
    if last.get("role") != "assistant":
        return ""
    return "".join(part.get("text", "") for part in last["content"] if isinstance(part, dict))


def one_reply(client: Client, log: ArrivalLog, backend: StampedBackend, n_chunks: int) -> dict[str, list[float]]:
    """Send a message and stream the reply: each chunk's added seconds at the socket and at the client, and the
    first chunk's, counting the send."""
    backend.enqueue([f"w{i:03d} " for i in range(n_chunks)])
    backend.ready_at.clear()
    sent_at = time.monotonic()
    send(client, "How does it sound?")
    log.arrivals.clear()
    at_socket, at_client = [], []
    for index, output in enumerate(client.submit(api_name="/respond")):
        n_new = len(CHUNK.findall(reply_text(output))) - len(at_socket)
        at_socket += [log.arrivals[index]] * n_new  # chunks that arrived together share a time
        at_client += [time.monotonic()] * n_new
    assert len(at_socket) == n_chunks, f"the client saw {len(at_socket)} of {n_chunks} chunks"
    # the first chunk also carries the send: everything from the click but the backend's own wait
    backend_wait = backend.ready_at[0] - backend.started_at[-1]
    return {
        "socket": [received - ready for received, ready in zip(at_socket, backend.ready_at)],
        "client": [received - ready for received, ready in zip(at_client, backend.ready_at)],
        "first": [at_socket[0] - sent_at - backend_wait],
    }


def add_history(client: Client, backend: StampedBackend, clip_files: list[Path]) -> None:
    """Earlier turns, each a clip and a question with a short reply, streamed without delay."""
    period_s, backend.period_s = backend.period_s, 0.0
    for path in clip_files:
        backend.enqueue(["It is a tone of one pitch."])
        send(client, "What is this?", [path])
        client.submit(api_name="/respond").result()
    backend.period_s = period_s


def measure(url: str, backend: StampedBackend, clip_files: list[Path], n_chunks: int, n_replies: int) -> list:
    """One table row: a fresh client session with len(clip_files) earlier turns, then n_replies timed replies."""
    client = Client(url, verbose=False, download_files=False)
    client.pending_messages_per_event = log = ArrivalLog()
    client.predict(None, api_name="/open_session")  # a new session, as a page load makes
    add_history(client, backend, clip_files)
    added = {"socket": [], "client": [], "first": []}
    for _ in range(n_replies):
        for key, seconds in one_reply(client, log, backend, n_chunks).items():
            added[key] += seconds
    ms = {key: [1000 * s for s in values] for key, values in added.items()}
    socket_ms, client_ms = ms["socket"], ms["client"]
    return [
        f"{backend.period_s * 1000:.0f}", len(clip_files), len(socket_ms), f"{percentile(socket_ms, 50):.1f}",
        f"{percentile(socket_ms, 95):.1f}", f"{max(socket_ms):.1f}", f"{percentile(client_ms, 50):.1f}",
        f"{percentile(client_ms, 95):.1f}", f"{percentile(ms['first'], 50):.0f}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="empty history, one reply of 5 chunks")
    args = parser.parse_args(argv)
    if args.quick:
        n_chunks, n_replies, cases = QUICK["n_chunks"], QUICK["n_replies"], QUICK["rows"]
    else:
        n_chunks, n_replies = N_CHUNKS, N_REPLIES
        cases = [(period_s, n) for period_s in CHUNK_PERIODS_S for n in HISTORY_TURNS]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        clip_files = []
        for i in range(max(n for _, n in cases)):
            clip_files.append(folder / f"clip-{i:02d}.wav")
            ffmpeg("-f", "lavfi", "-i", f"sine=frequency={300 + 10 * i}:duration={CLIP_S}", str(clip_files[-1]))
        backend = StampedBackend(0.0)
        demo = build_demo(backend, Store(folder / "data"))
        port = free_port()
        demo.queue(default_concurrency_limit=1)  # as launch.py serves it
        demo.launch(server_name="127.0.0.1", server_port=port, theme=THEME, css=CSS, prevent_thread_lock=True,
                    quiet=True)
        try:
            rows = []
            for period_s, n in cases:
                backend.period_s = period_s
                rows.append(measure(f"http://127.0.0.1:{port}/", backend, clip_files[:n], n_chunks, n_replies))
        finally:
            demo.close()
    print_table(
        f"Streaming through the Gradio app: {n_replies} replies of {n_chunks} chunks per row; "
        "ms added between a chunk being ready and the client having it",
        ["chunk every ms", "earlier turns", "chunks", "socket p50 ms", "socket p95 ms", "socket max ms",
         "client p50 ms", "client p95 ms", "send to first chunk ms"],
        rows,
    )
    # the target is on the median added per chunk; the p95 is reported beside it
    worst_p50, worst_p95 = (max(float(row[column]) for row in rows) for column in (3, 4))
    verdict = "met" if worst_p50 < TARGET_ADDED_S * 1000 else "missed"
    print(f"worst median added per chunk at the socket: {worst_p50:.1f} ms "
          f"(target < {TARGET_ADDED_S * 1000:.0f} ms: {verdict}); worst p95: {worst_p95:.1f} ms")

if __name__ == "__main__":
    main()
