"""The browser chat: a gr.Blocks page over the chat core. build_demo() returns it; launch.py serves it.

Each browser keeps a random session id in its localStorage (gr.BrowserState). On page load,
open_session() reads that session's conversation from chat.store, so a reload or a server restart
brings it back; every change is saved there again. While the page is open, the Session in gr.State
holds the conversation and the reply being written. API clients call /open_session first, too.
"""

import datetime
import functools
import gc
import io
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import gradio as gr
import numpy as np
import soundfile
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import ApiMiddleware, OpenAIApi
from app.chatview import ChatBlocks, ChatView
from app.render import ClipPath, render
from chat.backend import Backend
from chat.clip import RECORDED, Clip
from chat.conversation import ASSISTANT, DEFAULT_SYSTEM_PROMPT, STOPPED, Conversation, Message
from chat.errors import BackendError, ChatError, ClipError, SettingsError, StoreError
from chat.settings import SETTING_NAMES, GenerationSettings, settings_from
from chat.store import Store, from_zip
from chat.speech import SpeechChunk, Voices
from chat.timestamps import DEFAULT_WORD_MODEL
from chat.tools import ToolBox, toolbox_for, tools_note
from chat.turn import ReasoningChunk, TextChunk, ToolCallStarted, Turn, in_batches

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SESSION_KEY = "audio-chat-session"  # localStorage key of the session id
# BrowserState encrypts with a secret that it sends to the browser in the page config, so the secret hides
# nothing; it is fixed so that the id stored before a server restart can still be read after it.
SESSION_SECRET = "audio-chat-session-v1"
SESSION_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: 122 random bits, not guessable
STOP_WAIT_S = 10.0  # a reply stops within one token step; this only bounds a hung backend
TITLE = "Audio Chat"
EXAMPLES = [  # shown in the empty chat; a click puts the example in the message box (assets/make_assets.py)
    {"display_text": "Ask a spoken question", "text": "", "files": [str(ASSETS / "question.wav")]},
    {"display_text": "What is this sound?", "text": "What is this sound? Describe it.",
     "files": [str(ASSETS / "knock.wav")]},
    {"display_text": "Describe a tune", "text": "Describe this tune: its instrument, tempo and mood.",
     "files": [str(ASSETS / "tune.ogg")]},
]
CSS = """
.gradio-container { max-width: 1100px !important; margin: auto; }
#history label { width: 100%; }
#history label.selected { color: var(--body-text-color); }
#attached { font-size: var(--text-sm); color: var(--body-text-color-subdued); }
/* a failed step's message is in its toast; gradio's "Error" overlay would also hide the conversation */
.keeps-content > [data-testid="status-tracker"]:has(> .error) { display: none; }
#header h1 { margin-bottom: 0; }
#header p { margin-top: 4px; color: var(--body-text-color-subdued); }
#voice-row { align-items: center; }
"""
# Stop silences the spoken reply at once, and keeps it silent: what the player has buffered would otherwise play on,
# and audio still on its way when the reply stops would start it again. A new question silences the reply before it.
SILENCE_JS = """() => {
    window.speechSilenced = true;
    document.querySelectorAll('#speech-out audio').forEach(audio => {
        audio.pause();
        if (audio.dataset.silencer) return;
        audio.dataset.silencer = '1';
        audio.addEventListener('play', () => { if (window.speechSilenced) audio.pause(); });
    });
}"""
NEW_QUESTION_JS = """() => {
    document.querySelectorAll('#speech-out audio').forEach(audio => audio.pause());
    window.speechSilenced = false;
}"""
FILE_ROUTE = "/file="  # gradio's route for files: /gradio_api/file=<absolute path>
FILE_NOT_ALLOWED = "File not allowed: {path}."  # gradio's 403 detail for a file it does not serve, word for word
SAVE_EVERY_S = 1.0  # how often a reply being written is saved, so a crash loses at most this much of it
INTERRUPTED_NOTE = "Interrupted: the app stopped while writing this reply."
log = logging.getLogger(__name__)
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")


@dataclass
class Session:
    """One browser's conversation, and the reply asked for until it has ended."""

    id: str
    conversation: Conversation
    user: str = ""  # the login that owns it; empty without logins
    view: ChatView | None = None  # the chat as the browser gets it; None: the gr.ChatMessage list (no page)
    reply: "Reply | None" = None  # the reply asked for, until it has ended

    @property
    def turn(self) -> Turn | None:
        """The turn of the reply asked for, if any."""
        return self.reply.turn if self.reply is not None else None


