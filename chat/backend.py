"""The backend interface: a conversation in, a streamed, cancellable, measured reply out."""

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from chat.audio import SAMPLE_RATE
from chat.conversation import DONE, FAILED, STOPPED, Conversation, Figures, Message
from chat.errors import ChatError, ConversationError, SettingsError
from chat.families.base import Family
from chat.prompts import Prompt, estimate_tokens
from chat.settings import GenerationSettings
from chat.speech import SpeechChunk

STOPPED_NOTE = "Stopped by the user."
QUANTIZATIONS = ("4bit", "8bit", "fp8", "none")  # of a local model; 4bit is the default on a GPU; fp8 needs CC 8.9+
log = logging.getLogger(__name__)


@dataclass
class Stats:
    """What a reply cost; filled in while it streams."""

    time_to_first_token_s: float | None = None
    duration_s: float | None = None
    n_tokens: int = 0
    n_prompt_tokens: int = 0
    n_reused_prompt_tokens: int = 0  # of those, how many the previous turn's attention cache already held
    audio_s: float = 0.0
    peak_gpu_memory_mb: float | None = None  # None where there is no GPU
    n_dropped_turns: int = 0
    time_to_first_audio_s: float | None = None  # of a spoken reply
    started_at: float = field(default_factory=time.monotonic)  # when the reply was asked for (time.monotonic)

    def first_token(self) -> None:
        """Note that the first token was generated now, if this is the first time. A backend calls this where
        tokens are produced: text may reach the reader later (a streamer holds it back until a word ends)."""
        if self.time_to_first_token_s is None:
            self.time_to_first_token_s = time.monotonic() - self.started_at

    def first_audio(self) -> None:
        """Note that the reply's first audio was made now, if this is the first time."""
        if self.time_to_first_audio_s is None:
            self.time_to_first_audio_s = time.monotonic() - self.started_at

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed after the first token."""
        if self.n_tokens < 2 or self.duration_s is None or self.time_to_first_token_s is None:
            return None
        decode_s = self.duration_s - self.time_to_first_token_s
        return (self.n_tokens - 1) / decode_s if decode_s > 0 else None


class Backend:
    """A model behind one generator method; Response owns timing, recording and cancellation."""

    family: Family  # how its prompts are written and its replies read
    name = ""  # the checkpoint or served model, as the page and the terminal name it
    quantization = "none"  # how its weights are stored, as the figures of a reply say
    context_tokens = 8192
    supports_tools = True
    voices: tuple[str, ...] = ()  # the voices it speaks its replies in itself (its family's talker), default first

    @property
    def default_settings(self) -> GenerationSettings:
        """How replies are sampled unless a person says otherwise: its family's published defaults."""
        return self.family.settings

    def execute(
        self, prompt: Prompt, settings: GenerationSettings, stats: Stats, cancel: threading.Event,
        voice: str | None = None,
    ) -> Iterator[str | SpeechChunk]:
        """Yield text chunks of the reply, and with a voice (one of voices) its audio as it is made; stop within one
        token step once cancel is set.

        Set stats.n_tokens and stats.n_prompt_tokens as they become known. Clean-up (threads,
        connections) belongs in a finally block, since callers may close the generator at any yield.
        """
        raise NotImplementedError

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        """A prompt's length in tokens: estimated from its text unless the backend holds the model's tokenizer."""
        return estimate_tokens(prompt)

    def close(self) -> None:
        """Release the model or connection."""


