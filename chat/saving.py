"""Save a conversation with its clips to a folder, and load it back identical."""

import dataclasses
import errno
import io
import itertools
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

import numpy as np
import soundfile

from chat.audio import MAX_CLIP_S, SAMPLE_RATE
from chat.clip import SOURCES, Clip
from chat.conversation import ROLES, STATUSES, TOOL, Conversation, Figures, Message, ToolUse
from chat.errors import SettingsError, StoreError
from chat.settings import GenerationSettings
from chat.speech import Speech

# 2 added what a reply shows, its calls, a tool message's tool and outcome; 3 a reply's thinking; 4 its speech
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
V1_ERROR_PREFIX = "Error: "  # how version 1 told a failed tool message
CONVERSATION_FILE = "conversation.json"
CLIPS_FOLDER = "clips"
MAX_CONVERSATION_BYTES = 16 * 2**20  # conversation.json: far more text than any context holds
MAX_CLIP_FILE_BYTES = MAX_CLIP_S * SAMPLE_RATE * 4 + 2**16  # a stored clip: float32 samples and a wav header
MAX_SPEECH_S = 30 * 60  # a spoken reply: far longer than any reply's text takes to read aloud
SPEECH_RATES = range(8000, 48001)  # Hz: what a stored spoken reply may be in (every voice here makes 24 kHz)


class ClipDict(TypedDict):
    id: str
    name: str
    source: str
    note: str


class SpeechDict(TypedDict):
    id: str
    sample_rate: int
    voice: str


class ToolUseDict(TypedDict):
    name: str
    arguments: dict


class MessageDict(TypedDict):
    role: str
    text: str
    clips: list[ClipDict]
    status: str
    note: str
    shown: str | None
    reasoning: str  # from version 3 on
    calls: list[ToolUseDict]
    tool: str
    failed: bool
    figures: dict | None  # Figures, its settings a dict of GenerationSettings
    speech: SpeechDict | None  # from version 4 on


class ConversationDict(TypedDict):
    version: int
    id: str
    system_prompt: str
    messages: list[MessageDict]


def to_dict(conversation: Conversation) -> ConversationDict:
    """The JSON-ready description of a conversation; clip audio is stored beside it by id."""
    return {
        "version": FORMAT_VERSION,
        "id": conversation.id,
        "system_prompt": conversation.system_prompt,
        "messages": [
            {
                "role": m.role,
                "text": m.text,
                "clips": [{"id": c.id, "name": c.name, "source": c.source, "note": c.note} for c in m.clips],
                "status": m.status,
                "note": m.note,
                "shown": m.shown,
                "reasoning": m.reasoning,
                "calls": [{"name": call.name, "arguments": call.arguments} for call in m.calls],
                "tool": m.tool,
                "failed": m.failed,
                "figures": None if m.figures is None else dataclasses.asdict(m.figures),
                "speech": None if m.speech is None else {"id": m.speech.id, "sample_rate": m.speech.sample_rate,
                                                         "voice": m.speech.voice},
            }
            for m in conversation.messages
        ],
    }


def from_dict(data: object, load_samples) -> Conversation:
    """Rebuild a conversation, checking every field's type; load_samples(audio_id, sample_rate) returns the samples
    of a clip (at SAMPLE_RATE) or of a spoken reply, or None when that audio is lost (the clip is then kept as
    Clip.lost; a reply keeps its text without its speech).

    Raises StoreError naming the first field that is wrong: a file from elsewhere is not trusted.
    """
    data = _field(data, dict, "the file")
    if data.get("version") not in READABLE_VERSIONS:
        raise StoreError(
            f"This conversation was saved in format version {data.get('version')!r}; "
            f"this app reads versions {', '.join(map(str, READABLE_VERSIONS))}. Update the app to open it."
        )
    numbers = itertools.count(1)  # each clip's N of Audio N, counted as the clips are read
    messages = [_message(_field(m, dict, f"message {n}"), f"message {n}", data["version"], load_samples, numbers)
                for n, m in enumerate(_field(data.get("messages"), list, "messages"), start=1)]
    return Conversation(system_prompt=_field(data.get("system_prompt"), str, "the system prompt"), messages=messages,
                        id=_field(data.get("id"), str, "the conversation id"))


