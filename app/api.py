"""The app's model as an OpenAI-compatible API: POST /v1/chat/completions (streamed or not) and GET /v1/models.

Any client that speaks OpenAI's chat API (the openai SDK, Open WebUI, agent frameworks) uses whichever family the
app runs, through the same path as the page: a request's messages become a Conversation (each input_audio part a
clip through the same decoding and limits as an upload, numbered Audio 1, 2, ... in order), and a Turn replies.
The client's tools are offered in the family's own format and the calls come back as OpenAI tool_calls; the app's
own editing tools are never run for a client. One reply is generated at a time; others wait in a bounded queue
and past it get 429. A client that goes away stops its reply. A request that resends the conversation the server
has just answered, plus new messages, starts from that reply's attention cache (LocalBackend reuses it by itself).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, Router
from starlette.types import ASGIApp

from chat.backend import Backend
from chat.clip import Clip
from chat.conversation import ASSISTANT, DEFAULT_SYSTEM_PROMPT, TOOL, Conversation, Message, ToolUse
from chat.errors import ChatError
from chat.settings import SETTING_NAMES, GenerationSettings, settings_from
from chat.store import MAX_IMPORT_AUDIO_S
from chat.toolcalls import get_parser
from chat.turn import END, ReasoningChunk, TextChunk, Turn

PREFIX = "/v1"  # where the API's routes are, as OpenAI's
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # where the API answers without a key
MAX_REQUEST_AUDIO_S = MAX_IMPORT_AUDIO_S  # all clips of one request, as of an opened conversation
MAX_WAITING = 8  # requests queued behind the reply being generated; more are refused with 429
RETRY_AFTER_S = 10  # what a refused client is told to wait
AUDIO_FORMATS = ("wav", "mp3")  # what OpenAI's input_audio takes
LABEL = re.compile(r"Audio \d+( \(part \d+ of \d+\))?: ")  # this app's own label before a clip (another instance's)
# OpenAI and vLLM's names of the sampling fields, and the app's; max_completion_tokens is the newer max_tokens
SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                   "repetition_penalty": "repetition_penalty", "seed": "seed", "max_tokens": "max_new_tokens",
                   "max_completion_tokens": "max_new_tokens"}


class ApiError(Exception):
    """A request refused with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": None, "code": self.status}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class ApiOptions:
    """Who may use the API and how much it takes."""

    keys: tuple[str, ...] = ()  # accepted bearer keys; none: every request is accepted (loopback only, see launch)
    max_upload_mb: int = 100  # the largest clip a request may carry, as for an upload on the page
    max_waiting: int = MAX_WAITING


