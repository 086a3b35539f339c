"""Every browser session's conversation on disk: an SQLite index plus clip audio stored once by content id.

Layout of the data folder:

    chat.db               conversations(id, session_id, user, data, created_at, updated_at, title);
                          data is chat.saving's JSON; clip_owners(clip_id, user): the logins shown each clip
    clips/{clip id}.wav   float32 16 kHz audio, written once and never changed (the id is a hash of the samples);
                          a spoken reply's the same way, at its own rate (24 kHz)
    downloads/*/*.zip     conversations being downloaded, removed after an hour
    audio-chat.log        what the app did: loads, refusals, failures, every reply's figures (launch.py)

The folder is an argument, else $AUDIO_CHAT_DATA_DIR, else `data/` beside the code.
"""

import datetime
import errno
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from chat import saving
from chat.audio import SAMPLE_RATE
from chat.clip import Clip
from chat.speech import Speech
from chat.conversation import Conversation
from chat.errors import StoreError

DATA_DIR_ENV = "AUDIO_CHAT_DATA_DIR"
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DB_FILE = "chat.db"
LOCK_TIMEOUT_S = 30.0  # how long a writer waits for another process or thread holding the database
MAX_TITLE_CHARS = 60
DOWNLOADS_FOLDER = "downloads"
DOWNLOADS_KEPT_S = 3600  # a download is fetched at once; an hour is plenty
MAX_ZIP_ENTRIES = 1000  # files in an uploaded conversation: its json and one wav per clip
MAX_IMPORT_AUDIO_S = 2 * 3600  # all clips of one uploaded conversation: 460 MB of samples in memory at most

log = logging.getLogger(__name__)

MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []
migration = MIGRATIONS.append  # append-only: fix a shipped migration with a new one, never by editing it


@migration
def m001_conversations(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )"""
    )
    conn.execute("CREATE INDEX conversations_by_session ON conversations (session_id, updated_at)")


@migration
def m002_owners(conn: sqlite3.Connection) -> None:
    """Conversations belong to a login (empty without logins); a session id alone no longer opens one."""
    conn.execute("ALTER TABLE conversations ADD COLUMN user TEXT NOT NULL DEFAULT ''")
    conn.execute("CREATE INDEX conversations_by_owner ON conversations (user, session_id, updated_at)")


@migration
def m003_titles(conn: sqlite3.Connection) -> None:
    """A title a person gave the conversation; empty means it is named after its first question."""
    conn.execute("ALTER TABLE conversations ADD COLUMN title TEXT NOT NULL DEFAULT ''")


@migration
def m004_clip_owners(conn: sqlite3.Connection) -> None:
    """Which logins may fetch a clip's audio file: those whose conversations held it."""
    conn.execute("CREATE TABLE clip_owners (clip_id TEXT NOT NULL, user TEXT NOT NULL, PRIMARY KEY (clip_id, user))")
    for user, data in conn.execute("SELECT user, data FROM conversations WHERE user != ''").fetchall():
        messages = json.loads(data).get("messages", [])
        conn.executemany("INSERT OR IGNORE INTO clip_owners (clip_id, user) VALUES (?, ?)",
                         [(clip["id"], user) for m in messages for clip in m.get("clips", [])])


