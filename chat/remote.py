"""The remote backend: Qwen2-Audio behind an OpenAI-compatible chat API (vLLM), replies streamed as server-sent events.

Each request carries the prompt the Response rendered, so history fitting is shared with the local
backend: the system message, then every message of `prompt.messages` with its clips' audio parts as
`input_audio` content parts (16-bit PCM wav, base64), in the order the local prompt places them.

Audio numbering: vLLM renders the request with the model's own chat template, which writes
`Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>` with k counting the audio parts of the request, not of
the conversation. The two agree whenever no history was dropped and no clip is longer than one
window, and then the server's prompt is byte-identical to the local one. Where they differ (dropped
turns restart the count; a long clip is several parts) a text part right after the audio says which
clip it is, e.g. `(Audio 1 is this conversation's Audio 3.)`, so a question about "Audio 3" still
finds its clip. Replacing the template per request would be exact but needs the server to run with
--trust-request-chat-template, so it is not relied on.
"""

import base64
import io
import json
import threading
import wave
from collections.abc import Iterator
from itertools import islice

import httpx
import numpy as np

from chat.audio import SAMPLE_RATE
from chat.backend import Backend, GenerationSettings, Stats
from chat.conversation import ASSISTANT, TOOL
from chat.errors import BackendError
from chat.prompts import AudioPart, Prompt

QWEN2_AUDIO_CONTEXT_TOKENS = 8192  # the model's max_position_embeddings, vLLM's default --max-model-len
DEFAULT_TIMEOUT_S = 120.0  # longest silence from the server: prefill of several clips on a busy GPU
CONNECT_TIMEOUT_S = 10.0
SYSTEM_PREFIX = "<|im_start|>system\n"
END_OF_MESSAGE = "<|im_end|>"
START_HINT = (
    "Start one with `vllm serve Qwen/Qwen2-Audio-7B-Instruct --port 8001 --limit-mm-per-prompt '{\"audio\": 5}'` "
    "and pass its address as --api-base (e.g. http://localhost:8001/v1)."
)


