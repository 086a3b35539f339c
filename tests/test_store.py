"""The session store: conversations and clips survive a restart, sessions stay apart, migrations run once."""

import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from chat import saving, store as store_module
from chat.clip import Clip
from chat.conversation import STOPPED, Conversation
from chat.errors import StoreError
from chat.families import get_family
from chat.store import DATA_DIR_ENV, DB_FILE, Store, from_zip, to_zip
from tests.conftest import tone


def conversation_with_clips() -> Conversation:
    conversation = Conversation(system_prompt="Be brief.")
    conversation.add_user("What is in Audio 1?", [Clip(tone(1.0, 440), name="a.wav")])
    conversation.add_assistant("A tone, stopped here", status=STOPPED, note="Stopped by the user.")
    conversation.add_user("And Audio 2?", [Clip(tone(0.5, 880), name="b.wav", source="recorded")])
    return conversation


def assert_same(loaded: Conversation, saved: Conversation) -> None:
    assert loaded.id == saved.id and loaded.system_prompt == saved.system_prompt
    assert loaded.messages == saved.messages  # Message equality covers role, text, status, note and clip ids/names
    for got, want in zip(loaded.clips(), saved.clips()):
        assert np.array_equal(got.samples, want.samples)


def test_a_new_store_object_on_the_same_folder_loads_what_was_saved(tmp_path):
    conversation = conversation_with_clips()
    Store(tmp_path).save("session-a", conversation)
    assert_same(Store(tmp_path).load("session-a"), conversation)  # as after a server restart


def test_sessions_see_only_their_own_conversations(tmp_path):
    store = Store(tmp_path)
    mine, theirs = conversation_with_clips(), Conversation()
    theirs.add_user("hello")
    store.save("mine", mine)
    store.save("theirs", theirs)
    assert store.load("mine").id == mine.id
    assert store.load("theirs").messages == theirs.messages
    assert store.load("nobody") is None


def test_a_session_cannot_overwrite_another_sessions_conversation(tmp_path):
    store = Store(tmp_path)
    conversation = conversation_with_clips()
    store.save("owner", conversation)
    conversation.clear()
    with pytest.raises(StoreError, match="belongs to another session"):
        store.save("intruder", conversation)
    assert len(store.load("owner").messages) == 3
    assert store.load("intruder") is None


def test_saving_again_updates_the_row_and_load_returns_the_latest_conversation(tmp_path):
    store = Store(tmp_path)
    first, second = conversation_with_clips(), Conversation()
    store.save("s", first)
    first.add_assistant("Another tone.")
    store.save("s", first)
    assert store.load("s").messages[-1].text == "Another tone."
    second.add_user("new topic")
    store.save("s", second)
    assert store.load("s").id == second.id
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        assert conn.execute("SELECT count(*) FROM conversations").fetchone() == (2,)


def test_clip_audio_is_stored_once_under_its_content_id(tmp_path):
    store = Store(tmp_path)
    clip = Clip(tone(1.0), name="a.wav")
    same_audio = Clip(tone(1.0), name="renamed.wav", source="recorded")
    for session, each in (("s1", clip), ("s2", same_audio)):
        conversation = Conversation()
        conversation.add_user("", [each])
        store.save(session, conversation)
    assert [p.name for p in store.clips_folder.iterdir()] == [f"{clip.id}.wav"]
    assert store.clip_path(same_audio) == store.clips_folder / f"{clip.id}.wav"


def test_rows_hold_the_versioned_json_of_chat_saving(tmp_path):
    store = Store(tmp_path)
    conversation = conversation_with_clips()
    store.save("s", conversation)
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        data = json.loads(conn.execute("SELECT data FROM conversations").fetchone()[0])
    assert data["version"] == saving.FORMAT_VERSION and data["id"] == conversation.id
    assert [c["name"] for m in data["messages"] for c in m["clips"]] == ["a.wav", "b.wav"]


def test_a_missing_clip_file_keeps_the_conversation_with_the_clip_marked_missing(tmp_path):
    store = Store(tmp_path)
    conversation = conversation_with_clips()
    store.save("s", conversation)
    lost = conversation.clips()[0]
    store.clip_path(lost).unlink()
    loaded = store.load("s")
    assert [m.text for m in loaded.messages] == [m.text for m in conversation.messages]
    first, second = loaded.clips()
    assert first.missing and (first.id, first.name) == (lost.id, "a.wav") and len(first.samples) == 0
    assert not second.missing and np.array_equal(second.samples, conversation.clips()[1].samples)
    store.save("s", loaded)  # saving again writes no empty file under the lost clip's id
    assert not store.clip_path(first).exists()
    prompt = get_family("qwen2-audio").renderer.render(loaded)
    assert [p.number for p in prompt.audio_parts] == [2] and "Audio 1:" not in prompt.text


def test_a_conversation_belongs_to_its_login(tmp_path):
    store = Store(tmp_path)
    mine = conversation_with_clips()
    store.save("s", mine, user="ann")
    assert store.load("s", user="bob") is None and store.load("s") is None  # the session id alone opens nothing
    assert_same(store.load("s", user="ann"), mine)
    with pytest.raises(StoreError, match="belongs to another session"):
        store.save("s", mine, user="bob")  # nor can another login overwrite it
    assert_same(store.load("s", user="ann"), mine)


