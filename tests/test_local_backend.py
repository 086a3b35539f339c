"""The local transformers backend on a tiny real Qwen2-Audio: token counts, streaming, cancel, failures, loading."""

import gc
import sys
import threading
import time

import pytest
import torch
from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2Config

import chat.local
from chat import BackendError, Conversation, GenerationSettings, Response, SettingsError
from chat.conversation import DONE, FAILED, STOPPED
from chat.families import get_family
from chat.local import GENERATION_THREAD, LocalBackend, QueueStreamer, generate_kwargs
from tests.conftest import tone_clip

SAMPLED = GenerationSettings(seed=0, max_new_tokens=24)  # random weights sampled: several streamed chunks


def generation_threads() -> list[threading.Thread]:
    """Generation workers still alive."""
    return [t for t in threading.enumerate() if t.name == GENERATION_THREAD]


def test_streams_a_two_clip_two_turn_conversation(backend):
    conversation = Conversation()
    conversation.add_user("What is this sound?", [tone_clip(2.0, 440, "a.wav")])
    first = Response(backend, conversation, SAMPLED)
    chunks = list(first)
    assert len(chunks) >= 3 and first.text.strip()
    assert first.message.status == DONE and conversation.messages[-1].text == first.text

    conversation.add_user("And this one?", [tone_clip(1.5, 660, "b.wav")])
    second = Response(backend, conversation, SAMPLED)
    assert [(p.number, p.index) for p in second.prompt.audio_parts] == [(1, 0), (2, 0)]
    assert len(list(second)) >= 2 and second.message.status == DONE
    assert [m.role for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert 0 < second.stats.n_tokens <= SAMPLED.max_new_tokens
    assert second.stats.n_prompt_tokens > 100 + 75  # two clips' audio tokens (2 s = 50, 1.5 s = 37) and text
    assert second.stats.peak_gpu_memory_mb is None and not generation_threads()


def test_token_counts_are_exact(backend):
    conversation = Conversation()
    conversation.add_user("Describe it.", [tone_clip(2.0, 330, "c.wav")])
    greedy = GenerationSettings(temperature=0, max_new_tokens=12)
    response = Response(backend, conversation, greedy)
    inputs = backend.prepare(response.prompt)
    n_prompt = inputs["input_ids"].shape[1]
    expected = backend.model.generate(**inputs, **generate_kwargs(greedy, backend.loaded.stop_ids))[0, n_prompt:]
    streamed = "".join(response)
    assert response.stats.n_tokens == len(expected)
    assert streamed == backend.tokenizer.decode(expected, skip_special_tokens=True)
    # the renderer's context budget counts what the model really receives
    assert backend.count_prompt_tokens(response.prompt) == response.stats.n_prompt_tokens == n_prompt


class TextAtTheEnd(QueueStreamer):
    """A streamer that holds all text back until the reply ends, as transformers' streamer does until a word ends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.held = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.held += text
        if stream_end:
            super().on_finalized_text(self.held, stream_end=True)


def test_the_first_token_is_timed_when_it_is_generated_not_when_its_text_arrives(backend, monkeypatch):
    step_s = 0.02
    monkeypatch.setattr(chat.local, "QueueStreamer", TextAtTheEnd)
    conversation = Conversation()
    conversation.add_user("Describe it.", [tone_clip(1.0, 330, "c.wav")])
    response = Response(backend, conversation, GenerationSettings(seed=0, max_new_tokens=10))
    slow = backend.model.register_forward_pre_hook(lambda *_: time.sleep(step_s))  # a slow GPU: each step >= step_s
    try:
        chunks = list(response)
    finally:
        slow.remove()
    stats = response.stats
    assert len(chunks) == 1 and stats.n_tokens >= 5  # the whole reply arrived as one late chunk
    # the tokens after the first took at least one step each, however busy the machine
    assert stats.time_to_first_token_s <= stats.duration_s - (stats.n_tokens - 1) * step_s
    assert stats.tokens_per_s <= 1 / step_s


def test_audio_features_are_computed_once_per_clip_part(backend, monkeypatch):
    extractor, computed = backend.loaded.processor.feature_extractor, []

    def counting(samples, **kwargs):
        computed.append(len(samples))
        return extractor(samples, **kwargs)

    monkeypatch.setattr(backend.loaded.processor, "feature_extractor", counting)
    conversation = Conversation()
    conversation.add_user("One.", [tone_clip(40.0, 700, "two-parts.wav")])
    backend.prepare(get_family("qwen2-audio").renderer.render(conversation))
    assert len(computed) == 2
    conversation.add_assistant("A tone.")
    conversation.add_user("Two.", [tone_clip(2.0, 710, "d.wav")])
    longer = get_family("qwen2-audio").renderer.render(conversation)
    backend.prepare(longer)
    backend.prepare(longer)
    assert len(computed) == 3  # only the new clip was computed; the history came from the cache


def test_cancel_from_another_thread_stops_within_one_token(backend):
    conversation = Conversation()
    conversation.add_user("Talk.", [tone_clip(2.0, 880, "e.wav")])
    response = Response(backend, conversation, GenerationSettings(seed=0, max_new_tokens=500))
    at_cancel = []

    def cancel_after_five_tokens() -> None:  # like a Stop button, while the consumer waits for text
        while response.stats.n_tokens < 5 and response.message is None:
            time.sleep(0.001)
        response.cancel()
        at_cancel.append(response.stats.n_tokens)

    canceller = threading.Thread(target=cancel_after_five_tokens)
    canceller.start()
    list(response)
    canceller.join()
    assert 5 <= response.stats.n_tokens <= at_cancel[0] + 1
    assert response.message.status == STOPPED and conversation.messages[-1].text == response.text
    assert not generation_threads()


def test_closing_the_iterator_stops_and_leaves_no_thread(backend):
    conversation = Conversation()
    conversation.add_user("Talk.", [tone_clip(2.0, 990, "f.wav")])
    response = Response(backend, conversation, GenerationSettings(seed=0, max_new_tokens=500))
    chunks = iter(response)
    first = next(chunks)
    chunks.close()
    assert not generation_threads()
    assert response.message.status == STOPPED and response.message.text == first
    assert response.stats.n_tokens < 50


def test_the_same_seed_gives_the_same_reply(backend):
    replies = []
    for _ in range(2):
        conversation = Conversation()
        conversation.add_user("Again.", [tone_clip(2.0, 1100, "g.wav")])
        replies.append("".join(Response(backend, conversation, GenerationSettings(seed=7, max_new_tokens=12))))
    assert replies[0] == replies[1] and replies[0]


def test_settings_map_to_generate_arguments():
    greedy = generate_kwargs(GenerationSettings(temperature=0, max_new_tokens=9, repetition_penalty=1.2), [5, 6])
    assert greedy == {"max_new_tokens": 9, "repetition_penalty": 1.2, "eos_token_id": [5, 6], "do_sample": False,
                      "temperature": None, "top_p": None, "top_k": None}
    sampled = generate_kwargs(GenerationSettings(temperature=0.9, top_p=0.8, top_k=40), [5])
    assert sampled["do_sample"] and (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.9, 0.8, 40)
    with pytest.raises(SettingsError, match="top_p must be above 0"):
        GenerationSettings(top_p=0)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (RuntimeError("CUDA error: device-side assert triggered"), "GPU failed while replying .*device-side assert"),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "ran out of memory.*4bit"),
        (ValueError("bad logits"), "The model failed while replying: ValueError: bad logits"),
    ],
)
def test_a_failure_mid_reply_is_recorded_and_the_conversation_stays_usable(backend, monkeypatch, error, message):
    real_generate = backend.model.generate

    def generate_then_fail(**kwargs):
        real_generate(**(kwargs | {"max_new_tokens": 3}))  # streams a few tokens first
        raise error

    monkeypatch.setattr(backend.model, "generate", generate_then_fail)
    conversation = Conversation()
    conversation.add_user("Hello.", [tone_clip(2.0, 1200, "h.wav")])
    response = Response(backend, conversation, GenerationSettings(seed=0, max_new_tokens=20))
    chunks = []
    with pytest.raises(BackendError, match=message):
        for chunk in response:
            chunks.append(chunk)
    failed = conversation.messages[-1]
    assert failed.status == FAILED and failed.text == "".join(chunks) and "while replying" in failed.note
    assert not generation_threads()

    monkeypatch.undo()
    conversation.add_user("Try again.")
    retry = Response(backend, conversation, SAMPLED)
    assert "".join(retry) and retry.message.status == DONE


def test_a_missing_or_empty_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BackendError, match=f"no model folder {missing}.*-c/--checkpoint-path"):
        LocalBackend(str(missing))
    with pytest.raises(BackendError, match=f"{tmp_path} does not hold a usable checkpoint"):
        LocalBackend(str(tmp_path))


def test_a_hub_id_missing_offline_says_how_to_download():
    with pytest.raises(BackendError, match="Cannot find the model someone/absent.*hf download someone/absent"):
        LocalBackend("someone/absent")


def test_another_architecture_is_refused(tiny_whisper):
    with pytest.raises(BackendError, match="is a 'whisper' model, which this app cannot run. Supported families: "
                                           r"Qwen2-Audio \(e.g. Qwen/Qwen2-Audio-7B-Instruct\), Qwen-Audio-Chat"):
        LocalBackend(str(tiny_whisper))


def test_an_unknown_quantization_lists_the_choices(tiny_qwen2_audio):
    with pytest.raises(SettingsError, match="Unknown quantization '3bit'; choose one of: 4bit, 8bit, fp8, none"):
        LocalBackend(str(tiny_qwen2_audio), quantization="3bit")


def test_fp8_without_an_fp8_gpu_says_what_to_do(tiny_qwen2_audio):
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has a GPU with FP8 tensor cores")
    with pytest.raises(BackendError, match="fp8 needs a GPU of compute capability 8.9 or newer.*--quantization 4bit"):
        LocalBackend(str(tiny_qwen2_audio), quantization="fp8")


def test_4bit_without_bitsandbytes_says_what_to_do(tiny_qwen2_audio, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(BackendError, match="4bit quantization needs bitsandbytes.*--quantization none"):
        LocalBackend(str(tiny_qwen2_audio), quantization="4bit")


def test_the_cpu_default_is_unquantized_fp32(tiny_qwen2_audio):
    local = LocalBackend(str(tiny_qwen2_audio))
    assert local.quantization == "none" and local.model.dtype == torch.float32
    assert type(local.model.model.language_model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_8bit_loads_and_replies_on_cpu(tiny_qwen2_audio):
    try:
        local = LocalBackend(str(tiny_qwen2_audio), quantization="8bit")
    except BackendError as e:
        pytest.skip(f"bitsandbytes cannot run 8-bit here: {e}")
    import bitsandbytes as bnb

    assert isinstance(local.model.model.language_model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    conversation = Conversation()
    conversation.add_user("Hi.", [tone_clip(1.0, 1300, "i.wav")])
    response = Response(local, conversation, GenerationSettings(temperature=0, max_new_tokens=4))
    list(response)
    assert response.message.status == DONE and response.stats.n_tokens >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_size_model_in_4bit_on_the_gpu(tiny_qwen2_audio, tmp_path):
    """Qwen2-Audio-7B's real shapes with random weights (no download): 4-bit loads, streams, and fits."""
    import shutil

    tiny = Qwen2AudioConfig.from_pretrained(tiny_qwen2_audio)
    config = Qwen2AudioConfig(
        audio_config={"model_type": "qwen2_audio_encoder", "d_model": 1280, "encoder_layers": 32,
                      "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "num_mel_bins": 128},
        text_config=Qwen2Config(vocab_size=156032, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192),
        audio_token_index=tiny.audio_token_id,  # the tiny tokenizer's ids stand in for the real one's
    )
    with torch.device("cuda"):
        Qwen2AudioForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(tmp_path)
    gc.collect()
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                 "generation_config.json", "preprocessor_config.json"):
        if (tiny_qwen2_audio / name).exists():
            shutil.copy(tiny_qwen2_audio / name, tmp_path / name)
    torch.cuda.empty_cache()
    local = LocalBackend(str(tmp_path))
    assert local.quantization == "4bit" and local.context_tokens == 8192
    conversation = Conversation()
    conversation.add_user("What is this?", [tone_clip(30.0, 440, "j.wav")])
    response = Response(local, conversation, GenerationSettings(seed=0, max_new_tokens=16))
    list(response)
    assert response.message.status == DONE and response.stats.n_tokens >= 1
    assert response.stats.peak_gpu_memory_mb < 10_000  # 4-bit LLM, bf16 encoder, embeddings and head: about 7.5 GB
    local.close()


@pytest.fixture(scope="module")
def full_precision(tiny_qwen2_audio) -> LocalBackend:
    """The tiny checkpoint in fp32: exact enough that a reused cache must give the very same greedy reply."""
    return LocalBackend(str(tiny_qwen2_audio), quantization="none")


GREEDY = GenerationSettings(temperature=0, max_new_tokens=12)


def fresh_reply(backend: LocalBackend, response: Response) -> str:
    """What the model says to the response's prompt when everything is computed from scratch."""
    inputs = backend.prepare(response.prompt)
    ids = backend.model.generate(**inputs, **generate_kwargs(GREEDY, backend.loaded.stop_ids))[0, inputs["input_ids"].shape[1]:]
    return backend.tokenizer.decode(ids, skip_special_tokens=True)


def encoded_parts(backend: LocalBackend, monkeypatch) -> list[int]:
    """Records how many audio parts each pass of the audio encoder receives."""
    tower, calls = backend.model.model.audio_tower, []
    forward = tower.forward
    monkeypatch.setattr(tower, "forward", lambda features, *a, **k: calls.append(len(features)) or forward(features, *a, **k))
    return calls


def test_a_follow_up_turn_starts_from_the_cached_history_and_encodes_only_the_new_clip(full_precision, monkeypatch):
    conversation = Conversation()
    conversation.add_user("What is this?", [tone_clip(2.0, 300, "a.wav"), tone_clip(1.0, 500, "b.wav")])
    "".join(Response(full_precision, conversation, GREEDY))
    conversation.add_user("And this one?", [tone_clip(1.5, 700, "c.wav")])
    follow_up = Response(full_precision, conversation, GREEDY)
    expected = fresh_reply(full_precision, follow_up)
    calls = encoded_parts(full_precision, monkeypatch)
    assert "".join(follow_up) == expected
    assert calls == [1]  # Audio 3 only: Audio 1 and 2 are in the cache
    assert 100 < follow_up.stats.n_reused_prompt_tokens < follow_up.stats.n_prompt_tokens


def test_another_clip_behind_the_same_token_ids_is_encoded_again(full_precision, monkeypatch):
    first, second = Conversation(), Conversation()
    first.add_user("Describe.", [tone_clip(2.0, 300, "a.wav")])
    second.add_user("Describe.", [tone_clip(2.0, 900, "other.wav")])  # the same length: the same token ids
    "".join(Response(full_precision, first, GREEDY))
    response = Response(full_precision, second, GREEDY)
    expected = fresh_reply(full_precision, response)
    calls = encoded_parts(full_precision, monkeypatch)
    assert "".join(response) == expected and calls == [1]
    audio_start = full_precision.loaded.token_ids(response.prompt).index(full_precision.loaded.audio_token_id)
    assert 0 < response.stats.n_reused_prompt_tokens <= audio_start


def test_a_regenerated_reply_reuses_the_question_and_matches_a_fresh_one(full_precision):
    conversation = Conversation()
    conversation.add_user("Describe.", [tone_clip(2.0, 400, "a.wav")])
    "".join(Response(full_precision, conversation, GREEDY))
    conversation.drop_reply()
    again = Response(full_precision, conversation, GREEDY)
    assert "".join(again) == fresh_reply(full_precision, again)
    assert again.stats.n_reused_prompt_tokens == again.stats.n_prompt_tokens - 1


def test_a_turn_that_fails_before_generating_leaves_the_cache_to_the_next(full_precision, monkeypatch):
    conversation = Conversation()
    conversation.add_user("Describe.", [tone_clip(2.0, 310, "a.wav")])
    "".join(Response(full_precision, conversation, GREEDY))
    conversation.add_user("And this?", [tone_clip(1.0, 620, "b.wav")])
    with monkeypatch.context() as broken:
        broken.setattr(full_precision.loaded, "features", lambda samples: 1 / 0)  # its new clip cannot be read
        with pytest.raises(BackendError):
            "".join(Response(full_precision, conversation, GREEDY))
    conversation.drop_reply()
    retried = Response(full_precision, conversation, GREEDY)
    "".join(retried)
    assert retried.stats.n_reused_prompt_tokens > 0 and retried.message.status == DONE
