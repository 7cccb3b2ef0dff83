"""Calibration: P(label correct | its scores) fitted on a reviewed sample, and the precision and recall
of the whole run that follow from it (``labelgen calibrate``; the statistics are in ``docs/review.md``).

* ``fit_calibrator``: isotonic regression (pool-adjacent-violators, one score column) or logistic
  regression (Newton, on the logits of one or more score columns), per class where a class has
  ``min_class_labels`` reviewed labels of both outcomes, one pooled fit for the rest.
* ``summarize_run``: the run's labels as counts on a grid of their score columns per class (streamed,
  memory bounded by the grid, not the run).
* ``estimate_curve``: estimated precision and recall of the run at every ``p_correct`` threshold, with
  95% bootstrap intervals over the sampled images (refit per replicate; the realised outcome of each
  label is drawn too, so the interval is for the realised precision of the labels kept).
* ``calibrate_run``: all of it for a run and a pulled review sample; writes
  ``RUN_DIR/calibration/NAME.json`` and ``NAME.png``. ``load_calibration(run_dir, name).p_correct(instances)``
  applies the stored model on the fly (committed shards are never rewritten); ``CalibratedStore`` is a
  run store whose rows carry the ``p_correct`` score column, so filters and exports can threshold it.
"""
from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..atomic import write_bytes_atomic, write_json_atomic
from ..errors import ConfigError, ExportError, ValidationError
from ..store.run_store import RunStore
from ..structures.instances import Instances
from ..structures.rows import Row
from .verdicts import ImageVerdicts, read_verdicts

CALIBRATION_FORMAT = "labelgen-calibration/1"
P_CORRECT = "p_correct"
METHODS = ("isotonic", "logistic")
THRESHOLDS = np.round(np.linspace(0.0, 1.0, 201), 3)  # p_correct thresholds of the curve
GRID = 1000  # run summary: score columns rounded to 1/GRID
ECE_BINS = 10
_EPS = 1e-6
POOLED = "pooled"


# -- fits ------------------------------------------------------------------------------------------
def pav(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic (non-decreasing) least-squares fit of ``y`` on ``x`` by pool-adjacent-violators.

    Returns ``(knots_x, knots_y)``: per pooled block its weighted mean ``x`` and value, both increasing
    (``knots_y`` non-decreasing); predict with ``np.interp``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, np.float64)
    order = np.argsort(x, kind="mergesort")
    x, y, w = x[order], y[order], w[order]
    # ties in x form one starting block
    ux, start = np.unique(x, return_index=True)
    wsum = np.add.reduceat(w, start)
    ysum = np.add.reduceat(w * y, start)
    xsum = np.add.reduceat(w * x, start)
    vals, weights, xs = [], [], []
    for i in range(len(ux)):
        v, wt, xx = ysum[i] / wsum[i], wsum[i], xsum[i]
        while vals and vals[-1] >= v:
            pv, pw, px = vals.pop(), weights.pop(), xs.pop()
            v = (pv * pw + v * wt) / (pw + wt)
            wt, xx = pw + wt, px + xx
        vals.append(v), weights.append(wt), xs.append(xx)
    knots_y = np.array(vals)
    knots_x = np.array(xs) / np.array(weights)
    return knots_x, knots_y


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def fit_logistic(scores: np.ndarray, y: np.ndarray, ridge: float = 1e-2, iterations: int = 50) -> np.ndarray:
    """Coefficients ``[intercept, b_1..b_k]`` of P(y=1) = sigmoid(a + sum b_j logit(score_j)), by Newton's
    method with a small L2 penalty on the slopes (finite when the classes separate)."""
    X = np.column_stack([np.ones(len(y)), _logit(scores)])
    y = np.asarray(y, np.float64)
    beta = np.zeros(X.shape[1])
    penalty = np.full(X.shape[1], ridge)
    penalty[0] = 1e-6
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(X @ beta, -35, 35)))
        grad = X.T @ (p - y) + penalty * beta
        hess = (X * (p * (1 - p))[:, None]).T @ X + np.diag(penalty)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.max(np.abs(step)) < 1e-9:
            break
    return beta


def _predict_one(fit: Mapping[str, Any], scores: np.ndarray) -> np.ndarray:
    if fit["method"] == "isotonic":
        return np.interp(scores[:, 0], fit["x"], fit["y"])
    beta = np.asarray(fit["coef"], np.float64)
    z = beta[0] + _logit(scores) @ beta[1:]
    return 1 / (1 + np.exp(-np.clip(z, -35, 35)))


