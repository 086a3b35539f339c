"""A turn: the model's reply to the open user turn as a stream of events, tool calls included."""

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace

from chat.backend import Backend, Response
from chat.clip import Clip
from chat.conversation import DONE, Conversation, Message, ToolUse
from chat.errors import ChatError, ToolError
from chat.settings import GenerationSettings
from chat.speech import ReadAloud, Speech, SpeechChunk, Voice
from chat.toolcalls import ToolCall, get_parser
from chat.tools import ToolBox, ToolResult, client_tool_system_prompt, run_tool_call, tool_system_prompt

END = object()  # what pump() puts on its queue after a turn's last event
SIGNAL_POLL_S = 0.1  # the longest a pending Ctrl-C waits to be raised while drain() waits for events
DEFAULT_MAX_TOOL_CALLS = 4  # per turn, like llm's chain_limit: a looping model cannot edit forever


@dataclass(frozen=True)
class TextChunk:
    """A piece of the reply text as it streams."""

    text: str


@dataclass(frozen=True)
class ReasoningChunk:
    """A piece of the reply's thinking as it streams: shown apart (collapsed, dimmed), never as the answer."""

    text: str


class ToolCallStarted(ToolUse):
    """The reply asked for a tool; it is about to run."""


@dataclass(frozen=True)
class ToolCallFinished:
    """A tool ran (or was refused); its tool message is already on the conversation."""

    message: Message
    error: str = ""  # why the call was refused or failed; empty when it worked


Event = TextChunk | ReasoningChunk | SpeechChunk | ToolCallStarted | ToolCallFinished