def migrate(conn: sqlite3.Connection) -> None:
    """Apply, in order, each migration not yet recorded in the _migrations table."""
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    for fn in MIGRATIONS:
        with conn:
            # sqlite3 opens no transaction for DDL by itself; IMMEDIATE also makes a second process wait here
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("SELECT 1 FROM _migrations WHERE name = ?", (fn.__name__,)).fetchone():
                continue
            fn(conn)
            conn.execute("INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (fn.__name__, _now()))


def default_folder() -> Path:
    """$AUDIO_CHAT_DATA_DIR if set, else data/ beside the code."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


@dataclass(frozen=True)
class Saved:
    """A stored conversation as history() lists it."""

    id: str
    title: str
    updated_at: str  # ISO 8601, UTC

    @property
    def when(self) -> str:
        """`2025-06-01 14:03`: when it last changed, to the minute, in UTC."""
        return datetime.datetime.fromisoformat(self.updated_at).strftime("%Y-%m-%d %H:%M")


class Store:
    """Saves and loads the conversation of each session; one instance is shared by every thread."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()
        self.clips_folder = self.folder / saving.CLIPS_FOLDER
        self.downloads_folder = self.folder / DOWNLOADS_FOLDER  # each zip in a folder of its own, named at random
        self._granted: set[tuple[str, str]] = set()  # (clip id, login) pairs known to be in clip_owners
        try:
            self.clips_folder.mkdir(parents=True, exist_ok=True)
            with self._connect() as conn:
                migrate(conn)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"Cannot use {self.folder} as the data folder ({e}). Choose a writable folder.") from e

    def save(self, session_id: str, conversation: Conversation, user: str = "") -> None:
        """Write the conversation (clips first, so a row never names a missing clip) as the session's latest.

        user is the login it belongs to; a conversation of another session or login is never overwritten.
        A full disk raises StoreError naming the data folder; what was stored before stays as it was.
        """
        try:
            for clip in conversation.clips():
                self.clip_path(clip, user)
            for speech in saving.speeches(conversation):
                self.clip_path(speech, user)
            now = _now()
            data = json.dumps(saving.to_dict(conversation), ensure_ascii=False)
            with self._connect() as conn, conn:
                saved = conn.execute(
                    """INSERT INTO conversations (id, session_id, user, data, created_at, updated_at)
                    VALUES (?, ?, ?, ?, ?, ?)
                    ON CONFLICT (id) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at
                    WHERE conversations.user = excluded.user
                        AND (excluded.user != '' OR conversations.session_id = excluded.session_id)""",
                    (conversation.id, session_id, user, data, now, now),
                ).rowcount
        except (OSError, sqlite3.Error) as e:
            log.error("could not save to %s: %s", self.folder, e)  # the path goes to the log, not to the browser
            full = getattr(e, "errno", None) == errno.ENOSPC or "full" in str(e)
            raise StoreError(
                "Nothing was changed: the app's data folder could not be written "
                + ("(the disk is full). Free some space on it, then try again." if full
                   else "(see the app's log). Try again; if it repeats, ask whoever runs the app.")
            ) from e
        if not saved:
            raise StoreError(f"Conversation {conversation.id} belongs to another session and was not overwritten.")

    def load(self, session_id: str, user: str = "") -> Conversation | None:
        """The session's most recently saved conversation of this login, or None for a new session."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT data FROM conversations WHERE session_id = ? AND user = ? ORDER BY updated_at DESC LIMIT 1",
                (session_id, user),
            ).fetchone()
        if row is None:
            return None
        try:
            return saving.from_dict(json.loads(row[0]), self._read_clip)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:  # chat.saving reports clip files itself
            raise StoreError(f"The saved conversation of this session is damaged ({e}); start a new one.") from e

    def history(self, session_id: str, user: str = "") -> list[Saved]:
        """The conversations this login (else this browser session) has, newest first."""
        where, args = _owned(session_id, user)
        with self._connect() as conn:
            rows = conn.execute(
                f"SELECT id, title, data, updated_at FROM conversations WHERE {where} ORDER BY updated_at DESC", args
            ).fetchall()
        return [Saved(id, title or _title(data), updated_at) for id, title, data, updated_at in rows]

    def open(self, conversation_id: str, session_id: str, user: str = "") -> Conversation:
        """One of history()'s conversations, which becomes the session's current one."""
        where, args = _owned(session_id, user)
        with self._connect() as conn, conn:
            opened = conn.execute(f"UPDATE conversations SET session_id = ?, updated_at = ? WHERE id = ? AND {where}",
                                  (session_id, _now(), conversation_id, *args)).rowcount
        if not opened:
            raise StoreError("There is no such conversation among yours: it may have been deleted.")
        return self.load(session_id, user)

    def rename(self, conversation_id: str, title: str, session_id: str, user: str = "") -> None:
        """Give a conversation a title; an empty one names it after its first question again."""
        where, args = _owned(session_id, user)
        with self._connect() as conn, conn:
            conn.execute(f"UPDATE conversations SET title = ? WHERE id = ? AND {where}",
                         (" ".join(title.split())[:MAX_TITLE_CHARS], conversation_id, *args))

    def delete(self, conversation_id: str, session_id: str, user: str = "") -> None:
        """Remove a conversation (its clips stay: other conversations may hold them)."""
        where, args = _owned(session_id, user)
        with self._connect() as conn, conn:
            conn.execute(f"DELETE FROM conversations WHERE id = ? AND {where}", (conversation_id, *args))

    def export(self, conversation: Conversation, name: str) -> Path:
        """The conversation as a zip named name in the data folder's downloads/, for a browser to fetch.

        Downloads older than DOWNLOADS_KEPT_S are removed first, so they never pile up.
        """
        downloads = self.downloads_folder
        now = time.time()
        for old in downloads.glob("*/*.zip"):
            if now - old.stat().st_mtime > DOWNLOADS_KEPT_S:
                shutil.rmtree(old.parent, ignore_errors=True)
        folder = downloads / uuid.uuid4().hex  # a folder each, so the file keeps its plain name
        folder.mkdir(parents=True)
        return to_zip(conversation, folder / name)

    def clip_path(self, audio: Clip | Speech, owner: str = "") -> Path:
        """The wav file of a clip (or of a spoken reply) in the store, written the first time it is seen.

        owner is the login it is shown to: from then on may_fetch(its id, owner) holds.
        """
        if isinstance(audio, Speech):
            path = saving.write_speech(audio, self.clips_folder)
        else:
            path = saving.write_clip(audio, self.clips_folder)
        self._grant(audio.id, owner)
        return path

    def _grant(self, audio_id: str, owner: str) -> None:
        """Let a login fetch an audio file (a clip or a spoken reply) it was shown."""
        if owner and (audio_id, owner) not in self._granted:
            with self._connect() as conn, conn:
                conn.execute("INSERT OR IGNORE INTO clip_owners (clip_id, user) VALUES (?, ?)", (audio_id, owner))
            self._granted.add((audio_id, owner))

    def may_fetch(self, clip_id: str, user: str) -> bool:
        """Whether a login was ever shown this clip (in one of its conversations, or while one was written)."""
        if (clip_id, user) in self._granted:
            return True
        with self._connect() as conn:
            return conn.execute("SELECT 1 FROM clip_owners WHERE clip_id = ? AND user = ?",
                                (clip_id, user)).fetchone() is not None

    def _read_clip(self, audio_id: str, sample_rate: int):
        """A stored clip's (or spoken reply's) samples; None when its file is gone, so the conversation still opens."""
        path = saving.clip_file(self.clips_folder, audio_id)
        return saving.read_clip(path, sample_rate) if path.exists() else None

    def _connect(self) -> closing[sqlite3.Connection]:
        # one short-lived connection per operation: sqlite3 connections must not be shared across threads
        return closing(sqlite3.connect(self.folder / DB_FILE, timeout=LOCK_TIMEOUT_S))


def _owned(session_id: str, user: str) -> tuple[str, tuple]:
    """The SQL condition for the conversations a login owns, or without logins those of one browser session."""
    return ("user = ?", (user,)) if user else ("session_id = ? AND user = ''", (session_id,))


def _title(data: str) -> str:
    """A conversation's name from its first question: its first words, else its clips, else "New conversation"."""
    messages = json.loads(data).get("messages", [])
    first = next((m for m in messages if m.get("role") == "user"), None)
    if first is None:
        return "New conversation"
    text = " ".join(str(first.get("text", "")).split())
    if text:
        return text if len(text) <= MAX_TITLE_CHARS else text[: MAX_TITLE_CHARS - 1] + "…"
    return "Spoken question" if len(first.get("clips", [])) == 1 else f"{len(first.get('clips', []))} clips"