def _fit_one(method: str, scores: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    if method == "isotonic":
        kx, ky = pav(scores[:, 0], y)
        return {"method": "isotonic", "x": kx.tolist(), "y": ky.tolist()}
    return {"method": "logistic", "coef": fit_logistic(scores, y).tolist()}


@dataclass(frozen=True)
class Calibrator:
    """P(correct | score columns, class): one fit per class in ``per_class``, the pooled fit for the rest."""

    method: str
    columns: tuple[str, ...]
    pooled: Mapping[str, Any]
    per_class: Mapping[int, Mapping[str, Any]]

    def predict(self, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """``scores``: ``(N, len(columns))``; ``classes``: ``(N,)`` class ids (-1: none)."""
        scores = np.asarray(scores, np.float64).reshape(len(classes), len(self.columns))
        out = _predict_one(self.pooled, scores) if len(classes) else np.zeros(0)
        for cid, fit in self.per_class.items():
            mask = classes == cid
            if mask.any():
                out[mask] = _predict_one(fit, scores[mask])
        return np.clip(out, 0.0, 1.0)

    def p_correct(self, instances: Instances) -> np.ndarray:
        """``p_correct`` of every label of ``instances`` (float32), from its scores on the run summary's grid
        (clipped to [0, 1], rounded to 1/GRID), so a threshold keeps exactly the labels the estimate counted."""
        scores, classes = instance_features(instances, self.columns)
        return self.predict(on_grid(scores), classes).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "columns": list(self.columns), "pooled": dict(self.pooled),
                "per_class": {str(k): dict(v) for k, v in sorted(self.per_class.items())}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Calibrator":
        return cls(data["method"], tuple(data["columns"]), data["pooled"],
                   {int(k): v for k, v in data.get("per_class", {}).items()})


def fit_calibrator(scores: np.ndarray, y: np.ndarray, classes: np.ndarray, *, method: str = "isotonic",
                   columns: Sequence[str] = ("confidence",), min_class_labels: int = 50,
                   own_classes: Iterable[int] | None = None) -> Calibrator:
    """Fit P(y=1 | scores) pooled over all labels, and separately for each class with at least
    ``min_class_labels`` labels of which some are correct and some not (or exactly ``own_classes``)."""
    if method not in METHODS:
        raise ConfigError(f"calibration method must be one of {METHODS}; got {method!r}")
    scores = np.asarray(scores, np.float64).reshape(len(y), len(columns))
    y, classes = np.asarray(y, np.float64), np.asarray(classes)
    if method == "isotonic" and len(columns) != 1:
        raise ConfigError(f"isotonic calibration uses one score column; got {list(columns)}. Use --method"
                          " logistic for several columns, or pass one with --columns")
    if not len(y):
        raise ValidationError("no reviewed labels to calibrate on: the review sample has no labels")
    if own_classes is None:
        own_classes = choose_own_classes(y, classes, min_class_labels)
    per_class = {}
    for cid in own_classes:
        mask = classes == cid
        if mask.any():
            per_class[int(cid)] = _fit_one(method, scores[mask], y[mask])
    return Calibrator(method, tuple(columns), _fit_one(method, scores, y), per_class)


def choose_own_classes(y: np.ndarray, classes: np.ndarray, min_class_labels: int) -> list[int]:
    """Classes with enough reviewed labels (both outcomes present) for a fit of their own."""
    own = []
    for cid in np.unique(classes):
        mask = classes == cid
        if cid >= 0 and mask.sum() >= min_class_labels and 0 < y[mask].sum() < mask.sum():
            own.append(int(cid))
    return own


def on_grid(scores: np.ndarray) -> np.ndarray:
    """Scores clipped to [0, 1] and rounded to 1/GRID: what the run summary and ``p_correct`` use."""
    return np.round(np.clip(scores, 0.0, 1.0) * GRID) / GRID


def instance_features(instances: Instances, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (N, k) float64, class ids (N,) int, -1 when class-agnostic)`` of ``instances``."""
    missing = [c for c in columns if c not in instances.scores]
    if missing:
        raise ValidationError(f"the labels have no score column {missing} (they have {sorted(instances.scores)});"
                              " calibrate on columns every label has (--columns)")
    n = len(instances)
    scores = np.column_stack([np.asarray(instances.scores[c], np.float64) for c in columns]) if n else \
        np.zeros((0, len(columns)))
    classes = np.full(n, -1, np.int64) if instances.class_ids is None else instances.class_ids.astype(np.int64)
    return scores, classes


# -- calibration metrics -----------------------------------------------------------------------------
def reliability(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per equal-width bin of ``p``: ``{"low", "high", "count", "mean_p", "fraction_correct"}``."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    which = np.minimum((np.clip(p, 0, 1) * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out.append({"low": b / bins, "high": (b + 1) / bins, "count": n,
                    "mean_p": float(p[mask].mean()) if n else None,
                    "fraction_correct": float(y[mask].mean()) if n else None})
    return out


def ece(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width bins of (share of labels) * |mean p - fraction correct|."""
    total = len(y)
    if not total:
        return float("nan")
    return float(sum(b["count"] / total * abs(b["mean_p"] - b["fraction_correct"])
                     for b in reliability(p, y, bins) if b["count"]))


# -- the sample and the run ------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """The reviewed labels: scores ``(n, k)``, outcome ``y``, class, and which sampled image (``image``,
    index into ``missed``, the objects missed per sampled image)."""

    scores: np.ndarray
    y: np.ndarray
    classes: np.ndarray
    image: np.ndarray
    missed: np.ndarray

    @property
    def images(self) -> int:
        return len(self.missed)


def build_sample(rows: Iterable[Row], verdicts: Sequence[ImageVerdicts], columns: Sequence[str]) -> Sample:
    """Join the verdicts with the run's own rows (by image id; ``index`` into the row's instances).
    A sample tagged ``missing_object`` with no label drawn counts one missed object."""
    order = {v.image_id: i for i, v in enumerate(verdicts)}
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for row in rows:
        i = order.get(row.image.image_id)
        if i is None:
            continue
        if row.instances is None:
            if verdicts[i].labels:
                raise ValidationError(f"reviewed image {row.image.image_id!r} failed in the run; re-pull the review")
            found[i] = (np.zeros((0, len(columns))), np.zeros(0, np.int64))
            continue
        found[i] = instance_features(row.instances, columns)
    parts = []
    for i, v in enumerate(verdicts):
        if i not in found:
            raise ValidationError(f"reviewed image {v.image_id!r} is not in the run; was the sample drawn from"
                                  " another run?")
        scores, classes = found[i]
        for label in v.labels:
            if label.index >= len(classes):
                raise ValidationError(f"reviewed image {v.image_id!r}: label index {label.index} but the run's row"
                                      f" has {len(classes)} labels; re-pull the review")
            parts.append((scores[label.index], int(label.correct), classes[label.index], i))
    missed = np.array([v.missed if v.missed or not v.missing_object_tag else 1 for v in verdicts], np.float64)
    if not parts:
        return Sample(np.zeros((0, len(columns))), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64), missed)
    return Sample(np.array([p[0] for p in parts]), np.array([p[1] for p in parts], np.float64),
                  np.array([p[2] for p in parts], np.int64), np.array([p[3] for p in parts], np.int64), missed)


@dataclass(frozen=True)
class RunSummary:
    """The run's labels as counts per (class, score columns rounded to 1/GRID): flat memory at any size."""

    scores: np.ndarray  # (u, k)
    classes: np.ndarray  # (u,)
    counts: np.ndarray  # (u,)
    images: int  # labelled (ok) images

    @property
    def labels(self) -> int:
        return int(self.counts.sum())


