"""Speech-editing tools the model can call: typed functions whose JSON schemas come from their signatures.

A tool takes clip numbers, numbers and booleans only, so no call can name a file, run a command or
reach the network. Every result is a new clip with the next Audio number; the originals never change,
and a bad call comes back as an error message for the model instead of an exception.
"""

from __future__ import annotations

import inspect
import math
import reprlib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from chat.audio import MIN_CLIP_S, SAMPLE_RATE
from chat.clip import EDITED, Clip
from chat.conversation import DEFAULT_SYSTEM_PROMPT, Conversation
from chat.edit_tools import EDITS, Audio, Edit, word_finder
from chat.errors import ChatError
from chat.timestamps import DEFAULT_WORD_MODEL, WordTimestamper
from chat.toolcalls import get_parser

if TYPE_CHECKING:  # the backends import the families, whose timestamp edits (Qwen-Audio-Chat's) use these tools
    from chat.backend import Backend

MAX_ITEMS = 50  # longest list a call may pass (ranges, clips to join)
ERROR_PREFIX = "Error: "  # how a refused or failed call reads in its tool message


@dataclass(frozen=True)
class ToolResult:
    """What a call produced: text for the model, and a clip (not yet added) or an error."""

    text: str
    clip: Clip | None = None
    error: str | None = None

    @classmethod
    def failure(cls, message: str) -> "ToolResult":
        """A refused or failed call: the message goes to the model after ERROR_PREFIX."""
        return cls(ERROR_PREFIX + message, error=message)


@dataclass(frozen=True)
class Tool:
    """A function the model may call, with the JSON schema of its arguments."""

    name: str
    description: str
    schema: dict  # {"type": "object", "properties": {...}, "required": [...]}
    function: Callable[..., Edit | str]

    @classmethod
    def from_function(cls, function: Callable[..., Edit | str]) -> "Tool":
        """Name, schema and description from a typed function and the first line of its docstring."""
        hints = typing.get_type_hints(function, include_extras=True)
        properties, required = {}, []
        for name, parameter in inspect.signature(function).parameters.items():
            properties[name] = _schema(hints[name])
            if parameter.default is inspect.Parameter.empty:
                required.append(name)
            elif parameter.default is not None:
                properties[name]["default"] = parameter.default
        schema = {"type": "object", "properties": properties, "required": required}
        return cls(function.__name__, inspect.getdoc(function).splitlines()[0], schema, function)

    def spec(self) -> dict:
        """The function declaration Qwen's and OpenAI's formats use."""
        function = {"name": self.name, "description": self.description, "parameters": self.schema}
        return {"type": "function", "function": function}


def toolbox_for(
    backend: Backend, enabled: bool | None = None, word_model: str = DEFAULT_WORD_MODEL
) -> "ToolBox | None":
    """Every tool, finding words with word_model (a Whisper hub id or folder); None when off or unsupported.

    enabled None follows the model family (Family.offers_tools); True or False is a person's choice.
    """
    enabled = backend.family.offers_tools if enabled is None else enabled
    can_call = backend.supports_tools and backend.family.tool_style is not None  # None: never trained on tool calls
    return ToolBox(words=WordTimestamper(word_model)) if enabled and can_call else None


def tools_note(backend: Backend) -> str:
    """A sentence saying why the editing tools are off for the loaded model, where they cannot be on; else empty."""
    if backend.family.tool_style is None:
        return f"{backend.family.title} was not trained to call tools, so the speech-editing tools are off for it."
    return ""


class ToolBox:
    """The tools offered to the model, by name: every edit plus find_words unless a list is given."""

    def __init__(self, tools: Iterable[Tool] | None = None, words: WordTimestamper | None = None) -> None:
        if tools is None:
            words = words or WordTimestamper(DEFAULT_WORD_MODEL)
            tools = [Tool.from_function(function) for function in (*EDITS, word_finder(words))]
        self.tools = {tool.name: tool for tool in tools}


def run_tool_call(
    conversation: Conversation, name: str, arguments: object, toolbox: ToolBox | None = None
) -> ToolResult:
    """Check and run one call. A bad or failing call becomes an error result; the conversation never changes."""
    toolbox = toolbox or ToolBox()
    tool = toolbox.tools.get(name) if isinstance(name, str) else None
    if tool is None:
        return ToolResult.failure(f"There is no tool {reprlib.repr(name)}; the tools are: {', '.join(toolbox.tools)}.")
    try:
        output = tool.function(**_arguments(tool, arguments, conversation))
        return ToolResult(output) if isinstance(output, str) else new_clip(conversation, tool.name, output)
    except (ChatError, ValueError, RuntimeError) as e:  # RuntimeError: ffmpeg or the word model failed
        return ToolResult.failure(f"{tool.name}: {e}")


TOOLS_INTRO = (
    "You can edit audio clips with tools. Refer to a clip by its number (2 means Audio 2); times are in "
    "seconds. Each edit makes a new clip with the next number and leaves the others as they are."
)
CLIENT_TOOLS_INTRO = "You may call one or more functions to assist with the user query."  # Qwen's own words
WORDS_HINT = " To edit by words, first call find_words to learn when each word is said."
EXAMPLE_CALL = ("delete_ranges", {"audio": 2, "ranges": [[3.04, 3.23]]}, "remove 3.04 to 3.23 s from Audio 2")


