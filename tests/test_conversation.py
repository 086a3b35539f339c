"""Conversations: numbering that never changes, undo/regenerate/clear, and failed adds that change nothing."""

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat import Clip, Conversation, ConversationError
from chat.audio import SAMPLE_RATE
from chat.conversation import ASSISTANT, TOOL, USER
from tests.conftest import tone


def clip(k: int, seconds: float = 0.5) -> Clip:
    """A distinct clip per k."""
    return Clip.from_array(tone(seconds, 200 + 10 * k), SAMPLE_RATE, name=f"clip{k}.wav")


def snapshot(conversation: Conversation):
    return copy.deepcopy((conversation.system_prompt, conversation.messages, conversation.id))


def test_clips_are_numbered_in_order_across_turns():
    c = Conversation()
    c.add_user("first", [clip(1), clip(2)])
    c.add_assistant("ok")
    c.add_user("", [clip(3)])
    assert [x.name for x in c.clips()] == ["clip1.wav", "clip2.wav", "clip3.wav"]
    assert c.clip(2).name == "clip2.wav" and c.number(clip(3)) == 3


def test_clips_and_text_join_the_open_user_turn():
    c = Conversation()
    c.add_user(clips=[clip(1)])
    c.add_user("What is this?", [clip(2)])
    assert len(c.messages) == 1
    assert c.messages[0].text == "What is this?" and len(c.messages[0].clips) == 2
    assert c.awaiting_reply()


def test_undo_removes_the_last_exchange_and_keeps_earlier_numbers():
    c = Conversation()
    c.add_user("a", [clip(1)])
    c.add_assistant("A")
    c.add_user("b", [clip(2)])
    c.add_assistant("B")
    removed = c.undo()
    assert [m.text for m in removed] == ["b", "B"]
    assert [m.role for m in c.messages] == [USER, ASSISTANT] and c.clip(1).name == "clip1.wav"
    c.add_user("c", [clip(3)])
    assert c.number(clip(3)) == 2


def test_drop_reply_keeps_the_question_for_regeneration():
    c = Conversation()
    c.add_user("q", [clip(1)])
    c.add_assistant("first try")
    c.add_tool("reverse", "Audio 2 made", (clip(2),))
    c.add_assistant("after tool")
    question = c.drop_reply()
    assert question.text == "q" and c.messages == [question] and c.awaiting_reply()


def test_clear_keeps_the_system_prompt():
    c = Conversation(system_prompt="Be brief.")
    c.add_user("hi")
    c.clear()
    assert c.messages == [] and c.system_prompt == "Be brief."


@pytest.mark.parametrize(
    "operation, message",
    [
        (lambda c: c.add_user(""), "Type a message or add a clip"),
        (lambda c: c.add_user("   "), "Type a message or add a clip"),
        (lambda c: c.add_user("again", [clip(1)]), "already in this conversation as Audio 1"),
        (lambda c: c.add_user("twice", [clip(7), clip(7)]), "added twice"),
        (lambda c: c.add_user("x", [clip(8), np.zeros(3)]), "Expected a Clip"),
        (lambda c: c.clip(5), r"no Audio 5 .*Audio 1 to Audio 1"),
        (lambda c: c.add_tool("reverse", "r"), "must follow the reply"),
    ],
)
def test_failed_operations_leave_the_conversation_unchanged(operation, message):
    c = Conversation()
    c.add_user("q", [clip(1)])
    before = snapshot(c)
    with pytest.raises(ConversationError, match=message):
        operation(c)
    assert snapshot(c) == before


def test_undo_and_reply_on_an_empty_conversation_say_so():
    c = Conversation()
    with pytest.raises(ConversationError, match="Nothing to undo"):
        c.undo()
    with pytest.raises(ConversationError, match="conversation is empty"):
        c.add_assistant("hello")
    assert c.messages == []


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), min_size=1, max_size=8))
def test_numbering_never_changes_when_turns_are_added(turns):
    """Whatever is appended, every clip keeps the number it was given when it entered."""
    c, numbers, k = Conversation(), {}, 0
    for n_clips, with_text, with_tool in turns:
        new = [clip(k + i) for i in range(n_clips)]
        k += n_clips
        if not new and not with_text:
            continue
        c.add_user("text" if with_text else "", new)
        for x in new:
            numbers[x.id] = len(numbers) + 1
        c.add_assistant("reply")
        if with_tool:
            made = clip(k)
            k += 1
            c.add_tool("reverse", "made", (made,))
            numbers[made.id] = len(numbers) + 1
        for clip_id, n in numbers.items():
            assert c.clip(n).id == clip_id
    assert [m.role for m in c.messages if m.role == TOOL] == [TOOL] * sum(t[2] for t in turns if t[0] or t[1])


def test_unchanged_on_error_restores_messages_and_system_prompt():
    c = Conversation(system_prompt="Be brief.")
    c.add_user("q", [clip(1)])
    before = snapshot(c)
    with pytest.raises(ConversationError), c.unchanged_on_error():
        c.system_prompt = "Be long."
        c.add_assistant("partial")
        c.add_user("again", [clip(1)])
    assert snapshot(c) == before