def summarize_run(rows: Iterable[Row], columns: Sequence[str]) -> RunSummary:
    """Stream ``rows`` into a ``RunSummary`` (failed images are not counted)."""
    counts: dict[tuple, int] = {}
    images = 0
    for row in rows:
        if row.instances is None:
            continue
        images += 1
        scores, classes = instance_features(row.instances, columns)
        if not len(classes):
            continue
        q = np.round(np.clip(scores, 0.0, 1.0) * GRID).astype(np.int64)  # as on_grid
        keys, n = np.unique(np.column_stack([classes, q]), axis=0, return_counts=True)
        for key, c in zip(map(tuple, keys.tolist()), n.tolist()):
            counts[key] = counts.get(key, 0) + c
    if not counts:
        return RunSummary(np.zeros((0, len(columns))), np.zeros(0, np.int64), np.zeros(0, np.int64), images)
    keys = np.array(sorted(counts), np.int64)
    return RunSummary(keys[:, 1:] / GRID, keys[:, 0], np.array([counts[tuple(k)] for k in keys.tolist()]), images)


# -- the run's precision and recall -------------------------------------------------------------------
def estimate_curve(sample: Sample, run: RunSummary, calibrator: Calibrator, *, min_class_labels: int = 50,
                   replicates: int = 200, seed: int = 0, thresholds: np.ndarray = THRESHOLDS,
                   level: float = 0.95) -> list[dict[str, Any]]:
    """Per threshold ``t`` on ``p_correct``: labels kept (``p_correct >= t``), estimated precision (mean
    ``p_correct`` of the kept) and recall (estimated correct kept / (estimated correct in the run +
    missed objects per sampled image x run images)), each with a ``level`` bootstrap interval.

    Each replicate resamples the sampled images with replacement, refits the calibrator (same
    per-class structure), re-estimates the missed rate, and draws the realised outcome of the kept
    labels (binomial per grid cell), so the interval is for the precision the kept labels will turn
    out to have, not only for its expectation."""
    p_hat = calibrator.predict(run.scores, run.classes)
    order = np.argsort(-p_hat, kind="mergesort")
    p_sorted, counts = p_hat[order], run.counts[order].astype(np.float64)
    # kept prefix length per threshold: p_sorted is decreasing
    prefix = np.searchsorted(-p_sorted, -np.asarray(thresholds), side="right")
    kept = np.concatenate([[0], np.cumsum(counts)])[prefix]
    correct = np.concatenate([[0], np.cumsum(counts * p_sorted)])[prefix]
    missed_rate = sample.missed.mean() if sample.images else 0.0
    total_correct = float((counts * p_sorted).sum())
    missed_run = missed_rate * run.images
    precision = np.where(kept > 0, correct / np.maximum(kept, 1), np.nan)
    denom = total_correct + missed_run
    recall = correct / denom if denom > 0 else np.full(len(kept), np.nan)

    rng = np.random.default_rng(seed)
    own = list(calibrator.per_class)
    boot_p = np.full((replicates, len(thresholds)), np.nan)
    boot_r = np.full((replicates, len(thresholds)), np.nan)
    by_image = [np.flatnonzero(sample.image == i) for i in range(sample.images)]
    run_scores, run_classes = run.scores[order], run.classes[order]
    for b in range(replicates):
        pick = rng.integers(0, sample.images, sample.images)
        idx = np.concatenate([by_image[i] for i in pick]) if len(pick) else np.zeros(0, np.int64)
        if not len(idx):
            continue
        fit = fit_calibrator(sample.scores[idx], sample.y[idx], sample.classes[idx], method=calibrator.method,
                             columns=calibrator.columns, own_classes=own)
        p_b = fit.predict(run_scores, run_classes)
        # the replicate's estimator (its own fit selects its own kept set) against the bootstrap world's
        # truth (the full fit p_sorted), whose labels turn out correct at random
        order_b = np.argsort(-p_b, kind="mergesort")
        prefix_b = np.searchsorted(-p_b[order_b], -np.asarray(thresholds), side="right")
        counts_b = counts[order_b]
        kept_b = np.concatenate([[0], np.cumsum(counts_b)])[prefix_b]
        est_b = np.concatenate([[0], np.cumsum(counts_b * p_b[order_b])])[prefix_b]
        realised = rng.binomial(counts_b.astype(np.int64), p_sorted[order_b]).astype(np.float64)
        real_b = np.concatenate([[0], np.cumsum(realised)])[prefix_b]
        with np.errstate(invalid="ignore", divide="ignore"):
            boot_p[b] = np.where(kept_b > 0, (est_b - real_b) / np.maximum(kept_b, 1), np.nan)
            est_denom = (counts_b * p_b[order_b]).sum() + sample.missed[pick].mean() * run.images
            real_denom = realised.sum() + missed_run
            boot_r[b] = est_b / est_denom - real_b / real_denom if est_denom > 0 and real_denom > 0 else np.nan
    tail = (1 - level) / 2 * 100
    curve = []
    for j, t in enumerate(thresholds):
        row = {"threshold": float(t), "kept": int(kept[j]), "estimated_correct": _num(correct[j]),
               "precision": _num(precision[j]), "recall": _num(recall[j])}
        for key, boot in (("precision", boot_p[:, j]), ("recall", boot_r[:, j])):
            finite = boot[np.isfinite(boot)]
            lo, hi = (np.percentile(finite, [tail, 100 - tail]) if len(finite) and kept[j] > 0 else (np.nan, np.nan))
            if kept[j] > 0 and row[key] is not None:  # estimate minus the bootstrap's error quantiles
                lo, hi = np.clip([row[key] - hi, row[key] - lo], 0.0, 1.0)
            row[f"{key}_low"], row[f"{key}_high"] = _num(lo), _num(hi)
        curve.append(row)
    return curve


