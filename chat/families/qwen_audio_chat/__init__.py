"""Qwen-Audio-Chat: family.py says what it is (timestamp edits in spans.py), model.py runs its official files."""

from chat.families.qwen_audio_chat.family import FAMILY

__all__ = ["FAMILY"]
