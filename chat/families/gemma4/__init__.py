"""Gemma 4: family.py says what it is, model.py runs it with transformers' own classes."""

from chat.families.gemma4.family import FAMILY

__all__ = ["FAMILY"]
