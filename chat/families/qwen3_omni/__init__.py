"""Qwen3-Omni: family.py says what it is, model.py runs its thinker with transformers' own classes."""

from chat.families.qwen3_omni.family import FAMILY

__all__ = ["FAMILY"]