def to_zip(conversation: Conversation, path: str | Path) -> Path:
    """Write the conversation as a zip of chat.saving's folder (conversation.json + clips/); returns path."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as folder, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        saving.save(conversation, folder)
        for file in sorted(Path(folder).rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(folder).as_posix())
    return path


def from_zip(path: str | Path) -> Conversation:
    """Read a zip written by to_zip (also one whose files sit in a single top folder); raises StoreError.

    Nothing is extracted: conversation.json and each clip it names are read from the archive in
    memory, each checked against its limit by its stated size before it is read.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            if len(entries) > MAX_ZIP_ENTRIES:
                raise StoreError(f"{path.name} holds {len(entries)} files, more than a saved conversation can "
                                 f"({MAX_ZIP_ENTRIES}).")
            found = [e for e in entries if PurePosixPath(e.filename).name == saving.CONVERSATION_FILE]
            if not found:
                raise StoreError(f"{path.name} holds no {saving.CONVERSATION_FILE}: it is not a saved conversation.")
            main = min(found, key=lambda e: len(PurePosixPath(e.filename).parts))
            top = PurePosixPath(main.filename).parent
            by_name = {e.filename: e for e in entries}
            data = json.loads(_read_entry(archive, main, saving.MAX_CONVERSATION_BYTES))

            n_samples = [0]

            def load_samples(audio_id: str, sample_rate: int):
                entry = by_name.get(str(top / saving.CLIPS_FOLDER / f"{audio_id}.wav"))
                if entry is None:
                    raise StoreError(f"{path.name} lacks the audio of clip {audio_id}: the download is incomplete.")
                data = _read_entry(archive, entry, saving.max_file_bytes(sample_rate))
                samples = saving.read_clip_bytes(data, entry.filename, sample_rate)
                n_samples[0] += len(samples) * SAMPLE_RATE / sample_rate  # in seconds at 16 kHz: one budget
                if n_samples[0] > MAX_IMPORT_AUDIO_S * SAMPLE_RATE:
                    raise StoreError(f"{path.name} holds more than {MAX_IMPORT_AUDIO_S // 3600} hours of audio, more "
                                     "than one conversation may. Split it, or keep it as a file.")
                return samples

            return saving.from_dict(data, load_samples)
    except (zipfile.BadZipFile, OSError) as e:
        raise StoreError(f"{path.name} is not a readable zip file ({e}). Download the conversation again.") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path.name} holds a damaged {saving.CONVERSATION_FILE} ({e}).") from e


def _read_entry(archive: zipfile.ZipFile, entry: zipfile.ZipInfo, max_bytes: int) -> bytes:
    """An archive member's bytes, refused when it states or turns out to be larger than max_bytes."""
    if entry.file_size > max_bytes:
        raise StoreError(f"{entry.filename} unpacks to {entry.file_size / 2**20:.0f} MB, more than the "
                         f"{max_bytes / 2**20:.0f} MB it may have.")
    with archive.open(entry) as file:
        data = file.read(max_bytes + 1)  # a member whose header lies about its size is cut here
    if len(data) > max_bytes:
        raise StoreError(f"{entry.filename} unpacks to more than the {max_bytes / 2**20:.0f} MB it may have.")
    return data


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