class Response:
    """An iterator of text chunks (and, with a voice, SpeechChunks) that records the reply on the conversation when
    it ends.

    However the reply ends, it is recorded: in full (done), cut short by cancel() or by closing
    the iterator (stopped), or with the error's message as its note (failed, and the error is
    re-raised for the caller to show).
    """

    def __init__(
        self,
        backend: Backend,
        conversation: Conversation,
        settings: GenerationSettings | None = None,
        system_prompt: str | None = None,
        tools: tuple[dict, ...] = (),
        voice: str | None = None,
    ):
        """system_prompt, when given, replaces the conversation's for this reply only (Turn adds the tools to it);
        tools are specs for a family whose own template lists them (a native tool style, chat.toolcalls); voice, one
        of the backend's voices, has it speak the reply as it writes it."""
        if voice is not None and voice not in backend.voices:
            raise SettingsError(f"{backend.name} cannot speak in the voice {voice!r}; its voices: "
                                f"{', '.join(backend.voices) or 'none'}.")
        if not conversation.awaiting_reply():
            raise ConversationError("There is nothing to reply to: send a message or a clip first.")
        self.backend, self.conversation, self.voice = backend, conversation, voice
        self.settings = settings or backend.default_settings
        max_prompt_tokens = backend.context_tokens - self.settings.max_new_tokens
        shown = conversation if system_prompt is None else replace(conversation, system_prompt=system_prompt)
        self.prompt = backend.family.renderer.render(shown, max_prompt_tokens, backend.count_prompt_tokens, tools)
        self.stats = Stats(
            audio_s=sum(len(p.samples) for p in self.prompt.audio_parts) / SAMPLE_RATE,
            n_dropped_turns=self.prompt.n_dropped_turns,
        )
        self.chunks: list[str] = []
        # what its reader (Turn) has shown of it and read as thinking so far: recorded with it, so that no view of the
        # conversation shows the raw text (thinking, calls) before the turn describes the reply in full
        self.shown: str | None = None
        self.reasoning = ""
        self.message: Message | None = None
        self._cancel = threading.Event()
        self._iterating = False
        self._end_at: int | None = None  # set by end_at()

    @property
    def history_note(self) -> str:
        """What the model did not see of the conversation, said on the reply so it is never silent."""
        n = self.prompt.n_dropped_turns
        if not n:
            return ""
        exchanges = "exchange" if n == 1 else f"{n} exchanges"
        return f"The oldest {exchanges} did not fit the model's context and {'was' if n == 1 else 'were'} left out."

    @property
    def text(self) -> str:
        """The reply so far."""
        return "".join(self.chunks)

    def cancel(self) -> None:
        """Stop the reply at the next token step; safe to call from any thread."""
        self._cancel.set()

    def end_at(self, n_chars: int) -> None:
        """End the reply as complete after its first n_chars characters, dropping the rest (its last tool call ends
        there): while it streams, it stops at the next step; once recorded, the recorded text is cut there."""
        self._end_at = n_chars
        if self.message is None:
            self._cancel.set()
        elif n_chars < len(self.text):
            self.chunks = [self.text[:n_chars]]
            self.message = self.conversation.revise_reply(self.message, text=self.text)

    def __iter__(self) -> Iterator[str | SpeechChunk]:
        if self.message is not None:
            yield from self.chunks
            return
        if self._iterating:
            raise RuntimeError("A Response can be iterated only once at a time.")
        self._iterating = True
        self.stats.started_at = time.monotonic()
        status, note = STOPPED, STOPPED_NOTE
        chunks = self.backend.execute(self.prompt, self.settings, self.stats, self._cancel, voice=self.voice)
        try:
            for chunk in chunks:
                if isinstance(chunk, SpeechChunk):
                    self.stats.first_audio()
                    yield chunk
                    continue
                self.stats.first_token()  # a backend that cannot see its tokens: the first text is the first token
                self.chunks.append(chunk)
                yield chunk
                if self._cancel.is_set():
                    break
            else:
                status, note = (STOPPED, STOPPED_NOTE) if self._cancel.is_set() else (DONE, self.history_note)
        except Exception as e:
            status, note = FAILED, str(e) if isinstance(e, ChatError) else f"{type(e).__name__}: {e}"
            raise
        finally:
            chunks.close()
            if self._end_at is not None and status == STOPPED:
                self.chunks, status, note = [self.text[: self._end_at]], DONE, self.history_note
            self.stats.duration_s = time.monotonic() - self.stats.started_at
            self.message = self.conversation.add_assistant(self.text, status=status, note=note, figures=self.figures(),
                                                           shown=self.shown, reasoning=self.reasoning)
            failure = f" ({note})" if status == FAILED else ""
            log.log(logging.WARNING if failure else logging.INFO, "reply %s%s: %s", status, failure,
                    self.message.figures.summary())

    def figures(self) -> Figures:
        """This reply's figures, as they stand."""
        stats, backend = self.stats, self.backend
        return Figures(backend.name, backend.family.title, backend.quantization, self.settings, stats.n_prompt_tokens,
                       stats.n_reused_prompt_tokens, stats.n_tokens, stats.time_to_first_token_s, stats.tokens_per_s,
                       stats.peak_gpu_memory_mb, stats.time_to_first_audio_s)

