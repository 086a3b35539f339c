"""The voice that reads replies aloud for families with no talker of their own: Kokoro-82M (hexgrad/Kokoro-82M, the
kokoro package's KModel), sentence by sentence while the reply's text streams in.

Kokoro turns phonemes into 24-kHz speech faster than real time on a laptop CPU. Its phonemes come from misaki, the
G2P it was trained with: English from misaki's lexicons, with spaCy's part-of-speech tags (en_core_web_sm) to pick
between readings and espeak-ng (bundled in espeakng-loader) for words the lexicons lack; Chinese from misaki's
pinyin G2P. Both the Kokoro checkpoint and the spaCy pipeline are fetched from the model hub on first use, like the
chat model, and load offline afterwards; each may also be a local folder of the same files.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import jieba
import numpy as np
import torch
from kokoro import KModel, KPipeline
from loguru import logger
from misaki import en, espeak, zh

from chat.errors import BackendError, SettingsError

SAMPLE_RATE = 24000  # Hz, of Kokoro's audio
DEFAULT_CHECKPOINT = "hexgrad/Kokoro-82M"
DEFAULT_TAGGER = "spacy/en_core_web_sm"  # the spaCy pipeline whose tags misaki's English G2P reads
CHECKPOINT_FILES = ("config.json", "*.pth")
TAGGER_FILES = ("config.cfg", "meta.json", "tokenizer", "vocab/*", "tok2vec/*", "tagger/*")
TAGGER_UNUSED = ("parser", "attribute_ruler", "lemmatizer", "ner", "senter")  # not loaded, not downloaded

# The voices offered, the default first: Kokoro-82M's best-graded American and British English voices of each
# gender, and Chinese ones of each gender (all of v1.0's Chinese voices are graded low). A name's first letter
# is its language (a: American English, b: British English, z: Mandarin), its second f or m.
CURATED_VOICES = ("af_heart", "af_bella", "am_michael", "bf_emma", "bm_george", "zf_xiaoxiao", "zf_xiaobei",
                  "zm_yunxi", "zm_yunjian")
VOICE_LANGUAGES = {"a": "en", "b": "en", "z": "zh"}

MAX_PHONEMES = 510  # a voice has one style vector per phoneme count up to this; the model's context is 512
CLAUSE_COST = 120  # a sentence this long (in Latin letters, about 8 s of speech) is cut at a clause mark
HARD_COST = 200  # and this long (about 13 s) at a space, or anywhere, so that speech never waits long for text
MIN_PIECE_COST = 30  # a cut leaves at least this much in front of it
HAN_COST = 3  # a Chinese character takes about as long to say as three Latin letters

FENCE = "```"
CLOSING_FENCE = re.compile(r"^[ \t]*```[^\n]*(?:\n|\Z)", re.M)
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# A sentence ends at a line's end, at Chinese end marks, or at English ones once the space after them shows that
# they do not belong to a number or a name ("3.14", "example.com").
SENTENCE_END = re.compile(r"\n|[。！？…]+[”’」』）)\"']*|[.!?]+[”’\"')\]]*(?=\s)")
CLAUSE_END = re.compile(r"[，、；：]|[,;:—](?=\s)")
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "e.g", "i.e", "fig", "approx"})
LIST_NUMBER = re.compile(r"\s*\d+")
LINE_MARKS = re.compile(r"^\s*(?:(?:#{1,6}|>|[-*+]|\d+[.)])\s+)+")  # headings, quotes, list items
LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")  # [text](url) and images: the text
URL = re.compile(r"\b(?:https?://|www\.)\S+")
HTML_TAG = re.compile(r"</?[A-Za-z][^>]*>")
EMPHASIS = re.compile(r"(?<!\w)[*_~]+|[*_~]+(?!\w)")  # **bold**, _italic_, ~~struck~~, not snake_case
COMMAS = re.compile(r"(?:\s*,)+")
SPEAKABLE = re.compile(r"[^\W_]")  # a letter, a digit or a character: something to say
LATIN_WORD = re.compile(r"[A-Za-z]+")
# misaki's own split of a Chinese sentence into English runs and the rest (ZHG2P, version 1.1)
LATIN_RUN = re.compile(r"([A-Za-z '-]*[A-Za-z][A-Za-z '-]*)|([^A-Za-z]+)")
HAN_RUN = re.compile(r"([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)|([^\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)")

logger.disable("kokoro")  # it logs every sentence's phonemes and durations at debug level to stderr
jieba.setLogLevel(logging.WARNING)  # misaki's Chinese word splitter announces loading its dictionary


class _Cancelled(Exception):
    """Raised inside the model's forward when a speak's cancel is set, so synthesis stops mid-sentence."""


class _EnglishG2P(en.G2P):
    """misaki's English G2P (as KPipeline builds it: lexicons, espeak-ng for unknown words, unknown symbols
    dropped) on a spaCy pipeline loaded from a folder. en.G2P's own __init__ takes en_core_web_sm by package name
    and, where it is not installed, pip-installs it from GitHub: not on PyPI, and never possible offline."""

    def __init__(self, nlp, british: bool) -> None:
        self.version, self.british, self.nlp, self.unk = None, british, nlp, ""
        self.lexicon = en.Lexicon(british)
        self.fallback = espeak.EspeakFallback(british=british)


class KokoroSpeech:
    """Kokoro-82M reading text aloud in English and Chinese, one sentence at a time as the text streams in."""

    sample_rate = SAMPLE_RATE

    def __init__(self, checkpoint: str = DEFAULT_CHECKPOINT, tagger: str = DEFAULT_TAGGER, device: str = "cpu"
                 ) -> None:
        """checkpoint: a hub id or a folder with config.json, one .pth and voices/<name>.pt; tagger: a hub id or a
        folder of a spaCy English pipeline with a tagger (en_core_web_sm's layout)."""
        import spacy

        voice_files = tuple(f"voices/{voice}.pt" for voice in CURATED_VOICES)
        folder = _local_folder(checkpoint, CHECKPOINT_FILES + voice_files)
        tagger_folder = _local_folder(tagger, TAGGER_FILES)
        weights = sorted(folder.glob("*.pth"))
        if not (folder / "config.json").is_file() or len(weights) != 1:
            raise BackendError(f"The voice's checkpoint {checkpoint!r} needs config.json and one .pth file beside it.")
        self.voices = tuple(v for v in CURATED_VOICES if (folder / "voices" / f"{v}.pt").is_file())
        if not self.voices:
            raise BackendError(f"The voice's checkpoint {checkpoint!r} has none of the voices {CURATED_VOICES}.")
        self._styles = {v: torch.load(folder / "voices" / f"{v}.pt", weights_only=True) for v in self.voices}
        self.model = KModel(repo_id=checkpoint, config=str(folder / "config.json"), model=str(weights[0]))
        self.model = self.model.to(device).eval()
        for module in self.model.modules():
            module.register_forward_pre_hook(self._stop_if_cancelled)
        nlp = spacy.load(tagger_folder, exclude=list(TAGGER_UNUSED))
        self._english = {british: _EnglishG2P(nlp, british) for british in (False, True)}
        # version None: the G2P of Kokoro v1.0, which KPipeline picks for hexgrad/Kokoro-82M
        self._chinese = zh.ZHG2P(version=None)
        self._lock = threading.Lock()  # one sentence at a time: the G2P and the cancel hook are not shared
        self._cancel: threading.Event | None = None

    def speak(self, texts: Iterable[str], voice: str, cancel: threading.Event) -> Iterator[np.ndarray]:
        """(n_samples,) float32 audio of each sentence of the text, yielded as soon as the sentence has streamed in
        and been synthesized; the rest when the text ends. A sentence in the other language than the voice's is
        spoken by the voice of that language and the same gender (voice_for). Stops within one model layer of
        cancel; while it waits for text, when the text stream ends."""
        if voice not in self.voices:
            raise SettingsError(f"Unknown voice {voice!r}: choose one of {', '.join(self.voices)}.")
        return self._speak(texts, voice, cancel)

    def _speak(self, texts: Iterable[str], voice: str, cancel: threading.Event) -> Iterator[np.ndarray]:
        for sentence in sentences(texts):
            if cancel.is_set():
                return
            language = sentence_language(sentence)
            speaker = self.voice_for(voice, language)
            for phonemes in self._phonemes(sentence, language, british=speaker.startswith("b")):
                audio = self._synthesize(phonemes, speaker, cancel)
                if audio is None:
                    return
                yield audio

    def voice_for(self, voice: str, language: str) -> str:
        """The voice that speaks a sentence in ``language``: ``voice`` if it is of that language, else the first
        voice of that language and the same gender (the second letter), else the first of that language."""
        if VOICE_LANGUAGES[voice[0]] == language:
            return voice
        others = [v for v in self.voices if VOICE_LANGUAGES[v[0]] == language]
        return next((v for v in others if v[1] == voice[1]), others[0] if others else voice)

    def phonemize(self, text: str, language: str, british: bool = False) -> str:
        """Kokoro's phonemes for a sentence: runs of the other script inside it (a Chinese name in English, an
        English word in Chinese) go to their own G2P, as misaki's newer Chinese G2P does with English."""
        parts = []
        for first, second in (LATIN_RUN if language == "zh" else HAN_RUN).findall(text):
            english, chinese = (first, second) if language == "zh" else (second, first)
            if chinese.strip():
                parts.append(self._chinese(chinese)[0])
            elif english.strip():
                parts.append(KPipeline.tokens_to_ps(self._english[british](english)[1]))
        return " ".join(part for part in parts if part)

    def _phonemes(self, text: str, language: str, british: bool) -> Iterator[str]:
        """A sentence's phonemes in pieces the model takes; a sentence too long for one is halved at a space."""
        with self._lock:
            phonemes = self.phonemize(text, language, british)
        if len(phonemes) <= MAX_PHONEMES or len(text) < 2:
            if phonemes:
                yield phonemes[:MAX_PHONEMES]
            return
        space = text.rfind(" ", 0, len(text) // 2 + 1)
        cut = space if space > 0 else len(text) // 2
        yield from self._phonemes(text[:cut], language, british)
        yield from self._phonemes(text[cut:], language, british)

    def _synthesize(self, phonemes: str, voice: str, cancel: threading.Event) -> np.ndarray | None:
        """The audio of one piece, or None if cancel was set before or while it was made."""
        with self._lock:
            self._cancel = cancel
            try:
                audio = KPipeline.infer(self.model, phonemes, self._styles[voice]).audio
            except _Cancelled:
                return None
            finally:
                self._cancel = None
        return None if cancel.is_set() else np.clip(audio.numpy(), -1.0, 1.0).astype(np.float32, copy=False)

    def _stop_if_cancelled(self, module: torch.nn.Module, args: tuple) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise _Cancelled


def _local_folder(name: str, patterns: tuple[str, ...]) -> Path:
    """A folder as given, or a hub repository's files in the hub's cache: downloaded on first use, found there
    offline afterwards."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(name, allow_patterns=list(patterns)))
    except (OSError, ValueError, HfHubHTTPError) as e:
        include = " ".join(f'"{p}"' for p in patterns)
        raise BackendError(
            f"Could not load the voice's files {name!r} ({type(e).__name__}: {e}). The first use needs the network; "
            f"offline, download them beforehand: `hf download {name} --include {include}`, or give a folder."
        ) from e


def sentences(texts: Iterable[str]) -> Iterator[str]:
    """The sentences of streamed text, cleaned for reading aloud, each yielded as soon as it is complete (the next
    piece is asked for only after that); a sentence too long to wait for is cut at a clause mark or a space.
    Markdown is read as prose: code blocks are skipped, and markup, links' addresses and bare URLs dropped."""
    buffer, line_start = "", True
    for piece in itertools.chain(texts, [None]):
        final = piece is None
        buffer += piece or ""
        while (cut := _next_cut(buffer, line_start, final)) is not None:
            end, spoken = cut
            segment, buffer = buffer[:end], buffer[end:]
            if spoken and (text := clean(segment, line_start)):
                yield text
            line_start = segment.endswith("\n")


def _next_cut(buffer: str, line_start: bool, final: bool) -> tuple[int, bool] | None:
    """Where the buffer's next piece ends and whether it is to be spoken, or None while more text is needed."""
    if not buffer:
        return None
    head = buffer.lstrip(" \t")
    if line_start and head.startswith(FENCE):
        first_line_end = buffer.find("\n")
        found = CLOSING_FENCE.search(buffer, first_line_end + 1) if first_line_end >= 0 else None
        return (found.end(), False) if found else ((len(buffer), False) if final else None)
    if line_start and not final and FENCE.startswith(head):
        return None  # the line may yet open a code block
    for match in SENTENCE_END.finditer(buffer):
        if not _is_abbreviation(buffer, match, line_start):
            return match.end(), True
    if final:
        return len(buffer), True
    return _long_cut(buffer)


def _is_abbreviation(buffer: str, match: re.Match, line_start: bool) -> bool:
    """Whether a full stop ends "Dr", "e.g", an initial ("J. K."), or a list item's number at a line's start."""
    if not match.group().startswith("."):
        return False
    before = buffer[:match.start()]
    word = before.rsplit(None, 1)[-1] if before.strip() else ""
    return (word.lower() in ABBREVIATIONS or (len(word) == 1 and word.isalpha())
            or (line_start and LIST_NUMBER.fullmatch(before) is not None))


def _long_cut(buffer: str) -> tuple[int, bool] | None:
    """A cut in a sentence that has grown past CLAUSE_COST: after its last clause mark; past HARD_COST, at its last
    space, or else where it reaches HARD_COST."""
    costs = list(itertools.accumulate(HAN_COST if HAN.match(c) else 1 for c in buffer))
    if costs[-1] <= CLAUSE_COST:
        return None
    clauses = [m.end() for m in CLAUSE_END.finditer(buffer) if costs[m.end() - 1] >= MIN_PIECE_COST]
    if clauses:
        return clauses[-1], True
    if costs[-1] <= HARD_COST:
        return None
    limit = next(i for i, cost in enumerate(costs) if cost > HARD_COST)
    space = buffer.rfind(" ", 0, limit)
    return (space + 1 if space >= 0 and costs[space] >= MIN_PIECE_COST else limit), True


def clean(segment: str, line_start: bool) -> str:
    """A piece of a reply as it is to be read: markdown markup, HTML tags and URLs dropped, links read by their
    text, table cells as a list; empty if nothing in it can be said."""
    text = LINE_MARKS.sub("", segment) if line_start else segment
    text = URL.sub("", LINK.sub(r"\1", HTML_TAG.sub("", text)))
    text = EMPHASIS.sub("", text.replace("`", "")).replace("|", ",")
    text = COMMAS.sub(",", " ".join(text.split())).strip(" ,")
    return text if SPEAKABLE.search(text) else ""


def sentence_language(sentence: str) -> str:
    """"zh" for a sentence with at least as many Chinese characters as English words, else "en"."""
    n_han = len(HAN.findall(sentence))
    return "zh" if n_han and n_han >= len(LATIN_WORD.findall(sentence)) else "en"