@dataclass
class Reply:
    """A reply asked for on the page: its turn, whether respond() streams it yet, and when it is recorded."""

    turn: Turn
    streaming: bool = False  # respond() is iterating turn (else it is still queued, or never will be)
    ended: threading.Event = field(default_factory=threading.Event)  # set once the reply is recorded and saved


def handler(fn: Callable) -> Callable:
    """An event handler: it needs an open session, and a ChatError becomes gr.Error, which the page shows
    while every output, and so whatever was typed or attached, stays as it was."""

    @functools.wraps(fn)
    def wrapper(page: "ChatPage", session: Session | None, *args, **kwargs):
        if session is None:
            raise gr.Error("No session is open: call /open_session first (the page does when it loads).")
        try:
            return fn(page, session, *args, **kwargs)
        except ChatError as e:
            raise shown(e, fn.__name__) from e

    return wrapper


def shown(error: ChatError, step: str) -> gr.Error:
    """The gr.Error that shows a refused step's reason on the page."""
    log.warning("%s refused: %s", step, error)
    return gr.Error(str(error), print_exception=False)


def with_settings(fn: Callable) -> Callable:
    """fn, a handler that takes a GenerationSettings as `settings` and the voice as `voice`, as an event function that
    gradio hands every input by name (inputs_kwargs): the side panel's values are read as the terminal's /set reads
    them, and the voice switch and choice become the voice (None while the switch is off)."""

    def event(session: Session | None, speak: bool = False, voice: str | None = None, **values):
        try:
            settings = settings_from({name: values.pop(name) for name in SETTING_NAMES})
        except SettingsError as e:
            raise shown(e, fn.__name__) from e
        return fn(session, **values, settings=settings, voice=voice if speak else None)

    return event


def attachment_names(message: dict | None) -> str:
    """`Attached: question.wav · knock.wav`, the files waiting in the message box by name; empty when none."""
    files = (message or {}).get("files") or []
    names = [Path(file if isinstance(file, str) else file.get("path", "")).name for file in files]
    return f"Attached: {' · '.join(names)}" if names else ""


