"""Qwen3-Omni's voice: its talker and code2wav stream the audio transformers' own full model makes, starting before
the thinker has finished; each voice speaks; cancel stops it.

The ThinkerStream here is filled from the thinker's own generate output (prompt ids, the prompt's hidden states at
the talker's layers, each forwarded reply token's) by a thread of its own, as the local backend's generate thread
fills it.
"""

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen3OmniMoeForConditionalGeneration

from chat import Clip, Conversation, GenerationSettings, Response
from chat.errors import SettingsError
from chat.families import get_family
from chat.families.base import LoadOptions
from chat.families.qwen3_omni.talker import FIRST_CHUNK_CODES, MAX_NEW_TOKENS, Qwen3OmniTalker
from chat.local import LocalBackend
from chat.speech import ThinkerStep, ThinkerStream
from testkit.tiny.qwen3_omni import build_tiny_qwen3_omni
from tests.conftest import one_intra_op_thread, spoken, tone

FAMILY = get_family("qwen3-omni")
GREEDY = GenerationSettings(temperature=0, max_new_tokens=8, repetition_penalty=1.0)  # as test_qwen3_omni's
MAX_TALKER_TOKENS = 40  # talker_max_new_tokens here: 39 codes, 3.1 s of speech (the tiny talker never ends itself)
# Of the reference's peak. float32 on a CPU: the talker's codes are equal (one wrong code changes samples by the
# audio's own scale), and the audio differs from generate's only by the float rounding of the same sums computed in
# other shapes (a reply token's projection alone, code2wav's transformer one code at a time with its cache, its
# convolutions per chunk): measured 2.5e-7 of a 0.3 peak (8e-7 of it), a few float32 ulps; 1e-5 leaves 12 times that
AUDIO_TOLERANCE = 1e-5
CANCEL_AFTER_S = 0.3  # waiting that long before cancel
SEED = 0  # of torch's sampling: the sampled reply does not end before its second chunk
CANCEL_WITHIN_S = 1.0  # a tiny talker step takes milliseconds; a second is room for a loaded machine


def two_clip_conversation() -> Conversation:
    """test_qwen3_omni's: two clips of the same length (the processor would pad a shorter one), then a question."""
    conversation = Conversation()
    conversation.add_user("What do you hear?", [Clip(tone(2.4, 300.0), name="chirp.wav"),
                                                Clip(tone(2.4, 500.0), name="bursts.wav")])
    return conversation


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> Iterator[tuple[LocalBackend, Path, Qwen3OmniTalker]]:
    """The tiny checkpoint loaded as a user's folder is, and its talker beside the thinker."""
    folder = build_tiny_qwen3_omni(tmp_path_factory.mktemp("tiny-qwen3-omni"))
    with one_intra_op_thread():
        backend = LocalBackend(str(folder), cpu_only=True)
        talker = Qwen3OmniTalker(str(folder), LoadOptions(torch.float32, "cpu", None), backend.loaded)
        talker.max_new_tokens = MAX_TALKER_TOKENS
        yield backend, folder, talker


