"""Tool calls in a streamed reply: Hermes `<tool_call>` JSON, ReAct `Action:` lines, Mistral's `[TOOL_CALLS]`, Gemma 4's
`<|tool_call>call:NAME{...}<tool_call|>`.

A parser is fed the reply chunk by chunk and returns the text that is safe to show plus the calls
completed so far. Text that might be the start of a call is held back until it is clearly not one,
so a call split anywhere across chunks, even inside its tag, is never shown half-written.
A reply's opening thinking is split off before the parser sees it (chat.reasoning).
"""

import json
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

from chat.gemma4_args import STRING_MARK, ArgumentSyntaxError, read_object, write_members


@dataclass(frozen=True)
class ToolCall:
    """A call the model wrote; error says why it could not be read (then name/arguments may be empty)."""

    name: str
    arguments: dict
    error: str = ""
    end: int = 0  # characters of the reply up to and including the call (set by the parser)


class ReplyReader:
    """Reads a streamed reply into the text meant for the person and the tool calls it makes; this base finds none."""

    several_calls = False  # whether a reply may make more than one call (else reading stops at its first)
    ended = False  # set once the reply has said all that is read of it (it began writing a tool's result itself)
    reasoning = ""  # the reply's thinking read so far (chat.reasoning.ReasoningReader)

    def feed(self, chunk: str) -> tuple[str, list[ToolCall]]:
        """Add a chunk; returns (text to show now, the call this chunk completed, if any)."""
        return chunk, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The reply ended: release held-back text, and read a call left open as far as possible."""
        return "", []


class ToolCallParser(ReplyReader):
    """Base of one call format: finds `marker`, then `_read` decides where the call ends."""

    style = ""
    marker = ""
    result_marker = ""  # how a tool's result comes back: written by the model after a call, it ends the reply
    native = False  # the tools are listed by the model's own template (Prompt.tools), not in the system prompt

    def __init__(self) -> None:
        self.buffer = ""  # received text not yet shown or parsed
        self.n_consumed = 0  # characters of the reply before the buffer
        self.made_call = False

    def feed(self, chunk: str) -> tuple[str, list[ToolCall]]:
        """Add a chunk; returns (text to show now, the call this chunk completed, if any).

        Reading stops at a completed call, so the text returned always comes before it; what follows
        the call stays buffered for the next feed() (feed("") reads on) or finish().
        """
        self.buffer += chunk
        return self._scan(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The reply ended: release held-back text, and read a call left open as far as possible."""
        return self._scan(final=True)

    def _scan(self, final: bool) -> tuple[str, list[ToolCall]]:
        """Release text up to the next call or possible call; read that call if it is complete."""
        shown = []
        while not self.ended:
            start = self.buffer.find(self.marker)
            result = self.buffer.find(self.result_marker) if self.made_call and self.result_marker else -1
            if result >= 0 and (start < 0 or result < start):
                # a result the model wrote itself: it is imagining what the call returned, and a call it makes
                # next would rest on that, so the reply is read no further
                shown.append(self._take(result))
                self.ended = True
                break
            if start < 0:
                n_held = 0 if final else max(partial_marker(self.buffer, self.marker),
                                             partial_marker(self.buffer, self.result_marker) if self.made_call else 0)
                shown.append(self._take(len(self.buffer) - n_held))
                break
            shown.append(self._take(start))
            read = self._read(self.buffer, final)
            if read is None:  # the call is still arriving
                break
            n_chars, call = read
            text = self._take(n_chars)
            if call is not None:
                self.made_call = True
                return "".join(shown), [replace(call, end=self.n_consumed)]
            shown.append(text)  # the marker began something that is not a call after all
        return "".join(shown), []

    def _take(self, n_chars: int) -> str:
        text, self.buffer = self.buffer[:n_chars], self.buffer[n_chars:]
        self.n_consumed += n_chars
        return text

    def _read(self, held: str, final: bool) -> tuple[int, ToolCall | None] | None:
        """For text starting with the marker: (its length, the call or None if not a call), or None to wait."""
        raise NotImplementedError

    def _enclosed(self, held: str, final: bool) -> tuple[str, int, bool] | None:
        """For a format whose calls end at `closer`: (the body after the marker, the characters up to and including
        the closer, whether it came), or None to wait for it; at the reply's end, the rest is the body."""
        close = held.find(self.closer)
        if close < 0:
            return (held[len(self.marker):], len(held), False) if final else None
        return held[len(self.marker):close], close + len(self.closer), True

    @classmethod
    def write(cls, name: str, arguments: dict) -> str:
        """A call as the model writes it in this format (a client's earlier call, sent back as history)."""
        raise NotImplementedError

    @classmethod
    def instructions(cls, intro: str, specs: list[dict], example: tuple[str, dict, str] | None) -> str:
        """System-prompt text: intro, the tools (OpenAI function specs) and how to call them in this format.

        example is (tool name, arguments, what the call does), shown as the one sample call.
        """
        raise NotImplementedError


