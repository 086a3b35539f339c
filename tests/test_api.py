"""The OpenAI-compatible API, with the official openai SDK as the client against a real server on a free port."""

import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import openai
import pytest
import soundfile
import uvicorn

import launch
from app.api import ApiOptions, OpenAIApi, why_off
from app.web import build_demo
from app.web import launch as launch_page
from chat import Conversation, GenerationSettings, Response
from chat.audio import SAMPLE_RATE
from chat.clip import Clip
from chat.families import get_family
from chat.local import LocalBackend
from chat.remote import RemoteBackend
from chat.store import Store
from chat.turn import Turn
from testkit.scripted import ScriptedBackend
from tests.conftest import tone
from tests.test_web import free_port

KEY = "sk-test-key"
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


@contextmanager
def serving(backend, **options) -> Iterator[tuple[openai.OpenAI, OpenAIApi]]:
    """The API of backend on a free port of 127.0.0.1, and an SDK client (no retries) that uses KEY."""
    api = OpenAIApi(backend, ApiOptions(**{"keys": (KEY,)} | options))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.asgi(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60), api
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wav_part(samples: np.ndarray) -> dict:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(buffer.getvalue()).decode(),
                                                   "format": "wav"}}


def test_plain_and_streamed_replies_with_usage():
    backend = ScriptedBackend()
    backend.enqueue(["Hello", " there."])
    backend.enqueue(["Streamed", " reply."])
    with serving(backend) as (client, _):
        plain = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi?"}])
        stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Again?"}],
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        models = client.models.list()
    assert plain.choices[0].message.content == "Hello there." and plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens == 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Streamed reply."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert [(m.id, m.family) for m in models.data] == [("scripted", "Qwen2-Audio")]
    assert backend.prompts[1].text.endswith("Again?<|im_end|>\n<|im_start|>assistant\n")


def test_clips_over_two_turns_are_numbered_as_the_page_numbers_them():
    backend = ScriptedBackend()
    first, second = tone(1.0, 300.0), tone(1.5, 500.0)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, wav_part(first)]},
                {"role": "assistant", "content": "A tone."},
                {"role": "user", "content": [wav_part(second), {"type": "text", "text": "And Audio 2?"}]}]
    with serving(backend) as (client, _):
        client.chat.completions.create(model="any", messages=messages)
    prompt = backend.prompts[0]
    assert [p.label for p in prompt.audio_parts] == ["Audio 1", "Audio 2"]
    assert np.allclose(prompt.audio_parts[1].samples, second, atol=1e-4)
    assert "A tone.<|im_end|>" in prompt.text and prompt.text.rstrip().endswith("And Audio 2?<|im_end|>\n"
                                                                                "<|im_start|>assistant")


def test_a_tool_call_comes_back_as_openai_tool_calls_and_its_result_goes_to_the_model():
    backend = ScriptedBackend()
    backend.enqueue(["Let me check.\n", CALL[:15], CALL[15:]])
    backend.enqueue(["Let me check.\n", CALL[:15], CALL[15:]])
    backend.enqueue(["It is sunny in Oslo."])
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    with serving(backend) as (client, _):
        plain = client.chat.completions.create(model="any", messages=question, tools=[WEATHER])
        streamed = list(client.chat.completions.create(model="any", messages=question, tools=[WEATHER], stream=True))
        call = plain.choices[0].message.tool_calls[0]
        answer = client.chat.completions.create(model="any", tools=[WEATHER], messages=question + [
            {"role": "assistant", "content": "Let me check.", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C."}])
    assert plain.choices[0].finish_reason == "tool_calls" and plain.choices[0].message.content == "Let me check.\n"
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city": "Oslo"}')
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    streamed_calls = [t for d in deltas for t in d.tool_calls or []]
    assert [(t.function.name, t.function.arguments) for t in streamed_calls] == [("get_weather", '{"city": "Oslo"}')]
    assert answer.choices[0].message.content == "It is sunny in Oslo."
    # the tools in the family's own format, the earlier call as the model writes it, the result as a response
    last = backend.prompts[-1].text
    assert '"name": "get_weather"' in last.split("<|im_end|>")[0] and f"Let me check.\n{CALL}<|im_end|>" in last
    assert "<tool_response>\nSunny, 21 C.\n</tool_response>" in last


def test_a_wrong_key_a_bad_clip_and_too_large_ones_get_openais_errors():
    backend = ScriptedBackend()
    with serving(backend, max_upload_mb=1) as (client, _):
        wrong = openai.OpenAI(base_url=client.base_url, api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="Missing or wrong API key"):
            wrong.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}])
        garbage = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"not audio" * 50).decode(),
                                                          "format": "wav"}}
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\] \(user\), audio part 1: .*"):
            client.chat.completions.create(model="any", messages=[{"role": "user", "content": [garbage]}])
        large = wav_part(tone(40.0))  # 1.3 MB of 16-bit wav
        with pytest.raises(openai.APIStatusError, match="larger than this server's limit of 1 MB") as error:
            client.chat.completions.create(model="any", messages=[{"role": "user", "content": [large]}])
        assert error.value.status_code == 413
        with pytest.raises(openai.APIStatusError, match="request is larger than this server's limit of 2 MB") as error:
            client.chat.completions.create(model="any", messages=[{"role": "user", "content": "x" * 3 * 2**20}])
        assert error.value.status_code == 413
    assert backend.prompts == []


