"""A turn's event stream and the tool loop: calls split across chunks, bounded calls, bad calls, end to end."""

import queue
import threading

import numpy as np
import pytest

from chat.audio import SAMPLE_RATE
from chat.clip import Clip
from chat.conversation import ASSISTANT, DONE, STOPPED, TOOL, USER, Conversation
from chat.errors import BackendError, ToolError
from chat.families import get_family
from chat.families.base import ReplyStep
from chat.families.qwen_audio_chat.spans import SPANS_TOOL
from chat.remote import RemoteBackend
from chat.tools import ToolBox
from chat.turn import END, ReasoningChunk, TextChunk, ToolCallFinished, ToolCallStarted, Turn, drain, in_batches
from testkit.scripted import ScriptedBackend
from tests.conftest import tone
from tests.openai_server import OpenAIServer, decoded_audio

CALL = '<tool_call>\n{"name": "delete_ranges", "arguments": {"audio": 2, "ranges": [[1.0, 1.5]]}}\n</tool_call>'
SPLIT_CALL = ["I'll cut it. <tool", '_call>\n{"name": "delete_ranges", "argu',
              'ments": {"audio": 2, "ranges": [[1.0, 1.5]]}}\n</tool_', "call> (made-up result)"]
NOTE = "Audio 2 with 1–1.5 s removed"  # how Audio 3 was made


@pytest.fixture
def conversation() -> Conversation:
    conversation = Conversation()
    conversation.add_user("Cut 1 to 1.5 s out of Audio 2.", [Clip(tone(2.0, 440.0), name="a.wav"),
                                                             Clip(tone(3.0, 220.0), name="b.wav")])
    return conversation


def shape(conversation: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in conversation.messages]


def kinds(events) -> list[str]:
    return [type(e).__name__ for e in events]


def test_without_tools_a_turn_is_its_response_text(conversation):
    backend = ScriptedBackend()
    backend.enqueue(["Hello", " there", " <tool_call>"])
    events = list(Turn(backend, conversation))
    assert events == [TextChunk("Hello"), TextChunk(" there"), TextChunk(" <tool_call>")]
    assert "# Tools" not in backend.prompts[0].text


def test_a_call_split_across_chunks_runs_and_the_model_continues(conversation):
    backend = ScriptedBackend()
    backend.enqueue(SPLIT_CALL)
    backend.enqueue(["Audio 3 ", "is the cut clip."])
    events = list(Turn(backend, conversation, tools=ToolBox()))

    assert kinds(events) == ["TextChunk", "ToolCallStarted", "ToolCallFinished", "TextChunk", "TextChunk"]
    assert "".join(e.text for e in events if isinstance(e, TextChunk)) == "I'll cut it. Audio 3 is the cut clip."
    assert events[1] == ToolCallStarted("delete_ranges", {"audio": 2, "ranges": [[1.0, 1.5]]})
    assert events[2].error == "" and events[2].message is conversation.messages[2]
    assert shape(conversation)[1:] == [
        (ASSISTANT, "I'll cut it. " + CALL),  # cut right after the call: the made-up result is dropped
        (TOOL, f"Audio 3 = {NOTE} (2.50 s)."),
        (ASSISTANT, "Audio 3 is the cut clip."),
    ]
    assert [m.status for m in conversation.messages[1:]] == [DONE, DONE, DONE]
    edited = conversation.clip(3)
    assert (edited.note, edited.duration_s) == (NOTE, 2.5)
    assert np.array_equal(conversation.clip(2).samples, tone(3.0, 220.0))  # the original is untouched
    # the model saw the tools both times, and the result with its clip the second time
    assert all("<tools>" in prompt.text for prompt in backend.prompts)
    assert f"<tool_response>\nAudio 3: <|audio_bos|><|AUDIO|><|audio_eos|>\nAudio 3 = {NOTE}" in backend.prompts[1].text
    assert backend.prompts[1].audio_parts[-1].clip is edited


