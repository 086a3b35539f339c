"""The chat as the browser gets it, each message processed once: an update costs the same whatever the history.

gradio processes a Chatbot's whole value again at every update: it postprocesses every message and, twice,
gives every file its URL after resolving its path against every static path (blocks.py postprocess_data). While
a reply streams, that redid the whole conversation for each chunk: about 28 ms with 20 clips, growing with each
clip (bench/streaming). Here a session's ChatView processes a message the first time it is shown, with gradio's
own Chatbot.postprocess and move_files_to_cache, and keeps the result; ChatBlocks sends such a ProcessedChat as
it is. The browser gets exactly what gradio would have sent.
"""

import gradio as gr
from gradio import processing_utils
from gradio.block_function import BlockFunction
from gradio.state_holder import SessionState

from app.render import ClipPath, numbered, render_message, render_tail
from chat.conversation import Conversation, Message
from chat.families import Family
from chat.turn import ToolCallStarted


class ProcessedChat(list):
    """A Chatbot's value as gradio sends it to the browser (its messages postprocessed, its files given URLs)."""


class ChatBlocks(gr.Blocks):
    """gr.Blocks that sends a ProcessedChat output as it is, and processes every other output as gradio does."""

    async def postprocess_data(self, block_fn: BlockFunction, predictions: list | dict, state: SessionState | None):
        one = len(block_fn.outputs) == 1 and not block_fn.batch
        values = [predictions] if one else predictions
        if not isinstance(values, (list, tuple)) or not any(isinstance(value, ProcessedChat) for value in values):
            return await super().postprocess_data(block_fn, predictions, state)
        ready = {i: value for i, value in enumerate(values) if isinstance(value, ProcessedChat)}
        # None is an empty chat to gradio's Chatbot: nothing to process; its place is then given the processed chat
        others = [None if i in ready else value for i, value in enumerate(values)]
        output = await super().postprocess_data(block_fn, others[0] if one else others, state)
        for i, chat in ready.items():
            output[i] = chat
            if state is not None:
                state._update_value_in_config(block_fn.outputs[i]._id, chat)  # as gradio keeps each output's last value
        return output


class ChatView:
    """One session's chat as the browser gets it: each message processed the first time it is shown, then kept.

    A message is kept as long as the conversation holds it at the same place; messages are immutable values, so one
    that changes is another object, processed anew. clip_path is called once per clip shown.
    """

    def __init__(self, chatbot: gr.Chatbot, clip_path: ClipPath, family: Family) -> None:
        self.chatbot, self.clip_path, self.family = chatbot, clip_path, family
        self._shown: dict[int, tuple[Message, int, list[dict]]] = {}  # id(message) -> (message, first number, dicts)

    def show(self, conversation: Conversation, streaming: str = "", running: ToolCallStarted | None = None,
             thinking: str = "") -> ProcessedChat:
        """render(conversation, ..., streaming, running, thinking), processed for the browser."""
        chat, shown = ProcessedChat(), {}
        for message, first_number in numbered(conversation):
            kept = self._shown.get(id(message))
            if kept is None or kept[0] is not message or kept[1] != first_number:
                kept = message, first_number, self.process(render_message(message, first_number, self.clip_path,
                                                                          self.family))
            shown[id(message)] = kept
            chat += kept[2]
        self._shown = shown  # what the conversation no longer holds goes
        chat += self.process(render_tail(streaming, running, thinking))
        return chat

    def process(self, messages: list[gr.ChatMessage]) -> list[dict]:
        """The messages as gradio processes a Chatbot's value for the browser."""
        dumped = self.chatbot.postprocess(messages).model_dump()
        return processing_utils.move_files_to_cache(dumped, self.chatbot, postprocess=True)
