"""A reply's opening thinking (`<think>\\n...\\n</think>\\n\\n` then the answer), split off as it streams.

The thinking is never the answer and never holds a call: only the text after it reaches the call parser.
"""

from dataclasses import replace

from chat.toolcalls import ReplyReader, ToolCall, partial_marker

START, THINKING, CLOSED, ANSWER = "start", "thinking", "closed", "answer"  # where in the reply the reader is


class ReasoningReader(ReplyReader):
    """Reads the thinking a reply may start with (between tags, leading whitespace allowed) into `reasoning`, and
    the rest through `then`, whose calls' ends it counts from the start of the whole reply.

    `reasoning` is the thinking without its tags and the newlines around it, as Qwen3's template keeps it
    (`reasoning_content`); it grows as the reply streams, and text that may yet turn out to be the close tag
    or the newlines before it is held back, so what it has grown by is never taken back. A reply cut off
    while thinking keeps what was thought.
    """

    def __init__(self, tags: tuple[str, str], then: ReplyReader) -> None:
        self.open, self.close = tags
        self.then = then
        self.reasoning = ""
        self.held = ""  # received text not yet read
        self.where = START
        self.n_before = 0  # characters of the reply before the text `then` reads: the thinking, tags and all

    @property
    def several_calls(self) -> bool:
        """Whether the answer's reader reads several calls per reply."""
        return self.then.several_calls

    @property
    def ended(self) -> bool:
        """Whether the answer's reader has read all it will."""
        return self.then.ended

    def feed(self, chunk: str) -> tuple[str, list[ToolCall]]:
        """Add a chunk; returns (answer text to show now, the call this chunk completed, if any)."""
        self.held += chunk
        return self._read(final=False)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The reply ended: what was held back is thinking or answer, as far as the reply got."""
        return self._read(final=True)

    def _read(self, final: bool) -> tuple[str, list[ToolCall]]:
        if self.where == START:
            text = self.held.lstrip()
            if text.startswith(self.open):
                self._skip(len(self.held) - len(text) + len(self.open))
                self.where = THINKING
            elif self.open.startswith(text) and not final:
                return "", []  # the open tag may still be arriving
            else:
                self.where = ANSWER  # a reply without thinking: read all of it, its leading whitespace too
        if self.where == THINKING:
            self._think(final)
        if self.where == CLOSED:  # the whitespace between the thinking and the answer is neither
            text = self.held.lstrip()
            self._skip(len(self.held) - len(text))
            if text or final:
                self.where = ANSWER
        if self.where != ANSWER:
            return "", []
        text, self.held = self.held, ""
        shown, calls = self.then.feed(text)
        if final and not calls:
            more, calls = self.then.finish()
            shown += more
        return shown, [replace(call, end=call.end + self.n_before) for call in calls]

    def _think(self, final: bool) -> None:
        """Move the thinking read so far into `reasoning`; at the close tag (or the reply's end) go on to the answer."""
        close = self.held.find(self.close)
        # a reply cut off inside the close tag: what came before it was the thought
        n_thought = close if close >= 0 else len(self.held) - partial_marker(self.held, self.close)
        thought = self.held[:n_thought]
        if not self.reasoning:  # the newlines after the open tag are not thinking
            n_lead = len(thought) - len(thought.lstrip("\n"))
            self._skip(n_lead)
            thought = thought[n_lead:]
        thought = thought.rstrip("\n")  # nor are those before the close tag; in the middle, they wait for more
        self.reasoning += thought
        self._skip(len(thought))
        if close >= 0 or final:
            self._skip(self.held.find(self.close) + len(self.close) if close >= 0 else len(self.held))
            self.where = CLOSED

    def _skip(self, n_chars: int) -> None:
        self.held = self.held[n_chars:]
        self.n_before += n_chars
