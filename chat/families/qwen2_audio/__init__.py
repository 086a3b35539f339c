"""Qwen2-Audio-Instruct: family.py says what it is, model.py runs it with transformers' own classes."""

from chat.families.qwen2_audio.family import FAMILY

__all__ = ["FAMILY"]