class HermesParser(ToolCallParser):
    """Qwen2.5 / Hermes: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, as often as the reply needs
    (Qwen3 makes several calls in one reply, then reads one result per call)."""

    style = "hermes"
    marker = "<tool_call>"
    closer = "</tool_call>"
    result_marker = "<tool_response>"
    several_calls = True

    def _read(self, held: str, final: bool) -> tuple[int, ToolCall | None] | None:
        if (enclosed := self._enclosed(held, final)) is None:
            return None
        body, n_chars, closed = enclosed
        call = _call_from_json(body.strip())
        if not closed and call.error:
            call = ToolCall("", {}, f"The tool call was cut off before {self.closer}. {call.error}")
        return n_chars, call

    @classmethod
    def write(cls, name: str, arguments: dict) -> str:
        """`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`."""
        return f"{cls.marker}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{cls.closer}"

    @classmethod
    def instructions(cls, intro: str, specs: list[dict], example: tuple[str, dict, str] | None) -> str:
        """Qwen2.5's own tool prompt (from its chat template), plus the one example."""
        declarations = "\n".join(json.dumps(spec, ensure_ascii=False) for spec in specs)
        text = (
            f"# Tools\n\n{intro}\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{declarations}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n\n'
            "The result comes back inside <tool_response></tool_response>; then answer the user."
        )
        if example:
            name, arguments, purpose = example
            call = json.dumps({"name": name, "arguments": arguments})
            text += f"\n\nExample, to {purpose}:\n<tool_call>\n{call}\n</tool_call>"
        return text


class Qwen3Parser(HermesParser):
    """Qwen3's own Hermes calls: its chat template lists the tools itself (`# Tools` in the system turn) and wraps
    each result in `<tool_response>`; the model may write several calls in one reply."""

    style = "qwen3"
    native = True

    @classmethod
    def instructions(cls, intro: str, specs: list[dict], example: tuple[str, dict, str] | None) -> str:
        """Only the intro: the template lists the tools and says how to call them."""
        return intro


class ReActParser(ToolCallParser):
    """Qwen-7B-Chat ReAct: `Action: name` then `Action Input: {json}` on the next line."""

    style = "react"
    marker = "Action:"
    input_marker = "Action Input:"

    def _read(self, held: str, final: bool) -> tuple[int, ToolCall | None] | None:
        name_end = held.find("\n")
        if name_end < 0:
            return (len(held), None) if final else None
        name = held[len(self.marker):name_end].strip()
        rest = held[name_end + 1:]
        if not rest.startswith(self.input_marker):
            waiting = self.input_marker.startswith(rest) and not final
            return None if waiting else (name_end + 1, None)
        input_start = name_end + 1 + len(self.input_marker)
        raw = held[input_start:].lstrip()
        input_start = len(held) - len(raw)
        if raw.startswith("{"):
            try:
                arguments, n_json = json.JSONDecoder().raw_decode(raw)
                return input_start + n_json, _checked_call(name, arguments)
            except (ValueError, RecursionError):
                pass  # incomplete so far, or broken: wait for the line to end
        line_end = raw.find("\n") if not raw.startswith("{") else raw.find("\nObservation:")
        if line_end < 0 and not final:
            return None
        n_input = len(raw) if line_end < 0 else line_end
        error = f"Action Input must be one JSON object such as {{\"audio\": 1}}, got {raw[:n_input].strip()[:80]!r}."
        return input_start + n_input, ToolCall(name, {}, error)

    @classmethod
    def write(cls, name: str, arguments: dict) -> str:
        """`Action: name` and `Action Input: {...}` on the next line."""
        return f"{cls.marker} {name}\n{cls.input_marker} {json.dumps(arguments, ensure_ascii=False)}"

    @classmethod
    def instructions(cls, intro: str, specs: list[dict], example: tuple[str, dict, str] | None) -> str:
        """Qwen-7B-Chat's ReAct prompt (tool lines, then the Thought/Action/Observation format), plus the example."""
        functions = [spec["function"] for spec in specs]
        tools = "\n\n".join(
            f"{f['name']}: {f['description']} Parameters: {json.dumps(f['parameters'], ensure_ascii=False)} "
            "Format the arguments as a JSON object."
            for f in functions
        )
        text = (
            f"{intro} You have access to the following tools:\n\n{tools}\n\n"
            "Use the following format:\n\n"
            "Thought: you should always think about what to do\n"
            f"Action: the action to take, should be one of [{', '.join(f['name'] for f in functions)}]\n"
            "Action Input: the input to the action\nObservation: the result of the action\n"
            "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
            "Thought: I now know the final answer\nFinal Answer: the final answer to the original input question"
        )
        if example:
            name, arguments, purpose = example
            text += f"\n\nExample, to {purpose}:\nAction: {name}\nAction Input: {json.dumps(arguments)}"
        return text