def test_migrations_run_once_and_new_ones_are_applied_to_an_existing_store(tmp_path, monkeypatch):
    Store(tmp_path)
    Store(tmp_path)  # a second start applies nothing twice (a CREATE TABLE would fail)

    def m999_add_pinned(conn):
        conn.execute("ALTER TABLE conversations ADD COLUMN pinned INTEGER")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, m999_add_pinned])
    Store(tmp_path)
    with sqlite3.connect(tmp_path / DB_FILE) as conn:
        names = [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]
        columns = [row[1] for row in conn.execute("PRAGMA table_info(conversations)")]
    assert names == ["m001_conversations", "m002_owners", "m003_titles", "m004_clip_owners", "m999_add_pinned"]
    assert "pinned" in columns


def test_the_data_folder_comes_from_the_argument_else_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "from-env"))
    assert Store().folder == tmp_path / "from-env"
    assert Store(tmp_path / "given").folder == tmp_path / "given"
    assert (tmp_path / "given" / DB_FILE).is_file()


def test_an_unusable_data_folder_is_a_store_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreError, match="Choose a writable folder"):
        Store(tmp_path / "file")


FULL = r"Nothing was changed: the app's data folder could not be written \(the disk is full\)\. Free some space on it"


@pytest.fixture
def tiny_disk(tmp_path):
    """A folder on a 256 KB tmpfs, a disk that a 10-second clip fills (mounting one needs root: skipped without)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)]
    mounted = shutil.which("mount") and subprocess.run(mount, capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (it needs root); the simulated full disk below runs everywhere")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def store_and_clip(folder: Path) -> tuple[Store, Conversation]:
    """A store holding a conversation, and that conversation with a 10-second clip (640 KB of float32) added."""
    store = Store(folder)
    conversation = Conversation()
    conversation.add_user("Hi")
    store.save("s" * 32, conversation)
    conversation.add_assistant("Hello.")
    conversation.add_user("Listen.", [Clip(tone(10.0), name="long.wav")])
    return store, conversation


def assert_refused_as_full(store: Store, conversation: Conversation, message: str = FULL) -> None:
    with pytest.raises(StoreError, match=message):
        store.save("s" * 32, conversation)
    assert list(store.clips_folder.iterdir()) == []  # no .partial.wav left behind
    assert [m.text for m in store.load("s" * 32).messages] == ["Hi"]  # what was stored before is as it was


def test_a_full_disk_while_writing_a_clip_says_so_and_leaves_no_partial_file(tiny_disk):
    assert_refused_as_full(*store_and_clip(tiny_disk))  # libsndfile says only "System error."


@pytest.mark.parametrize(("free_bytes", "message"), [
    (0, FULL),
    (2**40, r"could not be written \(see the app's log\)\. Try again; if it repeats, ask whoever runs the app\."),
])
def test_a_clip_write_that_libsndfile_fails_says_what_to_do_and_leaves_no_partial_file(tmp_path, monkeypatch,
                                                                                      free_bytes, message):
    store, conversation = store_and_clip(tmp_path)

    def write_part_then_fail(path, samples, *args, **kwargs):  # as libsndfile fails on a full disk
        Path(path).write_bytes(samples[:1000].tobytes())
        raise soundfile.LibsndfileError(2)

    monkeypatch.setattr("chat.saving.soundfile.write", write_part_then_fail)
    monkeypatch.setattr("chat.saving.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(2**41, 0, free_bytes))
    assert_refused_as_full(store, conversation, message)


def test_zip_round_trip_keeps_everything(tmp_path):
    conversation = conversation_with_clips()
    path = to_zip(conversation, tmp_path / "conversation.zip")
    with zipfile.ZipFile(path) as archive:
        assert "conversation.json" in archive.namelist()
    assert_same(from_zip(path), conversation)


def test_a_zip_whose_files_sit_in_one_folder_is_read_too(tmp_path):
    conversation = conversation_with_clips()
    flat = to_zip(conversation, tmp_path / "flat.zip")
    nested = tmp_path / "nested.zip"
    with zipfile.ZipFile(flat) as source, zipfile.ZipFile(nested, "w") as target:
        for name in source.namelist():
            target.writestr(f"my chat/{name}", source.read(name))
    assert_same(from_zip(nested), conversation)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not a zip at all", "not a readable zip"), (None, "holds no conversation.json")],
)
def test_a_file_that_is_not_a_saved_conversation_is_refused(tmp_path, content, message):
    path = tmp_path / "upload.zip"
    if content is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
    else:
        path.write_bytes(content)
    with pytest.raises(StoreError, match=message):
        from_zip(path)


def zip_of(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def saved_files(conversation) -> dict[str, bytes]:
    """The files of to_zip, by name."""
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(to_zip(conversation, Path(folder) / "c.zip")) as archive:
            return {name: archive.read(name) for name in archive.namelist()}


@pytest.mark.parametrize(("seconds", "message"), [
    (660, "unpacks to 40 MB, more than the 37 MB it may have"),  # refused by the size the zip states
    (600.5, "longer than the 10-minute clip limit"),  # fits the size, refused by the wav header
])
def test_an_over_long_clip_in_a_small_zip_is_refused_before_it_is_decoded(tmp_path, seconds, message):
    conversation = conversation_with_clips()
    files = saved_files(conversation)
    clip_name = next(name for name in files if name.endswith(".wav"))
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(seconds * 16000), dtype=np.float32), 16000, subtype="FLOAT", format="WAV")
    files[clip_name] = buffer.getvalue()  # tens of MB of silence: a few kB deflated
    path = zip_of(tmp_path / "long.zip", files)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(StoreError, match=message):
        from_zip(path)


def test_a_huge_conversation_json_is_refused_by_its_size(tmp_path):
    path = zip_of(tmp_path / "huge.zip", {"conversation.json": b'{"version": 2, "x": "' + b"a" * 20 * 2**20 + b'"}'})
    with pytest.raises(StoreError, match="conversation.json unpacks to 20 MB, more than the 16 MB"):
        from_zip(path)


def test_too_many_files_are_refused(tmp_path):
    path = zip_of(tmp_path / "many.zip", {f"clips/{k}.wav": b"" for k in range(1001)})
    with pytest.raises(StoreError, match="holds 1001 files, more than a saved conversation can"):
        from_zip(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["messages"][0].update(text=42), "message 1's text should be a str, not 42"),
        (lambda d: d["messages"][0].update(role="admin"), "message 1 has role 'admin'"),
        (lambda d: d.update(messages={}), "messages should be a list"),
        (lambda d: d["messages"][0]["clips"][0].update(id="../../etc"), "has source 'uploaded' and id '../../etc'"),
        (lambda d: d.update(system_prompt=None), "the system prompt should be a str"),
    ],
    ids=["number-text", "bad-role", "messages-not-a-list", "path-as-id", "no-system-prompt"],
)
def test_every_field_of_an_import_is_checked(tmp_path, change, message):
    files = saved_files(conversation_with_clips())
    data = json.loads(files["conversation.json"])
    change(data)
    files["conversation.json"] = json.dumps(data).encode()
    with pytest.raises(StoreError, match=re.escape(message)):
        from_zip(zip_of(tmp_path / "edited.zip", files))


def test_downloads_are_removed_after_an_hour(tmp_path):
    store = Store(tmp_path)
    first = store.export(conversation_with_clips(), "conversation.zip")
    assert first.name == "conversation.zip" and from_zip(first).messages[0].text == "What is in Audio 1?"
    hour_ago = time.time() - store_module.DOWNLOADS_KEPT_S - 1
    os.utime(first, (hour_ago, hour_ago))
    second = store.export(conversation_with_clips(), "conversation.zip")
    assert not first.parent.exists() and second.is_file()
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == [second.parent.name]


def test_history_lists_renames_opens_and_deletes_a_logins_conversations(tmp_path):
    store = Store(tmp_path)
    first, second, spoken = conversation_with_clips(), Conversation(), Conversation()
    second.add_user("   Where is   the nearest train station from the museum of modern art in this city?")
    spoken.add_user("", [Clip(tone(1.0, 330), name="q.wav")])
    for conversation in (first, second, spoken):
        store.save("browser-1", conversation, user="ann")
    store.save("browser-9", Conversation(), user="bob")
    titles = [(s.id, s.title) for s in store.history("browser-2", user="ann")]  # any browser of ann's
    assert titles == [(spoken.id, "Spoken question"),
                      (second.id, "Where is the nearest train station from the museum of moder…"),
                      (first.id, "What is in Audio 1?")]
    store.rename(first.id, "  Tones\n test ", "browser-2", user="ann")
    store.rename(first.id, "Hijacked", "browser-9", user="bob")  # not bob's: nothing happens
    assert store.history("x", user="ann")[-1].title == "Tones test"
    assert_same(store.open(first.id, "browser-2", user="ann"), first)  # now the current one of browser-2
    assert store.load("browser-2", user="ann").id == first.id and store.history("x", "ann")[0].id == first.id
    with pytest.raises(StoreError, match="no such conversation among yours"):
        store.open(first.id, "browser-9", user="bob")
    store.save("browser-2", first, user="ann")  # a conversation opened from another browser saves as before
    store.delete(second.id, "browser-9", user="bob")  # not bob's
    store.delete(second.id, "browser-2", user="ann")
    assert [s.id for s in store.history("x", user="ann")] == [first.id, spoken.id]


def test_without_logins_history_is_the_browser_sessions_own(tmp_path):
    store = Store(tmp_path)
    mine, theirs = conversation_with_clips(), Conversation()
    store.save("mine", mine)
    store.save("theirs", theirs)
    assert [s.id for s in store.history("mine")] == [mine.id]
    with pytest.raises(StoreError, match="no such conversation"):
        store.open(theirs.id, "mine")