class Turn:
    """Drives one or more Responses until the reply is complete; every step lands on the conversation.

    Each Response is read through the family's reader: its thinking is yielded as ReasoningChunks and
    recorded on the reply as `reasoning`, and only text meant for the person is yielded as TextChunks and
    recorded as `shown`. With tools, the calls a Response makes end it: it is read on after each call
    for more (where the family's format makes several per reply), its message keeps the text up to and
    including the last call, the calls run in order and each is recorded as a tool message; then a new
    Response continues the reply. A call past max_tool_calls is refused with a message the model
    answers; a Response after that which calls again ends the turn. A finished reply may take a step of
    its own in its family (Family.after_reply: Qwen-Audio-Chat's timestamps become clips).

    With a voice, each Response is spoken as it streams (SpeechChunks among the events): by the backend's own
    talker, or read aloud from the text meant for the person by a text-to-speech model. Its audio is recorded
    on its message as its speech once the Response and its speech have ended.
    """

    def __init__(
        self,
        backend: Backend,
        conversation: Conversation,
        settings: GenerationSettings | None = None,
        tools: ToolBox | None = None,
        max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS,
        client_tools: tuple[dict, ...] | None = None,
        voice: Voice | None = None,
    ):
        """client_tools: None for the app's own turn; for an API client's, the tools it runs itself (OpenAI function
        specs, perhaps none): the reply's calls end the turn unrun (the reply's message holds them), and the family's
        own step after a reply (Qwen-Audio-Chat's clips) is not taken. voice: None for text only."""
        offered = tools is not None or bool(client_tools)
        if offered and not backend.supports_tools:
            raise ToolError(f"{type(backend).__name__} does not support tool calls; turn speech editing off.")
        if offered and backend.family.tool_style is None:
            raise ToolError(f"{backend.family.title} was not trained to call tools and has no format for them.")
        self.backend, self.conversation, self.settings = backend, conversation, settings
        self.tools, self.max_tool_calls, self.client_tools, self.voice = tools, max_tool_calls, client_tools, voice
        self.system_prompt = None  # the conversation's own, unless tools are on
        self.tool_specs: tuple[dict, ...] = ()  # for a family whose template lists the tools itself
        style = backend.family.tool_style
        if client_tools:
            self.system_prompt = client_tool_system_prompt(client_tools, style, conversation.system_prompt)
        elif tools is not None:
            self.system_prompt = tool_system_prompt(tools, style, conversation.system_prompt)
        if offered and get_parser(style).native:
            self.tool_specs = client_tools or tuple(tool.spec() for tool in tools.tools.values())
        self.responses: list[Response] = [self._new_response()]
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
        n_calls, n_refused = 0, 0  # calls asked for in this turn; Responses that had calls refused
        while True:
            calls = yield from self._stream()
            if self._cancel.is_set() or self.client_tools is not None:
                return
            if not calls:
                yield from self._after_reply()
                return
            for call in calls:  # a stop runs no more of them, but each still gets its result, as formats expect
                n_calls += 1
                yield from self._run(call, allowed=n_calls <= self.max_tool_calls, stopped=self._cancel.is_set())
            if self._cancel.is_set():
                return
            if n_calls > self.max_tool_calls:
                n_refused += 1
                if n_refused > 1:
                    return  # the model ignored a refusal: stop asking it
            self.responses.append(self._new_response())

    def _new_response(self) -> Response:
        talker_voice = self.voice.name if self.voice is not None and self.voice.reader is None else None
        return Response(self.backend, self.conversation, self.settings, system_prompt=self.system_prompt,
                        tools=self.tool_specs, voice=talker_voice)

    def _stream(self) -> Generator[Event, None, list[ToolCall]]:
        """Yield the current response's thinking and its text for the person; return the tool calls it made.

        The reader stops at each call; a reader of several calls per reply is fed on. Text after a call is
        shown only once another call follows it: the reply is cut at its last call, so that text was never
        an answer (written before any result came back).
        """
        reader = self.backend.family.reader(tools=self.tools is not None or bool(self.client_tools))
        calls: list[ToolCall] = []
        shown: list[str] = []  # what the person is shown of the reply
        after: list[str] = []  # text since the last call, shown if another call follows
        n_thought = 0  # of reader.reasoning, yielded so far
        spoken: list[SpeechChunk] = []  # the Response's audio so far
        read_aloud = None
        if self.voice is not None and self.voice.reader is not None:
            read_aloud = ReadAloud(self.voice.reader, self.voice.name, self._cancel)

        def speech(chunks: Iterator[SpeechChunk]) -> Iterator[SpeechChunk]:
            for chunk in chunks:
                self.response.stats.first_audio()
                spoken.append(chunk)
                yield chunk

        def read(text: str, new: list[ToolCall]) -> Iterator[Event]:
            nonlocal n_thought
            if len(reader.reasoning) > n_thought:
                self.response.reasoning = reader.reasoning
                yield ReasoningChunk(reader.reasoning[n_thought:])
                n_thought = len(reader.reasoning)
            if calls and not new:
                after.append(text)
                return
            text = "".join(after) + text
            if calls and not text.strip():
                text = ""  # the newline between two calls is no text for the person
            after.clear()
            shown.append(text)
            self.response.shown = "".join(shown)
            if text:
                yield TextChunk(text)
                if read_aloud is not None:
                    read_aloud.feed(text)
                    yield from speech(read_aloud.ready())
            calls.extend(new)

        def read_on(text: str, new: list[ToolCall], more: Callable[[], tuple[str, list[ToolCall]]]) -> Iterator[Event]:
            yield from read(text, new)
            while new and reader.several_calls and not reader.ended:  # the reader stops at each call: read on
                text, new = more()
                yield from read(text, new)

        try:
            for chunk in self.response:  # never left early: the Response records itself when it ends
                if isinstance(chunk, SpeechChunk):
                    yield from speech([chunk])
                    continue
                yield from read_on(*reader.feed(chunk), lambda: reader.feed(""))
                if calls and (not reader.several_calls or reader.ended):
                    self.response.end_at(calls[-1].end)  # stops the reply at once
            if not calls or (reader.several_calls and not reader.ended):  # else the reply was stopped at its call
                n_before = len(calls)
                yield from read_on(*reader.finish(), reader.finish)
                if self.response.message.status != DONE:  # a call the reply was cut off in is not one
                    del calls[n_before:]
            if calls and self.response.message.status == DONE:
                self.response.end_at(calls[-1].end)  # what follows the last call is dropped
            if read_aloud is not None:
                yield from speech(read_aloud.rest())
        finally:  # a failed or closed reply is described too: what the person saw of it and heard
            if read_aloud is not None:
                read_aloud.close()  # its thread ends with the text, if the turn ended before rest() was read
            if self.response.message is not None:
                uses = tuple(ToolUse(call.name, call.arguments) for call in calls if call.name)
                self.response.message = self.conversation.describe_reply(self.response.message, "".join(shown), uses,
                                                                         reader.reasoning)
                if spoken:  # read aloud, the first audio may come after the text, and so after its figures
                    message = self.response.message
                    figures = replace(message.figures, time_to_first_audio_s=self.response.stats.time_to_first_audio_s)
                    self.response.message = self.conversation.revise_reply(
                        message, speech=Speech.joined(spoken, self.voice.name), figures=figures)
        return calls

    def _run(self, call: ToolCall, allowed: bool, stopped: bool = False) -> Iterator[Event]:
        """Run (or refuse, or after a stop skip) a call and record its result as a tool message."""
        name = call.name or "unknown"  # a call too garbled to name its tool
        yield ToolCallStarted(name, call.arguments)
        if stopped:
            result = ToolResult.failure("Not run: the reply was stopped before this call.")
        elif call.error:
            result = ToolResult.failure(call.error)
        elif not allowed:
            limit = self.max_tool_calls
            result = ToolResult.failure(f"Refused: this turn already ran {limit} tool calls, the limit. Answer now.")
        else:
            result = run_tool_call(self.conversation, call.name, call.arguments, self.tools)
        clips = (result.clip,) if result.clip else ()
        yield self._finished(name, result.text, clips, failed=result.error is not None, error=result.error or "")

    def _after_reply(self) -> Iterator[Event]:
        """The step a finished reply takes by itself in its family (Qwen-Audio-Chat's timestamp spans become clips)."""
        if self.response.message.status != DONE:
            return
        step = self.backend.family.after_reply(self.conversation)
        if step is None:
            return
        yield ToolCallStarted(step.tool, step.arguments)
        yield self._finished(step.tool, step.text, step.clips, failed=step.failed)

    def _finished(self, tool: str, text: str, clips: tuple[Clip, ...], failed: bool,
                  error: str = "") -> ToolCallFinished:
        """Record a step's result as a tool message. A step that cannot be recorded as it is (its clip is already in
        the conversation) is recorded as failed, so no step is left looking as if it were still running."""
        try:
            message = self.conversation.add_tool(tool, text, clips, failed=failed)
        except ChatError as e:
            error = str(e)
            message = self.conversation.add_tool(tool, ToolResult.failure(error).text, failed=True)
        return ToolCallFinished(message, error)


