"""Qwen2.5-Omni: family.py says what it is, model.py runs its thinker with transformers' own classes."""

from chat.families.qwen2_5_omni.family import FAMILY

__all__ = ["FAMILY"]
