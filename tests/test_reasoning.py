"""A reply's opening thinking, split off as it streams: on every split of its tags, with and without calls."""

import pytest

from chat.reasoning import ReasoningReader
from chat.toolcalls import HermesParser, ReplyReader, get_parser
from tests.test_toolcalls import HERMES_CALL, splits

TAGS = ("<think>", "</think>")
THOUGHT = "Cut 3.04 to 3.23 s.\nThen say so."
ANSWER = "I'll remove it. "
REPLY = f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}{HERMES_CALL}\nDone."


def read(chunks: list[str], tools: bool = True) -> tuple[list[str], str, list[str], list]:
    """Feed chunks then finish (reading on after each call); returns (each piece of reasoning as it grew, the
    reasoning, each piece of text shown, every call)."""
    reader = ReasoningReader(TAGS, HermesParser() if tools else ReplyReader())
    grown, shown, calls = [], [], []

    def step(result: tuple[str, list]) -> bool:
        if len(reader.reasoning) > len("".join(grown)):
            assert reader.reasoning.startswith("".join(grown))  # thinking shown is never taken back
            grown.append(reader.reasoning[len("".join(grown)):])
        shown.append(result[0])
        calls.extend(result[1])
        return bool(result[1])

    for chunk in chunks:
        if step(reader.feed(chunk)):
            while step(reader.feed("")):  # the parser stops at each call: read on
                pass
    while step(reader.finish()):
        pass
    return grown, reader.reasoning, shown, calls


def check(chunks: list[str]) -> None:
    grown, reasoning, shown, calls = read(chunks)
    assert reasoning == THOUGHT and "".join(grown) == THOUGHT
    assert "".join(shown) == ANSWER + "\nDone."  # the newlines between thinking and answer are neither
    assert [(c.name, c.error) for c in calls] == [("delete_ranges", "")]
    assert REPLY[: calls[0].end] == REPLY[: REPLY.index(HERMES_CALL) + len(HERMES_CALL)]  # counted in the whole reply


def test_a_whole_reply_gives_its_thinking_its_answer_and_its_call():
    check([REPLY])


@pytest.mark.parametrize("n_pieces", [2, 3])
def test_every_2_and_3_way_split_of_the_thinking_and_its_tags(n_pieces):
    head = REPLY[: REPLY.index(ANSWER) + 3]  # every split point in the tags, the thinking and the newlines around
    tail = REPLY[len(head):]
    for chunks in splits(head, n_pieces):
        check(chunks[:-1] + [chunks[-1] + tail])


def test_every_split_one_character_at_a_time():
    check(list(REPLY))


def test_a_call_inside_the_thinking_is_not_a_call():
    reply = f"<think>\nMaybe {HERMES_CALL}? No.\n</think>\n\nNo edit is needed."
    for chunks in splits(reply, 2):
        _, reasoning, shown, calls = read(chunks)
        assert calls == [] and reasoning == f"Maybe {HERMES_CALL}? No." and "".join(shown) == "No edit is needed."


def test_a_reply_without_thinking_is_read_as_it_is():
    for reply in ["  Hello <b>there</b>", "<thin", "<thinking about it", ""]:
        for chunks in splits(reply, 2):
            grown, reasoning, shown, _ = read(chunks, tools=False)
            assert (grown, reasoning, "".join(shown)) == ([], "", reply)


def test_thinking_after_the_start_of_the_reply_is_answer_text():
    reply = "Sure. <think>x</think> done"
    _, reasoning, shown, _ = read([reply], tools=False)
    assert reasoning == "" and "".join(shown) == reply


@pytest.mark.parametrize("cut", ["<think>\nHalf a thou", "<think>\nHalf a thou\n</thi", "<think>\nHalf a thou\n\n"])
def test_a_reply_cut_off_while_thinking_keeps_what_was_thought(cut):
    for chunks in splits(cut, 2):
        grown, reasoning, shown, calls = read(chunks)
        assert reasoning == "Half a thou" == "".join(grown) and "".join(shown) == "" and calls == []


def test_empty_thinking_and_leading_whitespace():
    _, reasoning, shown, _ = read(["\n <think>\n\n</think>\n\nHi"], tools=False)
    assert (reasoning, "".join(shown)) == ("", "Hi")


def test_the_readers_of_families_with_and_without_reasoning_tags():
    from chat.families import DEFAULT_FAMILY

    class Thinking(type(DEFAULT_FAMILY)):
        reasoning_tags = TAGS

    reader = Thinking().reader(tools=True)
    assert isinstance(reader, ReasoningReader) and isinstance(reader.then, HermesParser) and reader.several_calls
    assert not isinstance(DEFAULT_FAMILY.reader(tools=True), ReasoningReader)
    assert not ReasoningReader(TAGS, get_parser("react")).several_calls
