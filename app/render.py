"""Conversation → the list of gr.ChatMessage the Chatbot shows. The conversation stays the source of truth."""

from collections.abc import Callable
from pathlib import Path

import gradio as gr

from app.cli_text import duration, tool_call
from chat.clip import Clip
from chat.conversation import ASSISTANT, DONE, FAILED, STOPPED, TOOL, Conversation, Message
from chat.families import Family
from chat.turn import ToolCallStarted

ClipPath = Callable[[Clip], Path]  # where a clip's audio file is (chat.store.Store.clip_path)
MISSING = "missing: its audio file is gone from the data folder, so the model no longer hears it"


def caption(clip: Clip, number: int, family: Family) -> str:
    """`Audio 2 · question.wav · 4.2 s`, plus how a long clip is sent and how an edited one was made."""
    if clip.missing:
        return f"Audio {number} · {clip.name} · {MISSING}"
    parts = [f"Audio {number}", clip.name, duration(clip.duration_s)]
    n_parts = family.n_parts(clip)
    if n_parts > 1:
        parts.append(f"sent as {n_parts} parts of {family.window_s:g} s")
    if clip.note:
        parts.append(clip.note.removeprefix(f"Audio {number} = "))  # an edit's note names its own number
    return " · ".join(parts)


def render(
    conversation: Conversation,
    clip_path: ClipPath,
    family: Family,
    streaming: str = "",
    running: ToolCallStarted | None = None,
) -> list[gr.ChatMessage]:
    """Every message, then the text of a reply still streaming, then a tool call still running.

    family is the loaded model's, for how long clips are sent.
    """
    # one snapshot: while a reply streams, its worker thread adds tool messages (and their clips) to the conversation
    messages = list(conversation.messages)
    numbers = {clip.id: n for n, clip in enumerate((clip for m in messages for clip in m.clips), start=1)}
    shown = []
    for message in messages:
        shown += _render(message, numbers, clip_path, family)
    if streaming:
        shown.append(gr.ChatMessage(streaming, role="assistant"))
    if running is not None:
        title = tool_call(running).replace("[tool]", "🛠", 1)
        shown.append(gr.ChatMessage("Running…", role="assistant", metadata={"title": title, "status": "pending"}))
    return shown


def _render(message: Message, numbers: dict[str, int], clip_path: ClipPath, family: Family) -> list[gr.ChatMessage]:
    players = [part for clip in message.clips for part in _player(clip, numbers[clip.id], clip_path, family)]
    if message.role == TOOL:
        # a done step folds away, a failed one stays open (no status) so its error is read;
        # a clip the tool made stays in sight, playable, below the step
        title = f"🛠 {message.tool}"
        metadata = {"title": f"{title} failed"} if message.failed else {"title": title, "status": "done"}
        result = gr.ChatMessage(message.text, role="assistant", metadata=metadata)
        return [result] + ([gr.ChatMessage(players, role="assistant")] if players else [])
    if message.role == ASSISTANT:
        text = message.display_text.strip()
        if message.status in (DONE, STOPPED) and message.note:
            text += f"\n\n*{message.note}*"
        elif message.status == FAILED:
            text += f"\n\n**The reply failed:** {message.note}"
        if message.figures is not None and text:
            text += f"\n\n<sub>{message.figures.summary()}</sub>"  # small, under the reply
        return [gr.ChatMessage(text.strip(), role="assistant")] if text else []  # empty: it only called a tool
    return [gr.ChatMessage(players + ([message.text] if message.text else []), role="user")]


def _player(clip: Clip, number: int, clip_path: ClipPath, family: Family) -> list[dict | str]:
    # a file part, not a gr.Audio: building a component costs ~0.1 s, and a streaming reply re-renders every chunk
    label, rest = caption(clip, number, family).split(" · ", 1)
    player = [] if clip.missing else [{"path": str(clip_path(clip))}]
    return [*player, f"**{label}** · {rest}"]
