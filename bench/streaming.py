"""Streaming overhead: how long a chunk takes from the backend making it to a client receiving it.

The real Gradio app (app.web.build_demo, launched as launch.py launches it) runs in a process of its own on
127.0.0.1 with a scripted backend that makes one word ready every 50 ms, or every 13 ms (100 tokens/s, the GPU
target, at about 1.3 tokens per streamed word), on a fixed schedule as a model's generate thread does, and stamps
each with time.monotonic(). gradio_client, in this process, sends a message (/add_message) and streams the reply
(/respond), stamping each chunk as it arrives. time.monotonic() is one clock for every process of the machine, so
the difference is what the app adds, waiting behind a slow update included: the turn and response wrappers,
rendering the chat, gradio's queue and server-sent events. The app has its own process, as it has in use (the
browser is another program): in one process, gradio_client's own work on each update (it copies the whole chat
to apply each diff) and its garbage collection held the app's threads up; this process also collects no garbage
while it times.
  socket   when the client's reader thread gets the message, as a browser would
  client   when gradio_client hands it over, after its own polling (every 50 ms) on top
  send to first chunk   from the /add_message call to the first chunk at the socket, less the backend's
           own wait for that chunk: the app's cost of starting a reply, HTTP round trip included
Each rate is measured with an empty history and with 20 and 100 earlier turns of a 10 s clip each, since each
update sends the whole conversation.
Run: .venv/bin/python -m bench.streaming [--quick]
"""

import argparse
import gc
import multiprocessing
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

from app.web import CSS, THEME, build_demo, freeze_startup_objects, launch  # noqa: E402
from bench.common import ffmpeg, percentile, print_table  # noqa: E402
from chat.backend import Stats  # noqa: E402
from chat.prompts import Prompt  # noqa: E402
from chat.settings import GenerationSettings  # noqa: E402
from chat.store import Store  # noqa: E402
from testkit.scripted import ScriptedBackend  # noqa: E402

CHUNK_PERIODS_S = (0.05, 0.013)
N_CHUNKS = 40
N_REPLIES = 3
HISTORY_TURNS = (0, 20, 100)
QUICK = {"n_chunks": 5, "n_replies": 1, "rows": [(0.05, 0)]}
CLIP_S = 10
TARGET_P50_MS, TARGET_P95_MS = 10.0, 20.0  # added per chunk at the socket, whatever the history
START_TIMEOUT_S = 300.0  # the app's process imports gradio and torch first
CHUNK = re.compile(r"w\d{3}\b")  # each scripted chunk is a numbered word, so a client can tell which have arrived


class StampedBackend(ScriptedBackend):
    """Scripted chunks on a model's schedule: chunk i is ready at start + (i + 1) * period_s whether or not the
    app has taken the one before, as LocalBackend's generate thread fills its streamer queue; late ones wait."""

    def __init__(self, period_s: float) -> None:
        super().__init__(interval_s=0.0)
        self.period_s = period_s
        self.started_at: list[float] = []
        self.ready_at: list[float] = []

    def execute(self, prompt: Prompt, settings: GenerationSettings, stats: Stats, cancel: threading.Event,
                voice: str | None = None) -> Iterator[str]:
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


def serve(port: int, folder: str, conn) -> None:
    """The app's process: build and launch the page as launch.py does, then do what the pipe asks.

    ("reply", chunks, period_s): the backend's next reply, one chunk ready every period_s;
    ("stamps",): when the last reply started and when each of its chunks was ready; ("stop",): close the app.
    """
    backend, store = StampedBackend(0.0), Store(folder)
    demo = build_demo(backend, store)
    demo.queue(default_concurrency_limit=1)
    launch(demo, store, server_name="127.0.0.1", server_port=port, theme=THEME, css=CSS, prevent_thread_lock=True,
           quiet=True)
    freeze_startup_objects()
    conn.send("up")
    try:
        while (asked := conn.recv())[0] != "stop":
            if asked[0] == "reply":
                backend.period_s = asked[2]
                backend.enqueue(asked[1])
                backend.ready_at.clear()
                conn.send(None)
            else:
                conn.send((backend.started_at[-1], list(backend.ready_at)))
    finally:
        demo.close()


class App:
    """The app in its own process, and a pipe to its backend."""

    def __init__(self, folder: Path) -> None:
        self.url = f"http://127.0.0.1:{(port := free_port())}/"
        self.conn, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(target=serve, args=(port, str(folder), child),
                                                                     daemon=True)
        self.process.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.conn.poll(0.5):
            if not self.process.is_alive() or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"the app's process did not start (exit code {self.process.exitcode})")
        self.conn.recv()

    def reply(self, chunks: list[str], period_s: float) -> None:
        """Queue the backend's next reply: one chunk ready every period_s."""
        self.conn.send(("reply", chunks, period_s))
        self.conn.recv()

    def stamps(self) -> tuple[float, list[float]]:
        """When the last reply started, and when each of its chunks was ready (time.monotonic())."""
        self.conn.send(("stamps",))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(("stop",))
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()