@pytest.fixture(scope="module")
def reference(omni) -> dict:
    """transformers' full model on the inputs the backend prepares: its greedy reply and audio in each voice,
    and the thinker's hidden states a ThinkerStream carries."""
    backend, folder, talker = omni
    prompt = FAMILY.renderer.render(two_clip_conversation())
    inputs = backend.prepare(prompt)
    full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    config = backend.model.generation_config
    # thinker_eos_token_id None: given ids, generate moves tts_eos to the entry after the reply's end counted as if
    # "<|im_start|>assistant\n" were 3 tokens, as in the real vocab (where it changes nothing); the tiny byte tokenizer
    # spells it in 11, which would put tts_eos mid-text. The reply is the same: the generation config's <|im_end|>
    # still ends it, and the app's other stop, <|im_start|>, is suppressed.
    thinker_kwargs = {"thinker_max_new_tokens": GREEDY.max_new_tokens, "thinker_do_sample": False,
                      "thinker_eos_token_id": None, "thinker_suppress_tokens": config.suppress_tokens}
    audio = {}
    for voice in talker.voices:
        sequences, wav = full.generate(**inputs, **thinker_kwargs, return_audio=True, speaker=voice,
                                       talker_do_sample=False, talker_max_new_tokens=MAX_TALKER_TOKENS)
        audio[voice] = wav.reshape(-1).numpy()
    thinker = full.thinker.generate(**inputs, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                    eos_token_id=backend.loaded.stop_ids, suppress_tokens=config.suppress_tokens,
                                    output_hidden_states=True, return_dict_in_generate=True)
    assert torch.equal(thinker.sequences, sequences)
    n_prompt = inputs["input_ids"].shape[1]
    layers = talker.hidden_layers
    steps = [ThinkerStep(int(thinker.sequences[0, n_prompt + k - 1]), {i: h[i][0, -1] for i in layers})
             for k, h in enumerate(thinker.hidden_states) if k]
    hidden = {i: thinker.hidden_states[0][i][0] for i in layers}
    text = backend.tokenizer.decode(sequences[0, n_prompt:], skip_special_tokens=True)
    return {"prompt": prompt, "ids": inputs["input_ids"][0], "hidden": hidden, "steps": steps, "audio": audio,
            "text": text}


def assert_same_audio(audio: np.ndarray, expected: np.ndarray) -> None:
    """Equal length, equal samples within AUDIO_TOLERANCE of the peak; the reference moves (not flat or silent)."""
    peak = np.abs(expected).max()
    assert expected.std() > 0.01 and len(audio) == len(expected)
    np.testing.assert_allclose(audio, expected, atol=AUDIO_TOLERANCE * peak, rtol=0)


def stream_of(reference: dict) -> ThinkerStream:
    return ThinkerStream(reference["prompt"], reference["ids"], reference["hidden"])


def feed(stream: ThinkerStream, steps: list[ThinkerStep], events: list[str], before_end: threading.Event | None = None,
         end: bool = True) -> threading.Thread:
    """Put the steps from a thread, as the backend's generate thread does; with before_end, wait (up to 10 s) for
    it before the last step and the end, so a talker that speaks before the thinker ends can show it."""
    def run() -> None:
        for n, step in enumerate(steps):
            if before_end is not None and n == len(steps) - 1:
                before_end.wait(10)
            stream.put(step)
            events.append("step")
        if end:
            stream.end()
            events.append("end")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_streamed_audio_is_transformers_own_full_models_and_the_text_its_text_only_reply(omni, reference):
    backend, _, talker = omni
    assert reference["text"] == "".join(Response(backend, two_clip_conversation(), GREEDY))
    voice = talker.voices[0]
    stream = stream_of(reference)
    feeder = feed(stream, reference["steps"], [])
    chunks = list(talker.speak(stream, voice, threading.Event(), greedy=True))
    feeder.join()
    audio = np.concatenate(chunks)
    assert audio.dtype == np.float32
    assert_same_audio(audio, reference["audio"][voice])


def test_the_first_chunk_comes_before_the_thinker_ends_and_more_follow(omni, reference):
    _, _, talker = omni
    events: list[str] = []
    first_chunk = threading.Event()
    stream = stream_of(reference)
    feeder = feed(stream, reference["steps"], events, before_end=first_chunk)
    chunks = []
    for chunk in talker.speak(stream, talker.voices[0], threading.Event(), greedy=True):
        events.append("chunk")
        chunks.append(chunk)
        first_chunk.set()
    feeder.join()
    assert events.index("chunk") < events.index("end")
    assert_same_audio(np.concatenate(chunks), reference["audio"][talker.voices[0]])  # waiting changed nothing
    sizes, per_code = [len(chunk) for chunk in chunks], talker.samples_per_code
    lookahead = (MAX_TALKER_TOKENS - 1) * per_code - sum(sizes)  # what a decode of n codes lacks of n codes' samples
    assert 0 < lookahead < per_code
    assert sizes == [FIRST_CHUNK_CODES * per_code - lookahead] + [n * per_code for n in (4, 8, 16, 39 - 32)]


