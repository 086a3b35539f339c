"""SALMONN: family.py says what it is, model.py runs its four parts (BEATs in beats.py)."""

from chat.families.salmonn.family import FAMILY

__all__ = ["FAMILY"]
