"""Generation settings: how a reply is sampled."""

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from chat.errors import SettingsError

RANDOM_SEED = ("", "random", "none")  # a seed given as one of these (any case) is a new random one for each reply
SEED_KIND = "a whole number from 0, or empty or random for a new one each time"


@dataclass(frozen=True)
class GenerationSettings:
    """How a reply is sampled; checked once here, changed with dataclasses.replace. A model family states its own
    defaults (Family.settings); these serve where none is stated."""

    # length
    max_new_tokens: int = 512
    # sampling: temperature 0 means greedy decoding
    temperature: float = 0.7
    top_p: float = 0.5
    top_k: int = 0  # 0 turns top-k off
    repetition_penalty: float = 1.1
    seed: int | None = None  # fixed seed makes sampling repeatable

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.max_new_tokens <= 8192, "max_new_tokens must be between 1 and 8192"),
            (0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p must be above 0 and at most 1"),
            (0 <= self.top_k <= 1000, "top_k must be between 0 (off) and 1000"),
            (1.0 <= self.repetition_penalty <= 2.0, "repetition_penalty must be between 1 and 2"),
            (self.seed is None or 0 <= self.seed < 2**32, "seed must be empty or between 0 and 2**32 - 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(f"{message}.")


SETTING_TYPES = {field.name: field.type for field in fields(GenerationSettings)}
SETTING_NAMES = tuple(SETTING_TYPES)


def with_setting(settings: GenerationSettings, name: str, value: object) -> GenerationSettings:
    """settings with one of them set from a value as a person gives it: text (`/set top_k 40`) or a number (the
    page's fields). The seed takes empty or `random` for a new one each time. SettingsError says what is wrong."""
    if name not in SETTING_NAMES:
        raise SettingsError(f"There is no setting {name!r}; the settings are {', '.join(SETTING_NAMES)}.")
    text = "" if value is None else str(value).strip()
    if name == "seed" and text.lower() in RANDOM_SEED:
        return replace(settings, seed=None)
    whole = SETTING_TYPES[name] in (int, int | None)
    kind = SEED_KIND if name == "seed" else f"a {'whole ' if whole else ''}number"
    if not text:
        raise SettingsError(f"{name} needs a value: {kind}.")
    try:
        number = int(text) if whole else float(text)
    except ValueError:
        number = None
    if number is None or (name == "seed" and number < 0):
        raise SettingsError(f"{name} must be {kind}, not {text!r}.")
    return replace(settings, **{name: number})


def settings_from(values: Mapping[str, object], base: GenerationSettings | None = None) -> GenerationSettings:
    """base (default: GenerationSettings()) with each named value set as with_setting reads it."""
    return functools.reduce(lambda settings, item: with_setting(settings, *item), values.items(),
                            base or GenerationSettings())