class ChatPage:
    """The event handlers: each changes the session's conversation through the core, saves it, and renders it."""

    def __init__(self, backend: Backend, store: Store, tools: ToolBox | None,
                 chatbot: gr.Chatbot | None = None, voices: Voices | None = None) -> None:
        """chatbot is the page's: each session's chat is then processed for it message by message (ChatView);
        voices are those replies can be spoken in (None: text only)."""
        self.backend, self.store, self.tools, self.chatbot, self.voices = backend, store, tools, chatbot, voices

    def open_session(self, session_id: str | None, request: gr.Request | None = None):
        """Reconnect a browser to its stored conversation; a missing or malformed id starts a new session.

        With logins, a conversation belongs to the user who wrote it: another login that presents the
        same session id gets a conversation of its own.
        """
        if not (isinstance(session_id, str) and SESSION_ID.fullmatch(session_id)):
            session_id = uuid.uuid4().hex
        user = (request.username if request is not None else None) or ""
        try:
            conversation = self.store.load(session_id, user) or Conversation()
        except StoreError as e:
            gr.Warning(str(e))
            conversation = Conversation()
        session = Session(session_id, conversation, user)
        if self.chatbot is not None:
            session.view = ChatView(self.chatbot, self._clip_path(session), self.backend.family)
        return session_id, session, *self._opened(session)

    @handler
    def add_message(self, session: Session, message: dict | None, system_prompt: str, settings: GenerationSettings,
                    voice: str | None = None):
        """Add the text and attached files to the open user turn and ask for a reply, which /respond streams (spoken
        in voice, one of the page's voices, if given)."""
        text, files = (message or {}).get("text", "").strip(), (message or {}).get("files") or []
        clips, refused = [], {}  # refused: path -> why
        for path in files:  # decoded before anything changes: a file that fails leaves the conversation as it was
            try:
                clips.append(Clip.from_file(path))
            except ClipError as e:
                refused[path] = str(e)
        if refused:
            return self._refuse(session, text, [path for path in files if path not in refused], list(refused.values()))

        def add(conversation: Conversation) -> None:
            if text or clips:  # else it is a send of the clips already waiting: a spoken question
                conversation.add_user(text, clips)

        return self._ask(session, system_prompt, settings, add, voice)

    @handler
    def regenerate(self, session: Session, system_prompt: str, settings: GenerationSettings,
                   voice: str | None = None):
        """Replace the last reply with a new one, which /respond_again streams."""
        return self._ask(session, system_prompt, settings, Conversation.drop_reply, voice)

    def respond(self, session: Session | None) -> Iterator[tuple]:
        """Stream the reply asked for: the whole chat at every update (each message processed once: ChatView), and
        the audio a spoken reply made since the last update, for the page's player to play on."""
        reply = session.reply if session is not None else None
        if reply is None:  # stopped while it waited in the queue
            return
        turn, reply.streaming = reply.turn, True
        batches, streaming, thinking, running = in_batches(turn), "", "", None
        try:
            self._save_as_interrupted(session, turn, streaming, thinking)
            saved_at = time.monotonic()
            for batch in batches:
                audio = [event for event in batch if isinstance(event, SpeechChunk)]
                for event in batch:
                    if isinstance(event, SpeechChunk):
                        continue
                    if isinstance(event, TextChunk):
                        streaming += event.text
                    elif isinstance(event, ReasoningChunk):
                        thinking += event.text
                    elif isinstance(event, ToolCallStarted):  # the reply so far is on the conversation now
                        streaming, thinking, running = "", "", event
                    else:
                        running = None
                if time.monotonic() - saved_at >= SAVE_EVERY_S:
                    self._save_as_interrupted(session, turn, streaming, thinking)
                    saved_at = time.monotonic()
                unrecorded = turn.response.message is None  # else the reply so far is on the conversation
                # no audio: a skipped update, which opens no stream (a page would poll an empty one for nothing)
                yield (self._render(session, streaming if unrecorded else "", running, thinking if unrecorded else ""),
                       wav_bytes(audio) if audio else gr.skip())
            yield self._render(session), gr.skip()  # the worker has ended: everything is on the conversation
        except ChatError:
            pass  # the reply is on the conversation as failed, with the error as its note; finish() shows it
        finally:
            try:
                batches.close()  # when gradio closes us mid-reply (Stop), this stops the turn and records the reply
                self.store.save(session.id, session.conversation, session.user)
            finally:  # even when saving failed (a full disk): the session must not wait for this reply again
                if session.reply is reply:
                    session.reply = None
                reply.ended.set()

    @handler
    def finish(self, session: Session):
        """Show the conversation as recorded, unlock the inputs, and list it under its (perhaps new) title."""
        return self._render(session), *self._inputs(session), self._history(session)

    @handler
    def stop(self, session: Session):
        """Stop the reply being written; the part already written is kept, marked as stopped."""
        self._stop(session)
        return self._render(session), *self._inputs(session)

    @handler
    def add_recording(self, session: Session, recording: str | None):
        """Add a microphone recording to the open user turn, where it waits for a question or a send."""
        if recording is None:
            return self._render(session), None
        clip = Clip.from_file(recording, name="recording", source=RECORDED)
        self._stop(session)
        with session.conversation.unchanged_on_error():  # not saved, not changed: nothing is sent later by surprise
            session.conversation.add_user("", [clip])
            self.store.save(session.id, session.conversation, session.user)
        return self._render(session), None

    @handler
    def undo(self, session: Session, message: dict | None):
        """Remove the last exchange and put its text back in the message box, before anything typed since."""
        self._stop(session)
        with session.conversation.unchanged_on_error():
            removed = session.conversation.undo()
            self.store.save(session.id, session.conversation, session.user)
        message = message or {}
        text = "\n".join(t for t in (removed[0].text, message.get("text", "")) if t)
        return self._render(session), {"text": text, "files": message.get("files") or []}

    @handler
    def clear(self, session: Session):
        """Remove every message; the system prompt stays."""
        self._stop(session)
        with session.conversation.unchanged_on_error():
            session.conversation.clear()
            self.store.save(session.id, session.conversation, session.user)
        return self._render(session), *self._inputs(session)

    @handler
    def download(self, session: Session) -> gr.File:
        """The conversation as a zip of conversation.json and its clips (chat.saving's folder)."""
        stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
        return gr.File(str(self.store.export(session.conversation, f"conversation-{stamp}.zip")), visible=True)

    @handler
    def upload(self, session: Session, path: str):
        """Open a downloaded conversation as one more of yours; the one open before stays in the list."""
        # a fresh id: the file may come from another session, which keeps its own copy
        conversation = replace(from_zip(path), id=uuid.uuid4().hex)
        self._stop(session)
        self.store.save(session.id, conversation, session.user)
        session.conversation = conversation
        return self._opened(session)

    @handler
    def open_conversation(self, session: Session, conversation_id: str):
        """Switch to one of this person's stored conversations."""
        self._stop(session)
        session.conversation = self.store.open(conversation_id, session.id, session.user)
        return self._opened(session)

    @handler
    def new_conversation(self, session: Session):
        """Start an empty conversation; the one open before stays in the list."""
        self._stop(session)
        conversation = Conversation()
        self.store.save(session.id, conversation, session.user)
        session.conversation = conversation
        return self._opened(session)

    @handler
    def rename(self, session: Session, title: str):
        """Give the open conversation a title (empty: named after its first question again)."""
        self.store.rename(session.conversation.id, title or "", session.id, session.user)
        return self._history(session)

    @handler
    def delete(self, session: Session):
        """Delete the open conversation and open the newest one left, or a new one."""
        self._stop(session)
        self.store.delete(session.conversation.id, session.id, session.user)
        left = self.store.history(session.id, session.user)
        session.conversation = self.store.open(left[0].id, session.id, session.user) if left else Conversation()
        return self._opened(session)

    def example(self, selected: gr.SelectData) -> dict:
        """Put a clicked example into the message box."""
        files = [f["path"] if isinstance(f, dict) else f for f in selected.value.get("files", [])]
        return {"text": selected.value.get("text", ""), "files": files}

    def _ask(self, session: Session, system_prompt: str, settings: GenerationSettings,
             change: Callable[[Conversation], object], voice: str | None = None):
        """Change the conversation and start a Turn (spoken in voice, if given), or leave the conversation exactly
        as it was."""
        if voice is not None and self.voices is None:
            raise SettingsError("This page cannot speak replies.")
        spoken = self.voices.get(voice) if voice is not None else None  # loads the voice's model the first time
        self._stop(session)
        conversation = session.conversation
        with conversation.unchanged_on_error():
            conversation.system_prompt = system_prompt.strip() or DEFAULT_SYSTEM_PROMPT
            change(conversation)
            # the prompt is rendered here: a turn too long for the context fails before any model work
            turn = Turn(self.backend, conversation, settings, tools=self.tools, voice=spoken)
            self.store.save(session.id, conversation, session.user)  # a full disk refuses the step here
        session.reply = Reply(turn)
        return self._render(session), *self._inputs(session, busy=True)

    def _refuse(self, session: Session, text: str, kept: list[str], reasons: list[str]):
        """Send nothing; say which files were refused and why, and leave the text and the good files in the box."""
        for reason in reasons:
            log.warning("attachment refused: %s", reason)
            gr.Warning(f"Not sent: {reason}", duration=None)  # stays until closed: it says what to do
        box = gr.MultimodalTextbox(value={"text": text, "files": kept}, interactive=True, submit_btn=True,
                                   stop_btn=False)
        return self._render(session), box, gr.Audio(interactive=True)

    def _save_as_interrupted(self, session: Session, turn: Turn, shown: str, reasoning: str) -> None:
        """Save the reply written so far as it would read if the app stopped now: marked interrupted.

        The finished reply replaces it; a server killed mid-reply loses at most SAVE_EVERY_S of text,
        and after a restart the next question starts a turn of its own instead of joining this one.
        """
        if turn.response.message is not None:
            return  # between a tool call and the next part of the reply: all of it is recorded already
        partial = Message(ASSISTANT, turn.response.text, status=STOPPED, note=INTERRUPTED_NOTE, shown=shown,
                          reasoning=reasoning)
        self.store.save(session.id, replace(session.conversation, messages=[*session.conversation.messages, partial]),
                        session.user)

    def _stop(self, session: Session) -> None:
        """Cancel the reply being written, if any, and wait until it is recorded on the conversation."""
        reply = session.reply
        if reply is None:
            return
        reply.turn.cancel()
        if not reply.streaming:  # still queued: respond() will find no reply and return
            if session.reply is reply:
                session.reply = None
            return
        if not reply.ended.wait(STOP_WAIT_S):
            raise BackendError(f"The reply did not stop within {STOP_WAIT_S:.0f} s. Wait a moment and try again.")

    def _opened(self, session: Session) -> tuple:
        """Everything the page shows of a conversation just opened: chat, system prompt, inputs, the list."""
        return self._render(session), session.conversation.system_prompt, *self._inputs(session), self._history(session)

    def _history(self, session: Session) -> gr.Radio:
        """This person's conversations, newest first, the open one selected."""
        saved = self.store.history(session.id, session.user)
        choices = [(f"{s.title} · {s.when}", s.id) for s in saved]
        current = session.conversation.id if any(s.id == session.conversation.id for s in saved) else None
        return gr.Radio(choices=choices, value=current)

    def _render(self, session: Session, streaming: str = "", running: ToolCallStarted | None = None,
                thinking: str = "") -> list:
        if session.view is not None:
            return session.view.show(session.conversation, streaming, running, thinking)
        return render(session.conversation, self._clip_path(session), self.backend.family, streaming, running,
                      thinking)

    def _clip_path(self, session: Session) -> ClipPath:
        return functools.partial(self.store.clip_path, owner=session.user)  # shown to them: they may fetch it

    def _inputs(self, session: Session, busy: bool = False) -> tuple:
        """The message box and the recorder: emptied and locked, with a stop button, while a reply is being written."""
        next_number = len(session.conversation.clips()) + 1
        placeholder = f"Ask about the clips, or attach audio files (the next is Audio {next_number})"
        update = {"interactive": not busy, "submit_btn": not busy, "stop_btn": busy, "placeholder": placeholder}
        box = gr.MultimodalTextbox(value=None, **update) if busy else gr.MultimodalTextbox(**update)
        return box, gr.Audio(interactive=not busy)


