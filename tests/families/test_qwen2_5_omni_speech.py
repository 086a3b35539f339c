"""Qwen2.5-Omni's spoken replies: the talker's codes equal transformers' generate(return_audio=True) exactly, the
streamed audio equals its one-shot audio, chunks come while the thinker still writes, cancel stops, the voices.

The reference is Qwen2_5OmniForConditionalGeneration.generate on the inputs LocalBackend.prepare makes, the thinker
greedy and the talker greedy (talker_do_sample=False), with token2wav's initial noise taken from the talker's own
noise table (generate draws it with torch.randn, patched here for that one call).
"""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2_5OmniForConditionalGeneration

from chat import Clip, Conversation, GenerationSettings, Response, load_backend
from chat.errors import SettingsError
from chat.families import get_family
from chat.families.base import LoadOptions
from chat.families.qwen2_5_omni.talker import Qwen2_5OmniTalker, _Decoder
from chat.local import LocalBackend
from chat.prompts import Prompt
from chat.speech import ThinkerStep, ThinkerStream
from testkit.tiny.qwen2_5_omni import build_tiny_qwen2_5_omni
from tests.conftest import one_intra_op_thread, spoken, tone

FAMILY = get_family("qwen2.5-omni")
N_REPLY_TOKENS = 48  # the thinker's reply (its last token is never forwarded: 47 steps)
N_CODES = 100  # the talker's codes: past the reply's end, so the text end and padding are read too; 4 chunks
SHORT_CODES = 30  # a reply decoded in one window, as generate decodes it
FIRST_CHUNK_CODES = 36  # (2 chunk blocks + 1 future block) * 24 mel frames / 2 frames a code
HELD_STEPS = 4  # the slow thinker's last steps, held back until the first chunk is heard
STEP_DELAY_S = 0.02  # how slowly the slow thinker forwards its tokens
# Streamed vs one-shot audio. Where a chunk's window holds the whole reply the decode is the one-shot decode, so
# only float error is allowed. Elsewhere each DiT window sees one block ahead and two behind, not the whole
# reply; at the tiny checkpoint's weights (small attention gates) that changed the audio by at most 5e-10 (its
# RMS is 9e-4: a relative 6e-7), so the float-error bound holds for every sample. The real checkpoint's error
# there is Qwen's design, larger, and not measured here.
AUDIO_ATOL = 1e-8


@dataclass
class Reference:
    """What generate computed: the thinker's output (with hidden states), the talker's codes, the audio."""

    prompt: Prompt
    inputs: dict[str, torch.Tensor]
    thinker: object  # GenerateDecoderOnlyOutput
    codes: list[int]
    audio: np.ndarray


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> Iterator[tuple[LocalBackend, Qwen2_5OmniTalker, Path]]:
    """The tiny checkpoint: its thinker as the backend loads it, and the talker beside it, on the CPU."""
    folder = build_tiny_qwen2_5_omni(tmp_path_factory.mktemp("tiny-qwen2.5-omni-speech"))
    with one_intra_op_thread():
        backend = load_backend(str(folder), cpu_only=True)
        talker = Qwen2_5OmniTalker(str(folder), LoadOptions(torch.float32, "cpu", None), backend.loaded)
        talker.max_new_codes = N_CODES
        yield backend, talker, folder


def conversation() -> Conversation:
    """A clip asked about."""
    conversation = Conversation()
    conversation.add_user("What is this?", [Clip(tone(1.5), name="a.wav")])
    return conversation


def generated(backend: LocalBackend, talker: Qwen2_5OmniTalker, folder: Path, voice: str, n_reply_tokens: int,
              n_codes: int = N_CODES) -> Reference:
    """transformers' full model's generate(return_audio=True) for the conversation, spied on for its parts."""
    prompt = FAMILY.renderer.render(conversation())
    inputs = backend.prepare(prompt)
    full = Qwen2_5OmniForConditionalGeneration.from_pretrained(folder).eval()
    seen: dict[str, object] = {}
    for part in ("thinker", "talker"):
        module = getattr(full, part)
        module.generate = lambda *args, _generate=module.generate, _part=part, **kwargs: seen.setdefault(
            _part, _generate(*args, **kwargs))
    randn = torch.randn

    def noise(*shape, **kwargs) -> torch.Tensor:
        """token2wav's initial noise (1, n_frames, mel_dim) from the talker's table; anything else as torch's."""
        size = list(shape[0] if len(shape) == 1 else shape)
        if len(size) == 3 and size[2] == talker.dit.mel_dim:
            return talker.noise[:, :size[1]].clone()
        return randn(*shape, **kwargs)

    torch.randn = noise
    try:
        _, audio = full.generate(
            **inputs, speaker=voice, thinker_max_new_tokens=n_reply_tokens, thinker_do_sample=False,
            thinker_eos_token_id=backend.loaded.stop_ids,
            thinker_suppress_tokens=backend.model.generation_config.suppress_tokens,
            talker_do_sample=False, talker_max_new_tokens=n_codes, talker_eos_token_id=talker.end_codes)
    finally:
        torch.randn = randn
    n_prompt = inputs["input_ids"].shape[1]
    return Reference(prompt, inputs, seen["thinker"], seen["talker"][0, n_prompt + 2:].tolist(), audio.numpy())


