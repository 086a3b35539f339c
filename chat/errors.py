"""One exception family: every message says what went wrong and what to do."""


class ChatError(Exception):
    """Base class of every error a person should read."""


class ClipError(ChatError):
    """Audio that cannot become a clip: unreadable, empty, silent, too long, ..."""


class ConversationError(ChatError):
    """An operation the conversation cannot do in its current state."""


class SettingsError(ChatError):
    """A generation setting or option outside its valid range."""


class PromptTooLongError(ChatError):
    """The current turn alone does not fit the model's context."""


class BackendError(ChatError):
    """The model could not be loaded or failed while replying."""


class ToolError(ChatError):
    """A speech-editing tool call that was refused or failed."""


class StoreError(ChatError):
    """A saved conversation that cannot be read or written."""