class MistralParser(ToolCallParser):
    """Mistral's tokenizers (mistral-common): `[TOOL_CALLS]` then, by tokenizer version, a JSON list of
    `{"name": ..., "arguments": {...}}` (v7 and earlier, and v13 and later) or `name[CALL_ID]id[ARGS]{...}` (v11,
    the call id left out from v13 on). The tools themselves are listed by the tokenizer ([AVAILABLE_TOOLS]).

    A list of several calls is read as its first call: the app runs one call at a time and the model, shown
    that call's result, asks for the next.
    """

    style = "mistral"
    marker = "[TOOL_CALLS]"
    native = True
    args_marker, call_id_marker = "[ARGS]", "[CALL_ID]"

    def _read(self, held: str, final: bool) -> tuple[int, ToolCall | None] | None:
        body_start = len(self.marker)
        body = held[body_start:].lstrip()
        body_start = len(held) - len(body)
        if not body:
            return (len(held), ToolCall("", {}, "The tool call was cut off after [TOOL_CALLS].")) if final else None
        if body.startswith("["):
            return self._read_list(body, body_start, final)
        args = body.find(self.args_marker)
        if args < 0:
            if final:
                return len(held), ToolCall("", {}, f"The tool call {body[:80]!r} has no {self.args_marker} part.")
            return None
        name = body[:args].split(self.call_id_marker)[0].strip()
        raw = body[args + len(self.args_marker):]
        try:
            arguments, n_json = json.JSONDecoder().raw_decode(raw)
        except (ValueError, RecursionError) as e:
            if not final:
                return None
            return len(held), ToolCall(name, {}, f"The arguments of {name} are not valid JSON ({e}).")
        return body_start + args + len(self.args_marker) + n_json, _checked_call(name, arguments)

    def _read_list(self, body: str, body_start: int, final: bool) -> tuple[int, ToolCall | None] | None:
        try:
            calls, n_json = json.JSONDecoder().raw_decode(body)
        except (ValueError, RecursionError) as e:
            if not final:
                return None
            return body_start + len(body), ToolCall("", {}, f"The tool call list is not valid JSON ({e}).")
        first = calls[0] if isinstance(calls, list) and calls else None
        call = _call_from_json(json.dumps(first)) if isinstance(first, dict) else ToolCall(
            "", {}, 'A tool call list needs [{"name": ..., "arguments": {...}}].')
        return body_start + n_json, call

    @classmethod
    def write(cls, name: str, arguments: dict) -> str:
        """`[TOOL_CALLS]` and a one-call JSON list, the form every tokenizer version reads."""
        return f"{cls.marker}{json.dumps([{'name': name, 'arguments': arguments}], ensure_ascii=False)}"

    @classmethod
    def instructions(cls, intro: str, specs: list[dict], example: tuple[str, dict, str] | None) -> str:
        """Only the intro: the tokenizer lists the tools and the model knows its own call format."""
        return intro