def _num(value: float) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else round(float(value), 6)


def threshold_for(curve: Sequence[Mapping[str, Any]], target: float) -> Mapping[str, Any] | None:
    """The curve point keeping the most labels whose estimated precision reaches ``target`` (``None``: none)."""
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"target precision must be in (0, 1]; got {target!r}")
    best = None
    for point in curve:
        if point["kept"] > 0 and point["precision"] is not None and point["precision"] >= target:
            if best is None or point["kept"] > best["kept"]:
                best = point
    return best


def out_of_fold(sample: Sample, method: str, columns: Sequence[str], min_class_labels: int,
                folds: int = 5, seed: int = 0) -> np.ndarray:
    """``p_correct`` of every sampled label from a fit on the other folds of images (honest ECE)."""
    if sample.images < folds:
        fit = fit_calibrator(sample.scores, sample.y, sample.classes, method=method, columns=columns,
                             min_class_labels=min_class_labels)
        return fit.predict(sample.scores, sample.classes)
    fold_of_image = np.random.default_rng(seed).permutation(sample.images) % folds
    fold = fold_of_image[sample.image]
    out = np.zeros(len(sample.y))
    for f in range(folds):
        test = fold == f
        if not test.any() or test.all():
            continue
        fit = fit_calibrator(sample.scores[~test], sample.y[~test], sample.classes[~test], method=method,
                             columns=columns, min_class_labels=min_class_labels)
        out[test] = fit.predict(sample.scores[test], sample.classes[test])
    return out