def send(client: Client, text: str, files: list[Path] = ()) -> None:
    """Type a message (with attachments) and press send, as the page does, with the side panel as it starts."""
    client.predict({"text": text, "files": [handle_file(str(f)) for f in files]}, "", api_name="/add_message")


def reply_text(chat: list[dict]) -> str:
    """The text of the last assistant message of the Chatbot value."""
    last = chat[-1] if chat else {}
    if last.get("role") != "assistant":
        return ""
    return "".join(part.get("text", "") for part in last["content"] if isinstance(part, dict))


def one_reply(client: Client, log: ArrivalLog, app: App, n_chunks: int, period_s: float) -> dict[str, list[float]]:
    """Send a message and stream the reply: each chunk's added seconds at the socket and at the client, and the
    first chunk's, counting the send."""
    app.reply([f"w{i:03d} " for i in range(n_chunks)], period_s)
    sent_at = time.monotonic()
    send(client, "How does it sound?")
    log.arrivals.clear()
    at_socket, at_client = [], []
    for index, (chat, _audio) in enumerate(client.submit(api_name="/respond")):  # audio only for a spoken reply
        n_new = len(CHUNK.findall(reply_text(chat))) - len(at_socket)
        at_socket += [log.arrivals[index]] * n_new  # chunks that arrived together share a time
        at_client += [time.monotonic()] * n_new
    assert len(at_socket) == n_chunks, f"the client saw {len(at_socket)} of {n_chunks} chunks"
    started_at, ready_at = app.stamps()
    # the first chunk also carries the send: everything from the click but the backend's own wait
    backend_wait = ready_at[0] - started_at
    return {
        "socket": [received - ready for received, ready in zip(at_socket, ready_at)],
        "client": [received - ready for received, ready in zip(at_client, ready_at)],
        "first": [at_socket[0] - sent_at - backend_wait],
    }


def add_history(client: Client, app: App, clip_files: list[Path]) -> None:
    """Earlier turns, each a clip and a question with a short reply, streamed without delay."""
    for path in clip_files:
        app.reply(["It is a tone of one pitch."], 0.0)
        send(client, "What is this?", [path])
        client.submit(api_name="/respond").result()


def measure(app: App, clip_files: list[Path], n_chunks: int, n_replies: int, period_s: float) -> list:
    """One table row: a fresh client session with len(clip_files) earlier turns, then n_replies timed replies."""
    client = Client(app.url, verbose=False, download_files=False)
    client.pending_messages_per_event = log = ArrivalLog()
    client.predict(None, api_name="/open_session")  # a new session, as a page load makes
    add_history(client, app, clip_files)
    added = {"socket": [], "client": [], "first": []}
    gc.collect()
    gc.disable()  # the client's own pauses are not the app's
    try:
        for _ in range(n_replies):
            for key, seconds in one_reply(client, log, app, n_chunks, period_s).items():
                added[key] += seconds
    finally:
        gc.enable()
    ms = {key: [1000 * s for s in values] for key, values in added.items()}
    socket_ms, client_ms = ms["socket"], ms["client"]
    return [
        f"{period_s * 1000:.0f}", len(clip_files), len(socket_ms), f"{percentile(socket_ms, 50):.1f}",
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
            clip_files.append(folder / f"clip-{i:03d}.wav")
            ffmpeg("-f", "lavfi", "-i", f"sine=frequency={300 + 10 * i}:duration={CLIP_S}", str(clip_files[-1]))
        app = App(folder / "data")
        try:
            rows = [measure(app, clip_files[:n], n_chunks, n_replies, period_s) for period_s, n in cases]
        finally:
            app.close()
    print_table(
        f"Streaming through the Gradio app: {n_replies} replies of {n_chunks} chunks per row; "
        "ms added between a chunk being ready and the client having it",
        ["chunk every ms", "earlier turns", "chunks", "socket p50 ms", "socket p95 ms", "socket max ms",
         "client p50 ms", "client p95 ms", "send to first chunk ms"],
        rows,
    )
    worst_p50, worst_p95 = (max(float(row[column]) for row in rows) for column in (3, 4))
    verdict = "met" if worst_p50 <= TARGET_P50_MS and worst_p95 <= TARGET_P95_MS else "missed"
    print(f"worst median added per chunk at the socket: {worst_p50:.1f} ms, worst p95: {worst_p95:.1f} ms "
          f"(target at most {TARGET_P50_MS:.0f} and {TARGET_P95_MS:.0f} ms, whatever the history: {verdict})")


if __name__ == "__main__":
    main()
