"""Spoken replies: audio made from a reply while its text streams, heard before the reply has finished.

Two kinds of voice. An Omni family's own talker speaks what its thinker writes: it reads the thinker's hidden
states (a ThinkerStream, which the local backend fills as the thinker generates) and yields audio chunk by chunk
as its vocoder decodes them. Every other family is read aloud by a text-to-speech model, sentence by sentence as
the text streams in (chat.tts). Either way a reply's audio reaches a view as SpeechChunk events and stays with the
reply's message as its Speech: playable, saved and exported, never sent back to the model.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from chat.clip import ID_HEX_CHARS
from chat.errors import SettingsError

if TYPE_CHECKING:
    import torch

    from chat.families.base import LoadOptions, LocalModel
    from chat.prompts import Prompt


@dataclass(frozen=True)
class Speech:
    """A reply's spoken audio: float32 mono samples at their own rate (24 kHz for every voice here), not the
    16 kHz the models hear, since nothing here is heard by a model."""

    samples: np.ndarray = field(repr=False, compare=False)  # (n_samples,) float32 in [-1, 1]
    sample_rate: int
    voice: str  # the voice that spoke it, as a person chose it
    id: str = field(init=False)  # from the samples, as a clip's: the name of its stored file

    def __post_init__(self) -> None:
        samples = np.ascontiguousarray(self.samples, dtype=np.float32)
        samples.flags.writeable = False
        object.__setattr__(self, "samples", samples)
        object.__setattr__(self, "id", hashlib.sha256(samples.data).hexdigest()[:ID_HEX_CHARS])

    @classmethod
    def joined(cls, chunks: list[SpeechChunk], voice: str) -> Speech:
        """The reply's audio: its chunks one after another, as they were played."""
        return cls(np.concatenate([chunk.samples for chunk in chunks]), chunks[0].sample_rate, voice)

    @property
    def duration_s(self) -> float:
        """How long it plays."""
        return len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class SpeechChunk:
    """A piece of a reply's audio as it is made; a view plays it at once."""

    samples: np.ndarray = field(repr=False, compare=False)  # (n_samples,) float32 mono
    sample_rate: int


@dataclass(frozen=True)
class ThinkerStep:
    """One reply token as the thinker forwarded it (a token is forwarded in the step after it was chosen)."""

    token_id: int
    hidden: dict[int, torch.Tensor]  # the talker's layers (Talker.hidden_layers): (hidden_size,) each


class ThinkerStream:
    """What a talker reads of the thinker: the whole prompt's token ids and hidden states (earlier turns included,
    kept from the turns that computed them), then each reply token with its hidden states as it is forwarded.

    The reply's last token (its end, or the token a stop came after) is never forwarded, so it is not among the
    steps: steps() simply ends. The local backend puts steps from its generate thread; a talker reads them from its
    own thread.
    """

    def __init__(self, prompt: Prompt, prompt_ids: torch.Tensor, prompt_hidden: dict[int, torch.Tensor]) -> None:
        self.prompt = prompt  # the app's prompt: its audio parts, for a talker that needs their lengths
        self.prompt_ids = prompt_ids  # (n_prompt,)
        self.prompt_hidden = prompt_hidden  # layer → (n_prompt, hidden_size)
        self._steps: queue.Queue[ThinkerStep | None] = queue.Queue()

    def put(self, step: ThinkerStep) -> None:
        """Add the next reply token (the backend's generate thread)."""
        self._steps.put(step)

    def end(self) -> None:
        """Say the reply has no more tokens (however it ended)."""
        self._steps.put(None)

    def steps(self) -> Iterator[ThinkerStep]:
        """The reply's tokens in order, each as soon as the thinker has forwarded it; ends with the reply."""
        while (step := self._steps.get()) is not None:
            yield step


class Talker:
    """A family's own speech model beside its thinker (talker and vocoder), loaded from the same checkpoint only
    when the voice is on. A family folder's talker.py subclasses it; Family.talker names that class."""

    sample_rate: int  # of the audio it makes
    voices: tuple[str, ...]  # the voices its checkpoint has, the default first
    hidden_layers: tuple[int, ...]  # which of the thinker's hidden_states it reads: 0 the embeddings, -1 the last

    def __init__(self, checkpoint: str, options: LoadOptions, thinker: LocalModel) -> None:
        raise NotImplementedError

    @classmethod
    def voices_of(cls, checkpoint: str) -> tuple[str, ...]:
        """The voices a checkpoint's talker has, read from its small files without loading it; none when the
        checkpoint was saved without a talker."""
        raise NotImplementedError

    def speak(self, thinker: ThinkerStream, voice: str, cancel: threading.Event, greedy: bool = False
              ) -> Iterator[np.ndarray]:
        """(n_samples,) float32 chunks of the reply's audio, each yielded as soon as it is decoded, so the first is
        heard while the thinker still writes; stops within one talker step of cancel. greedy: no sampling (tests)."""
        raise NotImplementedError