# -- a run ---------------------------------------------------------------------------------------------
def calibration_paths(run_dir: str | Path, name: str) -> tuple[Path, Path]:
    folder = Path(run_dir) / "calibration"
    return folder / f"{name}.json", folder / f"{name}.png"


def calibrate_run(run_dir: str | Path, reviewed: str, *, name: str | None = None, method: str = "logistic",
                  columns: Sequence[str] = ("confidence",), target: float = 0.9, min_class_labels: int = 50,
                  replicates: int = 200, seed: int = 0) -> dict[str, Any]:
    """Fit the calibration of the run at ``run_dir`` on the verdicts of ``RUN_DIR/reviewed/REVIEWED``;
    write ``RUN_DIR/calibration/NAME.json`` (NAME defaults to REVIEWED) and ``NAME.png``; return the JSON."""
    from ..postprocess.filter_store import _check_name

    name = name or reviewed
    _check_name(name)
    threshold_for([], target)  # validates target
    columns = tuple(columns)
    store = RunStore(run_dir)
    run_id = store.manifest().get("run_id")
    verdicts = read_verdicts(store.root, reviewed)
    if not verdicts:
        raise ValidationError(f"reviewed copy {reviewed!r} has no sampled images in its verdicts")
    sample = build_sample(store.iter_rows(), verdicts, columns)
    if not len(sample.y):
        raise ValidationError(f"review sample {reviewed!r} holds no labels to calibrate on")
    run = summarize_run(store.iter_rows(), columns)
    calibrator = fit_calibrator(sample.scores, sample.y, sample.classes, method=method, columns=columns,
                                min_class_labels=min_class_labels)
    curve = estimate_curve(sample, run, calibrator, replicates=replicates, seed=seed)
    oof = out_of_fold(sample, method, columns, min_class_labels, seed=seed)
    raw = np.clip(sample.scores[:, 0], 0, 1)
    chosen = threshold_for(curve, target)
    data = {
        "format": CALIBRATION_FORMAT, "name": name, "run_id": run_id, "reviewed": reviewed,
        "method": method, "columns": list(columns), "min_class_labels": min_class_labels,
        "model": calibrator.to_dict(),
        "sample": {"images": sample.images, "labels": int(len(sample.y)), "correct": int(sample.y.sum()),
                   "missed": float(sample.missed.sum()),
                   "classes_with_own_fit": sorted(calibrator.per_class)},
        "ece": {"raw": ece(raw, sample.y), "calibrated": ece(oof, sample.y), "bins": ECE_BINS,
                "raw_column": columns[0],
                "calibrated_is": "out of fold: each sampled label scored by a fit on the other 4 of 5 folds of images"},
        "reliability": {"raw": reliability(raw, sample.y), "calibrated": reliability(oof, sample.y)},
        "run": {"images": run.images, "labels": run.labels,
                "estimated_correct": _num(float((calibrator.predict(run.scores, run.classes) * run.counts).sum())),
                "estimated_missed": _num(sample.missed.mean() * run.images)},
        "bootstrap": {"replicates": replicates, "seed": seed, "level": 0.95, "over": "sampled images"},
        "target_precision": target,
        "threshold": None if chosen is None else dict(chosen),
        "curve": curve,
    }
    json_path, png_path = calibration_paths(store.root, name)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(png_path, plot_calibration(data), "calibration plot")
    write_json_atomic(json_path, data, "calibration")
    return data


