"""Gemma 4's own argument syntax, the `{...}` of `<|tool_call>call:NAME{...}<tool_call|>`: read into a dict, written
as Gemma 4's chat template writes it.

The grammar (whitespace is allowed between any two tokens):

    object := "{" [member ("," member)*] "}"
    member := key ":" value                    no key twice
    key    := a run of characters but whitespace : { } [ ] , " '   (unquoted, as calls write them)
            | string                           (the template quotes keys only in tool declarations)
    value  := string | object | array | number | true | false | null | None
    string := <|"|> any text without <|"|> <|"|>   (no escapes: the text between the marks is the string)
    array  := "[" [value ("," value)*] "]"
    number := a JSON number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?   (int unless it has . or e)

It is the value grammar llama.cpp's Gemma 4 parser accepts (common/chat.cpp, common_chat_params_init_gemma4: rules
gemma4-string, -dict, -array, -number = JSON number, -bool, -null), written the way the template's
`format_argument(value, escape_keys=False)` prints a call's arguments (llama.cpp models/templates/gemma4.jinja at
75f1ba7389067a9f90082515e124c377a1e104b2). `None` is read too because that is how the template, rendered by
Jinja, prints a Python None. Bare words are refused where vLLM's parser (vllm/tool_parsers/gemma4_tool_parser.py)
would keep them as strings: the error tells the model how to write a string instead of guessing what it meant.
"""

import re
from collections.abc import Mapping

STRING_MARK = '<|"|>'  # one special token that both opens and closes a string
MAX_DEPTH = 32  # deepest nesting of lists and objects read (no tool needs more; deeper input is refused, not recursed)

_SPACE = re.compile(r"\s*")
_KEY = re.compile(r"[^\s:{}\[\],\"']+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORDS = {"true": True, "false": False, "null": None, "None": None}
_VALUE_END = re.compile(r"\s|[,}\]]|$")  # what may follow a number or word


class ArgumentSyntaxError(ValueError):
    """Text that is not Gemma 4's argument syntax; `missing` says what should follow where the text ends too soon."""

    def __init__(self, message: str, missing: str = "") -> None:
        super().__init__(message)
        self.missing = missing


def read_object(text: str) -> tuple[dict, int]:
    """The object at the start of text (leading whitespace allowed): (its dict, characters read up to its `}`).

    Raises ArgumentSyntaxError saying what is wrong, or what is missing where the text ends too soon.
    """
    reader = _Reader(text)
    reader.skip_space()
    if not text.startswith("{", reader.pos):
        raise reader.unexpected("the { that opens the arguments")
    return reader.object(1), reader.pos


def write_members(arguments: Mapping) -> str:
    """`key:value` pairs joined by commas, keys unquoted, in the template's order (Jinja's dictsort: by key, case
    ignored, ties kept in the order given)."""
    items = sorted(arguments.items(), key=lambda item: item[0].lower() if isinstance(item[0], str) else item[0])
    return ",".join(f"{key}:{write_value(value)}" for key, value in items)


def write_value(value: object) -> str:
    """A value as the template's format_argument(value, escape_keys=False) prints it.

    A string is written between the marks as it is: the format has no escape, so a string holding <|"|> (or
    <tool_call|>) cannot be read back, by this reader or the model, exactly as with the template itself.
    """
    if isinstance(value, str):
        return f"{STRING_MARK}{value}{STRING_MARK}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{" + write_members(value) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(write_value(item) for item in value) + "]"
    return str(value)  # numbers as Jinja prints them (Python's str: 0.52, -6.5, 1e-07), and None as None


class _Reader:
    """A recursive-descent reader over one text; pos is the next character to read."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def object(self, depth: int) -> dict:
        self.pos += 1  # the {
        members: dict = {}
        if self.take("}"):
            return members
        while True:
            key = self.key()
            if not self.take(":"):
                raise self.unexpected(f"the : after the argument name {key}")
            if key in members:
                raise ArgumentSyntaxError(f"the argument {key} is given twice")
            members[key] = self.value(depth)
            if self.take("}"):
                return members
            if not self.take(","):
                raise self.unexpected(f"a , or the closing }} after the value of {key}")

    def array(self, depth: int) -> list:
        self.pos += 1  # the [
        items: list = []
        if self.take("]"):
            return items
        while True:
            items.append(self.value(depth))
            if self.take("]"):
                return items
            if not self.take(","):
                raise self.unexpected("a , or the closing ] of a list")

    def key(self) -> str:
        self.skip_space()
        if self.text.startswith(STRING_MARK, self.pos):
            return self.string()
        match = _KEY.match(self.text, self.pos)
        if not match:
            raise self.unexpected("an argument name")
        self.pos = match.end()
        return match.group()

    def value(self, depth: int) -> object:
        self.skip_space()
        text, pos = self.text, self.pos
        if text.startswith(STRING_MARK, pos):
            return self.string()
        if text.startswith(("{", "["), pos):
            if depth >= MAX_DEPTH:
                raise ArgumentSyntaxError(f"the arguments nest lists and objects more than {MAX_DEPTH} deep")
            return self.object(depth + 1) if text[pos] == "{" else self.array(depth + 1)
        if pos == len(text) or STRING_MARK.startswith(text[pos:]):
            raise self.missing("a value")
        number, word = _NUMBER.match(text, pos), _WORD.match(text, pos)
        match = number or word
        if match and _VALUE_END.match(text, match.end()):
            self.pos = match.end()
            if word:
                if match.group() not in _WORDS:
                    raise ArgumentSyntaxError(f"{match.group()!r} is not a value: write text between {STRING_MARK} "
                                              "marks, numbers as 2 or -6.5, and true, false or null")
                return _WORDS[match.group()]
            return float(match.group()) if match.group(1) or match.group(2) else int(match.group())
        if text.startswith(('"', "'"), pos):
            raise ArgumentSyntaxError(f"strings go between {STRING_MARK} marks, not quotes: {self.snippet()}")
        raise ArgumentSyntaxError(f"{self.snippet()} is not a value (a {STRING_MARK}string{STRING_MARK}, number, "
                                  "true, false, null, [list] or {object})")

    def string(self) -> str:
        start = self.pos + len(STRING_MARK)
        end = self.text.find(STRING_MARK, start)
        if end < 0:
            raise self.missing(f"the {STRING_MARK} that closes the string {self.text[start:start + 30]!r}")
        self.pos = end + len(STRING_MARK)
        return self.text[start:end]

    def take(self, char: str) -> bool:
        """Skip whitespace, then char if it comes next."""
        self.skip_space()
        if self.text.startswith(char, self.pos):
            self.pos += len(char)
            return True
        return False

    def skip_space(self) -> None:
        self.pos = _SPACE.match(self.text, self.pos).end()

    def unexpected(self, expected: str) -> ArgumentSyntaxError:
        if self.pos >= len(self.text):
            return self.missing(expected)
        return ArgumentSyntaxError(f"expected {expected}, found {self.snippet()}")

    def missing(self, expected: str) -> ArgumentSyntaxError:
        return ArgumentSyntaxError(f"they end before {expected}", missing=expected)

    def snippet(self) -> str:
        rest = self.text[self.pos:]
        return repr(rest if len(rest) <= 30 else rest[:27] + "...")
