"""Range and choice metadata for config dataclass fields, checked when a config is built. No torch.

A config dataclass declares what each value may be next to its default::

    shard_size: int = bounded(256, 1, 100_000)      # an integer in 1..100000
    nms_iou: float = bounded(0.7, 0.0, 1.0)         # a finite number in [0, 1]
    cache_max_gb: float = bounded(50.0, 0.0, None, low_open=True)   # > 0
    model_type: str = one_of("vit_h", ("vit_h", "vit_l", "vit_b"))

and calls ``check_fields(self)`` in ``__post_init__``. Every float field is refused when it is
NaN or infinite, whether or not it has a range. A failure is a ``FieldValueError`` naming the
field; ``config.from_mapping`` turns it into a ``ConfigError`` naming the dotted recipe key.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field
from typing import Any, Sequence

from .errors import ConfigError

RANGE = "labelgen_range"
CHOICES = "labelgen_choices"
NON_EMPTY = "labelgen_non_empty"


class FieldValueError(ConfigError):
    """A config field has a value outside what it allows. ``field`` is the field's name."""

    def __init__(self, name: str, detail: str):
        super().__init__(f"{name}: {detail}")
        self.field = name
        self.detail = detail


def bounded(default: Any, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False) -> Any:
    """A dataclass field whose value must lie between ``low`` and ``high`` (``None``: unbounded)."""
    return field(default=default, metadata={RANGE: (low, high, low_open, high_open)})


def one_of(default: str, choices: Sequence[str]) -> Any:
    """A dataclass field whose value must be one of ``choices``."""
    return field(default=default, metadata={CHOICES: tuple(choices)})


def non_empty(default: str) -> Any:
    """A string field that must not be empty or blank."""
    return field(default=default, metadata={NON_EMPTY: True})


def describe_range(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False,
                   integer: bool = False) -> str:
    """``an integer in 1..100000``, ``a number in [0, 1]``, ``a number > 0``..."""
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        if integer and not low_open and not high_open:
            return f"{kind} in {low}..{high}"
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind


def in_range(value: float, low: float | None, high: float | None, low_open: bool = False,
             high_open: bool = False) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    if high is not None and (value >= high if high_open else value > high):
        return False
    return True


def check_fields(config: Any) -> None:
    """Check every field of dataclass instance ``config`` against its metadata.

    Floats must be finite; ``bounded`` fields in range; ``one_of`` fields one of their choices;
    ``non_empty`` strings not blank. Raises ``FieldValueError`` for the first bad field.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        meta = f.metadata
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(value, float) and not math.isfinite(value):
            raise FieldValueError(f.name, f"expected a finite number; got {value!r}")
        if RANGE in meta and is_number:
            low, high, low_open, high_open = meta[RANGE]
            if not in_range(value, low, high, low_open, high_open):
                integer = hints.get(f.name) is int
                raise FieldValueError(
                    f.name, f"expected {describe_range(low, high, low_open, high_open, integer)}; got {value!r}")
        if CHOICES in meta and value not in meta[CHOICES]:
            raise FieldValueError(f.name, f"expected one of {list(meta[CHOICES])}; got {value!r}")
        if NON_EMPTY in meta and (not isinstance(value, str) or not value.strip()):
            raise FieldValueError(f.name, f"expected a non-empty string; got {value!r}")


def check_strings(name: str, values: Any, *, what: str = "non-empty strings") -> None:
    """Every item of the tuple ``values`` is a non-blank string."""
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise FieldValueError(name, f"expected a list of {what}; got {value!r} in {list(values)!r}")


def check_vocabulary(classes: Any, key: str) -> "typing.Mapping[str, tuple[str, ...]]":
    """A read-only ``{class name: prompts}`` copy of a recipe vocabulary (``None`` prompts -> ``()``: the class
    name itself), as the labeler and prompt-driven generators take it; ``key`` (e.g. ``"labeler.classes"``)
    names it in errors. Class names and prompts must be non-empty strings and no prompt may be listed twice
    (a prompt names one class)."""
    from types import MappingProxyType

    if not isinstance(classes, typing.Mapping):
        raise ConfigError(f"{key}: expected a mapping of class name -> list of prompts, e.g."
                          f" {{person: [person, pedestrian], dog: []}}; got {type(classes).__name__} {classes!r}")
    if not classes:
        raise ConfigError(f"{key}: expected at least one class; got an empty mapping")
    checked: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}  # effective prompt -> the class it belongs to
    for name, prompts in classes.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{key}: class names must be non-empty strings; got {name!r}")
        prompts = () if prompts is None else prompts
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise ConfigError(f"{key}.{name}: expected a list of prompts ([] = the class name); got {prompts!r}")
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError(f"{key}.{name}: prompts must be non-empty strings; got {prompt!r}")
        checked[name] = tuple(prompts)
        for prompt in checked[name] or (name,):
            if prompt in owner:
                where = "twice" if owner[prompt] == name else f"under both {owner[prompt]!r} and {name!r}"
                raise ConfigError(f"{key}: prompt {prompt!r} is listed {where}; give each prompt once")
            owner[prompt] = name
    return MappingProxyType(checked)