@pytest.fixture(scope="module")
def reference(omni) -> Reference:
    """generate's reply, codes and audio in the first voice."""
    backend, talker, folder = omni
    with one_intra_op_thread():
        return generated(backend, talker, folder, talker.voices[0], N_REPLY_TOKENS)


def thinker_stream(reference: Reference, delay_s: float = 0.0, hold: threading.Event | None = None
                   ) -> tuple[ThinkerStream, threading.Event]:
    """A ThinkerStream of generate's thinker run, its steps put from another thread delay_s apart, the last
    HELD_STEPS only once hold is set (if given); the event is set when the stream has ended."""
    out = reference.thinker
    layers = (0, -1)
    n_prompt = reference.inputs["input_ids"].shape[1]
    stream = ThinkerStream(reference.prompt, reference.inputs["input_ids"][0],
                           {layer: out.hidden_states[0][layer][0] for layer in layers})
    ended = threading.Event()

    def feed() -> None:
        for i, hidden in enumerate(out.hidden_states[1:]):  # each forwarded reply token: generated token i
            time.sleep(delay_s)
            if hold is not None and i == len(out.hidden_states) - 1 - HELD_STEPS:
                hold.wait()
            stream.put(ThinkerStep(int(out.sequences[0, n_prompt + i]), {layer: hidden[layer][0, -1]
                                                                         for layer in layers}))
        ended.set()
        stream.end()

    threading.Thread(target=feed, daemon=True).start()
    return stream, ended


def test_codes_and_audio_equal_transformers_generate(omni, reference):
    backend, talker, _ = omni
    assert talker.hidden_layers == (0, -1) and talker.sample_rate == 24_000
    with one_intra_op_thread():
        codes = list(talker.codes(thinker_stream(reference)[0], talker.voices[0], threading.Event(), greedy=True))
        chunks = list(talker.speak(thinker_stream(reference)[0], talker.voices[0], threading.Event(), greedy=True))
        text = "".join(Response(backend, conversation(), GenerationSettings(
            temperature=0, max_new_tokens=N_REPLY_TOKENS, repetition_penalty=1.0)))
    assert codes == reference.codes and len(codes) == N_CODES
    assert len(chunks) > 1
    audio = np.concatenate(chunks)
    assert audio.shape == reference.audio.shape == (N_CODES * 2 * talker.hop,)
    np.testing.assert_allclose(audio, reference.audio, rtol=0, atol=AUDIO_ATOL)
    n_prompt = reference.inputs["input_ids"].shape[1]
    assert text == backend.tokenizer.decode(reference.thinker.sequences[0, n_prompt:], skip_special_tokens=True)


def test_the_first_chunk_comes_while_the_thinker_still_writes(omni, reference):
    _, talker, _ = omni
    heard = threading.Event()
    stream, ended = thinker_stream(reference, STEP_DELAY_S, hold=heard)
    with one_intra_op_thread():
        chunks = talker.speak(stream, talker.voices[0], threading.Event(), greedy=True)
        first = next(chunks)  # after 36 of the thinker's 47 steps; 43 are put before the rest wait for it
        assert not ended.is_set()
        heard.set()
        rest = list(chunks)
    assert len(first) == (FIRST_CHUNK_CODES * 2 - 24 - 20) * talker.hop  # one chunk less the vocoder's context
    assert len(rest) >= 2


def test_cancel_stops_speaking_at_once(omni, reference):
    _, talker, _ = omni
    cancel = threading.Event()
    stream, _ = thinker_stream(reference, STEP_DELAY_S)
    with one_intra_op_thread():
        chunks = talker.speak(stream, talker.voices[0], cancel)
        next(chunks)
        cancel.set()
        start = time.monotonic()
        assert list(chunks) == []
    assert time.monotonic() - start < 0.5


