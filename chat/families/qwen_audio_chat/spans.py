"""Qwen-Audio-Chat's speech editing: a reply's word timestamps (`<|3.04|>`), shown as times a person reads and
cut from the clip the question was about into clips, as the first generation's demo did."""

import re

from chat.clip import Clip
from chat.conversation import USER, Conversation
from chat.edit_tools import Audio, keep_range
from chat.errors import ChatError
from chat.families.base import ReplyStep
from chat.toolcalls import ReplyReader
from chat.tools import ERROR_PREFIX, new_clip

SPANS_TOOL = "timestamp_spans"  # the tool name the clips cut at a reply's timestamps are recorded under
MAX_SPAN_CLIPS = 8  # clips one reply's timestamps may create
AUDIO_REFERENCE = re.compile(r"\bAudio (\d+)\b")  # how a person names a clip
TIMESTAMP_TOKEN = re.compile(r"<\|(\d{1,2}\.\d{2})\|>")
# The end of a streamed text that may still change how it reads: timestamps that a second one may pair
# with, and the start of a token still arriving (`<`, `<|3.`, `<|3.04|`).
UNFINISHED_TIMESTAMPS = re.compile(r"(<\|\d{1,2}\.\d{2}\|>\s*)*(<(\|(\d{1,2}(\.(\d{1,2}(\|>?)?)?)?)?)?)?\Z")


class TimestampReader(ReplyReader):
    """A reader whose shown text has timestamp tokens written as times a person reads: `<|3.04|>` → `3.04 s`."""

    def __init__(self, inner: ReplyReader) -> None:
        super().__init__()
        self.inner = inner
        self.held = ""  # the end of the text so far, while UNFINISHED_TIMESTAMPS may still change it

    def feed(self, chunk: str) -> tuple[str, list]:
        text, calls = self.inner.feed(chunk)
        return self._format(text, final=bool(calls)), calls  # a call ends the text shown

    def finish(self) -> tuple[str, list]:
        text, calls = self.inner.finish()
        return self._format(text, final=True), calls

    def _format(self, text: str, final: bool) -> str:
        text = self.held + text
        n_shown = len(text) if final else UNFINISHED_TIMESTAMPS.search(text).start()
        text, self.held = text[:n_shown], text[n_shown:]
        return format_timestamps(text)


def format_timestamps(text: str) -> str:
    """`<|3.04|> to <|3.23|>` as `3.04 s to 3.23 s`; a pair right next to each other as `3.04 s – 3.23 s`."""
    text = re.sub(r"<\|(\d{1,2}\.\d{2})\|>\s*<\|(\d{1,2}\.\d{2})\|>", r"\1 s – \2 s", text)
    return TIMESTAMP_TOKEN.sub(r"\1 s", text)


def timestamp_spans(text: str) -> list[tuple[float, float]]:
    """(start_s, end_s) pairs of the timestamp tokens in a reply, as the first generation's demo cut them.

    Like that demo, only an even number of timestamps counts; pairs that do not run forward are skipped.
    """
    times = [float(t) for t in TIMESTAMP_TOKEN.findall(text)]
    if len(times) % 2:
        return []
    return [(start, end) for start, end in zip(times[::2], times[1::2]) if end > start]


def spans_step(conversation: Conversation) -> ReplyStep | None:
    """The clips the timestamp spans of the reply that ends the conversation name, as a tool step; None for none."""
    spans = timestamp_spans(conversation.messages[-1].text)
    if not spans:
        return None
    text, clips, failed = span_clips(conversation, spans)
    return ReplyStep(SPANS_TOOL, {"spans": [list(span) for span in spans]}, text, tuple(clips), failed)


def span_clips(conversation: Conversation, spans: list[tuple[float, float]]) -> tuple[str, list[Clip], bool]:
    """Each (start_s, end_s) span of the clip the question was about as a new clip, as the first generation's demo did.

    Returns the tool message's text, the clips, and whether any span failed. At most MAX_SPAN_CLIPS
    clips come from one reply, like the tool-call limit: a reply full of timestamps cannot flood the chat.
    """
    source = _asked_about(conversation)
    if source is None:
        return f"{ERROR_PREFIX}there is no clip of yours to cut these times from.", [], True
    lines, clips, failed = [], [], False
    unique = list(dict.fromkeys(spans))  # a repeated span would repeat a clip
    for start_s, end_s in unique[:MAX_SPAN_CLIPS]:
        try:
            result = new_clip(conversation, "keep_range", keep_range(source, start_s, end_s), n_pending=len(clips))
        except (ChatError, ValueError) as e:
            lines.append(f"{ERROR_PREFIX}{start_s:g}–{end_s:g} s: {e}")
            failed = True
            continue
        same = next((k for k, clip in enumerate(clips) if clip.id == result.clip.id), None)
        if same is not None:  # other times, the same audio: one clip, referred to twice
            number = len(conversation.clips()) + same + 1
            lines.append(f"{start_s:g}–{end_s:g} s of {source.clip.name} is the same audio as Audio {number}.")
            continue
        lines.append(result.text)
        clips.append(result.clip)
    if len(unique) > MAX_SPAN_CLIPS:
        lines.append(f"Only the first {MAX_SPAN_CLIPS} of the {len(unique)} spans became clips, the limit per reply.")
    return "\n".join(lines), clips, failed


def _asked_about(conversation: Conversation) -> Audio | None:
    """The clip the last question was about: the one `Audio N` it names, else its last clip, else the last one sent.

    The first generation's demo always took the last clip sent; a question such as "when is 'hello'
    said in Audio 1?" after more clips came means Audio 1.
    """
    user_clips = [clip for message in conversation.messages if message.role == USER for clip in message.clips]
    if not user_clips:
        return None
    question = next(message for message in reversed(conversation.messages) if message.role == USER)
    named = {int(n) for n in AUDIO_REFERENCE.findall(question.text) if 1 <= int(n) <= len(conversation.clips())}
    if len(named) == 1:
        number = named.pop()
        return Audio(number, conversation.clip(number))
    clip = question.clips[-1] if question.clips else user_clips[-1]
    return Audio(conversation.number(clip), clip)
