"""Generation settings: how a reply is sampled."""

from dataclasses import dataclass, fields, replace

from chat.errors import SettingsError


@dataclass(frozen=True)
class GenerationSettings:
    """How a reply is sampled; checked once here, changed with dataclasses.replace."""

    # length
    max_new_tokens: int = 512
    # sampling: temperature 0 means greedy decoding
    temperature: float = 0.7
    top_p: float = 0.5  # the Qwen-Audio family's published default
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


def with_setting(settings: GenerationSettings, name: str, value: str) -> GenerationSettings:
    """settings with one of them set from text (`seed` takes `random` too); SettingsError says what is wrong."""
    kinds = {field.name: field.type for field in fields(GenerationSettings)}
    if name not in kinds:
        raise SettingsError(f"There is no setting {name!r}; the settings are {', '.join(kinds)}.")
    if name == "seed" and value.lower() in ("", "random", "none"):
        return replace(settings, seed=None)
    whole = name in ("max_new_tokens", "top_k", "seed")
    try:
        number = int(value) if whole else float(value)
    except ValueError:
        raise SettingsError(f"{name} must be a {'whole ' if whole else ''}number, not {value!r}.") from None
    return replace(settings, **{name: number})
