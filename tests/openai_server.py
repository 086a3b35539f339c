"""A scriptable OpenAI-compatible chat server on 127.0.0.1: real HTTP, real server-sent events, like vLLM's.

    with OpenAIServer() as server:
        server.enqueue(["Hello", " world"], delay_s=0.05)
        backend = RemoteBackend(server.model, server.url)
        ...
        server.requests[-1]["messages"]          # the parsed JSON body the client sent
        decoded_audio(server.requests[-1])       # its input_audio parts as float arrays

Each POST /v1/chat/completions takes the next enqueued reply (DEFAULT_REPLY when none is queued).
GET /v1/models lists `models`. With `api_key` set, requests without `Authorization: Bearer <key>`
get vLLM's 401; a model name not in `models` gets vLLM's 404.
"""

import base64
import io
import json
import socket
import threading
import time
import wave
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

DEFAULT_MODEL = "test-model"
DEFAULT_REPLY = ["This ", "is ", "a ", "scripted ", "reply."]
POLL_S = 0.01  # how often the serving loop checks for stop(); stop() waits at most this long


@dataclass
class Reply:
    """One scripted answer to a chat request."""

    chunks: list[str] = field(default_factory=list)  # content deltas, one event each
    delay_s: float = 0.0  # pause before each chunk
    break_after: int | None = None  # close the socket mid-stream after this many chunks
    done: bool = True  # end with `data: [DONE]`
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens), sent when the request asks
    status: int = 200
    error: str = ""  # the message of an HTTP error reply
    raw_events: list[str] | None = None  # sent verbatim as `data: <event>` lines instead of chunks


class OpenAIServer:
    """The server; a context manager that starts it on a free port and stops it."""

    def __init__(self, models: tuple[str, ...] = (DEFAULT_MODEL,), api_key: str | None = None) -> None:
        self.models, self.api_key = models, api_key
        self.requests: list[dict] = []  # parsed JSON bodies of chat requests, in arrival order
        self.headers: list[dict[str, str]] = []  # their headers, names lower-cased
        self.disconnects = 0  # streams the client closed before they were complete
        self.replies: list[Reply] = []
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: the OS picks a free one
        self._httpd.daemon_threads = True
        self._httpd.app = self

    @property
    def model(self) -> str:
        """The first served model name."""
        return self.models[0]

    @property
    def url(self) -> str:
        """The API base, as passed to --api-base."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def enqueue(
        self,
        chunks: list[str],
        *,
        delay_s: float = 0.0,
        break_after: int | None = None,
        done: bool = True,
        usage: tuple[int, int] | None = None,
    ) -> None:
        """Queue a streamed reply; break_after closes the socket after that many chunks, done=False omits [DONE]."""
        self.replies.append(Reply(list(chunks), delay_s, break_after, done, usage))

    def enqueue_error(self, status: int, message: str) -> None:
        """Queue an HTTP error reply with an OpenAI-style error body."""
        self.replies.append(Reply(status=status, error=message))

    def enqueue_raw(self, events: list[str]) -> None:
        """Queue a stream of verbatim `data:` events (for malformed streams); no [DONE] is added."""
        self.replies.append(Reply(raw_events=list(events), done=False))

    def wait_for_disconnects(self, n: int = 1, timeout_s: float = 10.0) -> bool:
        """True once n streams were cut by the client, False after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self.disconnects < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.disconnects >= n

    def start(self) -> "OpenAIServer":
        """Serve from a daemon thread."""
        threading.Thread(target=self._httpd.serve_forever, args=(POLL_S,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving; streams still being written stop at their next pause."""
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def decoded_audio(request: dict) -> list[np.ndarray]:
    """The float32 samples of every input_audio part of a request, in order."""
    arrays = []
    for message in request["messages"]:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "input_audio":
                with wave.open(io.BytesIO(base64.b64decode(part["input_audio"]["data"]))) as file:
                    pcm = np.frombuffer(file.readframes(file.getnframes()), dtype="<i2")
                arrays.append(pcm.astype(np.float32) / 32767)
    return arrays


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # chunked streaming, as uvicorn does it

    @property
    def app(self) -> OpenAIServer:
        return self.server.app

    def log_message(self, *args) -> None:
        pass  # keep test output clean

    def do_GET(self) -> None:
        if self.path != "/v1/models":
            return self._json(404, {"detail": "Not Found"})
        if self._authorized():
            models = [{"id": name, "object": "model", "owned_by": "tests"} for name in self.app.models]
            self._json(200, {"object": "list", "data": models})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/chat/completions":
            return self._json(404, {"detail": "Not Found"})
        try:
            request = json.loads(body)
        except json.JSONDecodeError as e:
            return self._error(400, f"Invalid JSON: {e}")
        self.app.requests.append(request)
        self.app.headers.append({k.lower(): v for k, v in self.headers.items()})
        if not self._authorized():
            return
        if request.get("model") not in self.app.models:
            return self._error(404, f"The model `{request.get('model')}` does not exist.")
        if not request.get("stream"):
            return self._error(400, "This test server only streams: send stream=true.")
        reply = self.app.replies.pop(0) if self.app.replies else Reply(list(DEFAULT_REPLY))
        if reply.status != 200:
            return self._error(reply.status, reply.error)
        try:
            self._stream(request, reply)
        except (BrokenPipeError, ConnectionResetError):
            self.app.disconnects += 1
            self.close_connection = True

    def _stream(self, request: dict, reply: Reply) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if reply.raw_events is not None:
            for event in reply.raw_events:
                self._send(f"data: {event}\n\n")
        else:
            self._chunk(request, {"role": "assistant", "content": ""})
            for n, chunk in enumerate(reply.chunks):
                if n == reply.break_after:
                    self.connection.shutdown(socket.SHUT_RDWR)  # mid-chunked-body: the client sees a broken stream
                    self.close_connection = True
                    return
                if self.app._stopping.wait(reply.delay_s):
                    return
                self._chunk(request, {"content": chunk})
            self._chunk(request, {}, finish_reason="stop")
            if reply.usage and (request.get("stream_options") or {}).get("include_usage"):
                n_prompt, n_completion = reply.usage
                usage = {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                         "total_tokens": n_prompt + n_completion}
                self._chunk(request, None, usage=usage)
        if reply.done:
            self._send("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")  # the chunked body's end
        self.wfile.flush()

    def _chunk(self, request: dict, delta: dict | None, finish_reason: str | None = None, usage: dict | None = None):
        """One chat.completion.chunk event; the usage event alone has no choices."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        chunk = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": request["model"], "choices": choices}
        if usage:
            chunk["usage"] = usage
        self._send(f"data: {json.dumps(chunk)}\n\n")

    def _send(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _authorized(self) -> bool:
        if self.app.api_key is None or self.headers.get("Authorization") == f"Bearer {self.app.api_key}":
            return True
        self._json(401, {"error": "Unauthorized"})  # vLLM's --api-key middleware answers exactly this
        return False

    def _error(self, status: int, message: str) -> None:
        error = {"message": message, "type": HTTPStatus(status).phrase, "param": None, "code": status}
        self._json(status, {"error": error})  # vLLM's and OpenAI's error body

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
