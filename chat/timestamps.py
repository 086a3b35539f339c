"""Word start and end times in a clip, from a Whisper model through transformers (DTW on cross-attention)."""

import functools
import json
import threading
from dataclasses import asdict, dataclass

from chat.audio import SAMPLE_RATE
from chat.clip import Clip
from chat.errors import ToolError

DEFAULT_WORD_MODEL = "openai/whisper-small"  # multilingual, 244M parameters: quick on a CPU, good word times
N_CACHED_CLIPS = 32  # word lists kept per timestamper, keyed by clip id (a clip's content never changes)


@dataclass(frozen=True)
class Word:
    """One spoken word and when it is said, in seconds from the start of its clip."""

    word: str
    start: float
    end: float

    def to_json(self) -> str:
        """One JSON line, e.g. {"word": "um", "start": 3.04, "end": 3.23}."""
        return json.dumps(asdict(self), ensure_ascii=False)


class WordTimestamper:
    """Finds words with their times in a clip; the model loads on first use and is shared by all timestampers."""

    def __init__(self, model: str = DEFAULT_WORD_MODEL, device: str | None = None, max_new_tokens: int | None = None):
        self.model, self.device = model, device
        self.max_new_tokens = max_new_tokens  # per 30-s window; None keeps Whisper's own limit
        self._cache: dict[str, list[Word]] = {}
        self._lock = threading.Lock()

    def words(self, clip: Clip) -> list[Word]:
        """The clip's words in order, each with 0 <= start <= end <= the clip's length."""
        with self._lock:
            if clip.id not in self._cache:
                if len(self._cache) >= N_CACHED_CLIPS:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[clip.id] = self._transcribe(clip)
            return self._cache[clip.id]

    def _transcribe(self, clip: Clip) -> list[Word]:
        recognize = _load_pipeline(self.model, self.device)
        options = {"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else {}
        audio = {"raw": clip.samples.copy(), "sampling_rate": SAMPLE_RATE}
        result = recognize(audio, return_timestamps="word", generate_kwargs=options)
        return _ordered_words(result.get("chunks", []), clip.duration_s)


@functools.cache
def _load_pipeline(model: str, device: str | None):
    """Whisper from a hub id or a folder, with from_pretrained, wrapped in the speech-recognition pipeline.

    The pipeline groups tokens into words and handles clips longer than one 30-s window.
    """
    import torch
    from transformers import AutoProcessor, WhisperForConditionalGeneration, pipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(model)
        whisper = WhisperForConditionalGeneration.from_pretrained(model, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as e:
        raise ToolError(
            f"Could not load the word-timestamp model {model!r} ({e}). Give a Whisper hub id (default "
            f"{DEFAULT_WORD_MODEL}) or a folder holding a Whisper checkpoint; a hub id needs the network "
            "once, or `hf download <id>` beforehand."
        ) from e
    return pipeline(
        "automatic-speech-recognition", model=whisper, tokenizer=processor.tokenizer,
        feature_extractor=processor.feature_extractor, device=device,
    )


def _ordered_words(chunks: list[dict], duration_s: float) -> list[Word]:
    """Pipeline chunks as Words, clamped into the clip and forced into order.

    The cross-attention alignment can put a last word past the end of the audio, or leave its end
    unknown (None), and windows of long clips can overlap slightly; the editing tools need times
    that lie inside the clip and never run backwards.
    """
    words: list[Word] = []
    previous_start = 0.0
    for chunk in chunks:
        text = chunk["text"].strip()
        start, end = chunk["timestamp"]
        if not text or start is None:
            continue
        start = min(round(max(start, previous_start), 2), duration_s)
        end = min(round(max(end if end is not None else duration_s, start), 2), duration_s)
        words.append(Word(text, start, end))
        previous_start = start
    return words