def _message(m: dict, where: str, version: int, load_samples, numbers: Iterator[int]) -> Message:
    """One saved message, every field checked."""
    if version == 1 and m.get("role") == TOOL:  # version 1 kept the tool's name as the note
        text = m.get("text")
        failed = isinstance(text, str) and text.startswith(V1_ERROR_PREFIX)
        m = m | {"tool": m.get("note"), "note": "", "failed": failed}
    role, status = _field(m.get("role"), str, f"{where}'s role"), _field(m.get("status"), str, f"{where}'s status")
    if role not in ROLES or status not in STATUSES:
        raise StoreError(f"The saved conversation is damaged: {where} has role {role!r} and status {status!r}.")
    clips = tuple(_clip(_field(c, dict, f"a clip of {where}"), load_samples, next(numbers))
                  for c in _field(m.get("clips"), list, f"{where}'s clips"))
    calls = []
    for call in _field(m.get("calls", []), list, f"{where}'s calls"):
        call = _field(call, dict, f"a call of {where}")
        calls.append(ToolUse(_field(call.get("name"), str, f"a call of {where}"),
                             _field(call.get("arguments"), dict, f"a call of {where}")))
    shown = m.get("shown")
    return Message(
        role, _field(m.get("text"), str, f"{where}'s text"), clips, status,
        _field(m.get("note"), str, f"{where}'s note"),
        shown=None if shown is None else _field(shown, str, f"{where}'s shown text"),
        reasoning=_field(m.get("reasoning", ""), str, f"{where}'s reasoning"), calls=tuple(calls),
        tool=_field(m.get("tool", ""), str, f"{where}'s tool"),
        failed=_field(m.get("failed", False), bool, f"{where}'s failed"), figures=_figures(m.get("figures"), where),
        speech=_speech(m.get("speech"), where, load_samples),
    )


def _speech(data: object, where: str, load_samples) -> Speech | None:
    """A reply's saved speech, every field checked; None when it has none or its audio is lost."""
    if data is None:
        return None
    data = _field(data, dict, f"{where}'s speech")
    audio_id, rate = _field(data.get("id"), str, f"{where}'s speech id"), _field(data.get("sample_rate"), int,
                                                                                  f"{where}'s speech sample rate")
    if not audio_id.isalnum() or rate not in SPEECH_RATES:
        raise StoreError(f"The saved conversation is damaged: {where}'s speech has id {audio_id!r} and rate {rate!r}.")
    samples = load_samples(audio_id, rate)
    if samples is None:
        return None
    speech = Speech(samples, rate, _field(data.get("voice"), str, f"{where}'s voice"))
    if speech.id != audio_id:
        raise StoreError(f"The spoken audio of {where} does not match its id: the save is damaged.")
    return speech


FIGURE_TYPES = {"model": str, "family": str, "quantization": str, "prompt_tokens": int, "reused_tokens": int,
                 "new_tokens": int, "time_to_first_token_s": (int, float, type(None)),
                 "tokens_per_s": (int, float, type(None)), "peak_gpu_memory_mb": (int, float, type(None))}


def _figures(data: object, where: str) -> Figures | None:
    """A reply's Figures from its saved dict, every field checked; None when there are none."""
    if data is None:
        return None
    data = _field(data, dict, f"{where}'s figures")
    values = {name: _field(data.get(name), kind, f"{where}'s {name}") for name, kind in FIGURE_TYPES.items()}
    first_audio = _field(data.get("time_to_first_audio_s"), (int, float, type(None)), f"{where}'s first audio")
    try:
        settings = GenerationSettings(**_field(data.get("settings"), dict, f"{where}'s settings"))
    except (TypeError, SettingsError) as e:
        raise StoreError(f"The saved conversation is damaged: {where}'s settings are not valid ({e}).") from e
    return Figures(settings=settings, time_to_first_audio_s=first_audio, **values)


def _field(value: object, kind: type | tuple, what: str):
    """value, if it is of kind; else StoreError naming the field."""
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else "number"
        raise StoreError(f"The saved conversation is damaged: {what} should be a {name}, not {value!r:.40}.")
    return value


def save(conversation: Conversation, folder: str | Path) -> Path:
    """Write conversation.json and one float32 wav per clip and per spoken reply into folder; returns the folder."""
    folder = Path(folder)
    (folder / CLIPS_FOLDER).mkdir(parents=True, exist_ok=True)
    for clip in conversation.clips():
        write_clip(clip, folder / CLIPS_FOLDER)
    for speech in speeches(conversation):
        write_speech(speech, folder / CLIPS_FOLDER)
    (folder / CONVERSATION_FILE).write_text(json.dumps(to_dict(conversation), indent=1, ensure_ascii=False))
    return folder


def load(folder: str | Path) -> Conversation:
    """Read a folder written by save(); raises StoreError with what is missing or damaged."""
    folder = Path(folder)
    path = folder / CONVERSATION_FILE
    if not path.is_file():
        raise StoreError(f"{CONVERSATION_FILE} is missing from {folder}: this is not a saved conversation.")
    if path.stat().st_size > MAX_CONVERSATION_BYTES:
        raise StoreError(f"{path} is over {MAX_CONVERSATION_BYTES // 2**20} MB: it is not a saved conversation.")
    try:
        data = json.loads(path.read_text())
        return from_dict(data, lambda audio_id, rate: read_clip(clip_file(folder / CLIPS_FOLDER, audio_id), rate))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path} is damaged ({e}); it cannot be loaded.") from e