def test_each_voice_speaks_and_an_unknown_one_is_named(omni, reference):
    backend, talker, folder = omni
    assert talker.voices == ("Chelsie", "Ethan")  # generate's default first
    with one_intra_op_thread():
        other = generated(backend, talker, folder, "Ethan", n_reply_tokens=4, n_codes=SHORT_CODES)
        talker.max_new_codes = SHORT_CODES
        try:
            audio = np.concatenate(list(talker.speak(thinker_stream(other)[0], "Ethan", threading.Event(), True)))
        finally:
            talker.max_new_codes = N_CODES
        np.testing.assert_allclose(audio, other.audio, rtol=0, atol=AUDIO_ATOL)
        assert np.abs(audio - reference.audio[:len(audio)]).max() > 100 * AUDIO_ATOL
        with pytest.raises(SettingsError, match="no voice 'Serena'; its voices: Chelsie, Ethan"):
            next(talker.speak(thinker_stream(reference)[0], "Serena", threading.Event()))


def test_vocoding_in_pieces_equals_vocoding_at_once(omni):
    """BigVGAN's chunking is exact where its 20 frames of context on each side cover its receptive field."""
    _, talker, _ = omni
    mel = torch.randn(150, talker.dit.mel_dim, generator=torch.Generator().manual_seed(1)) * 3 - 6
    with one_intra_op_thread(), torch.no_grad():
        whole = talker.vocode(mel)
        decoder = _Decoder(talker, {}, threading.Event())
        decoder.mels, decoder.n_mel = [mel[:70]], 70  # mel up to frame 70 solved: audio up to 50 heard
        pieces = list(decoder._vocode(50))
        decoder.mels, decoder.n_mel = [mel], 150
        pieces += list(decoder._vocode(150))
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=0, atol=AUDIO_ATOL)
    assert np.abs(whole).max() > 1e5 * AUDIO_ATOL


GREEDY = GenerationSettings(temperature=0, max_new_tokens=N_REPLY_TOKENS, repetition_penalty=1.0)


def test_the_backend_speaks_as_it_writes_and_the_audio_equals_generates(omni, reference):
    """Through LocalBackend: the thinker's hidden states reach the talker from hooks while it generates."""
    backend, _, _ = omni
    with one_intra_op_thread():
        backend.talker().max_new_codes = N_CODES
        response = Response(backend, conversation(), GREEDY, voice="Chelsie")
        text, audio = spoken(response)
    n_prompt = reference.inputs["input_ids"].shape[1]
    assert text == backend.tokenizer.decode(reference.thinker.sequences[0, n_prompt:], skip_special_tokens=True)
    np.testing.assert_allclose(audio, reference.audio, rtol=0, atol=AUDIO_ATOL)
    assert response.stats.time_to_first_audio_s is not None
    assert response.message.text == text  # the Response records the text; a Turn records the speech on it


def test_a_continued_spoken_turn_equals_the_same_turn_from_scratch(omni):
    """The second turn reuses the attention cache and the talker's hidden states kept with it."""
    backend, _, _ = omni
    with one_intra_op_thread():
        backend.talker().max_new_codes = SHORT_CODES
        chat = conversation()
        settings = GenerationSettings(temperature=0, max_new_tokens=8, repetition_penalty=1.0)
        spoken(Response(backend, chat, settings, voice="Ethan"))
        chat.add_user("Again, please.")
        continued = Response(backend, chat, settings, voice="Ethan")
        text, audio = spoken(continued)
        chat.drop_reply()
        backend.last_reply = None
        fresh = Response(backend, chat, settings, voice="Ethan")
        text_again, audio_again = spoken(fresh)
    assert continued.stats.n_reused_prompt_tokens > 0 and fresh.stats.n_reused_prompt_tokens == 0
    assert text == text_again
    np.testing.assert_allclose(audio, audio_again, rtol=0, atol=1e-6)  # the same codes; cache vs recompute float


def test_after_a_silent_turn_a_spoken_one_computes_the_prompt_anew(omni):
    """A silent reply's cache holds no hidden states for the talker: the spoken turn after it starts over."""
    backend, _, _ = omni
    with one_intra_op_thread():
        backend.talker().max_new_codes = SHORT_CODES
        chat = conversation()
        settings = GenerationSettings(temperature=0, max_new_tokens=4, repetition_penalty=1.0)
        list(Response(backend, chat, settings))
        chat.add_user("Again, please.")
        response = Response(backend, chat, settings, voice="Ethan")
        _, audio = spoken(response)
    assert response.stats.n_reused_prompt_tokens == 0 and len(audio) > 0
    assert backend.last_reply.hidden is not None  # the next spoken turn can continue from this one


def test_a_voice_the_checkpoint_lacks_is_refused_before_anything_runs(omni):
    backend, _, _ = omni
    assert backend.voices == ("Chelsie", "Ethan")
    with pytest.raises(SettingsError, match="voices: Chelsie, Ethan"):
        Response(backend, conversation(), GREEDY, voice="Serena")
