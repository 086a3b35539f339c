"""Response: however a reply ends, it is recorded, and dropped history is never silent."""

import pytest

from chat import BackendError, Clip, Conversation, ConversationError, GenerationSettings, Response
from chat.audio import SAMPLE_RATE
from chat.conversation import DONE, FAILED, STOPPED
from testkit.scripted import ScriptedBackend
from tests.conftest import tone


class FailingBackend(ScriptedBackend):
    def execute(self, prompt, settings, stats, cancel, voice=None):
        yield "Half a"
        raise BackendError("The GPU ran out of memory while replying.")


def asked(text: str = "Hello?") -> Conversation:
    conversation = Conversation()
    conversation.add_user(text)
    return conversation


def test_a_finished_reply_is_recorded_with_its_figures():
    backend, conversation = ScriptedBackend(), asked()
    backend.enqueue(["Hi ", "there."])
    response = Response(backend, conversation)
    assert list(response) == ["Hi ", "there."]
    assert conversation.messages[-1].text == "Hi there." and conversation.messages[-1].status == DONE
    assert response.stats.n_tokens == 2 and response.stats.time_to_first_token_s is not None


def test_closing_the_iterator_records_a_stopped_reply():
    backend, conversation = ScriptedBackend(), asked()
    backend.enqueue(["one ", "two ", "three"])
    chunks = iter(Response(backend, conversation))
    assert next(chunks) == "one "
    chunks.close()
    assert (conversation.messages[-1].text, conversation.messages[-1].status) == ("one ", STOPPED)


def test_a_failure_keeps_the_partial_reply_and_the_error():
    conversation = asked()
    with pytest.raises(BackendError):
        list(Response(FailingBackend(), conversation))
    message = conversation.messages[-1]
    assert (message.text, message.status, message.note) == ("Half a", FAILED, "The GPU ran out of memory while replying.")


def test_dropped_history_is_said_on_the_reply():
    backend, conversation = ScriptedBackend(), Conversation()
    for k in range(3):
        conversation.add_user(f"question {k}", [Clip.from_array(tone(20.0, 300 + k), SAMPLE_RATE)])
        conversation.add_assistant(f"answer {k}")
    conversation.add_user("And the last one?")
    backend.context_tokens = 800 + GenerationSettings().max_new_tokens  # room for one 20-s clip (500 tokens)
    response = Response(backend, conversation)
    list(response)
    assert response.prompt.n_dropped_turns == 2
    assert conversation.messages[-1].note == "The oldest 2 exchanges did not fit the model's context and were left out."


def test_nothing_to_reply_to():
    conversation = asked()
    conversation.add_assistant("Done.")
    with pytest.raises(ConversationError, match="nothing to reply to"):
        Response(ScriptedBackend(), conversation)