class RemoteBackend(Backend):
    """Streams replies from `POST {api_base}/chat/completions`; one HTTP connection pool, shared by threads.

    count_tokens stays None: the tokenizer lives on the server, so the renderer estimates prompt length.
    """

    def __init__(
        self,
        model: str,
        api_base: str,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        context_tokens: int = QWEN2_AUDIO_CONTEXT_TOKENS,
    ) -> None:
        self.model, self.api_base = model, api_base.rstrip("/")
        self.api_key, self.timeout_s, self.context_tokens = api_key, timeout_s, context_tokens
        self.where = f"The model server at {self.api_base}"  # how error messages name it
        self.client = httpx.Client(
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
        )

    def execute(
        self, prompt: Prompt, settings: GenerationSettings, stats: Stats, cancel: threading.Event
    ) -> Iterator[str]:
        """Yield the reply's text pieces, checking cancel at every event (vLLM sends one per token step).

        Leaving the `with` block in any way (done, cancelled, closed by the caller, failed) closes the connection.
        """
        body = {
            "model": self.model,
            "messages": chat_messages(prompt),
            "stream": True,
            "stream_options": {"include_usage": True},
            **sampling_fields(settings),
        }
        try:
            with self.client.stream("POST", f"{self.api_base}/chat/completions", json=body) as response:
                if response.is_error:
                    raise self._http_error(response)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise BackendError(f"{self.where} did not stream its reply: is it an OpenAI-compatible chat API?")
                for event in self._events(response):
                    if cancel.is_set():
                        return
                    if usage := event.get("usage"):
                        stats.n_prompt_tokens = usage.get("prompt_tokens", 0)
                        stats.n_tokens = usage.get("completion_tokens", stats.n_tokens)
                    if text := self._delta_text(event):
                        stats.n_tokens += 1  # counts chunks; the usage event, when sent, is last and corrects it
                        yield text
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise BackendError(f"{self.where} is not reachable ({e}). {START_HINT}") from e
        except httpx.TimeoutException as e:
            raise BackendError(
                f"{self.where} sent nothing for {self.timeout_s:g} s: it may be overloaded or still loading "
                "the model. Try again in a moment."
            ) from e
        except httpx.HTTPError as e:
            raise BackendError(
                f"The connection to {self.api_base} broke before the reply was complete ({e}). Try again."
            ) from e

    def served_models(self) -> list[str] | None:
        """The model names `GET {api_base}/models` lists, or None when it does not answer."""
        try:
            response = self.client.get(f"{self.api_base}/models", timeout=CONNECT_TIMEOUT_S)
            return [model["id"] for model in response.raise_for_status().json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

    def _events(self, response: httpx.Response) -> Iterator[dict]:
        """The JSON payloads of the stream's `data:` lines, up to `data: [DONE]`."""
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, `: keep-alive` comments, `event:`/`id:` fields
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
            except json.JSONDecodeError as e:
                raise BackendError(f"{self.where} sent a malformed stream event: {data[:200]!r}") from e
            if not isinstance(event, dict) or "error" in event or event.get("object") == "error":
                raise BackendError(f"{self.where} failed mid-reply: {_error_message(event)}")
            yield event
        raise BackendError(
            f"The stream from {self.api_base} ended before the reply was complete (no [DONE]); "
            "the server may have restarted. Try again."
        )

    def _delta_text(self, event: dict) -> str:
        """`choices[0].delta.content` of a stream event; "" for role, finish and usage events."""
        try:
            choices = event["choices"]
            return (choices[0]["delta"].get("content") or "") if choices else ""
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise BackendError(f"{self.where} sent a malformed stream event: {event!r:.200}") from e

    def _http_error(self, response: httpx.Response) -> BackendError:
        """A BackendError that says what to do about an HTTP error status."""
        response.read()
        status, where = response.status_code, self.where
        try:
            message = _error_message(response.json())
        except ValueError:
            message = response.text.strip()[:300] or response.reason_phrase
        if status in (401, 403):
            hint = "check --api-key" if self.api_key else "it needs an API key: pass --api-key or set OPENAI_API_KEY"
            return BackendError(f"{where} refused the request (HTTP {status}: {message}); {hint}.")
        if status == 404:
            served = self.served_models()
            if served is not None and self.model not in served:
                return BackendError(
                    f"{where} does not serve a model named {self.model!r}; "
                    f"it serves: {', '.join(served) or 'none'}. Pass one of these names with -c."
                )
            return BackendError(f"Nothing answers at {response.url} (HTTP 404). Check --api-base: vLLM's ends in /v1.")
        if status >= 500:
            return BackendError(f"{where} failed (HTTP {status}: {message}). Check the server's log, then try again.")
        if "audio(s) may be provided" in message:  # vLLM's --limit-mm-per-prompt; every clip in the history counts
            message += " Restart vLLM with a higher --limit-mm-per-prompt, or start a new conversation."
        return BackendError(f"{where} rejected the request (HTTP {status}): {message}")


def chat_messages(prompt: Prompt) -> list[dict]:
    """The prompt as OpenAI chat messages, laid out so the model's chat template renders the local prompt text."""
    parts = iter(prompt.audio_parts)  # in prompt order: message by message, clip by clip, part by part
    n_sent = 0
    messages: list[dict] = [{"role": "system", "content": _system_prompt(prompt)}]
    for message in prompt.messages:
        if message.role == ASSISTANT:
            if message.text:  # as in the local prompt, a reply that failed before its first token is left out
                messages.append({"role": "assistant", "content": message.text})
            continue
        audio: list[dict] = []
        for part in islice(parts, sum(clip.n_parts for clip in message.clips)):
            n_sent += 1
            audio += _audio_content(part, n_sent)
        if message.role == TOOL:  # the template has no tool role; the local prompt puts the audio inside the tags
            content = [_text("<tool_response>\n"), *audio, _text(f"{message.text}\n</tool_response>")]
        else:
            content = audio + ([_text(message.text)] if message.text else [])
        messages.append({"role": "user", "content": content})
    return messages


def sampling_fields(settings: GenerationSettings) -> dict:
    """GenerationSettings as request fields: OpenAI's, plus vLLM's top_k and repetition_penalty."""
    fields = {
        "max_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,  # 0 is greedy in vLLM too
        "top_p": settings.top_p,
        # Every field is sent: vLLM fills missing ones from the model's generation_config.json (its top_k
        # is 20), and -1 is the value that turns top-k off in every vLLM version.
        "top_k": settings.top_k or -1,
        "repetition_penalty": settings.repetition_penalty,
    }
    if settings.seed is not None:
        fields["seed"] = settings.seed
    return fields


def wav_base64(samples: np.ndarray) -> str:
    """Mono float samples at SAMPLE_RATE as a base64 16-bit PCM wav (half the size of float; every reader takes it)."""
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(SAMPLE_RATE)
        file.writeframes(pcm.tobytes())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _audio_content(part: AudioPart, server_number: int) -> list[dict]:
    """The part's input_audio, and a note naming its clip where the server's `Audio k` label would mislead."""
    content = [{"type": "input_audio", "input_audio": {"data": wav_base64(part.samples), "format": "wav"}}]
    if part.clip.n_parts > 1:
        name = f"part {part.index + 1} of {part.clip.n_parts} of this conversation's Audio {part.number}"
        content.append(_text(f"(Audio {server_number} is {name}.)\n"))
    elif part.number != server_number:
        content.append(_text(f"(Audio {server_number} is this conversation's Audio {part.number}.)\n"))
    return content


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _system_prompt(prompt: Prompt) -> str:
    """The system message as the renderer wrote it (the default filled in, anything it adds included)."""
    return prompt.text.removeprefix(SYSTEM_PREFIX).split(END_OF_MESSAGE, 1)[0]


def _error_message(body: object) -> str:
    """The message in an error body: `{"error": {"message"}}` (OpenAI, vLLM), `{"message"}` (old vLLM), `{"detail"}`."""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)
    return str(error)
