"""A turn: the model's reply to the open user turn as a stream of events, tool calls included."""

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from chat.backend import Backend, GenerationSettings, Response
from chat.conversation import Conversation, Message


@dataclass(frozen=True)
class TextChunk:
    """A piece of the reply text as it streams."""

    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    """The reply asked for a tool; it is about to run."""

    name: str
    arguments: dict


@dataclass(frozen=True)
class ToolCallFinished:
    """A tool ran (or was refused); its tool message is already on the conversation."""

    message: Message


Event = TextChunk | ToolCallStarted | ToolCallFinished


class Turn:
    """Drives one or more Responses until the reply is complete; every step lands on the conversation."""

    def __init__(self, backend: Backend, conversation: Conversation, settings: GenerationSettings | None = None):
        self.backend, self.conversation, self.settings = backend, conversation, settings
        self.responses: list[Response] = [Response(backend, conversation, settings)]
        self._cancel = threading.Event()

    @property
    def response(self) -> Response:
        """The response streaming now (or the last one)."""
        return self.responses[-1]

    def cancel(self) -> None:
        """Stop the reply at the next token step; safe to call from any thread."""
        self._cancel.set()
        self.response.cancel()

    def __iter__(self) -> Iterator[Event]:
        for chunk in self.response:
            yield TextChunk(chunk)