def plot_calibration(data: Mapping[str, Any]) -> bytes:
    """PNG: reliability (raw vs calibrated, ECE in the legend) and the run's precision/recall by threshold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for key, label in (("raw", f"raw {data['ece']['raw_column']}"), ("calibrated", P_CORRECT)):
        pts = [(b["mean_p"], b["fraction_correct"]) for b in data["reliability"][key] if b["count"]]
        if pts:
            left.plot(*zip(*pts), marker="o", label=f"{label} (ECE {data['ece'][key]:.3f})")
    left.set(xlabel="predicted probability", ylabel="fraction correct", xlim=(0, 1), ylim=(0, 1),
             title=f"reliability ({data['sample']['labels']} reviewed labels)")
    left.legend(loc="upper left")
    curve = [p for p in data["curve"] if p["kept"] > 0]
    t = np.array([p["threshold"] for p in curve])
    for key in ("precision", "recall"):
        mid = np.array([np.nan if p[key] is None else p[key] for p in curve], float)
        lo = np.array([np.nan if p[f"{key}_low"] is None else p[f"{key}_low"] for p in curve], float)
        hi = np.array([np.nan if p[f"{key}_high"] is None else p[f"{key}_high"] for p in curve], float)
        line, = right.plot(t, mid, label=key)
        right.fill_between(t, lo, hi, alpha=0.25, color=line.get_color())
    right.axhline(data["target_precision"], color="grey", lw=0.8, ls=":")
    if data["threshold"] is not None:
        right.axvline(data["threshold"]["threshold"], color="grey", lw=0.8, ls="--")
    right.set(xlabel=f"threshold on {P_CORRECT}", ylim=(0, 1.02), xlim=(0, 1),
              title=f"whole run ({data['run']['labels']} labels), 95% intervals")
    right.legend(loc="lower left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


# -- reading it back -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """A stored calibration: ``p_correct(instances)``, the run curve and ``select(target)``."""

    data: Mapping[str, Any]
    calibrator: Calibrator

    @property
    def name(self) -> str:
        return self.data["name"]

    def p_correct(self, instances: Instances) -> np.ndarray:
        return self.calibrator.p_correct(instances)

    def select(self, target: float) -> dict[str, Any]:
        """What ``--min-precision target`` keeps: the threshold on ``p_correct``, the estimate and its interval.
        ``ConfigError`` when no threshold reaches the target."""
        point = threshold_for(self.data["curve"], target)
        if point is None:
            best = max((p["precision"] for p in self.data["curve"] if p["precision"] is not None), default=None)
            raise ConfigError(f"no threshold reaches an estimated precision of {target} with calibration"
                              f" {self.name!r} (the best is {best}); lower --min-precision, or review more")
        return {"calibration": self.name, "target_precision": target, "column": P_CORRECT,
                "threshold": point["threshold"], "kept_labels_estimated": point["kept"],
                "estimated_precision": point["precision"],
                "precision_interval": [point["precision_low"], point["precision_high"]],
                "estimated_recall": point["recall"], "recall_interval": [point["recall_low"], point["recall_high"]],
                "interval_level": 0.95}


def load_calibration(run_dir: str | Path, name: str) -> Calibration:
    """The calibration ``RUN_DIR/calibration/NAME.json`` written by ``labelgen calibrate``."""
    import json

    path, _ = calibration_paths(run_dir, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no calibration {name!r} in {run_dir} (expected {path}); run"
                          f" `labelgen calibrate {run_dir} --reviewed NAME` first") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not a calibration JSON ({exc}); re-run `labelgen calibrate`") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise ConfigError(f"{path} is not a {CALIBRATION_FORMAT} file; re-run `labelgen calibrate`")
    run_id = RunStore(run_dir).manifest().get("run_id")
    if data.get("run_id") != run_id:
        raise ConfigError(f"calibration {name!r} was fitted on run {data.get('run_id')}, not {run_id}")
    return Calibration(data, Calibrator.from_dict(data["model"]))


def with_p_correct(row: Row, calibration: Calibration) -> Row:
    """``row`` with the ``p_correct`` score column added (a failed row unchanged)."""
    if row.instances is None:
        return row
    scores = {**row.instances.scores, P_CORRECT: calibration.p_correct(row.instances)}
    return row.with_instances(dataclasses.replace(row.instances, scores=scores))


class CalibratedStore:
    """A ``RunStore`` whose run rows carry ``p_correct`` (computed on the fly; nothing is rewritten).
    Everything but ``iter_rows`` / ``iter_committed`` / ``read_rows`` is the wrapped store's."""

    def __init__(self, store: RunStore, calibration: Calibration):
        self._store, self.calibration = store, calibration

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def iter_rows(self, *args: Any, **kwargs: Any) -> Iterator[Row]:
        for row in self._store.iter_rows(*args, **kwargs):
            yield with_p_correct(row, self.calibration)

    def iter_committed(self, *args: Any, **kwargs: Any) -> Iterator[tuple[Any, dict, list[Row]]]:
        for shard, done, rows in self._store.iter_committed(*args, **kwargs):
            yield shard, done, [with_p_correct(row, self.calibration) for row in rows]

    def read_rows(self, *args: Any, **kwargs: Any) -> list[Row]:
        return [with_p_correct(row, self.calibration) for row in self._store.read_rows(*args, **kwargs)]


