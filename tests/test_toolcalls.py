"""Tool-call parsers on whole replies and on every way a stream can split them, and timestamp spans."""

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chat.toolcalls import (
    Gemma4Parser,
    HermesParser,
    ReActParser,
    get_parser,
)
from chat.families import get_family

ARGUMENTS = {"audio": 2, "ranges": [[3.04, 3.23]]}
HERMES_CALL = f'<tool_call>\n{{"name": "delete_ranges", "arguments": {json.dumps(ARGUMENTS)}}}\n</tool_call>'
REACT_CALL = f"Action: delete_ranges\nAction Input: {json.dumps(ARGUMENTS)}"
CALLS = {"hermes": HERMES_CALL, "react": REACT_CALL}
BEFORE, AFTER = "I'll remove it. ", "\nDone."


def stream(style: str, chunks: list[str]) -> tuple[list[str], list]:
    """Feed chunks then finish; returns every piece of text shown and every call, in order."""
    parser = get_parser(style)
    shown, calls = [], []
    for chunk in chunks:
        text, new = parser.feed(chunk)
        shown.append(text)
        calls += new
    text, new = parser.finish()
    return shown + [text], calls + new


def splits(text: str, n_pieces: int):
    """Every way to cut text into n_pieces consecutive (possibly empty) chunks."""
    for cuts in itertools.combinations_with_replacement(range(len(text) + 1), n_pieces - 1):
        bounds = (0, *cuts, len(text))
        yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


def check_one_call(style: str, chunks: list[str], before: str = BEFORE, after: str = AFTER) -> None:
    shown, calls = stream(style, chunks)
    assert "".join(shown) == before + after
    assert [(c.name, c.arguments, c.error) for c in calls] == [("delete_ranges", ARGUMENTS, "")]
    assert calls[0].end == len(before + CALLS[style])  # where the recorded reply is cut
    assert not any(marker in piece for piece in shown for marker in ("<tool", "_call>", "Action"))


@pytest.mark.parametrize("style", CALLS)
def test_a_whole_reply_gives_its_text_and_call(style):
    check_one_call(style, [BEFORE + CALLS[style] + AFTER])


@pytest.mark.parametrize("style", CALLS)
@pytest.mark.parametrize("n_pieces", [2, 3])
def test_every_2_and_3_way_split_finds_the_call_and_never_shows_it(style, n_pieces):
    reply = BEFORE + CALLS[style] + AFTER
    for chunks in splits(reply, n_pieces):
        check_one_call(style, chunks)


@given(
    style=st.sampled_from(sorted(CALLS)),
    before=st.text(alphabet="abc <>|{}:\n", max_size=20),
    cut_points=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_any_chunking_of_any_surrounding_text(style, before, cut_points):
    reply = before + CALLS[style] + AFTER
    bounds = sorted({0, len(reply), *(p % (len(reply) + 1) for p in cut_points)})
    check_one_call(style, [reply[a:b] for a, b in zip(bounds, bounds[1:])], before=before)


def test_a_partial_tag_is_held_back_then_released_when_it_is_not_a_call():
    parser = HermesParser()
    assert parser.feed("Hello <tool") == ("Hello ", [])
    assert parser.feed("box> here") == ("<toolbox> here", [])
    assert parser.feed(" <") == (" ", [])
    assert parser.finish() == ("<", [])


def test_text_after_a_call_in_the_same_chunk_waits_for_the_next_feed():
    parser = HermesParser()
    text, calls = parser.feed("A" + HERMES_CALL + "B" + HERMES_CALL + "C")
    assert (text, len(calls)) == ("A", 1)
    text, calls = parser.feed("")
    assert (text, len(calls), calls[0].end) == ("B", 1, 2 + 2 * len(HERMES_CALL))
    assert parser.finish() == ("C", [])


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('{"name": "reverse", "arguments": {"audio": 1,}}', "not valid JSON"),
        ('{"arguments": {"audio": 1}}', 'a "name" string'),
        ('["reverse", 1]', 'a "name" string'),
        ('{"name": "reverse", "arguments": [1]}', '"arguments" must be a JSON object'),
        ("[" * 100_000, "not valid JSON"),  # deep nesting must not crash the parser
    ],
)
def test_a_malformed_hermes_call_is_reported_not_raised(body, error):
    shown, calls = stream("hermes", [f"<tool_call>{body}</tool_call>after"])
    assert len(calls) == 1 and error in calls[0].error
    assert "".join(shown) == "after"


def test_arguments_sent_as_a_json_string_are_accepted():
    call = '<tool_call>{"name": "reverse", "arguments": "{\\"audio\\": 1}"}</tool_call>'
    _, calls = stream("hermes", [call])
    assert (calls[0].name, calls[0].arguments, calls[0].error) == ("reverse", {"audio": 1}, "")