def test_a_bad_call_returns_an_error_and_the_model_continues(conversation):
    backend = ScriptedBackend()
    backend.enqueue(['<tool_call>{"name": "reverse", "arguments": {"audio": 9}}</tool_call>'])
    backend.enqueue(["Sorry, there is no Audio 9."])
    events = list(Turn(backend, conversation, tools=ToolBox()))
    assert kinds(events) == ["ToolCallStarted", "ToolCallFinished", "TextChunk"]
    assert "There is no Audio 9" in events[1].error
    assert shape(conversation)[2] == (TOOL, "Error: " + events[1].error)
    assert conversation.messages[2].clips == () and len(conversation.clips()) == 2
    assert shape(conversation)[3] == (ASSISTANT, "Sorry, there is no Audio 9.")


def test_unreadable_call_json_is_an_error_for_the_model(conversation):
    backend = ScriptedBackend()
    backend.enqueue(['<tool_call>{"name": "reverse", "arguments": {"audio": 1</tool_call>'])
    backend.enqueue(["Let me try again."])
    events = list(Turn(backend, conversation, tools=ToolBox()))
    assert "not valid JSON" in events[1].error and conversation.messages[-1].text == "Let me try again."


def test_calls_past_the_limit_are_refused_and_the_turn_ends(conversation):
    backend = ScriptedBackend()
    for number in range(1, 6):
        backend.enqueue([f'<tool_call>{{"name": "reverse", "arguments": {{"audio": {number}}}}}</tool_call>'])
    events = list(Turn(backend, conversation, tools=ToolBox(), max_tool_calls=2))
    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    assert [bool(e.error) for e in finished] == [False, False, True, True]
    assert "this turn already ran 2 tool calls, the limit" in finished[2].error
    assert len(backend.prompts) == 4 and len(backend.replies) == 1  # the model answered one refusal, then stopped
    assert [m.role for m in conversation.messages[1:]] == [ASSISTANT, TOOL] * 4
    notes = [clip.note for clip in conversation.clips()[2:]]
    assert notes == ["Audio 1 reversed", "Audio 2 reversed"]


def test_react_style_for_the_first_generation(conversation):
    backend = ScriptedBackend(family=get_family("qwen-audio-chat"))
    backend.enqueue(["Thought: cut it\nAction: delete", "_ranges\nAction Input: {\"audio\": 2, ",
                     '"ranges": [[1.0, 1.5]]}\nObservation: made up'])
    backend.enqueue(["Final Answer: done."])
    events = list(Turn(backend, conversation, tools=ToolBox()))
    assert "".join(e.text for e in events if isinstance(e, TextChunk)) == "Thought: cut it\nFinal Answer: done."
    assert conversation.clip(3).note == NOTE
    assert "Action: the action to take" in backend.prompts[0].text
    clip_heard = "Audio 3: <audio>[[[AUDIO:modality]]]</audio>\n"  # the model hears the clip the tool made
    assert backend.prompts[1].text.endswith(f"\nObservation: {clip_heard}Audio 3 = {NOTE} (2.50 s).\n")


