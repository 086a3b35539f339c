"""The remote backend against a real local HTTP server speaking the OpenAI streaming wire format."""

import socket
import threading
from dataclasses import replace
import time

import numpy as np
import pytest
from transformers import AutoProcessor

from chat import BackendError, Clip, Conversation, GenerationSettings, Response, load_backend
from chat.audio import SAMPLE_RATE
from chat.conversation import DONE, FAILED, STOPPED
from chat.remote import RemoteBackend
from chat.tools import ToolBox
from chat.turn import Turn
from testkit.scripted import ScriptedBackend
from tests.conftest import tone
from tests.openai_server import OpenAIServer, decoded_audio

PCM_16_STEP = 1 / 32767


@pytest.fixture
def server():
    with OpenAIServer(api_key="secret") as server:
        yield server


@pytest.fixture
def backend(server):
    backend = RemoteBackend(server.model, server.url, api_key="secret")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def processor(tiny_qwen2_audio):
    return AutoProcessor.from_pretrained(tiny_qwen2_audio)


def clip(k: int, seconds: float = 0.5) -> Clip:
    return Clip.from_array(tone(seconds, 200 + 50 * k), SAMPLE_RATE, name=f"c{k}.wav")


def asking() -> Conversation:
    conversation = Conversation()
    conversation.add_user("What is said?", [clip(0)])
    return conversation


def fail(backend, conversation: Conversation, match: str) -> str:
    """Run a reply that must fail; returns the error message after checking it is recorded."""
    with pytest.raises(BackendError, match=match) as error:
        list(Response(backend, conversation))
    assert conversation.messages[-1].status == FAILED and conversation.messages[-1].note == str(error.value)
    return str(error.value)


def as_rendered_by_vllm(request: dict) -> list[dict]:
    """The request's messages as vLLM hands them to the chat template ("openai" content format)."""
    def content(parts: str | list[dict]) -> str | list[dict]:
        if isinstance(parts, str):
            return parts
        return [{"type": "audio"} if p["type"] == "input_audio" else p for p in parts]

    return [{"role": m["role"], "content": content(m["content"])} for m in request["messages"]]


def server_prompt(processor, request: dict) -> str:
    return processor.apply_chat_template(as_rendered_by_vllm(request), add_generation_prompt=True, tokenize=False)


# --- streaming and the request ---------------------------------------------------------------------


def test_reply_streams_in_chunks_with_the_server_usage(server, backend):
    server.enqueue(["Hel", "lo", " world", "."], delay_s=0.01, usage=(57, 9))
    conversation = asking()
    response = Response(backend, conversation)
    assert list(response) == ["Hel", "lo", " world", "."]
    assert conversation.messages[-1].text == "Hello world." and conversation.messages[-1].status == DONE
    assert (response.stats.n_prompt_tokens, response.stats.n_tokens) == (57, 9)
    assert response.stats.time_to_first_token_s >= 0.01


def test_without_usage_the_chunks_are_counted(server, backend):
    server.enqueue(["a", "b", "c"])
    response = Response(backend, asking())
    list(response)
    assert (response.stats.n_prompt_tokens, response.stats.n_tokens) == (0, 3)


