"""Loading a backend: the local model of a checkpoint's family, or an OpenAI-compatible server."""

from chat.backend import Backend
from chat.families import DEFAULT_FAMILY

DEFAULT_MODEL = DEFAULT_FAMILY.example_checkpoint


def load_backend(model: str = DEFAULT_MODEL, api_base: str | None = None, **options) -> Backend:
    """The OpenAI-compatible remote backend when api_base is given, else the local transformers one.

    model is a hub id or a local folder for the local backend, which reads the model family from the
    checkpoint itself, and the served model name for the remote one. Imports are deferred so a remote
    backend never loads transformers' generation machinery.
    """
    if api_base:
        from chat.remote import RemoteBackend

        return RemoteBackend(model, api_base, **options)
    from chat.local import LocalBackend

    return LocalBackend(model, **options)