def test_a_hermes_call_left_open_at_the_end_of_the_reply():
    _, calls = stream("hermes", ['<tool_call>\n{"name": "reverse", "arguments": {"audio": 1}}\n'])
    assert (calls[0].name, calls[0].arguments, calls[0].error) == ("reverse", {"audio": 1}, "")
    _, calls = stream("hermes", ['<tool_call>\n{"name": "reverse", "argu'])
    assert "cut off before </tool_call>" in calls[0].error


def test_react_reads_multi_line_json_and_stops_before_the_observation():
    reply = 'Thought: reverse it\nAction: reverse\nAction Input: {\n  "audio": 1\n}\nObservation: made up'
    shown, calls = stream("react", list(reply))
    assert (calls[0].name, calls[0].arguments) == ("reverse", {"audio": 1})
    assert reply[: calls[0].end].endswith("}")
    assert "".join(shown) == "Thought: reverse it\n\nObservation: made up"


def test_react_input_that_is_not_an_object_is_an_error_call():
    _, calls = stream("react", ["Action: reverse\nAction Input: 2\nmore"])
    assert calls[0].name == "reverse" and "must be one JSON object" in calls[0].error


def test_react_action_without_input_is_plain_text():
    reply = "Action: none needed\nThe clip is fine."
    shown, calls = stream("react", list(reply))
    assert calls == [] and "".join(shown) == reply


def test_styles_and_their_registry():
    assert get_family("qwen2-audio").tool_style == "hermes" and get_family("qwen-audio-chat").tool_style == "react"
    assert isinstance(get_parser("react"), ReActParser)
    with pytest.raises(ValueError, match="choose one of: hermes, qwen3, react, mistral"):
        get_parser("xml")


@pytest.mark.parametrize("style", CALLS)
def test_the_prompt_example_parses_in_its_own_format(style):
    example = ("delete_ranges", ARGUMENTS, "remove 3.04 to 3.23 s from Audio 2")
    text = get_parser(style).instructions("Edit clips.", [], example)
    _, calls = stream(style, [text.split("Example, to remove 3.04 to 3.23 s from Audio 2:\n")[1]])
    assert (calls[0].name, calls[0].arguments, calls[0].error) == ("delete_ranges", ARGUMENTS, "")


def read_on(style: str, chunks: list[str]):
    """Feed chunks then finish, reading on after each call as a turn does; returns (shown, calls, parser)."""
    parser, shown, calls = get_parser(style), [], []

    def take(result: tuple[str, list], more) -> None:
        while True:
            shown.append(result[0])
            calls.extend(result[1])
            if not result[1]:
                return
            result = more()

    for chunk in chunks:
        take(parser.feed(chunk), lambda: parser.feed(""))
    take(parser.finish(), parser.finish)
    return shown, calls, parser


def test_several_hermes_calls_are_read_on_every_split_and_a_result_the_model_writes_ends_the_reply():
    calls_part = "A" + HERMES_CALL + "\n" + HERMES_CALL
    reply = calls_part + "\n<tool_response>\nmade up\n</tool_response>" + HERMES_CALL + "more"
    for chunks in splits(reply, 2):
        shown, calls, parser = read_on("hermes", chunks)
        assert [c.end for c in calls] == [len("A" + HERMES_CALL), len(calls_part)] and parser.ended
        assert "".join(shown) == "A\n\n"  # nothing of the made-up result, nor of what follows it


def test_a_result_tag_before_any_call_is_text():
    shown, calls, parser = read_on("hermes", ["It comes in <tool_response> tags."])
    assert "".join(shown) == "It comes in <tool_response> tags." and not calls and not parser.ended


def test_which_formats_make_several_calls_per_reply():
    assert get_parser("hermes").several_calls
    assert not get_parser("react").several_calls  # it stops at its Observation
    assert not get_parser("mistral").several_calls  # a list is read as its first call


# Gemma 4: <|tool_call>call:NAME{ARGS}<tool_call|>, in its own argument syntax (chat.gemma4_args)

