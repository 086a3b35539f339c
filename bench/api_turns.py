"""The API's second turn: time to first token when a request continues the conversation the server has just
answered (its attention cache reused) against the same request to a server that answered nothing yet.

A client resends the whole history each turn, as chat clients do: a 30-s clip and a question, the reply, then a
follow-up question. The server runs LocalBackend (the tiny test model on the CPU unless --checkpoint names
another) behind the app's own OpenAI-compatible API on a free port, and the client is plain HTTP streaming.
Run: .venv/bin/python -m bench.api_turns [--checkpoint DIR] [--repeats 5]
"""

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402

from app.api import ApiOptions, OpenAIApi  # noqa: E402
from bench.common import print_table  # noqa: E402
from chat.local import LocalBackend  # noqa: E402
from chat.openai_content import audio_content  # noqa: E402
from testkit.tiny.qwen2_audio import build_tiny_qwen2_audio  # noqa: E402

CLIP_S = 30
SAMPLE_RATE = 16000
FIELDS = {"temperature": 0, "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(backend: LocalBackend, port: int) -> uvicorn.Server:
    """The app's API on 127.0.0.1:port in a thread, once it listens."""
    server = uvicorn.Server(uvicorn.Config(OpenAIApi(backend, ApiOptions()).asgi(), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server


def ask(url: str, messages: list[dict]) -> tuple[float, str, int]:
    """(seconds to the first content chunk, the reply, prompt tokens the cache held) of a streamed request."""
    start, first, text, cached = time.perf_counter(), None, [], 0
    with httpx.stream("POST", f"{url}/chat/completions", json={"model": "bench", "messages": messages, **FIELDS},
                      timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event.get("usage"):
                cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
            for choice in event.get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - start
                    text.append(choice["delta"]["content"])
    return first, "".join(text), cached


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: the tiny Qwen2-Audio)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint or build_tiny_qwen2_audio(Path(scratch) / "tiny")
        backend = LocalBackend(str(checkpoint))
        port = free_port()
        server = serve(backend, port)
        url = f"http://127.0.0.1:{port}/v1"
        rows = {"continued (cache reused)": [], "fresh server": []}
        cached = {}
        for repeat in range(args.repeats):
            clip = (0.1 * np.random.default_rng(repeat).standard_normal(CLIP_S * SAMPLE_RATE)).astype(np.float32)
            first = [{"role": "user", "content": [audio_content(clip), {"type": "text", "text": "What is it?"}]}]
            _, reply, _ = ask(url, first)
            second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
            for kind, reset in (("continued (cache reused)", False), ("fresh server", True)):
                if reset:
                    backend.last_reply = None  # what a server that answered nothing yet holds
                seconds, _, cached[kind] = ask(url, second)
                rows[kind].append(seconds)
        server.should_exit = True
    print_table(f"Second turn through the API, {backend.family.title} on {backend.model.device}, {CLIP_S}-s clip, "
                f"median of {args.repeats}", ["request", "time to first token ms", "prompt tokens from cache"],
                [[kind, f"{1000 * statistics.median(times):.0f}", str(cached[kind])] for kind, times in rows.items()])


if __name__ == "__main__":
    main()