def test_request_carries_audio_text_system_prompt_sampling_and_key(server, backend):
    clips = [clip(1), clip(2, seconds=1.3), clip(3)]
    conversation = Conversation(system_prompt="Answer in French.")
    conversation.add_user("Compare them.", clips[:2])
    conversation.add_assistant("Elles diffèrent.")
    conversation.add_user("", clips[2:])
    settings = GenerationSettings(
        max_new_tokens=77, temperature=0.3, top_p=0.9, top_k=0, repetition_penalty=1.2, seed=5)
    list(Response(backend, conversation, settings))

    request = server.requests[-1]
    assert server.headers[-1]["authorization"] == "Bearer secret"
    assert request["model"] == "test-model" and request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert {k: request[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")} == {
        "max_tokens": 77, "temperature": 0.3, "top_p": 0.9, "top_k": -1, "repetition_penalty": 1.2, "seed": 5}
    system, first, reply, second = request["messages"]
    assert system == {"role": "system", "content": "Answer in French."}
    assert [p["type"] for p in first["content"]] == ["input_audio", "input_audio", "text"]
    assert first["content"][2]["text"] == "Compare them." and first["role"] == "user"
    assert reply == {"role": "assistant", "content": "Elles diffèrent."}
    assert [p["type"] for p in second["content"]] == ["input_audio"]  # an audio-only turn has no text part
    audio = decoded_audio(request)
    assert len(audio) == 3
    for sent, original in zip(audio, clips):
        np.testing.assert_allclose(sent, original.samples, atol=PCM_16_STEP)


def test_seed_is_left_out_when_unset(server, backend):
    list(Response(backend, asking(), GenerationSettings(top_k=40)))
    assert "seed" not in server.requests[-1] and server.requests[-1]["top_k"] == 40


def test_server_renders_the_local_prompt_exactly(server, backend, processor):
    conversation = Conversation()
    conversation.add_user("What is in these?", [clip(1), clip(2)])
    conversation.add_assistant("<tool_call>cut</tool_call>")
    conversation.add_tool("cut", "Cut 0.2-0.4 s.", [clip(3)])
    response = Response(backend, conversation)
    list(response)
    assert server_prompt(processor, server.requests[-1]) == response.prompt.text


def test_dropped_history_and_long_clips_keep_their_audio_numbers(server, processor):
    # 2200 tokens fit the 70-s clip (three 23-s parts of 584 audio tokens) but not the first turn's long text as well
    backend = RemoteBackend(server.model, server.url, api_key="secret", context_tokens=2200)
    conversation = Conversation()
    conversation.add_user("x" * 1500, [clip(1)])
    conversation.add_assistant("ok")
    conversation.add_user("Summarise Audio 2 and Audio 3.", [clip(2, seconds=70.0), clip(3)])
    response = Response(backend, conversation, GenerationSettings(max_new_tokens=64))
    list(response)
    assert response.prompt.n_dropped_turns == 1
    text = server_prompt(processor, server.requests[-1])
    placeholder = "<|audio_bos|><|AUDIO|><|audio_eos|>\n"
    for k in (1, 2, 3):
        assert f"Audio {k}: {placeholder}(Audio {k} is part {k} of 3 of this conversation's Audio 2.)\n" in text
    assert f"Audio 4: {placeholder}(Audio 4 is this conversation's Audio 3.)\nSummarise Audio 2 and Audio 3." in text
    assert [len(a) for a in decoded_audio(server.requests[-1])] == [len(p.samples) for p in response.prompt.audio_parts]


def test_remote_and_scripted_backends_leave_identical_conversations(server):
    """Parity, as llm's test_async_parity: the same reply through either backend records the same conversation."""
    remote, scripted = load_backend(server.model, api_base=server.url, api_key="secret"), ScriptedBackend()
    assert isinstance(remote, RemoteBackend)
    turns = [
        ("What is this?", [clip(1)], ["Audio 1 ", "is a ", "tone."]),
        ("And now?", [clip(2)], ["Both ", "are ", "tones."]),
    ]
    conversations = {remote: Conversation(id="same"), scripted: Conversation(id="same")}
    for question, clips, chunks in turns:
        server.enqueue(chunks)
        scripted.enqueue(chunks)
        for backend, conversation in conversations.items():
            conversation.add_user(question, clips)
            response = Response(backend, conversation)
            assert list(response) == chunks and response.stats.n_tokens == len(chunks)
    # the same conversation; the figures say which backend wrote each reply and how fast, so only they differ
    without_figures = {b: [replace(m, figures=None) for m in c.messages] for b, c in conversations.items()}
    assert without_figures[remote] == without_figures[scripted]
    figures = {b: [m.figures for m in c.messages if m.figures] for b, c in conversations.items()}
    assert [(f.model, f.quantization, f.new_tokens) for f in figures[remote]] == [(server.model, "server", 3)] * 2
    assert [(f.model, f.new_tokens) for f in figures[scripted]] == [("scripted", 3)] * 2
    remote.close()


# --- cancel ----------------------------------------------------------------------------------------


def test_cancel_mid_stream_stops_early_and_closes_the_connection(server, backend):
    chunks = [f"w{i} " for i in range(100)]
    server.enqueue(chunks, delay_s=0.05)  # 5 s in full
    conversation = asking()
    response = Response(backend, conversation)
    start = time.monotonic()
    threading.Timer(0.15, response.cancel).start()  # from another thread, as the Stop button does
    received = list(response)
    assert time.monotonic() - start < 2.5  # well before the end, with room for a busy machine
    assert 0 < len(received) < len(chunks) and received == chunks[: len(received)]
    assert conversation.messages[-1].status == STOPPED and conversation.messages[-1].text == "".join(received)
    assert server.wait_for_disconnects(1)  # the server saw the connection go, well before the end


# --- failures --------------------------------------------------------------------------------------


def test_connection_refused_says_how_to_start_a_server():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again on leaving: nothing listens there
    message = fail(RemoteBackend("m", f"http://127.0.0.1:{port}/v1"), asking(), "is not reachable")
    assert f"127.0.0.1:{port}" in message and "vllm serve" in message


def test_a_slow_server_times_out(server):
    server.enqueue(["late"], delay_s=10.0)
    start = time.monotonic()
    fail(RemoteBackend(server.model, server.url, api_key="secret", timeout_s=0.2), asking(), "sent nothing for 0.2 s")
    assert time.monotonic() - start < 5.0  # the timeout ended it, not the server's late reply


@pytest.mark.parametrize("api_key, hint", [(None, "pass --api-key"), ("wrong", "check --api-key")])
def test_a_refused_api_key_says_what_to_check(server, api_key, hint):
    message = fail(RemoteBackend(server.model, server.url, api_key=api_key), asking(), "HTTP 401")
    assert hint in message and server.replies == []  # refused before a reply was taken


def test_an_unknown_model_lists_the_served_ones(server):
    fail(RemoteBackend("Qwen/Qwen2-Audio-7B", server.url, api_key="secret"), asking(),
         "does not serve a model named 'Qwen/Qwen2-Audio-7B'; it serves: test-model")


def test_a_wrong_api_base_says_to_check_it(server):
    fail(RemoteBackend(server.model, server.url.removesuffix("/v1"), api_key="secret"), asking(), "Check --api-base")


@pytest.mark.parametrize("status, message, match", [
    (400, "At most 5 audio(s) may be provided in one prompt.",
     r"rejected the request \(HTTP 400\): At most 5 audio\(s\) .* higher --limit-mm-per-prompt"),
    (500, "CUDA out of memory", r"failed \(HTTP 500: CUDA out of memory\)\. Check the server's log"),
])
def test_http_errors_carry_the_server_message(server, backend, status, message, match):
    server.enqueue_error(status, message)
    fail(backend, asking(), match)


@pytest.mark.parametrize("events, match", [
    (["{not json"], "malformed stream event"),
    (['{"choices": [{"index": 0}]}'], "malformed stream event"),
    (['{"error": {"message": "engine died", "code": 500}}'], "failed mid-reply: engine died"),
])
def test_a_malformed_stream_fails_clearly(server, backend, events, match):
    server.enqueue_raw(events)
    fail(backend, asking(), match)


@pytest.mark.parametrize("chunks, cut", [
    (["Hal", "f", " never sent"], {"break_after": 2}),
    (["Hal", "f"], {"done": False}),
], ids=["socket-closed", "no-done"])
def test_a_broken_stream_keeps_the_partial_reply_and_the_conversation_goes_on(server, backend, chunks, cut):
    server.enqueue(chunks, **cut)
    conversation = asking()
    fail(backend, conversation, "before the reply was complete")
    assert conversation.messages[-1].text == "Half"

    server.enqueue(["Fine", "."])
    conversation.add_user("Again?")
    assert "".join(Response(backend, conversation)) == "Fine."
    assert conversation.messages[-1].status == DONE
    # the model sees its partial reply
    assert server.requests[-1]["messages"][2] == {"role": "assistant", "content": "Half"}


def a_native_tool_call_through_vllm(model: str, find_words: str, clip: Clip) -> RemoteBackend:
    """A family whose template lists the tools, served by vLLM: the request carries the tools in `tools`, each clip
    as input_audio after its `Audio N: ` label, and the next request the call as OpenAI tool_calls and its result as
    a tool message naming it. find_words is the model's call of find_words on Audio 1 in its own format."""
    conversation = Conversation()
    conversation.add_user("Remove 'um' from Audio 1.", [clip])
    with OpenAIServer(models=(model,)) as server:
        server.enqueue([find_words[:12], find_words[12:]])
        server.enqueue(["No 'um' ", "was found."])
        remote = RemoteBackend(server.model, server.url)
        try:
            list(Turn(remote, conversation, tools=ToolBox()))
        finally:
            remote.close()
        first, second = server.requests
    assert {tool["function"]["name"] for tool in first["tools"]} >= {"delete_ranges", "find_words"}
    user = first["messages"][-1]
    assert [part["type"] for part in user["content"]] == ["text", "input_audio", "text"]
    assert user["content"][0]["text"] == "Audio 1: "
    call, result = second["messages"][-2:]
    assert call["tool_calls"][0]["function"] == {"name": "find_words", "arguments": '{"audio": 1}'}
    assert result["role"] == "tool" and result["tool_call_id"] == call["tool_calls"][0]["id"]
    return remote