class Gemma4Parser(ToolCallParser):
    """Gemma 4: `<|tool_call>call:NAME{key:value,...}<tool_call|>`, as often as the reply needs, in its own argument
    syntax (chat.gemma4_args: unquoted keys, strings between <|"|> marks). The template declares the tools
    (`<|tool>declaration:...<tool|>`) and a result comes back as `<|tool_response>response:NAME{...}<tool_response|>`.

    A call ends at the first <tool_call|>, as vLLM's and transformers' Gemma 4 parsers end it: the format has no
    escape, and a string left open by mistake must not swallow the rest of the reply.
    """

    style = "gemma4"
    marker = "<|tool_call>"
    closer = "<tool_call|>"
    result_marker = "<|tool_response>"
    several_calls = True
    native = True
    call_prefix = "call:"
    name_pattern = re.compile(r"[\w.-]+")  # vLLM's gemma4 parser; transformers' serving reads \w+

    def _read(self, held: str, final: bool) -> tuple[int, ToolCall | None] | None:
        if (enclosed := self._enclosed(held, final)) is None:
            return None
        body, n_chars, closed = enclosed
        return n_chars, self._call(body, cut_off=not closed)

    @classmethod
    def _call(cls, body: str, cut_off: bool) -> ToolCall:
        """A call body `call:NAME{...}` as a ToolCall (error set if malformed; cut_off: the reply ended in it).

        A body complete but for the closer is read as a call: the reply stopped exactly at its end (where a backend
        that stops on <tool_call|> leaves it), as HermesParser reads one left open.
        """
        cut = f"The tool call was cut off before {cls.closer}"
        syntax = f"Write {cls.marker}call:NAME{{key:value,...}}{cls.closer}, strings between {STRING_MARK} marks."
        if not body.startswith(cls.call_prefix):
            if cut_off and cls.call_prefix.startswith(body):
                return ToolCall("", {}, f"{cut}.")
            return ToolCall("", {}, f"A tool call must start with {cls.call_prefix}NAME{{, got {reprlib.repr(body)}. "
                                    + syntax)
        rest = body[len(cls.call_prefix):]
        n_name = rest.find("{")
        name = (rest if n_name < 0 else rest[:n_name]).strip()
        if n_name < 0:
            name = name if cls.name_pattern.fullmatch(name) else ""
            return ToolCall(name, {}, f"{cut}: it ends before its arguments {{...}}." if cut_off else
                            f"The tool call {reprlib.repr(body)} has no arguments {{...}}. {syntax}")
        if not cls.name_pattern.fullmatch(name):
            return ToolCall("", {}, f"{reprlib.repr(name)} is not a tool name (letters, digits, _ . -). {syntax}")
        try:
            arguments, n_args = read_object(rest[n_name:])
        except ArgumentSyntaxError as e:
            if cut_off and e.missing:
                return ToolCall(name, {}, f"{cut}: the arguments of {name} end before {e.missing}.")
            return ToolCall(name, {}, f"The arguments of {name} could not be read: {e}. {syntax}")
        after = rest[n_name + n_args:].strip()
        if after:
            return ToolCall(name, {}, f"The call to {name} has {reprlib.repr(after)} after its arguments' closing }}, "
                                      f"where {cls.closer} should follow. {syntax}")
        return ToolCall(name, arguments)

    @classmethod
    def write(cls, name: str, arguments: dict) -> str:
        """`<|tool_call>call:NAME{key:value,...}<tool_call|>` exactly as the template writes an earlier call (keys
        sorted, unquoted; an argument string it writes as it is, and anything else as `{}`, as the template does)."""
        if isinstance(arguments, Mapping):
            members = write_members(arguments)
        else:
            members = arguments if isinstance(arguments, str) else ""
        return f"{cls.marker}{cls.call_prefix}{name}{{{members}}}{cls.closer}"

    @classmethod
    def instructions(cls, intro: str, specs: list[dict], example: tuple[str, dict, str] | None) -> str:
        """Only the intro: the template declares the tools and the model knows its own call format."""
        return intro


def partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of text that is the start of marker (held back until it resolves)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _call_from_json(body: str) -> ToolCall:
    """A Hermes call body {"name": ..., "arguments": {...}} as a ToolCall (error set if malformed)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        error = f'The tool call is not valid JSON ({e}). Write {{"name": ..., "arguments": {{...}}}}.'
        return ToolCall("", {}, error)
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCall("", {}, 'A tool call needs a JSON object with a "name" string and an "arguments" object.')
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI-style clients send arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            pass
    return _checked_call(data["name"], arguments)


def _checked_call(name: str, arguments: object) -> ToolCall:
    if not isinstance(arguments, dict):
        return ToolCall(name, {}, f'"arguments" must be a JSON object, got {reprlib.repr(arguments)}.')
    return ToolCall(name, arguments)


PARSERS: dict[str, type[ToolCallParser]] = {
    parser.style: parser for parser in (HermesParser, Qwen3Parser, ReActParser, MistralParser, Gemma4Parser)
}


def get_parser(style: str) -> ToolCallParser:
    """A fresh parser for a call style; the error lists the valid names."""
    if style not in PARSERS:
        raise ValueError(f"Unknown tool-call style {style!r}; choose one of: {', '.join(PARSERS)}.")
    return PARSERS[style]()