class ClipAccess:
    """ASGI middleware: with logins, a clip's audio file is served only to a login that was shown the clip.

    gradio serves every file under a static path to anyone logged in, and a clip's file is named by its content
    hash, which anyone holding the same audio can compute. A refusal reads exactly like gradio's answer for a file
    that does not exist, so it tells nobody which clips are stored.
    """

    def __init__(self, app: ASGIApp, store: Store) -> None:
        self.app, self.store = app, store
        self.clips_folder = store.clips_folder.resolve()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            asked = scope["path"].split(FILE_ROUTE, 1)[1] if FILE_ROUTE in scope["path"] else None
            clip_id = self._stored_clip(asked) if asked is not None else None
            user = _login(scope) if clip_id is not None else None  # only a clip's request needs its login
            if user is not None and not self.store.may_fetch(clip_id, user):
                return await JSONResponse({"detail": FILE_NOT_ALLOWED.format(path=asked)}, 403)(scope, receive, send)
        await self.app(scope, receive, send)

    def _stored_clip(self, asked: str) -> str | None:
        """The id of the stored clip a file route asks for, else None."""
        path = Path(os.path.realpath(asked))  # as gradio resolves it: links, "..", all
        return path.stem if path.parent == self.clips_folder else None


def _login(scope: Scope) -> str | None:
    """The login that sent a request, as gradio's own /user route finds it; None when the page has no logins
    (or the request none, which gradio's login check then refuses)."""
    app = scope["app"]  # the gradio App (Starlette puts itself here)
    if app.auth is None:
        return None
    cookies = Request(scope).cookies
    token = cookies.get(f"access-token-{app.cookie_id}") or cookies.get(f"access-token-unsecure-{app.cookie_id}")
    return app.tokens.get(token)


