"""The remote backend: a model behind an OpenAI-compatible chat API (vLLM), replies streamed as server-sent events.

Each request carries the prompt the Response rendered, so history fitting is shared with the local
backend; the family lays the messages out (chat.families) so that the server's chat template
renders the same prompt the local model would see.
"""

import json
import threading
from collections.abc import Iterator

import httpx

from chat.backend import Backend, Stats
from chat.errors import BackendError
from chat.families import FAMILIES, Family, family_for_name
from chat.prompts import Prompt
from chat.settings import GenerationSettings

DEFAULT_TIMEOUT_S = 120.0  # longest silence from the server: prefill of several clips on a busy GPU
CONNECT_TIMEOUT_S = 10.0
START_HINT = (
    "Start one with `vllm serve {model} --port 8001 --limit-mm-per-prompt '{{\"audio\": 5}}'` "
    "and pass its address as --api-base (e.g. http://localhost:8001/v1)."
)


class RemoteBackend(Backend):
    """Streams replies from `POST {api_base}/chat/completions`; one HTTP connection pool, shared by threads.

    Prompt lengths are estimated (Backend.count_prompt_tokens): the tokenizer lives on the server.
    The family comes from the served model's name; a name of no known family is served as Qwen2-Audio.
    """

    def __init__(
        self,
        model: str,
        api_base: str,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        family: Family | None = None,
        context_tokens: int | None = None,  # the server's --max-model-len, when it is not the model's own
    ) -> None:
        self.model, self.api_base = model, api_base.rstrip("/")
        self.api_key, self.timeout_s = api_key, timeout_s
        self.where = f"The model server at {self.api_base}"  # how error messages name it
        self.client = httpx.Client(
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
        )
        served_family = None if family else self._served_family()
        self.family = family or served_family or family_for_name(model)
        if not self.family.served_by_vllm and served_family is None:
            raise BackendError(
                f"{model} is {self.family.title}, which OpenAI-compatible servers such as vLLM do not serve. "
                "Run it in this app (leave out --api-base), or point --api-base at another instance of this app."
            )
        self.name, self.quantization = model, "server"
        self.context_tokens = context_tokens or self.family.context_tokens

    def execute(
        self, prompt: Prompt, settings: GenerationSettings, stats: Stats, cancel: threading.Event,
        voice: str | None = None,  # never one: it has no voices of its own
    ) -> Iterator[str]:
        """Yield the reply's text pieces, checking cancel at every event (vLLM sends one per token step).

        Leaving the `with` block in any way (done, cancelled, closed by the caller, failed) closes the connection.
        """
        body = {
            "model": self.model,
            "messages": self.family.request_messages(prompt),
            "stream": True,
            "stream_options": {"include_usage": True},
            **sampling_fields(settings),
            **native_tool_fields(prompt.tools),
        }
        try:
            with self.client.stream("POST", f"{self.api_base}/chat/completions", json=body) as response:
                if response.is_error:
                    raise self._http_error(response)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    raise BackendError(f"{self.where} did not stream its reply: is it an OpenAI-compatible chat API?")
                thinking = False  # inside reasoning the server sends apart (vLLM's --reasoning-parser)
                for event in self._events(response):
                    if cancel.is_set():
                        return
                    if usage := event.get("usage"):
                        stats.n_prompt_tokens = usage.get("prompt_tokens", 0)
                        stats.n_tokens = usage.get("completion_tokens", stats.n_tokens)
                    reasoning, text = self._delta(event)
                    if reasoning and self.family.reasoning_tags:
                        # written back in the model's own tags, as a local reply has them, where the reader finds them
                        text, thinking = ("" if thinking else self.family.reasoning_tags[0]) + reasoning + text, True
                    elif text and thinking:
                        text, thinking = self.family.reasoning_tags[1] + text, False
                    if text:
                        stats.n_tokens += 1  # counts chunks; the usage event, when sent, is last and corrects it
                        yield text
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise BackendError(f"{self.where} is not reachable ({e}). {START_HINT.format(model=self.model)}") from e
        except httpx.TimeoutException as e:
            raise BackendError(
                f"{self.where} sent nothing for {self.timeout_s:g} s: it may be overloaded or still loading "
                "the model. Try again in a moment."
            ) from e
        except httpx.HTTPError as e:
            raise BackendError(
                f"The connection to {self.api_base} broke before the reply was complete ({e}). Try again."
            ) from e

    def _served_family(self) -> Family | None:
        """The family the server names for the model: another instance of this app does, in /v1/models."""
        try:
            response = self.client.get(f"{self.api_base}/models", timeout=CONNECT_TIMEOUT_S)
            listed = {model["id"]: model.get("family") for model in response.raise_for_status().json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        return next((f for f in FAMILIES.values() if f.title == listed.get(self.model)), None)

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

    def _delta(self, event: dict) -> tuple[str, str]:
        """(reasoning, content) of a stream event's `choices[0].delta`, "" where absent (role, finish and usage
        events). A server with a reasoning parser sends the thinking apart, as `reasoning_content` or, in newer vLLM,
        `reasoning`."""
        try:
            choices = event["choices"]
            delta = choices[0]["delta"] if choices else {}
            return delta.get("reasoning_content") or delta.get("reasoning") or "", delta.get("content") or ""
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


def native_tool_fields(tools: tuple[dict, ...]) -> dict:
    """For a family whose template lists the tools: the tools for the server's template, and the reply as text.

    tool_choice "none" keeps the server from parsing calls itself (vLLM still renders the tools), and with
    skip_special_tokens off (a vLLM field) a call's control tokens, such as [TOOL_CALLS], stay in the text,
    where the family's reader finds them as it does locally.
    """
    if not tools:
        return {}
    return {"tools": list(tools), "tool_choice": "none", "skip_special_tokens": False}


def _error_message(body: object) -> str:
    """The message in an error body: `{"error": {"message"}}` (OpenAI, vLLM), `{"message"}` (old vLLM), `{"detail"}`."""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)
    return str(error)
