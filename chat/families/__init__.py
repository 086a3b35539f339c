"""Model families, one module each; this registry finds a checkpoint's family from its own files.

To add a family: a module here with a Family subclass and its instance as FAMILY, a LocalModel to run
it locally (in a `*_model.py` imported by Family.load when it needs torch: importing this registry must
stay cheap, since every start of the app does), and one line in FAMILIES.
"""

from chat.errors import BackendError
from chat.families import qwen2_audio, qwen_audio_chat, salmonn, voxtral
from chat.families.base import Family, LoadOptions, LocalModel

FAMILIES: dict[str, Family] = {
    family.name: family for family in (qwen2_audio.FAMILY, qwen_audio_chat.FAMILY, salmonn.FAMILY, voxtral.FAMILY)
}
DEFAULT_FAMILY = qwen2_audio.FAMILY


def get_family(name: str) -> Family:
    """A family by name; the error lists the valid names."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_for_config(config: dict, checkpoint: str) -> Family:
    """The family whose checkpoints look like this config.json; BackendError lists the supported ones."""
    for family in FAMILIES.values():
        if family.recognizes(config):
            return family
    supported = ", ".join(f"{f.title} (e.g. {f.example_checkpoint})" for f in FAMILIES.values())
    raise BackendError(
        f"{checkpoint} is a {config.get('model_type', 'unknown')!r} model, which this app cannot run. "
        f"Supported families: {supported}."
    )


def family_for_name(model_name: str) -> Family:
    """The family a served model's name belongs to (Qwen2-Audio's when the name says nothing)."""
    return next((f for f in FAMILIES.values() if f.recognizes_name(model_name)), DEFAULT_FAMILY)


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "Family", "LoadOptions", "LocalModel", "family_for_config",
           "family_for_name", "get_family"]
