"""Conversation → the list of gr.ChatMessage the Chatbot shows. The conversation stays the source of truth."""

from collections.abc import Callable
from pathlib import Path

import gradio as gr

from app.cli_text import EMPTY_REPLY, call_text, duration, ended_without_text
from chat.clip import Clip
from chat.conversation import ASSISTANT, DONE, FAILED, STOPPED, TOOL, Conversation, Message
from chat.families import Family
from chat.speech import Speech
from chat.turn import ToolCallStarted

ClipPath = Callable[[Clip | Speech], Path]  # where a clip's (or spoken reply's) audio file is (Store.clip_path)
TOOL_MARK = "🛠"  # before a tool step's title
THINKING_TITLE = "Thinking"  # the collapsible block of a reply's thinking
SPOKEN_MARK = "🔊"  # before a spoken reply's caption
MISSING = "missing: its audio file is gone from the data folder, so the model no longer hears it"


def caption(clip: Clip, number: int, family: Family) -> tuple[str, str]:
    """`("Audio 2", "question.wav · 4.2 s")`: the clip's label, then its name, length, how a long clip is sent and
    how an edited one was made."""
    if clip.missing:
        return f"Audio {number}", f"{clip.name} · {MISSING}"
    details = [clip.name, duration(clip.duration_s)]
    n_parts = family.n_parts(clip)
    if n_parts > 1:
        details.append(f"sent as {n_parts} parts of {family.window_s:g} s")
    if clip.note:
        details.append(clip.note)
    return f"Audio {number}", " · ".join(details)


def render(
    conversation: Conversation,
    clip_path: ClipPath,
    family: Family,
    streaming: str = "",
    running: ToolCallStarted | None = None,
    thinking: str = "",
) -> list[gr.ChatMessage]:
    """Every message, then the thinking and text of a reply still streaming, then a tool call still running.

    family is the loaded model's, for how long clips are sent.
    """
    shown = []
    for message, first_number in numbered(conversation):
        shown += render_message(message, first_number, clip_path, family)
    return shown + render_tail(streaming, running, thinking)


def numbered(conversation: Conversation) -> list[tuple[Message, int]]:
    """Each message with the N of Audio N its first clip has (or would have), as one snapshot.

    One snapshot: while a reply streams, its worker thread adds tool messages (and their clips) to the conversation.
    """
    pairs, number = [], 1
    for message in list(conversation.messages):
        pairs.append((message, number))
        number += len(message.clips)
    return pairs


def render_message(message: Message, first_number: int, clip_path: ClipPath, family: Family) -> list[gr.ChatMessage]:
    """One message as the chat shows it (none for a reply that only called a tool); its clips are numbered from
    first_number on."""
    players = [part for n, clip in enumerate(message.clips, start=first_number)
               for part in _player(clip, n, clip_path, family)]
    if message.role == TOOL:
        # a done step folds away, a failed one stays open (no status) so its error is read;
        # a clip the tool made stays in sight, playable, below the step
        title = f"{TOOL_MARK} {message.tool}"
        metadata = {"title": f"{title} failed"} if message.failed else {"title": title, "status": "done"}
        result = gr.ChatMessage(message.text, role="assistant", metadata=metadata)
        return [result] + ([gr.ChatMessage(players, role="assistant")] if players else [])
    if message.role == ASSISTANT:
        thought = [thinking_block(message.reasoning, done=True)] if message.reasoning else []
        text = f"*{EMPTY_REPLY}*" if ended_without_text(message) else message.display_text.strip()
        if message.status in (DONE, STOPPED) and message.note:
            text += f"\n\n*{message.note}*"
        elif message.status == FAILED:
            text += f"\n\n**The reply failed:** {message.note}"
        if message.figures is not None and text:
            text += f"\n\n<sub>{message.figures.summary()}</sub>"  # small, under the reply
        spoken = [spoken_reply(message.speech, clip_path)] if message.speech is not None else []
        return thought + ([gr.ChatMessage(text.strip(), role="assistant")] if text else []) + spoken
    return [gr.ChatMessage(players + ([message.text] if message.text else []), role="user")]


def render_tail(streaming: str = "", running: ToolCallStarted | None = None, thinking: str = ""
                ) -> list[gr.ChatMessage]:
    """What follows the recorded messages while a reply is written: its thinking and text so far, then a tool call
    running."""
    shown = [thinking_block(thinking, done=bool(streaming))] if thinking else []
    shown += [gr.ChatMessage(streaming, role="assistant")] if streaming else []
    if running is not None:
        title = f"{TOOL_MARK} {call_text(running)}"
        shown.append(gr.ChatMessage("Running…", role="assistant", metadata={"title": title, "status": "pending"}))
    return shown


def thinking_block(reasoning: str, done: bool) -> gr.ChatMessage:
    """A reply's thinking as a collapsible block: open, with a spinner, while it is being written (the answer has
    not started, and a long think would otherwise look like a hung page); folded away once it is done, so the
    answer is what is in sight. gradio folds a block whose status turns "done" unless a person has opened it."""
    return gr.ChatMessage(reasoning, role="assistant",
                          metadata={"title": THINKING_TITLE, "status": "done" if done else "pending"})


def spoken_reply(speech: Speech, clip_path: ClipPath) -> gr.ChatMessage:
    """A reply's speech under it: playable and downloadable, captioned with its voice and length."""
    caption = f"{SPOKEN_MARK} Spoken reply · {speech.voice} · {duration(speech.duration_s)}"
    return gr.ChatMessage([{"path": str(clip_path(speech))}, caption], role="assistant")


def _player(clip: Clip, number: int, clip_path: ClipPath, family: Family) -> list[dict | str]:
    # a file part, not a gr.Audio: building a component costs ~0.1 s, and a streaming reply re-renders every chunk
    label, details = caption(clip, number, family)
    player = [] if clip.missing else [{"path": str(clip_path(clip))}]
    return [*player, f"**{label}** · {details}"]
