"""Model families, one folder each; this registry finds a checkpoint's family from its own files.

A family's folder holds family.py, what the app knows of it (its checkpoints, window and audio-token rule, prompt,
tool style, defaults, server layout) as a Family subclass and its instance FAMILY, and model.py, its LocalModel:
the checkpoint loaded and run with torch, imported by load_model() only when a checkpoint is loaded, since every
start of the app imports this registry. To add a family: a folder like the others and one line in REGISTRY.
"""

import importlib
from pathlib import Path

from chat.errors import BackendError
from chat.families import gemma4, qwen2_5_omni, qwen2_audio, qwen3_omni, qwen_audio_chat, salmonn, voxtral
from chat.families.base import Family, LoadOptions, LocalModel
from chat.speech import Talker

# each family with its LocalModel class by dotted path
REGISTRY: tuple[tuple[Family, str], ...] = (
    (qwen2_audio.FAMILY, "chat.families.qwen2_audio.model.Qwen2AudioModel"),
    (qwen_audio_chat.FAMILY, "chat.families.qwen_audio_chat.model.QwenAudioChatModel"),
    (salmonn.FAMILY, "chat.families.salmonn.model.SalmonnModel"),
    (voxtral.FAMILY, "chat.families.voxtral.model.VoxtralModel"),
    (qwen2_5_omni.FAMILY, "chat.families.qwen2_5_omni.model.Qwen2_5OmniModel"),
    (qwen3_omni.FAMILY, "chat.families.qwen3_omni.model.Qwen3OmniModel"),
    (gemma4.FAMILY, "chat.families.gemma4.model.Gemma4Model"),
)
FAMILIES: dict[str, Family] = {family.name: family for family, _ in REGISTRY}
LOCAL_MODELS: dict[str, str] = {family.name: model for family, model in REGISTRY}
DEFAULT_FAMILY = qwen2_audio.FAMILY


def get_family(name: str) -> Family:
    """A family by name; the error lists the valid names."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def load_model(family: Family, checkpoint: str, options: LoadOptions) -> LocalModel:
    """The family's LocalModel of a checkpoint (hub id, folder or file), loaded as options say."""
    module, _, name = LOCAL_MODELS[family.name].rpartition(".")
    return getattr(importlib.import_module(module), name)(checkpoint, options)


def load_talker(family: Family, checkpoint: str, options: LoadOptions, thinker: LocalModel) -> Talker:
    """The family's Talker of a checkpoint (its talker and vocoder), beside the thinker already loaded."""
    return _talker_class(family)(checkpoint, options, thinker)


def talker_voices(family: Family, checkpoint: str) -> tuple[str, ...]:
    """The voices a checkpoint's talker speaks in, read without loading it; none for a family without a talker or a
    checkpoint saved without one."""
    return _talker_class(family).voices_of(checkpoint) if family.talker else ()


def _talker_class(family: Family) -> type[Talker]:
    module, _, name = family.talker.rpartition(".")
    return getattr(importlib.import_module(module), name)


def family_for_config(config: dict, checkpoint: str) -> Family:
    """The family whose checkpoints look like this config; BackendError lists the supported ones."""
    for family in FAMILIES.values():
        if family.recognizes(config):
            return family
    supported = ", ".join(f"{f.title} (e.g. {f.example_checkpoint})" for f in FAMILIES.values())
    raise BackendError(
        f"{checkpoint} is a {config.get('model_type', 'unknown')!r} model, which this app cannot run. "
        f"Supported families: {supported}."
    )


def config_of_file(path: Path) -> dict:
    """The config of a checkpoint named by one file of a family's own kind (SALMONN's decode yaml)."""
    for family in FAMILIES.values():
        config = family.config_of_file(path)
        if config is not None:
            return config
    raise BackendError(f"{path} is a file, not a checkpoint: point -c/--checkpoint-path at the checkpoint's folder.")


def family_for_name(model_name: str) -> Family:
    """The family a served model's name belongs to (Qwen2-Audio's when the name says nothing)."""
    return next((f for f in FAMILIES.values() if f.recognizes_name(model_name)), DEFAULT_FAMILY)


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "Family", "LoadOptions", "LocalModel", "config_of_file",
           "family_for_config", "family_for_name", "get_family", "load_model", "load_talker", "talker_voices"]
