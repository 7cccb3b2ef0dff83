"""Combined confidence from named score components. No torch; never re-runs a model.

Every generator stores its raw components (e.g. ``clip_class_prob``, ``sam_predicted_iou``)
as score columns. A ``ScoringConfig`` says how to combine some of them into one column
(``confidence`` by default); the components stay stored beside it, so the formula can be
changed later on a finished run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import numpy as np

from ..errors import ConfigError, ValidationError
from .instances import Instances

Formula = Literal["geometric_mean", "arithmetic_mean", "harmonic_mean", "product", "min", "max"]


@dataclass(frozen=True)
class ScoringConfig:
    formula: Formula = "geometric_mean"  # how components combine (weighted when weights are given)
    components: tuple[str, ...] = ("clip_class_prob", "sam_predicted_iou")  # score columns to combine
    weights: tuple[float, ...] = ()  # one non-negative weight per component; empty = equal weights
    output: str = "confidence"  # the column written (overwritten if present)

    def __post_init__(self) -> None:
        if not self.components:
            raise ConfigError("scoring.components: expected at least one score column name")
        if self.weights and len(self.weights) != len(self.components):
            raise ConfigError(f"scoring.weights: expected {len(self.components)} weights (one per component);"
                              f" got {len(self.weights)}")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) == 0):
            raise ConfigError(f"scoring.weights: expected non-negative weights with a positive sum; got {self.weights}")


def _weighted(values: np.ndarray, weights: np.ndarray, formula: str) -> np.ndarray:
    """``values`` (K, N) in [0, 1]; ``weights`` (K,) summing to 1 -> (N,) float64."""
    w = weights[:, None]
    if formula == "geometric_mean":
        with np.errstate(divide="ignore"):
            logs = np.where(values > 0, np.log(np.maximum(values, 1e-300)), -np.inf)
        return np.exp(np.sum(np.where(w > 0, w * logs, 0.0), axis=0))
    if formula == "arithmetic_mean":
        return np.sum(w * values, axis=0)
    if formula == "harmonic_mean":
        with np.errstate(divide="ignore"):
            inv = np.sum(np.where(w > 0, w / np.maximum(values, 1e-300), 0.0), axis=0)
        return np.where(np.all((values > 0) | (w == 0), axis=0), 1.0 / inv, 0.0)
    raise AssertionError(formula)


_UNWEIGHTED: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "product": lambda v: np.prod(v, axis=0),
    "min": lambda v: np.min(v, axis=0),
    "max": lambda v: np.max(v, axis=0),
}


def combine_scores(scores: Mapping[str, np.ndarray], config: ScoringConfig) -> np.ndarray:
    """The combined ``(N,)`` float32 score. Components are clipped to [0, 1] first."""
    missing = [c for c in config.components if c not in scores]
    if missing:
        raise ValidationError(f"scoring needs score columns {missing}; this result has {sorted(scores)}."
                              " Pick components from the available columns.")
    values = np.stack([np.clip(np.asarray(scores[c], np.float64), 0.0, 1.0) for c in config.components])
    if config.formula in _UNWEIGHTED:
        if config.weights:
            raise ConfigError(f"scoring.formula {config.formula!r} takes no weights")
        return _UNWEIGHTED[config.formula](values).astype(np.float32)
    weights = np.asarray(config.weights or [1.0] * len(config.components), np.float64)
    return _weighted(values, weights / weights.sum(), config.formula).astype(np.float32)


def with_combined_score(instances: Instances, config: ScoringConfig) -> Instances:
    """A copy of ``instances`` with ``config.output`` (re)computed; every other column kept."""
    import dataclasses

    scores = dict(instances.scores)
    scores[config.output] = combine_scores(instances.scores, config) if len(instances) else np.zeros(0, np.float32)
    return dataclasses.replace(instances, scores=scores)
