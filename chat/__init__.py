"""The chat core: clips, conversations, exact prompts and model backends. It never imports gradio."""

from chat.backend import Backend, Response, Stats
from chat.clip import Clip
from chat.conversation import Conversation, Message
from chat.errors import (
    BackendError,
    ChatError,
    ClipError,
    ConversationError,
    PromptTooLongError,
    SettingsError,
    StoreError,
    ToolError,
)
from chat.families import FAMILIES, Family, get_family
from chat.loading import DEFAULT_MODEL, load_backend
from chat.prompts import Prompt, PromptRenderer
from chat.saving import load, save
from chat.settings import GenerationSettings
from chat.tools import ToolBox, run_tool_call
from chat.turn import TextChunk, ToolCallFinished, ToolCallStarted, Turn

__all__ = [
    "DEFAULT_MODEL", "Backend", "GenerationSettings", "Response", "Stats", "load_backend",
    "Clip", "Conversation", "Message",
    "ChatError", "BackendError", "ClipError", "ConversationError", "PromptTooLongError", "SettingsError",
    "StoreError", "ToolError",
    "FAMILIES", "Family", "get_family", "Prompt", "PromptRenderer",
    "load", "save",
    "ToolBox", "run_tool_call", "Turn", "TextChunk", "ToolCallStarted", "ToolCallFinished",
]