def test_timestamps_in_a_reply_become_clips_of_the_last_user_clip(conversation):
    backend = ScriptedBackend(family=get_family("qwen-audio-chat"))  # trained on timestamps; no tools needed
    backend.enqueue(['The word "what" starts at <|1.0', '0|> and ends at <|1.50|>.'])
    events = list(Turn(backend, conversation))
    assert kinds(events) == ["TextChunk", "TextChunk", "ToolCallStarted", "ToolCallFinished"]
    shown = 'The word "what" starts at 1.00 s and ends at 1.50 s.'
    assert "".join(e.text for e in events if isinstance(e, TextChunk)) == shown
    reply = conversation.messages[-2]
    assert reply.text == 'The word "what" starts at <|1.00|> and ends at <|1.50|>.' and reply.shown == shown
    assert events[2] == ToolCallStarted(SPANS_TOOL, {"spans": [[1.0, 1.5]]})
    assert conversation.clip(3).note == "Audio 2 cut to 1–1.5 s"
    assert np.array_equal(conversation.clip(3).samples, tone(3.0, 220.0)[SAMPLE_RATE:SAMPLE_RATE * 3 // 2])


def test_cancel_stops_before_any_tool_runs(conversation):
    backend = ScriptedBackend()
    backend.enqueue(["Cutting. ", CALL])
    turn = Turn(backend, conversation, tools=ToolBox())
    events = []
    for event in turn:
        events.append(event)
        turn.cancel()
    assert events == [TextChunk("Cutting. ")]
    assert [(m.role, m.status) for m in conversation.messages] == [(USER, DONE), (ASSISTANT, STOPPED)]


def test_a_backend_without_tool_support_is_refused_up_front(conversation):
    backend = ScriptedBackend()
    backend.supports_tools = False
    with pytest.raises(ToolError, match="does not support tool calls; turn speech editing off"):
        Turn(backend, conversation, tools=ToolBox())
    assert len(conversation.messages) == 1


def test_end_to_end_through_the_openai_compatible_server(conversation):
    with OpenAIServer() as server:
        server.enqueue(SPLIT_CALL, delay_s=0.01)
        server.enqueue(["Here is ", "Audio 3."])
        backend = RemoteBackend(server.model, server.url)
        try:
            events = list(Turn(backend, conversation, tools=ToolBox()))
        finally:
            backend.close()
        first, second = server.requests
    assert kinds(events) == ["TextChunk", "ToolCallStarted", "ToolCallFinished", "TextChunk", "TextChunk"]
    assert conversation.clip(3).note == NOTE and conversation.messages[-1].text == "Here is Audio 3."
    assert "<tools>" in first["messages"][0]["content"]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"] == "I'll cut it. " + CALL
    sent = decoded_audio(second)
    assert len(sent) == 3 and len(sent[2]) == len(conversation.clip(3).samples)


def test_in_batches_closed_mid_reply_stops_the_turn_and_its_worker():
    backend = ScriptedBackend(interval_s=0.25)
    backend.enqueue([f"w{i} " for i in range(20)])
    conversation = Conversation()
    conversation.add_user("Count.")
    batches = in_batches(Turn(backend, conversation))
    assert [e.text for e in next(batches)] == ["w0 "]
    batches.close()
    assert conversation.messages[-1].status == "stopped" and conversation.messages[-1].text.startswith("w0 ")
    assert not [t for t in threading.enumerate() if t.name == "turn"]


def test_in_batches_reraises_the_error_after_the_text_before_it():
    class Failing(ScriptedBackend):
        def execute(self, prompt, settings, stats, cancel, voice=None):
            yield "Half"
            raise BackendError("The server went away.")

    conversation = Conversation()
    conversation.add_user("Hi")
    seen = []
    with pytest.raises(BackendError, match="went away"):
        for batch in in_batches(Turn(Failing(), conversation)):
            seen += [e.text for e in batch]
    assert seen == ["Half"] and conversation.messages[-1].status == "failed"


class RecordsAStepOfAClipItHas(type(get_family("qwen2-audio"))):
    """A family whose finished replies take a step adding a clip the conversation already holds."""

    def after_reply(self, conversation: Conversation) -> ReplyStep:
        return ReplyStep("copy", {}, "Audio 2 is a copy.", (conversation.clip(1),))


def test_a_step_that_cannot_be_recorded_as_it_is_ends_failed_not_running():
    conversation = Conversation()
    conversation.add_user("Copy it.", [Clip(tone(1.0), name="a.wav")])
    events = list(Turn(ScriptedBackend(family=RecordsAStepOfAClipItHas()), conversation))
    started, finished = events[-2:]
    assert started == ToolCallStarted("copy", {}) and isinstance(finished, ToolCallFinished)
    assert finished.message.failed and "already in this conversation as Audio 1" in finished.error
    assert conversation.messages[-1] is finished.message and len(conversation.clips()) == 1


@pytest.mark.parametrize("ending", [[], [BackendError("The model failed.")]])
def test_a_reader_that_left_early_can_drain_the_rest_of_the_turn(ending):
    events = queue.Queue()
    for event in [TextChunk("a"), *ending, END]:
        events.put(event)
    first = drain(events)
    assert next(first) == [TextChunk("a")]
    first.close()  # the reader left (a terminal's Ctrl-C) while the last events were already taken
    again: list = []
    reader = threading.Thread(target=lambda: again.append(list_or_error(drain(events))), daemon=True)
    reader.start()
    reader.join(10)
    assert again == [ending[0] if ending else []]


def list_or_error(batches) -> list | Exception:
    """The batches a drain yields, or the error it raises."""
    try:
        return list(batches)
    except Exception as e:
        return e


def reverse_call(audio: int) -> str:
    return f'<tool_call>\n{{"name": "reverse", "arguments": {{"audio": {audio}}}}}\n</tool_call>'


TWO_CALLS_SPLIT = ["I'll reverse both. <tool", '_call>\n{"name": "reverse", "arguments": {"audio": 1}}\n</tool_call>\n',
                   '<tool_call>\n{"name": "reverse", "arguments": {"audio": 2}}\n</tool', "_call>"]


def test_several_calls_in_one_reply_run_in_order_and_the_next_prompt_holds_every_result(conversation):
    backend = ScriptedBackend()
    backend.enqueue(TWO_CALLS_SPLIT)
    backend.enqueue(["Audio 3 and Audio 4 are reversed."])
    events = list(Turn(backend, conversation, tools=ToolBox()))

    assert kinds(events) == ["TextChunk", "ToolCallStarted", "ToolCallFinished", "ToolCallStarted", "ToolCallFinished",
                             "TextChunk"]
    assert [e for e in events if isinstance(e, ToolCallStarted)] == [ToolCallStarted("reverse", {"audio": 1}),
                                                                    ToolCallStarted("reverse", {"audio": 2})]
    reply = conversation.messages[1]
    assert reply.text == "".join(TWO_CALLS_SPLIT) and reply.shown == "I'll reverse both. " and reply.status == DONE
    assert [(c.name, c.arguments) for c in reply.calls] == [("reverse", {"audio": 1}), ("reverse", {"audio": 2})]
    assert shape(conversation)[2:] == [(TOOL, "Audio 3 = Audio 1 reversed (2.00 s)."),
                                       (TOOL, "Audio 4 = Audio 2 reversed (3.00 s)."),
                                       (ASSISTANT, "Audio 3 and Audio 4 are reversed.")]
    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    assert [e.message for e in finished] == conversation.messages[2:4]
    assert len(backend.prompts) == 2  # one Response for both calls, one for the answer
    first, second = (backend.prompts[1].text.index(f"Audio {n} = Audio {n - 2} reversed") for n in (3, 4))
    assert first < second and backend.prompts[1].text.count("<tool_response>\n") == 2


def test_a_stop_between_calls_runs_no_more_but_gives_each_call_its_result(conversation):
    backend = ScriptedBackend()
    backend.enqueue(TWO_CALLS_SPLIT)
    turn = Turn(backend, conversation, tools=ToolBox())
    events = []
    for event in turn:
        events.append(event)
        if isinstance(event, ToolCallFinished):
            turn.cancel()  # after the first call ran
    assert [(m.role, m.failed) for m in conversation.messages[2:]] == [(TOOL, False), (TOOL, True)]
    assert conversation.messages[-1].text == "Error: Not run: the reply was stopped before this call."
    assert len(conversation.clips()) == 3 and len(backend.prompts) == 1  # one clip made, no reply asked for


def test_text_between_calls_is_shown_and_text_after_the_last_is_dropped_with_it(conversation):
    backend = ScriptedBackend()
    backend.enqueue(["First ", reverse_call(1), " then ", reverse_call(2) + " and I", " am done."])
    backend.enqueue(["Done."])
    events = list(Turn(backend, conversation, tools=ToolBox()))
    assert "".join(e.text for e in events if isinstance(e, TextChunk)) == "First  then Done."
    reply = conversation.messages[1]
    assert reply.text == f"First {reverse_call(1)} then {reverse_call(2)}" and reply.shown == "First  then "
    assert [m.role for m in conversation.messages[1:]] == [ASSISTANT, TOOL, TOOL, ASSISTANT]


def test_every_call_of_a_reply_counts_against_the_limit(conversation):
    backend = ScriptedBackend()
    backend.enqueue([reverse_call(1) + reverse_call(2) + reverse_call(1)])  # the third is past the limit of 2
    backend.enqueue([reverse_call(2)])  # the model ignores the refusal: refused too, and the turn ends
    backend.enqueue(["never asked"])
    events = list(Turn(backend, conversation, tools=ToolBox(), max_tool_calls=2))
    finished = [e for e in events if isinstance(e, ToolCallFinished)]
    assert [bool(e.error) for e in finished] == [False, False, True, True]
    assert "this turn already ran 2 tool calls, the limit" in finished[2].error
    assert [m.role for m in conversation.messages[1:]] == [ASSISTANT, TOOL, TOOL, TOOL, ASSISTANT, TOOL]
    assert len(backend.prompts) == 2 and backend.replies == [["never asked"]]


def test_a_result_the_model_writes_itself_ends_the_reply_at_its_last_call(conversation):
    backend = ScriptedBackend()
    backend.enqueue([reverse_call(1), "\n<tool_resp", "onse>\nAudio 3 = made up\n</tool_response>\n", reverse_call(2),
                     "never read"])
    backend.enqueue(["Done."])
    events = list(Turn(backend, conversation, tools=ToolBox()))
    assert [e for e in events if isinstance(e, ToolCallStarted)] == [ToolCallStarted("reverse", {"audio": 1})]
    assert conversation.messages[1].text == reverse_call(1) and len(conversation.clips()) == 3
    assert conversation.messages[-1].text == "Done."


class Thinking(type(get_family("qwen2-audio"))):
    """A family whose replies start with their thinking, as Qwen3-Omni's Thinking checkpoint's do."""

    reasoning_tags = ("<think>", "</think>")


THINKING_SPLIT = ["<th", "ink>\nTwo clips", "; reverse ", "both.\n</th", "ink>\n", "\nOn it. "]


def test_thinking_streams_apart_and_is_recorded_apart_from_the_answer(conversation):
    backend = ScriptedBackend(family=Thinking())
    backend.enqueue(THINKING_SPLIT + ["Both ", "are fine."])
    events = list(Turn(backend, conversation))
    assert kinds(events) == ["ReasoningChunk"] * 3 + ["TextChunk"] * 3
    assert "".join(e.text for e in events if isinstance(e, ReasoningChunk)) == "Two clips; reverse both."
    reply = conversation.messages[-1]
    assert reply.text == "".join(THINKING_SPLIT) + "Both are fine."  # what the model wrote, tags and all
    assert (reply.reasoning, reply.shown, reply.display_text) == ("Two clips; reverse both.", "On it. Both are fine.",
                                                                  "On it. Both are fine.")


def test_thinking_then_several_calls_and_calls_in_the_thinking_are_not_run(conversation):
    backend = ScriptedBackend(family=Thinking())
    backend.enqueue([f"<think>\nNot {reverse_call(2)} alone: both.\n</think>\n\n", reverse_call(1), "\n",
                     reverse_call(2)])
    backend.enqueue(["<think>\nDone both.\n</think>\n\nReversed."])
    events = list(Turn(backend, conversation, tools=ToolBox()))
    assert kinds(events) == ["ReasoningChunk", "ToolCallStarted", "ToolCallFinished", "ToolCallStarted",
                             "ToolCallFinished", "ReasoningChunk", "TextChunk"]
    first, second = conversation.messages[1], conversation.messages[-1]
    assert first.reasoning == f"Not {reverse_call(2)} alone: both." and first.shown == ""
    assert [c.arguments for c in first.calls] == [{"audio": 1}, {"audio": 2}]
    assert first.text.endswith(reverse_call(1) + "\n" + reverse_call(2))
    assert (second.reasoning, second.shown) == ("Done both.", "Reversed.")


def test_a_reply_stopped_while_thinking_keeps_what_was_thought(conversation):
    backend = ScriptedBackend(family=Thinking())
    backend.enqueue(["<think>\nFirst", " thought", " never seen"])
    turn = Turn(backend, conversation, tools=ToolBox())
    events = []
    for event in turn:
        events.append(event)
        if len(events) == 2:
            turn.cancel()
    reply = conversation.messages[-1]
    assert (reply.status, reply.reasoning, reply.shown) == (STOPPED, "First thought", "")
    assert "".join(e.text for e in events) == "First thought"


def test_a_reply_is_recorded_with_what_was_shown_so_no_view_shows_its_raw_text(conversation):
    """The Response records the reply when its stream ends, before the turn has read the last of it (here a `<` the
    call parser held back): even then, the recorded reply shows only its answer and keeps its thinking apart."""
    backend = ScriptedBackend(family=Thinking())
    backend.enqueue(["<think>\nHmm.\n</think>\n\n", "A tone <"])
    seen = []
    for event in Turn(backend, conversation, tools=ToolBox()):
        if event == TextChunk("<"):  # released by the reader's finish(), after the reply was recorded
            reply = conversation.messages[-1]
            seen.append((reply.role, reply.display_text, reply.reasoning))
    assert seen == [(ASSISTANT, "A tone ", "Hmm.")]
    assert conversation.messages[-1].display_text == "A tone <"