Q = '<|"|>'  # Gemma 4's string mark
GEMMA4_CALLS = [  # the app's tools' argument shapes, as Gemma 4's template writes them: keys sorted and unquoted
    ("delete_ranges", {"audio": 1, "ranges": [[0.52, 0.91]]},
     "<|tool_call>call:delete_ranges{audio:1,ranges:[[0.52,0.91]]}<tool_call|>"),
    ("change_volume", {"audio": 2, "gain_db": -6.5},
     "<|tool_call>call:change_volume{audio:2,gain_db:-6.5}<tool_call|>"),
    ("change_volume", {"audio": 2, "gain_db": 3, "start_s": 1.0, "end_s": 2.25},
     "<|tool_call>call:change_volume{audio:2,end_s:2.25,gain_db:3,start_s:1.0}<tool_call|>"),
    ("find_words", {"audio": 1}, "<|tool_call>call:find_words{audio:1}<tool_call|>"),
]
NESTED_BODY = (
    f"call:tag{{flag:true,label:{Q}Say \"hi\", {{not}} [a list]: 'x'{Q},offset:-1.5e-3,"
    "pairs:[[0,0.5],[1.25,-2]],opts:{deep:{n:-7,ok:false}},none:null,empty:[]}"
)
NESTED_ARGUMENTS = {
    "flag": True, "label": 'Say "hi", {not} [a list]: \'x\'', "offset": -0.0015,
    "pairs": [[0, 0.5], [1.25, -2]], "opts": {"deep": {"n": -7, "ok": False}}, "none": None, "empty": [],
}


@pytest.mark.parametrize(("name", "arguments", "written"), GEMMA4_CALLS)
def test_gemma4_writes_a_call_as_its_template_does_and_reads_it_back(name, arguments, written):
    assert Gemma4Parser.write(name, arguments) == written
    shown, calls = stream("gemma4", ["Sure. " + written])
    assert "".join(shown) == "Sure. " and [(c.name, c.arguments, c.error) for c in calls] == [(name, arguments, "")]
    assert type(calls[0].arguments["audio"]) is int  # a clip number stays an int, a time or gain a float


def test_gemma4_orders_keys_as_jinja_dictsort_and_writes_values_as_jinja_prints_them():
    arguments = {"b": [True, False, None], "C": 1e-7, "a": {"Z": "x y", "y": 2.0}}
    written = Gemma4Parser.write("f", arguments)
    assert written == f"<|tool_call>call:f{{a:{{y:2.0,Z:{Q}x y{Q}}},b:[true,false,None],C:1e-07}}<tool_call|>"
    _, calls = stream("gemma4", [written])
    assert (calls[0].arguments, calls[0].error) == (arguments, "")


GEMMA4_KEYS = st.from_regex(r"[A-Za-z_]\w{0,5}", fullmatch=True)
GEMMA4_VALUES = st.recursive(  # every JSON value, strings with anything but the mark (which has no escape)
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet='ab {}[],:"<|>\n').filter(lambda s: Q not in s),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(GEMMA4_KEYS, inner, max_size=3),
    max_leaves=10,
)


@given(arguments=st.dictionaries(GEMMA4_KEYS, GEMMA4_VALUES, max_size=4))
def test_gemma4_reads_back_whatever_it_writes(arguments):
    _, calls = stream("gemma4", [Gemma4Parser.write("f", arguments)])
    assert [(c.name, c.arguments, c.error) for c in calls] == [("f", arguments, "")]


def test_gemma4_reads_nested_arguments_and_any_strings_between_the_marks():
    _, calls = stream("gemma4", [f"<|tool_call>{NESTED_BODY}<tool_call|>"])
    assert [(c.name, c.arguments, c.error) for c in calls] == [("tag", NESTED_ARGUMENTS, "")]
    spaced = "call:tag { audio : 1 ,\n ranges : [ [ 0.5 , 1 ] ] }"  # whitespace between tokens is allowed
    _, calls = stream("gemma4", [f"<|tool_call>{spaced}<tool_call|>"])
    assert (calls[0].arguments, calls[0].error) == ({"audio": 1, "ranges": [[0.5, 1]]}, "")
    assert Gemma4Parser.write("tag", NESTED_ARGUMENTS).count(Q) == 2  # only the one string is marked


def test_gemma4_text_two_calls_and_text_are_read_on_every_2_way_split():
    first, second = GEMMA4_CALLS[0][2], f"<|tool_call>{NESTED_BODY}<tool_call|>"
    before, after = "I'll cut it, then tag it. ", "\nBoth done."
    reply = before + first + second + after
    expected = [("delete_ranges", GEMMA4_CALLS[0][1], ""), ("tag", NESTED_ARGUMENTS, "")]
    for chunks in splits(reply, 2):
        shown, calls, parser = read_on("gemma4", chunks)
        assert "".join(shown) == before + after
        assert [(c.name, c.arguments, c.error) for c in calls] == expected
        assert [c.end for c in calls] == [len(before + first), len(before + first + second)] and not parser.ended
        assert not any(mark in piece for piece in shown for mark in ("<|", "|>", "call:"))


def test_gemma4_one_call_is_read_on_every_3_way_split():
    reply = "Cut. " + GEMMA4_CALLS[1][2] + " Done."
    for chunks in splits(reply, 3):
        shown, calls, _ = read_on("gemma4", chunks)
        assert "".join(shown) == "Cut.  Done."
        assert [(c.name, c.arguments, c.error) for c in calls] == [("change_volume", GEMMA4_CALLS[1][1], "")]