def test_past_the_queue_a_request_gets_429_with_retry_after():
    backend = ScriptedBackend(interval_s=0.2)
    backend.enqueue(["slow "] * 20)
    with serving(backend, max_waiting=0) as (client, api):
        busy = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], stream=True)
        next(iter(busy))  # the first reply holds the model
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Me too"}])
        busy.close()
    assert refused.value.response.headers["retry-after"] == "10"


def test_a_client_that_goes_away_stops_its_reply():
    backend = ScriptedBackend(interval_s=0.1)
    backend.enqueue([f"{n} " for n in range(200)])
    with serving(backend) as (client, api):
        stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Count"}],
                                                stream=True)
        for n, _ in enumerate(stream):
            if n == 3:
                break
        stream.close()
        deadline = time.monotonic() + 10
        while api.n_waiting and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api.n_waiting == 0  # the reply stopped within a step or two, freeing the model
        after = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Next"}])
    assert after.choices[0].message.content == "This is a scripted reply."


def test_a_greedy_reply_through_the_api_equals_the_pages(tiny_qwen2_audio):
    backend = LocalBackend(str(tiny_qwen2_audio), cpu_only=True)
    clip = tone(1.5, 300.0)
    greedy = GenerationSettings(temperature=0, max_new_tokens=8, repetition_penalty=1.0)
    conversation = Conversation()
    conversation.add_user("What is this?", [Clip(clip, name="a.wav")])
    on_the_page = "".join(Response(backend, conversation, greedy))
    backend.last_reply = None
    with serving(backend) as (client, _):
        through_the_api = client.chat.completions.create(
            model=backend.name, temperature=0, max_tokens=8, extra_body={"repetition_penalty": 1.0},
            messages=[{"role": "user", "content": [wav_part(clip), {"type": "text", "text": "What is this?"}]}])
    assert through_the_api.choices[0].message.content == on_the_page
    assert through_the_api.choices[0].finish_reason == "length"
    backend.close()


@pytest.mark.parametrize("keys, share, name, off", [
    ((), False, "127.0.0.1", None), ((), True, "127.0.0.1", "--share"), ((), False, "0.0.0.0", "--server-name"),
    ((KEY,), True, "0.0.0.0", None)])
def test_without_a_key_the_api_answers_only_on_a_loopback_address(keys, share, name, off):
    reason = why_off(keys, share, name)
    assert (reason is None) == (off is None) and (off is None or reason.startswith(off))


def test_api_keys_come_from_flags_and_a_file(tmp_path):
    (tmp_path / "keys").write_text("sk-one\n\nsk-two\n")
    args = launch.parse_args(["--server-api-key", "sk-zero", "--server-api-key-file", str(tmp_path / "keys")])
    assert args.api_keys == ("sk-zero", "sk-one", "sk-two")


def test_a_family_without_a_tool_format_refuses_tools_clearly():
    backend = ScriptedBackend(family=get_family("salmonn"))
    with serving(backend) as (client, _):
        with pytest.raises(openai.BadRequestError, match="SALMONN was not trained to call tools"):
            client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}], tools=[WEATHER])


def test_the_api_shares_the_pages_server_and_port(tmp_path):
    backend = ScriptedBackend()
    store = Store(tmp_path)
    demo = build_demo(backend, store)
    port = free_port()
    launch_page(demo, store, OpenAIApi(backend, ApiOptions(keys=(KEY,))), server_name="127.0.0.1", server_port=port,
                prevent_thread_lock=True, quiet=True, auth=[("ann", "secret")])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}])
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=30)
    finally:
        demo.close()
    assert reply.choices[0].message.content == "This is a scripted reply."  # no page login needed: its own key
    assert page.status_code == 200 and "gradio" in page.text.lower()


def pcm16_clip(samples: np.ndarray, name: str) -> Clip:
    """A clip whose samples 16-bit wav carries exactly (the remote backend sends clips so): k / 32768, |k| < 16384."""
    return Clip(np.round(samples * 32768) / 32768, name=name)


@pytest.mark.parametrize("checkpoint", ["tiny_qwen_audio_chat", "tiny_salmonn"])
def test_this_apps_remote_backend_holds_a_conversation_with_another_instance(checkpoint, request):
    """No other server runs Qwen-Audio-Chat or SALMONN: one instance of this app serves them to another, whose
    greedy replies over two turns and two clips equal the serving instance's own."""
    local = LocalBackend(str(request.getfixturevalue(checkpoint)), cpu_only=True)
    greedy = GenerationSettings(temperature=0, max_new_tokens=6, repetition_penalty=1.0)
    here, there = Conversation(), Conversation()
    with serving(local, keys=()) as (client, _):
        remote = RemoteBackend(local.name, str(client.base_url))
        for question, clip in [("What is this?", pcm16_clip(tone(1.0, 300.0, amplitude=0.4), "a.wav")),
                               ("And Audio 2?", pcm16_clip(tone(1.5, 500.0, amplitude=0.4), "b.wav"))]:
            for conversation, backend in ((here, local), (there, remote)):
                conversation.add_user(question, [clip])
                list(Turn(backend, conversation, greedy))
        remote.close()
    assert remote.family is local.family
    assert [m.text for m in there.messages] == [m.text for m in here.messages]
    assert all(m.text for m in there.messages) and len(there.clips()) >= 2
    local.close()
