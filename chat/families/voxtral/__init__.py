"""Voxtral: family.py says what it is, model.py runs it with transformers and mistral-common."""

from chat.families.voxtral.family import FAMILY

__all__ = ["FAMILY"]