class TextToSpeech:
    """A model that reads text aloud (chat.tts), for families with no talker of their own."""

    sample_rate: int
    voices: tuple[str, ...]  # the default first

    def speak(self, texts: Iterator[str], voice: str, cancel: threading.Event) -> Iterator[np.ndarray]:
        """(n_samples,) float32 audio of each sentence of the text as it streams in, yielded as soon as the sentence
        is complete and synthesized; stops soon after cancel."""
        raise NotImplementedError


@dataclass(frozen=True)
class Voice:
    """How replies are spoken: a voice of the backend's own talker (reader None), or of a text-to-speech model."""

    name: str
    reader: TextToSpeech | None = None


class ReadAloud:
    """A text-to-speech model reading one reply in a thread of its own: fed the reply's text as it streams, its
    audio taken as it comes (ready()) and, once the text is complete, to the end (rest())."""

    def __init__(self, reader: TextToSpeech, voice: str, cancel: threading.Event) -> None:
        self.sample_rate = reader.sample_rate
        self._texts: queue.Queue[str | None] = queue.Queue()
        self._audio: queue.Queue[np.ndarray | BaseException | None] = queue.Queue()
        self._cancel = cancel
        self._thread = threading.Thread(target=self._run, args=(reader, voice), name="read-aloud", daemon=True)
        self._thread.start()

    def feed(self, text: str) -> None:
        """The next piece of the reply's text."""
        self._texts.put(text)

    def ready(self) -> list[SpeechChunk]:
        """The audio made since the last call, without waiting."""
        chunks = []
        while not self._audio.empty():
            chunk = self._audio.get_nowait()
            if chunk is None or isinstance(chunk, BaseException):
                self._audio.put(chunk)  # rest() ends or raises on it
                break
            chunks.append(SpeechChunk(chunk, self.sample_rate))
        return chunks

    def rest(self) -> Iterator[SpeechChunk]:
        """Say the text is complete and yield the audio still to come, each chunk as it is made."""
        self.close()
        while (chunk := self._audio.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            yield SpeechChunk(chunk, self.sample_rate)
        self._thread.join()

    def close(self) -> None:
        """Say the text is complete without waiting for its audio (rest() says it too)."""
        self._texts.put(None)

    def _texts_in_order(self) -> Iterator[str]:
        while (text := self._texts.get()) is not None:
            yield text

    def _run(self, reader: TextToSpeech, voice: str) -> None:
        try:
            for samples in reader.speak(self._texts_in_order(), voice, self._cancel):
                self._audio.put(samples)
        except Exception as e:  # the reader of rest() raises it: the reply's text stands, its speech failed
            self._audio.put(e)
        finally:
            self._audio.put(None)


class Voices:
    """The voices an app offers for its backend, the default first: the backend's own talker's where it has one (an
    Omni family run here), else a text-to-speech model's. What speaks them is loaded the first time one is used (a
    talker's weights, or the text-to-speech model's, which may download), not in the middle of the first reply."""

    def __init__(self, names: tuple[str, ...], load: Callable[[], TextToSpeech | None]) -> None:
        """load: loads what speaks; returns the text-to-speech model, or None where the backend's talker speaks."""
        self.names = names
        self._load, self._loaded, self._reader = load, False, None
        self._lock = threading.Lock()

    @property
    def default(self) -> str:
        """The voice used unless a person picks another."""
        return self.names[0]

    def get(self, name: str) -> Voice:
        """A voice by name (a person's choice), what speaks it loaded; SettingsError names the voices there are."""
        if name not in self.names:
            raise SettingsError(f"There is no voice {name!r}; choose one of: {', '.join(self.names)}.")
        with self._lock:
            if not self._loaded:
                self._reader, self._loaded = self._load(), True
        return Voice(name, self._reader)