@pytest.mark.parametrize(
    "text",
    [
        "Gemma writes call:reverse{audio:1} inside its tags; <|tool> declares one, <|tool_response> answers.",
        "Tokens like <|tool_call or <tool_call|> alone, or <|turn>, are only text: call:x{",
    ],
)
def test_gemma4_text_that_mentions_calls_stays_text(text):
    for chunks in splits(text, 2):
        shown, calls, parser = read_on("gemma4", chunks)
        assert "".join(shown) == text and not calls and not parser.ended


def test_gemma4_a_result_the_model_writes_itself_ends_the_reply():
    call = GEMMA4_CALLS[2][2]
    reply = "A" + call + "<|tool_response>response:find_words{value:<|\"|>made up<|\"|>}<tool_response|>" + call
    shown, calls, parser = read_on("gemma4", [reply])
    assert "".join(shown) == "A" and len(calls) == 1 and parser.ended


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("call:reverse{audio:1,}", "expected an argument name, found '}'"),
        ("call:reverse{audio 1}", "expected the : after the argument name audio"),
        ("call:reverse{unit:celsius}", "'celsius' is not a value: write text between <|\"|> marks"),
        ('call:reverse{unit:"celsius"}', "strings go between <|\"|> marks, not quotes"),
        ('call:reverse{"audio":1}', "expected an argument name"),
        ("call:reverse{audio:1,audio:2}", "the argument audio is given twice"),
        ("call:reverse{audio:1.2.3}", "is not a value"),
        ("call:reverse{audio:.5}", "is not a value"),
        ("call:reverse{ranges:[[1,2}]}", "expected a , or the closing ] of a list, found '}]}'"),
        ("call:reverse{audio:1", "they end before a , or the closing }"),
        ("call:reverse{label:<|\"|>open}", "they end before the <|\"|> that closes the string"),
        ("call:reverse{audio:1}junk", "'junk' after its arguments' closing }"),
        ("call:reverse audio:1", "has no arguments {...}"),
        ("call:{audio:1}", "'' is not a tool name"),
        ("call:re verse{}", "'re verse' is not a tool name"),
        ('reverse{audio:1}', "A tool call must start with call:NAME{"),
        ("", "A tool call must start with call:NAME{"),
        ("call:reverse{a:" + "[" * 100_000, "nest lists and objects more than 32 deep"),  # no RecursionError
    ],
)
def test_a_malformed_gemma4_call_is_reported_not_raised(body, error):
    shown, calls = stream("gemma4", [f"<|tool_call>{body}<tool_call|>after"])
    assert len(calls) == 1 and error in calls[0].error and not calls[0].arguments
    assert "Write <|tool_call>call:NAME{key:value,...}<tool_call|>" in calls[0].error  # how to write it instead
    assert "".join(shown) == "after"


@pytest.mark.parametrize(
    ("reply", "name", "missing"),
    [
        ("<|tool_call>call:delete_ranges{audio:1,ranges:[[0.5", "delete_ranges", "a , or the closing ] of a list"),
        ("<|tool_call>call:tag{label:<|\"|>half a sen", "tag", "the <|\"|> that closes the string 'half a sen'"),
        ("<|tool_call>call:tag{label:", "tag", "a value"),
        ("<|tool_call>call:tag", "tag", "its arguments {...}"),
        ("<|tool_call>ca", "", "<tool_call|>."),
        ("<|tool_call>", "", "<tool_call|>."),
    ],
)
def test_a_gemma4_call_cut_off_by_the_end_of_the_reply_says_what_is_missing(reply, name, missing):
    for chunks in splits("Sure: " + reply, 2):
        shown, calls, _ = read_on("gemma4", chunks)
        assert "".join(shown) == "Sure: " and [(c.name, c.arguments) for c in calls] == [(name, {})]
        assert calls[0].error.startswith("The tool call was cut off before <tool_call|>") and missing in calls[0].error


def test_a_gemma4_call_complete_but_for_its_closing_token_is_read():
    _, calls = stream("gemma4", ["<|tool_call>call:find_words{audio:1}"])  # a backend that stops on <tool_call|>
    assert [(c.name, c.arguments, c.error) for c in calls] == [("find_words", {"audio": 1}, "")]


def test_gemma4_is_a_native_style_that_makes_several_calls():
    parser = get_parser("gemma4")
    assert isinstance(parser, Gemma4Parser) and parser.native and parser.several_calls
    assert parser.instructions("Edit clips.", [{"type": "function"}], None) == "Edit clips."
