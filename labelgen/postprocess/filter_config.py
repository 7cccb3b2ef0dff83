"""``FilterConfig``: the options of ``labelgen.postprocess.filtering``, validated strictly, and their loading.

Options come from a YAML file (its top level, or a ``filter:`` section so that a recipe can
carry them) plus ``--set key=value`` overrides; an unknown key is an error naming the nearest
valid one. ``min_confidence_per_class`` keys are resolved against the run's class names here.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from ..config import apply_overrides, from_mapping, read_yaml_file
from ..errors import ConfigError
from ..structures.scoring import ScoringConfig

RECIPE_SECTIONS = ("generator", "images", "store", "execution", "description")  # may sit beside filter:


@dataclass(frozen=True)
class FilterConfig:
    """What to keep of a finished run. The defaults keep everything."""

    confidence_column: str = "confidence"  # score column thresholded and ranked (NMS, max_instances)
    min_confidence: float = 0.0  # reject confidence < this, for classes without their own minimum
    min_confidence_per_class: Mapping[str, float] = field(default_factory=dict)  # class name (or id as a
    # string when the run has no class names) -> minimum; replaces min_confidence for that class
    min_area: int = 0  # pixels; reject area < this (0 = no bound)
    max_area: int = 0  # pixels; reject area > this (0 = no bound)
    min_area_fraction: float = 0.0  # 0..1 of height*width; reject area below this fraction
    max_area_fraction: float = 1.0  # 0..1 of height*width; reject area above this fraction
    nms_iou: float = 1.0  # suppress IoU > this with a kept higher-confidence mask (>= 1 disables)
    nms_ios: float = 1.0  # suppress intersection-over-smaller > this (>= 1 disables)
    nms_across_classes: bool = True  # False: masks compete only within their own class
    max_instances: int = 0  # per image, highest confidence first (0 = no limit)
    drop_border: bool = False  # reject masks with a pixel within border_margin px of the image edge
    border_margin: int = 0  # 0 = a pixel on the outermost row/column; m = up to m px inside it
    fill_holes: bool = False  # fill background enclosed by the mask (4-connected holes)
    min_component_area: int = 0  # remove 8-connected parts smaller than this many px (0 = off)
    scoring: ScoringConfig | None = None  # recompute confidence_column from score components first

    def __post_init__(self) -> None:
        object.__setattr__(self, "min_confidence_per_class", _check_class_minimums(self.min_confidence_per_class))
        if not isinstance(self.confidence_column, str) or not self.confidence_column:
            raise ConfigError(f"filter.confidence_column: expected a score column name; got {self.confidence_column!r}")
        _check_number("min_confidence", self.min_confidence)
        for name in ("min_area", "max_area", "max_instances", "border_margin", "min_component_area"):
            _check_count(name, getattr(self, name))
        if self.max_area and self.min_area > self.max_area:
            raise ConfigError(f"filter.min_area ({self.min_area}) must be <= max_area ({self.max_area}); 0 = no bound")
        for name in ("min_area_fraction", "max_area_fraction"):
            _check_number(name, getattr(self, name), low=0.0, high=1.0)
        if self.min_area_fraction > self.max_area_fraction:
            raise ConfigError(f"filter.min_area_fraction ({self.min_area_fraction}) must be <= max_area_fraction"
                              f" ({self.max_area_fraction})")
        for name in ("nms_iou", "nms_ios"):
            _check_number(name, getattr(self, name), low=0.0)
        if self.scoring is not None and self.scoring.output != self.confidence_column:
            raise ConfigError(f"filter.scoring.output ({self.scoring.output!r}) must equal confidence_column"
                              f" ({self.confidence_column!r}): scoring recomputes the column the filter thresholds")

    @property
    def nms_enabled(self) -> bool:
        return self.nms_iou < 1.0 or self.nms_ios < 1.0

    def needs_confidence(self) -> bool:
        """Whether some step reads ``confidence_column`` (then it must exist in every non-empty image)."""
        return bool(self.min_confidence or self.min_confidence_per_class or self.nms_enabled or self.max_instances)


def _check_class_minimums(value: Any) -> Mapping[str, float]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"filter.min_confidence_per_class: expected a mapping class -> minimum; got {value!r}")
    checked = {}
    for key, minimum in value.items():
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)
        if not isinstance(key, str) or not key:
            raise ConfigError(f"filter.min_confidence_per_class: keys must be class names or ids; got {key!r}")
        checked[key] = _check_number(f"min_confidence_per_class.{key}", minimum)
    return MappingProxyType(checked)


def _check_number(name: str, value: Any, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"filter.{name}: expected a finite number; got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"filter.{name}: expected {low}..{high}; got {value}")
    return float(value)


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"filter.{name}: expected an integer >= 0 (0 = off); got {value!r}")


def resolve_class_minimums(config: FilterConfig, class_names: Sequence[str] | None) -> dict[int, float]:
    """``min_confidence_per_class`` keyed by class id. Raises ``ConfigError`` for an unknown class."""
    resolved = {}
    for key, minimum in config.min_confidence_per_class.items():
        resolved[_class_id_of(key, class_names)] = minimum
    return resolved


def _class_id_of(key: str, class_names: Sequence[str] | None) -> int:
    if class_names is not None:
        names = [str(n) for n in class_names]
        if key in names:
            return names.index(key)
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"filter.min_confidence_per_class: {key!r} is not a class of this run.{hint}"
                          f" Classes: {', '.join(names)}")
    if not key.isdigit():
        raise ConfigError(f"filter.min_confidence_per_class: this run has no class names, so keys must be class ids"
                          f" as strings (e.g. '0'); got {key!r}. Pass the class names to use names.")
    return int(key)


# -- loading ----------------------------------------------------------------------------------
def load_filter_config(path: str | Path | None, overrides: Sequence[str] = ()) -> FilterConfig:
    """Read filter options from YAML (or none), apply ``key=value`` overrides, validate strictly.

    The file holds either the ``FilterConfig`` fields at the top level, or a ``filter:`` section
    (beside which only recipe sections may appear, so a recipe can carry its filter). Override
    keys may be written with or without the ``filter.`` prefix.
    """
    data = _read_yaml_mapping(Path(path)) if path is not None else {}
    if "filter" in data:
        others = sorted(set(data) - {"filter", *RECIPE_SECTIONS})
        if others:
            raise ConfigError(f"{path}: with a 'filter:' section, put every filter option inside it; found {others}"
                              " at the top level")
        data = data["filter"] if data["filter"] is not None else {}
    overrides = [item[len("filter."):] if item.startswith("filter.") else item for item in overrides]
    return from_mapping(FilterConfig, _class_keys_as_strings(apply_overrides(data, overrides)), "filter")


def _class_keys_as_strings(data: dict[str, Any]) -> dict[str, Any]:
    """YAML reads ``{0: 0.5}`` with int keys; class ids are string keys (like JSON's)."""
    minimums = data.get("min_confidence_per_class")
    if isinstance(minimums, Mapping):
        data["min_confidence_per_class"] = {
            str(k) if isinstance(k, int) and not isinstance(k, bool) else k: v for k, v in minimums.items()
        }
    return data


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    data = read_yaml_file(path, "filter file", "Pass a YAML file of filter options")  # bounded, strict, UTF-8
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"filter file {path} must be a mapping at the top level; got {type(data).__name__}")
    return data