class OpenAIApi:
    """The API's routes over one backend."""

    def __init__(self, backend: Backend, options: ApiOptions) -> None:
        self.backend, self.options = backend, options
        self.generating = asyncio.Lock()  # one reply at a time, in arrival order
        self.n_waiting = 0  # requests holding or waiting for `generating`

    def asgi(self) -> Router:
        """An ASGI app of the routes (404 for any other path)."""
        return Router(routes=[Route(f"{PREFIX}/chat/completions", self.chat, methods=["POST"]),
                              Route(f"{PREFIX}/models", self.models, methods=["GET"])])

    async def models(self, request: Request) -> Response:
        """The loaded model, with its family."""
        try:
            self._authorize(request)
        except ApiError as e:
            return e.response()
        model = {"id": self.backend.name, "object": "model", "created": 0, "owned_by": "audio-chat",
                 "family": self.backend.family.title}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat(self, request: Request) -> Response:
        """A chat completion, streamed as server-sent events when the body asks for it."""
        try:
            self._authorize(request)
            body = await _json_body(request, 2 * self.options.max_upload_mb)
            conversation = conversation_of(body.get("messages"), self.backend, self.options.max_upload_mb)
            settings = settings_of(body, self.backend.default_settings)
            tools = tools_of(body)
            if self.n_waiting > self.options.max_waiting:
                raise ApiError(429, f"The server is busy: {self.n_waiting} requests are ahead of this one. Retry in "
                                    f"{RETRY_AFTER_S} s.", "rate_limit_error", {"Retry-After": str(RETRY_AFTER_S)})
            turn = Turn(self.backend, conversation, settings, client_tools=tools)
        except ApiError as e:
            return e.response()
        except ChatError as e:
            return ApiError(400, str(e)).response()
        reply = Reply(turn, settings, f"chatcmpl-{uuid.uuid4().hex}", self.backend.name)
        events = self._generate(reply)
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(reply.sse(events, usage), media_type="text/event-stream")
        return await self._whole(reply, events, request)

    async def _whole(self, reply: Reply, events: AsyncIterator, request: Request) -> Response:
        """The reply in one body; a client that goes away meanwhile stops it."""
        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.2)
            reply.turn.cancel()

        watcher = asyncio.create_task(watch())
        try:
            async for event in events:
                reply.take(event)
        finally:
            watcher.cancel()
        if reply.error is not None:
            return ApiError(500, f"The model failed while replying: {reply.error}", "server_error").response()
        return JSONResponse(reply.completion())

    async def _generate(self, reply: Reply) -> AsyncIterator[object]:
        """The turn's events as it runs in a worker thread, once it holds the generation slot; leaving early (the
        client went away) stops it."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def run() -> None:
            try:
                for event in reply.turn:
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except Exception as e:  # the turn recorded the failed reply; the client is told
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, END)

        self.n_waiting += 1
        try:
            async with self.generating:
                worker = threading.Thread(target=run, name="api-reply", daemon=True)
                worker.start()
                try:
                    while (event := await queue.get()) is not END:
                        if isinstance(event, Exception):
                            reply.error = event
                        else:
                            yield event
                finally:
                    reply.turn.cancel()  # a no-op once it has ended; else the client left: stop at the next token
                    await asyncio.to_thread(worker.join)
        finally:
            self.n_waiting -= 1

    def _authorize(self, request: Request) -> None:
        if not self.options.keys:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not any(hmac.compare_digest(given.encode(), key.encode()) for key in self.options.keys):
            raise ApiError(401, "Missing or wrong API key: send `Authorization: Bearer KEY` with a key the server "
                                "was started with (--server-api-key).", "authentication_error")


class Reply:
    """One request's reply as it streams: OpenAI's chunks, then its completion."""

    def __init__(self, turn: Turn, settings: GenerationSettings, reply_id: str, model: str) -> None:
        self.turn, self.settings, self.id, self.model = turn, settings, reply_id, model
        self.created = int(time.time())
        self.content, self.reasoning = [], []
        self.error: Exception | None = None

    def take(self, event: object) -> dict | None:
        """Keep a turn's text or thinking; returns it as a stream delta (None for other events)."""
        if isinstance(event, TextChunk):
            self.content.append(event.text)
            return {"content": event.text}
        if isinstance(event, ReasoningChunk):
            self.reasoning.append(event.text)
            return {"reasoning_content": event.text}
        return None

    @property
    def calls(self) -> tuple[ToolUse, ...]:
        message = self.turn.response.message
        return message.calls if message is not None else ()

    @property
    def finish_reason(self) -> str:
        if self.calls:
            return "tool_calls"
        return "length" if self.turn.response.stats.n_tokens >= self.settings.max_new_tokens else "stop"

    def usage(self) -> dict:
        stats = self.turn.response.stats
        return {"prompt_tokens": stats.n_prompt_tokens, "completion_tokens": stats.n_tokens,
                "total_tokens": stats.n_prompt_tokens + stats.n_tokens,
                "prompt_tokens_details": {"cached_tokens": stats.n_reused_prompt_tokens}}

    def tool_calls(self) -> list[dict]:
        return [{"index": n, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}
                for n, call in enumerate(self.calls)]

    def completion(self) -> dict:
        """The whole reply as a chat.completion."""
        message = {"role": ASSISTANT, "content": "".join(self.content) or None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = [{key: value for key, value in call.items() if key != "index"}
                                     for call in self.tool_calls()]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}],
                "usage": self.usage()}

    async def sse(self, events: AsyncIterator, usage: bool) -> AsyncIterator[str]:
        """The reply as OpenAI streams it: a role chunk, content (and reasoning) deltas, the calls, the finish
        reason, the usage when asked, then [DONE]; a failure mid-reply is an error event."""
        yield self._event({"role": ASSISTANT, "content": ""})
        async for event in events:
            if delta := self.take(event):
                yield self._event(delta)
        if self.error is not None:
            error = {"message": f"The model failed while replying: {self.error}", "type": "server_error"}
            yield f"data: {json.dumps({'error': error})}\n\n"
            return
        if self.calls:
            yield self._event({"tool_calls": self.tool_calls()})
        yield self._event({}, self.finish_reason)
        if usage:
            yield self._data({"choices": [], "usage": self.usage()})
        yield "data: [DONE]\n\n"

    def _event(self, delta: dict, finish_reason: str | None = None) -> str:
        return self._data({"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    def _data(self, fields: dict) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        return f"data: {json.dumps(chunk | fields, ensure_ascii=False)}\n\n"


async def _json_body(request: Request, max_mb: int) -> dict:
    """The request's JSON object, read only up to max_mb (a request holds a conversation's clips, each at most
    --max-upload-mb; twice that is more audio than MAX_REQUEST_AUDIO_S)."""
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > max_mb * 2**20:
            raise ApiError(413, f"The request is larger than this server's limit of {max_mb} MB: send fewer or "
                                "shorter clips, or start a new conversation.")
    try:
        body = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not JSON: {e}.") from e
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def conversation_of(messages: object, backend: Backend, max_upload_mb: int) -> Conversation:
    """The request's messages as a Conversation: system, user (text and input_audio parts), assistant (text,
    tool_calls, reasoning_content) and tool messages; ApiError says what is wrong with one."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of chat messages.")
    conversation = Conversation()
    style = backend.family.tool_style
    names: dict[str, str] = {}  # tool call id → the function it called
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{n - 1}] is not an object.")
        role, content = message.get("role"), message.get("content")
        where = f"messages[{n - 1}] ({role})"
        try:
            if role in ("system", "developer"):
                conversation.system_prompt = _text(content, where) or DEFAULT_SYSTEM_PROMPT
            elif role in ("user", TOOL):
                text, clips = _heard(content, where, len(conversation.clips()), max_upload_mb)
                if role == TOOL:  # a clip here is one a tool made (another instance of this app sends it so)
                    conversation.add_tool(names.get(message.get("tool_call_id"), "tool"), text, tuple(clips))
                else:
                    conversation.add_user(text, clips)
            elif role == ASSISTANT:
                conversation.messages.append(_reply(message, where, style, names))
            else:
                raise ApiError(400, f"{where}: the role must be system, user, assistant or tool.")
        except ChatError as e:
            raise ApiError(400, f"{where}: {e}") from e
    if not conversation.awaiting_reply():
        raise ApiError(400, "The last message must be from the user or a tool: there is nothing to reply to.")
    if sum(clip.duration_s for clip in conversation.clips()) > MAX_REQUEST_AUDIO_S:
        raise ApiError(413, f"The request holds more than {MAX_REQUEST_AUDIO_S // 3600} hours of audio, the limit of "
                            "one conversation: start a new one.")
    return conversation


def _text(content: object, where: str) -> str:
    """A message's text: a string, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(part.get("text", "")) for part in content)
    raise ApiError(400, f"{where}: only user and tool messages may carry audio; send text here.")


def _heard(content: object, where: str, n_clips: int, max_upload_mb: int) -> tuple[str, list[Clip]]:
    """The text and the clips of a user or tool message, in order. A text part that is only this app's own label of the
    clip after it (`Audio 2: `, as another instance of this app sends) is left out: the clip is labelled anew."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: content must be a string or a list of parts.")
    texts, clips = [], []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            following = content[k + 1] if k + 1 < len(content) else {}
            if not (LABEL.fullmatch(str(part.get("text", ""))) and following.get("type") == "input_audio"):
                texts.append(str(part.get("text", "")))
        elif kind == "input_audio":
            clips.append(_clip(part.get("input_audio"), f"{where}, audio part {k + 1}", n_clips + len(clips) + 1,
                               max_upload_mb))
        else:
            raise ApiError(400, f"{where}: part {k + 1} is {kind!r}; this server takes text and input_audio parts.")
    return "".join(texts), clips


def _clip(audio: object, where: str, number: int, max_upload_mb: int) -> Clip:
    """An input_audio part (base64 wav or mp3) decoded as an upload is, with the same limits and messages."""
    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
        raise ApiError(400, f"{where}: input_audio needs a base64 `data` string and a `format`.")
    audio_format = audio.get("format", "wav")
    if audio_format not in AUDIO_FORMATS:
        raise ApiError(400, f"{where}: format {audio_format!r} is not one of {', '.join(AUDIO_FORMATS)}.")
    if len(audio["data"]) * 3 / 4 > max_upload_mb * 2**20:
        raise ApiError(413, f"{where}: the clip is larger than this server's limit of {max_upload_mb} MB "
                            "(--max-upload-mb).")
    try:
        data = base64.b64decode(audio["data"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{where}: `data` is not base64 ({e}).") from e
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"audio{number}.{audio_format}"
        path.write_bytes(data)
        try:
            return Clip.from_file(path)
        except ChatError as e:
            raise ApiError(400, f"{where}: {e}") from e


def _reply(message: dict, where: str, style: str | None, names: dict[str, str]) -> Message:
    """An assistant message, its calls written in the family's own format after its text, as the model writes
    them (the family's prompt shows the model its earlier calls so)."""
    text = _text(message.get("content"), where)
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError as e:
            raise ApiError(400, f"{where}: the arguments of {function.get('name')!r} are not JSON ({e}).") from e
        calls.append(ToolUse(str(function.get("name", "")), arguments))
        names[call.get("id")] = calls[-1].name
    if calls and style is None:
        raise ApiError(400, f"{where}: this model has no tool-call format, so it cannot be shown earlier calls.")
    written = [get_parser(style).write(call.name, call.arguments) for call in calls]
    full = "\n".join(part for part in (text, *written) if part)
    return Message(ASSISTANT, full, shown=text, calls=tuple(calls), reasoning=message.get("reasoning_content") or "")


def settings_of(body: dict, defaults: GenerationSettings) -> GenerationSettings:
    """The request's sampling fields over the model's defaults (those it leaves out keep them, as on the page)."""
    values = {name: body[field] for field, name in SAMPLING_FIELDS.items() if body.get(field) is not None}
    if isinstance(values.get("top_k"), int) and values["top_k"] < 0:
        values["top_k"] = 0  # vLLM's -1, which turns top-k off, is the app's 0
    try:
        return settings_from(values, defaults)
    except ChatError as e:
        raise ApiError(400, f"{e} (fields: {', '.join(SAMPLING_FIELDS)}; the app's names: {', '.join(SETTING_NAMES)})")


def tools_of(body: dict) -> tuple[dict, ...] | None:
    """The client's function tools, () for none; tool_choice "none" offers none."""
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function" for t in tools):
        raise ApiError(400, "tools must be a list of {\"type\": \"function\", \"function\": {...}} specs.")
    if body.get("tool_choice") == "none":
        return ()
    return tuple(tools)


class ApiMiddleware:
    """The API in front of the page's ASGI app (gradio's): HTTP requests under /v1/ are the API's, every other request
    and event the page's, untouched. A request to the API passes no page login: it has its own keys."""

    def __init__(self, app: ASGIApp, api: OpenAIApi) -> None:
        self.page, self.api = app, api.asgi()

    async def __call__(self, scope, receive, send) -> None:
        is_api = scope["type"] == "http" and scope["path"].startswith(f"{PREFIX}/")
        await (self.api if is_api else self.page)(scope, receive, send)


def why_off(keys: tuple[str, ...], share: bool, server_name: str) -> str | None:
    """Why the API must stay off (None: it may serve): without keys it answers only on a loopback address."""
    if keys:
        return None
    if share:
        return "--share makes the server public, and the API has no key: add --server-api-key KEY."
    if server_name not in LOOPBACK:
        return f"--server-name {server_name} opens the server to the network, and the API has no key: add " \
               "--server-api-key KEY."
    return None