def wav_bytes(chunks: list[SpeechChunk]) -> bytes:
    """Audio chunks as one 16-bit wav, what the page's streaming player takes."""
    buffer = io.BytesIO()
    samples = np.concatenate([chunk.samples for chunk in chunks])
    soundfile.write(buffer, samples, chunks[0].sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def launch(demo: gr.Blocks, store: Store, api: OpenAIApi | None = None, **options) -> None:
    """demo.launch(**options) with the clip files of store served only to the logins shown them, and api (the
    OpenAI-compatible API) at /v1 on the same server."""
    middleware = [Middleware(ClipAccess, store=store)]
    if api is not None:
        middleware.insert(0, Middleware(ApiMiddleware, api=api))
    demo.launch(app_kwargs={"middleware": middleware}, **options)


def freeze_startup_objects() -> None:
    """Exempt every object alive now (torch, the model, gradio's app: all kept until the server stops) from garbage
    collection. A full collection, which the allocations of a long streaming reply trigger, then scans only what
    came after: with them it stopped the stream for about 120 ms (bench/streaming)."""
    gc.collect()  # what is garbage already goes first: a frozen object is never collected
    gc.freeze()


def build_demo(
    backend: Backend, store: Store, *, description: str = "", concurrency: int = 1, tools: bool | None = None,
    word_model: str = DEFAULT_WORD_MODEL, voices: Voices | None = None, voice: str | None = None,
) -> gr.Blocks:
    """The chat page. description says which model serves it; concurrency is how many replies run at once;
    tools offers the speech-editing tools (None: as the model family does by default) to a backend that
    supports them, finding words with word_model; voices are those replies can be spoken in, voice the one switched
    on as the page opens (None: off)."""
    defaults = backend.default_settings
    # served as they are, wherever the data folder is (gradio refuses other files outside the working directory and
    # the temp folder), with no copy into gradio's cache per update; a download's folder name is random, unguessable
    gr.set_static_paths([store.clips_folder, store.downloads_folder, ASSETS])
    # uploads are decoded into the store at once, so gradio's copies can go after a day (checked hourly)
    with ChatBlocks(title=TITLE, fill_height=True, delete_cache=(3600, 86400)) as demo:
        session_id = gr.BrowserState(None, storage_key=SESSION_KEY, secret=SESSION_SECRET)
        state = gr.State(None)
        with gr.Sidebar(label="Settings", open=False, position="right"):
            gr.Markdown("### Conversations")
            new_button = gr.Button("New conversation", size="sm")
            history = gr.Radio([], label="Yours, newest first (times in UTC)", elem_id="history")
            with gr.Row():
                title = gr.Textbox(label="Title", placeholder="empty: its first question", scale=3)
                rename_button = gr.Button("Rename", size="sm", scale=1)
            delete_button = gr.Button("Delete this conversation", size="sm", variant="stop")
            download_button = gr.Button("Download conversation (.zip)", size="sm")
            download_file = gr.File(label="Download", visible=False)
            upload_button = gr.UploadButton("Open a downloaded conversation", file_types=[".zip"], size="sm")
            gr.Markdown("### Generation")
            system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=3)
            settings = {  # by GenerationSettings field: each event hands them to its handler by name
                "max_new_tokens": gr.Number(defaults.max_new_tokens, label="Max new tokens", precision=0,
                                            info="1 to 8192"),
                "temperature": gr.Slider(0, 2, defaults.temperature, step=0.05, label="Temperature",
                                         info="0 = greedy"),
                "top_p": gr.Slider(0.05, 1, defaults.top_p, step=0.05, label="Top-p"),
                "top_k": gr.Number(defaults.top_k, label="Top-k", precision=0, info="0 = off"),
                "repetition_penalty": gr.Slider(1, 2, defaults.repetition_penalty, step=0.05,
                                                label="Repetition penalty"),
                # a Textbox, as gr.Number shows and sends 0 for "no value"
                "seed": gr.Textbox("", label="Seed", placeholder="random",
                                   info="a whole number repeats a reply; empty = random"),
            }
        gr.Markdown(
            f"# {TITLE}\nChat about speech, sounds and music. Record or attach clips, then refer to them as "
            f"*Audio 1*, *Audio 2*, … {description} {tools_note(backend)}".strip(),
            elem_id="header",
        )
        chatbot = gr.Chatbot(
            label="Conversation", show_label=False, scale=1, height=None, min_height=420, examples=EXAMPLES,
            placeholder="**Record a clip or attach audio files**, then ask about them — or just ask out loud.",
            buttons=["copy_all"], elem_id="chatbot", elem_classes="keeps-content",
        )
        page = ChatPage(backend, store, toolbox_for(backend, tools, word_model), chatbot, voices)
        with gr.Row(equal_height=True, elem_id="voice-row", visible=voices is not None):
            speak = gr.Checkbox(voice is not None, label="Speak replies", elem_id="speak", scale=1)
            voice_choice = gr.Dropdown(list(voices.names) if voices else [], value=voice or (voices and voices.default),
                                       label="Voice", elem_id="voice", scale=1)
            speech_out = gr.Audio(streaming=True, autoplay=True, interactive=False, label="Spoken reply",
                                  elem_id="speech-out", scale=3)
        with gr.Row(equal_height=True):
            recorder = gr.Audio(sources=["microphone"], type="filepath", format=None, label="Record a clip", scale=1,
                                elem_id="recorder", elem_classes="keeps-content")
            chat_input = gr.MultimodalTextbox(
                file_count="multiple", file_types=["audio"], sources=["upload"], show_label=False, scale=3,
                placeholder="Ask about the clips, or attach audio files", autofocus=True, elem_id="chat-input",
                elem_classes="keeps-content",
            )
        attached = gr.Markdown("", elem_id="attached")  # the box shows every attachment as the same note icon

        inputs = [chat_input, recorder]
        # Quick steps go through the queue too (only a queued event's gr.Error reaches the page as a toast), but
        # run at once, without a progress overlay. Replies wait their turn in a queue that shows a person's place.
        quick = {"show_progress": "hidden", "concurrency_limit": None}
        opened = [chatbot, system_prompt, *inputs, history]
        demo.load(page.open_session, [session_id], [session_id, state, *opened], api_name="open_session", **quick)
        reply = {"fn": page.respond, "inputs": [state], "outputs": [chatbot, speech_out],
                 "concurrency_limit": concurrency,
                 "concurrency_id": "reply", "show_progress": "minimal"}
        unlock = {"fn": page.finish, "inputs": [state], "outputs": [chatbot, *inputs, history],
                  "api_visibility": "private", "queue": False}
        spoken = {"speak": speak, "voice": voice_choice}
        sent = chat_input.submit(with_settings(page.add_message), [state], [chatbot, *inputs], api_name="add_message",
                                 inputs_kwargs={"message": chat_input, "system_prompt": system_prompt, **settings,
                                                **spoken}, **quick)
        sent.success(None, js=NEW_QUESTION_JS)  # a new question silences the reply still being read out
        send_reply = sent.success(**reply, api_name="respond")
        send_reply.then(**unlock)
        retried = chatbot.retry(with_settings(page.regenerate), [state], [chatbot, *inputs], api_name="regenerate",
                                inputs_kwargs={"system_prompt": system_prompt, **settings, **spoken}, **quick)
        retried.success(None, js=NEW_QUESTION_JS)  # a regenerated reply speaks, even after a Stop
        retry_reply = retried.success(**reply, api_name="respond_again")
        retry_reply.then(**unlock)
        replies = [send_reply, retry_reply]
        chat_input.stop(page.stop, [state], [chatbot, *inputs], cancels=replies, api_name="stop", **quick)
        chat_input.stop(None, js=SILENCE_JS)
        undone = chatbot.undo(page.undo, [state, chat_input], [chatbot, chat_input], cancels=replies, api_name="undo",
                              **quick)
        chatbot.clear(page.clear, [state], [chatbot, *inputs], cancels=replies, api_name="clear", **quick)
        chatbot.example_select(page.example, None, [chat_input], api_visibility="private", queue=False)
        list_attached = {"fn": attachment_names, "inputs": [chat_input], "outputs": [attached],
                         "api_visibility": "private", "queue": False}
        chat_input.change(**list_attached)
        for changed_by_the_app in (sent, undone):  # a change the app makes to the box is no change event
            changed_by_the_app.then(**list_attached)
        recorder.stop_recording(page.add_recording, [state, recorder], [chatbot, recorder], api_name="add_recording",
                                **quick)
        download_button.click(page.download, [state], [download_file], api_name="download", **quick)
        upload_button.upload(page.upload, [state, upload_button], opened, cancels=replies, api_name="upload", **quick)
        history.input(page.open_conversation, [state, history], opened, cancels=replies, api_name="open_conversation",
                      **quick)
        new_button.click(page.new_conversation, [state], opened, cancels=replies, api_name="new_conversation", **quick)
        rename_button.click(page.rename, [state, title], [history], api_name="rename", **quick)
        delete_button.click(page.delete, [state], opened, cancels=replies, api_name="delete", **quick)
    return demo