def speeches(conversation: Conversation) -> list[Speech]:
    """The spoken replies of a conversation, in order."""
    return [m.speech for m in conversation.messages if m.speech is not None]


def clip_file(clips_folder: Path, audio_id: str) -> Path:
    """Where a clip's or a spoken reply's audio lives in a clips folder: named by its content id."""
    return clips_folder / f"{audio_id}.wav"


def write_clip(clip: Clip, clips_folder: Path) -> Path:
    """The clip's float32 wav in clips_folder, written the first time; returns its path.

    A failed write raises OSError (errno ENOSPC when the disk is full) and leaves no file behind.
    """
    path = clip_file(clips_folder, clip.id)
    if not clip.missing:
        _write_audio(path, clip.samples, SAMPLE_RATE)
    return path


def write_speech(speech: Speech, clips_folder: Path) -> Path:
    """A spoken reply's float32 wav at its own rate in clips_folder, written the first time; returns its path."""
    path = clip_file(clips_folder, speech.id)
    _write_audio(path, speech.samples, speech.sample_rate)
    return path


def _write_audio(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write a float32 wav unless it exists; a failed write raises OSError and leaves no file behind."""
    if not path.exists():
        # write aside, then rename: a crash or a second thread never leaves a half-written clip under its id
        partial = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.partial.wav")
        try:
            soundfile.write(partial, samples, sample_rate, subtype="FLOAT")
            os.replace(partial, path)
        except OSError:
            partial.unlink(missing_ok=True)
            raise
        except soundfile.LibsndfileError as e:
            # libsndfile tells a full disk only as "System error.": the space left tells it, before the part goes
            full = shutil.disk_usage(path.parent).free < samples.nbytes
            partial.unlink(missing_ok=True)
            code = errno.ENOSPC if full else errno.EIO
            raise OSError(code, f"{os.strerror(code)} (libsndfile: {e})", str(path)) from e


def max_file_bytes(sample_rate: int) -> int:
    """The largest stored wav of a clip (at SAMPLE_RATE) or of a spoken reply (at its rate)."""
    return MAX_CLIP_FILE_BYTES if sample_rate == SAMPLE_RATE else MAX_SPEECH_S * sample_rate * 4 + 2**16


def read_clip(path: Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A stored clip's (or spoken reply's, at its rate) float32 samples; raises StoreError when the file is missing
    or damaged."""
    if not path.is_file():
        raise StoreError(f"{CLIPS_FOLDER}/{path.name} is missing from {path.parent.parent}: the save is incomplete.")
    size_ok = path.stat().st_size <= max_file_bytes(sample_rate)
    return read_clip_bytes(path.read_bytes() if size_ok else b"", path.name, sample_rate)


def read_clip_bytes(data: bytes, name: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The samples of a stored clip's wav bytes (a spoken reply's at its rate), checked against the limits before
    they are decoded."""
    max_s, kind = (MAX_CLIP_S, "clip") if sample_rate == SAMPLE_RATE else (MAX_SPEECH_S, "spoken reply")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as file:
            if file.samplerate != sample_rate or file.channels != 1:
                raise StoreError(f"{name} is not {sample_rate / 1000:g} kHz mono as saved: the save is damaged.")
            if file.frames > max_s * sample_rate:
                raise StoreError(f"{name} is longer than the {max_s // 60}-minute {kind} limit: the save is damaged.")
            return file.read(dtype="float32")
    except soundfile.LibsndfileError as e:
        raise StoreError(f"{CLIPS_FOLDER}/{name} is damaged or too large ({e}); the save cannot be loaded.") from e


def _clip(data: dict, load_samples, number: int) -> Clip:
    """A saved clip, every field checked; number is its N of Audio N."""
    name, clip_id = _field(data.get("name"), str, "a clip's name"), _field(data.get("id"), str, "a clip's id")
    source, note = _field(data.get("source"), str, f"{name}'s source"), _field(data.get("note"), str, f"{name}'s note")
    # an edit's note once began with the clip's own label ("Audio 3 = Audio 1 reversed"); the label is shown apart
    note = note.removeprefix(f"Audio {number} = ")
    if source not in SOURCES or not clip_id.isalnum():
        raise StoreError(f"The saved conversation is damaged: clip {name!r} has source {source!r} and id {clip_id!r}.")
    samples = load_samples(clip_id, SAMPLE_RATE)
    if samples is None:
        return Clip.lost(clip_id, name, source, note)
    clip = Clip(samples, name=name, source=source, note=note)
    if clip.id != data["id"]:
        raise StoreError(f"The audio of {data['name']} does not match its id: the save is damaged.")
    return clip