def pump(turn: Turn, events: queue.Queue) -> None:
    """Put the turn's events on a queue (meant for a worker thread), then the error it ended with, if any, then END."""
    try:
        for event in turn:
            events.put(event)
    except Exception as e:  # the turn has already recorded the failed reply; the reader shows the error
        events.put(e)
    finally:
        events.put(END)


def drain(events: queue.Queue) -> Iterator[list[Event]]:
    """Yield what pump() puts on the queue, all that arrived at each step, until it puts END.

    The error the turn ended with is raised after the events before it. The error and END are put back
    each time they are taken, so a caller that leaves early (a terminal's Ctrl-C) may drain the queue again.
    """
    while True:
        batch = [_next(events)]
        while not events.empty():
            batch.append(events.get_nowait())
        arrived = [e for e in batch if e is not END and not isinstance(e, Exception)]
        ending = [e for e in batch if e is END or isinstance(e, Exception)]
        for e in ending:
            events.put(e)
        if arrived:
            yield arrived
        elif ending:
            if isinstance(ending[0], Exception):
                raise ending[0]
            return


def _next(events: queue.Queue) -> object:
    """The next event, waited for in short waits: a terminal's Ctrl-C (SIGINT) that lands just before a wait begins
    does not interrupt it, and is raised here at the end of that wait instead of after the model's next token."""
    while True:
        try:
            return events.get(timeout=SIGNAL_POLL_S)
        except queue.Empty:
            pass


def in_batches(turn: Turn) -> Iterator[list[Event]]:
    """Run the turn in a worker thread and yield, each time the caller asks, every event that arrived meanwhile.

    A reader slower than the model (a page that re-sends the whole chat on each update) gets fewer,
    larger batches instead of falling behind. Closing the iterator cancels the turn and waits for the
    worker, which stops within one token step; the error the turn ended with is re-raised.
    """
    events: queue.Queue = queue.Queue()
    worker = threading.Thread(target=pump, args=(turn, events), name="turn", daemon=True)
    worker.start()
    try:
        yield from drain(events)
    finally:
        turn.cancel()
        worker.join()