def min_precision_filter(run_dir: str | Path, calibration_name: str | None, target: float,
                         config: Any = None) -> tuple[CalibratedStore, Any, dict[str, Any]]:
    """``(store, filter config, selection)`` for ``--min-precision target --calibration NAME``: the run's
    store with ``p_correct``, a ``FilterConfig`` keeping ``p_correct >= threshold``, and ``Calibration.select``.
    Other filter options are refused: the estimate is for the threshold alone."""
    from ..postprocess.filter_config import FilterConfig

    if not calibration_name:
        raise ConfigError("--min-precision needs --calibration NAME (fit one with `labelgen calibrate RUN"
                          " --reviewed NAME`)")
    if config is not None and config != FilterConfig():
        raise ConfigError("--min-precision cannot be combined with other filter options: its precision estimate"
                          " is for the p_correct threshold alone. Drop the other options")
    store = RunStore(run_dir)
    calibration = load_calibration(store.root, calibration_name)
    selection = calibration.select(target)
    config = FilterConfig(confidence_column=P_CORRECT, min_confidence=float(selection["threshold"]))
    return CalibratedStore(store, calibration), config, selection


def record_in_export_report(out_dir: str | Path, selection: Mapping[str, Any]) -> Path | None:
    """Add ``"precision_target": selection`` to ``OUT/export_report.json`` (``None`` if there is none)."""
    import json

    path = Path(out_dir) / "export_report.json"
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ExportError(f"{path} is not JSON ({exc}); re-run the export") from None
    report["precision_target"] = dict(selection)
    write_json_atomic(path, report, "export report")
    return path


__all__ = ["CALIBRATION_FORMAT", "P_CORRECT", "CalibratedStore", "Calibration", "Calibrator", "RunSummary",
           "Sample", "build_sample", "calibrate_run", "ece", "estimate_curve", "fit_calibrator", "fit_logistic",
           "load_calibration", "min_precision_filter", "pav", "record_in_export_report", "reliability",
           "summarize_run", "threshold_for", "with_p_correct"]