def client_tool_system_prompt(specs: tuple[dict, ...], style: str, system_prompt: str) -> str:
    """The system prompt with tools a client runs itself (OpenAI function specs) and how to call them, in the family's
    format; where the family's template lists them (a native style), only the intro."""
    instructions = get_parser(style).instructions(CLIENT_TOOLS_INTRO, list(specs), None)
    return f"{system_prompt or DEFAULT_SYSTEM_PROMPT}\n\n{instructions}"


def tool_system_prompt(toolbox: ToolBox, style: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The user's system prompt followed by the tools and how to call them, in the family's format (see toolcalls)."""
    intro = TOOLS_INTRO + (WORDS_HINT if "find_words" in toolbox.tools else "")
    example = EXAMPLE_CALL if EXAMPLE_CALL[0] in toolbox.tools else None
    specs = [tool.spec() for tool in toolbox.tools.values()]
    return f"{system_prompt or DEFAULT_SYSTEM_PROMPT}\n\n{get_parser(style).instructions(intro, specs, example)}"


def _schema(annotation: object) -> dict:
    """The JSON schema of an argument type: clip numbers, numbers, booleans and lists of them, nothing else."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _schema(args[0]) | args[1].schema()
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        return _schema(args[0] if args[1] is type(None) else args[1])
    if origin in (list, tuple):
        n_min, n_max = (1, MAX_ITEMS) if origin is list else (len(args), len(args))
        return {"type": "array", "items": _schema(args[0]), "minItems": n_min, "maxItems": n_max}
    # Audio is a clip's number; the prompt's introduction says so once for every tool.
    simple = {Audio: {"type": "integer", "minimum": 1}, float: {"type": "number"}, bool: {"type": "boolean"}}
    if annotation not in simple:
        raise TypeError(f"A tool argument cannot be {annotation!r}: use Audio, float, bool, or lists of them.")
    return dict(simple[annotation])


def _arguments(tool: Tool, arguments: object, conversation: Conversation) -> dict:
    """Keyword arguments for the tool's function, checked against its schema, with clip numbers made Audio."""
    properties, required = tool.schema["properties"], tool.schema["required"]
    if not isinstance(arguments, dict):
        raise ValueError(f"arguments must be a JSON object such as {{\"audio\": 1}}, got {reprlib.repr(arguments)}.")
    unknown = [name for name in arguments if name not in properties]
    missing = [name for name in required if name not in arguments]
    if unknown or missing:
        problem = f"unknown argument {unknown[0]!r}" if unknown else f"missing argument {missing[0]!r}"
        raise ValueError(f"{problem}; its arguments are {', '.join(properties)} (required: {', '.join(required)}).")
    hints = typing.get_type_hints(tool.function, include_extras=True)
    return {
        name: _with_clips(_check(value, properties[name], name), hints[name], conversation)
        for name, value in arguments.items()
        if not (value is None and name not in required)  # null means "use the default"
    }


def _check(value: object, schema: dict, name: str) -> object:
    """value if it fits the schema (whole floats become ints where an integer is due); else ValueError."""
    kind = schema["type"]
    if kind == "array":
        n_min, n_max = schema["minItems"], schema["maxItems"]
        if not isinstance(value, list) or not n_min <= len(value) <= n_max:
            count = n_min if n_min == n_max else f"{n_min} to {n_max}"
            raise ValueError(f"{name} must be a list of {count} items, got {reprlib.repr(value)}.")
        return [_check(item, schema["items"], f"{name}[{i}]") for i, item in enumerate(value)]
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {reprlib.repr(value)}.")
        return value
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not finite:
        raise ValueError(f"{name} must be a finite number, got {reprlib.repr(value)}.")
    if kind == "integer":
        if value != int(value):
            raise ValueError(f"{name} must be a whole number, got {value!r}.")
        value = int(value)
    low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
    if not low <= value <= high:
        bounds = f"at least {low:g}" if high == math.inf else f"between {low:g} and {high:g}"
        raise ValueError(f"{name} must be {bounds}, got {reprlib.repr(value)}.")
    return value


def _with_clips(value: object, annotation: object, conversation: Conversation) -> object:
    """Clip numbers of an Audio or list[Audio] argument as Audio; other values unchanged."""
    while typing.get_origin(annotation) in (Annotated, typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is Audio:
        return Audio(value, conversation.clip(value))
    if annotation == list[Audio]:
        return [Audio(n, conversation.clip(n)) for n in value]
    return value


def new_clip(conversation: Conversation, tool_name: str, edit: Edit, n_pending: int = 0) -> ToolResult:
    """The edit as a clip numbered as it will be once added (after n_pending clips not yet added); ValueError when it
    is too short or exactly a clip of the conversation."""
    number = len(conversation.clips()) + n_pending + 1
    duration_s = len(edit.samples) / SAMPLE_RATE
    if duration_s < MIN_CLIP_S:
        raise ValueError(f"the result would be only {duration_s:.3f} s long; clips need at least {MIN_CLIP_S:g} s.")
    clip = Clip(edit.samples, name=f"audio{number}-{tool_name}.wav", source=EDITED, note=edit.how)
    same = [n for n, known in enumerate(conversation.clips(), start=1) if known.id == clip.id]
    if same:
        raise ValueError(f"the result is exactly Audio {same[0]}, so no new clip was made.")
    return ToolResult(f"Audio {number} = {edit.how} ({clip.duration_s:.2f} s).", clip)