def test_cancel_stops_speaking_while_waiting_for_the_thinker(omni, reference):
    """The thinker says nothing after its fourth token, and does not end: the talker waits, then sees cancel."""
    _, _, talker = omni
    stream, cancel = stream_of(reference), threading.Event()
    feed(stream, reference["steps"][:4], [], end=False)
    chunks = talker.speak(stream, talker.voices[0], cancel, greedy=True)
    next(chunks)
    start = time.monotonic()
    threading.Timer(CANCEL_AFTER_S, cancel.set).start()
    list(chunks)
    assert CANCEL_AFTER_S <= time.monotonic() - start < CANCEL_AFTER_S + CANCEL_WITHIN_S


def test_cancel_stops_a_sampled_reply_within_a_step(omni, reference, monkeypatch):
    """After the thinker's end, with no end of the talker's own in sight (4096 codes: 5 minutes of speech)."""
    _, _, talker = omni
    monkeypatch.setattr(talker, "max_new_tokens", MAX_NEW_TOKENS)
    torch.manual_seed(SEED)
    stream, cancel = stream_of(reference), threading.Event()
    feed(stream, reference["steps"], [])
    chunks = talker.speak(stream, talker.voices[0], cancel)
    first, second = next(chunks), next(chunks)
    cancel.set()
    start = time.monotonic()
    assert list(chunks) == [] and time.monotonic() - start < CANCEL_WITHIN_S
    assert first.dtype == second.dtype == np.float32 and np.abs(np.concatenate([first, second])).max() <= 1


def test_each_voice_speaks_as_transformers_does_and_an_unknown_voice_is_named(omni, reference):
    _, _, talker = omni
    assert talker.voices == ("Ethan", "Aiden", "Chelsie") == Qwen3OmniTalker.voices_of(str(omni[1]))
    heard = {}
    for voice in talker.voices:
        stream = stream_of(reference)
        feed(stream, reference["steps"], [])
        heard[voice] = np.concatenate(list(talker.speak(stream, voice.lower(), threading.Event(), greedy=True)))
        assert_same_audio(heard[voice], reference["audio"][voice])
    assert not np.allclose(heard["Ethan"], heard["Chelsie"])
    with pytest.raises(SettingsError, match="Ethan, Aiden, Chelsie"):
        talker.speak(stream_of(reference), "Nobody", threading.Event())


def test_the_backend_speaks_as_it_writes_and_the_audio_is_transformers_own(omni, reference):
    """Through LocalBackend: the thinker's hidden states reach the talker from hooks while it generates."""
    backend, _, talker = omni
    assert backend.voices == talker.voices
    with one_intra_op_thread():
        backend.talker().max_new_tokens = MAX_TALKER_TOKENS
        response = Response(backend, two_clip_conversation(), GREEDY, voice=talker.voices[0])
        text, audio = spoken(response)
    assert text == reference["text"]
    assert_same_audio(audio, reference["audio"][talker.voices[0]])
    assert response.stats.time_to_first_audio_s is not None


def test_a_continued_spoken_turn_equals_the_same_turn_from_scratch(omni):
    """The second turn reuses the attention cache and the talker's hidden states kept with it."""
    backend, _, talker = omni
    with one_intra_op_thread():
        backend.talker().max_new_tokens = MAX_TALKER_TOKENS
        chat = two_clip_conversation()
        spoken(Response(backend, chat, GREEDY, voice=talker.voices[1]))
        chat.add_user("Again, please.")
        continued = Response(backend, chat, GREEDY, voice=talker.voices[1])
        text, audio = spoken(continued)
        chat.drop_reply()
        backend.last_reply = None
        fresh = Response(backend, chat, GREEDY, voice=talker.voices[1])
        text_again, audio_again = spoken(fresh)
    assert continued.stats.n_reused_prompt_tokens > 0 and fresh.stats.n_reused_prompt_tokens == 0
    assert text == text_again
    assert_same_audio(audio, audio_again)
