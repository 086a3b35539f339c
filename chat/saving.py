"""Save a conversation with its clips to a folder, and load it back identical."""

import json
import os
import uuid
from pathlib import Path
from typing import TypedDict

import numpy as np
import soundfile

from chat.audio import SAMPLE_RATE
from chat.clip import Clip
from chat.conversation import TOOL, Conversation, Message, ToolUse
from chat.errors import StoreError

FORMAT_VERSION = 2  # 2 added what a reply shows and the calls it made, and a tool message's tool and outcome
READABLE_VERSIONS = (1, 2)
V1_ERROR_PREFIX = "Error: "  # how version 1 told a failed tool message
CONVERSATION_FILE = "conversation.json"
CLIPS_FOLDER = "clips"


class ClipDict(TypedDict):
    id: str
    name: str
    source: str
    note: str


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
    calls: list[ToolUseDict]
    tool: str
    failed: bool


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
                "calls": [{"name": call.name, "arguments": call.arguments} for call in m.calls],
                "tool": m.tool,
                "failed": m.failed,
            }
            for m in conversation.messages
        ],
    }


def from_dict(data: ConversationDict, load_samples) -> Conversation:
    """Rebuild a conversation; load_samples(clip_id) returns that clip's float32 samples."""
    if data.get("version") not in READABLE_VERSIONS:
        raise StoreError(
            f"This conversation was saved in format version {data.get('version')!r}; "
            f"this app reads versions {' and '.join(map(str, READABLE_VERSIONS))}. Update the app to open it."
        )
    messages = []
    for m in data["messages"]:
        clips = tuple(_clip(c, load_samples(c["id"])) for c in m["clips"])
        if data["version"] == 1 and m["role"] == TOOL:  # version 1 kept the tool's name as the note
            m = m | {"tool": m["note"], "note": "", "failed": m["text"].startswith(V1_ERROR_PREFIX)}
        calls = tuple(ToolUse(call["name"], call["arguments"]) for call in m.get("calls", []))
        messages.append(Message(m["role"], m["text"], clips, m["status"], m["note"], m.get("shown"), calls,
                                m.get("tool", ""), m.get("failed", False)))
    return Conversation(system_prompt=data["system_prompt"], messages=messages, id=data["id"])


def save(conversation: Conversation, folder: str | Path) -> Path:
    """Write conversation.json and one float32 wav per clip into folder; returns the folder."""
    folder = Path(folder)
    (folder / CLIPS_FOLDER).mkdir(parents=True, exist_ok=True)
    for clip in conversation.clips():
        write_clip(clip, folder / CLIPS_FOLDER)
    (folder / CONVERSATION_FILE).write_text(json.dumps(to_dict(conversation), indent=1, ensure_ascii=False))
    return folder


def load(folder: str | Path) -> Conversation:
    """Read a folder written by save(); raises StoreError with what is missing or damaged."""
    folder = Path(folder)
    path = folder / CONVERSATION_FILE
    if not path.is_file():
        raise StoreError(f"{CONVERSATION_FILE} is missing from {folder}: this is not a saved conversation.")
    try:
        data = json.loads(path.read_text())
        return from_dict(data, lambda clip_id: read_clip(clip_file(folder / CLIPS_FOLDER, clip_id)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path} is damaged ({e}); it cannot be loaded.") from e


def clip_file(clips_folder: Path, clip_id: str) -> Path:
    """Where a clip's audio lives in a clips folder: named by its content id."""
    return clips_folder / f"{clip_id}.wav"


def write_clip(clip: Clip, clips_folder: Path) -> Path:
    """The clip's float32 wav in clips_folder, written the first time; returns its path."""
    path = clip_file(clips_folder, clip.id)
    if not path.exists():
        # write aside, then rename: a crash or a second thread never leaves a half-written clip under its id
        partial = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.partial.wav")
        soundfile.write(partial, clip.samples, SAMPLE_RATE, subtype="FLOAT")
        os.replace(partial, path)
    return path


def read_clip(path: Path) -> np.ndarray:
    """A stored clip's float32 samples; raises StoreError when the file is missing or damaged."""
    if not path.is_file():
        raise StoreError(f"{CLIPS_FOLDER}/{path.name} is missing from {path.parent.parent}: the save is incomplete.")
    try:
        samples, rate = soundfile.read(path, dtype="float32")
    except soundfile.LibsndfileError as e:
        raise StoreError(f"{CLIPS_FOLDER}/{path.name} is damaged ({e}); the save cannot be loaded.") from e
    if rate != SAMPLE_RATE:
        raise StoreError(f"{path.name} is stored at {rate} Hz, not {SAMPLE_RATE} Hz: the save is damaged.")
    return samples


def _clip(data: ClipDict, samples) -> Clip:
    clip = Clip(samples, name=data["name"], source=data["source"], note=data["note"])
    if clip.id != data["id"]:
        raise StoreError(f"The audio of {data['name']} does not match its id: the save is damaged.")
    return clip
