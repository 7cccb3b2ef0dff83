"""``labelgen report``: one self-contained HTML page describing a run directory. No torch.

The page holds a header (identity, status numbers, a random-weights warning), six plots and a
contact sheet of sample images with their masks, boxes, classes and confidences drawn on. Every
image is an embedded ``data:`` URI and the page has no scripts, external styles or fonts, so it
works offline and can be mailed around. Every string taken from the run is ``html.escape``d.

Streaming, bounded memory: the statistics come from ONE pass over ``RunStore.iter_rows`` and keep
only fixed-size accumulators, whatever the size of the run:

* scores: per score column, counts in ``SCORE_BINS`` fixed bins over [0, 1] (values outside are
  clipped into the end bins and counted in ``out_of_range``), plus count / min / max / sum;
* mask areas: counts in ``AREA_EDGES`` log-spaced bins of ``area / (height * width)`` (fractions
  below the first edge go in the first bin; empty masks are counted apart);
* instances per image, labels per class, failures per reason: counters (keys bounded by the
  largest instance count, the vocabulary and the reason codes);
* contact sheet: a reservoir sample (algorithm R, ``random.Random(seed)``) of ``sample_images``
  labelled rows, so the sample is uniform, needs one pass and is the same for the same seed;
* throughput: one small record per done shard (from the done records, not the rows).
"""
from __future__ import annotations

import base64
import collections
import colorsys
import html
import io
import random
from pathlib import Path
from typing import Any

import numpy as np

from . import report_plots
from ..atomic import write_bytes_atomic
from ..errors import ImageDecodeError, ValidationError
from ..structures.instances import Instances
from ..structures.masks import rle_areas, rles_to_masks
from ..structures.rows import Row
from ..store.status import run_status
from ..store.run_store import RunStore

SCORE_BINS = 20  # fixed bins of width 0.05 over [0, 1]
AREA_EDGES = np.logspace(-6, 0, 31)  # mask area as a fraction of the image area, 5 bins per decade
THUMB_WIDTH = 320  # contact-sheet thumbnail width, pixels
THUMB_MAX_HEIGHT = 400  # taller images are scaled down further
MAX_DRAWN = 100  # instances drawn per thumbnail (highest confidence first)
AGNOSTIC = "(class-agnostic)"


def report_stats(run_dir: str | Path, *, sample_images: int = 12, seed: int = 0) -> dict[str, Any]:
    """The numbers behind the report's plots (one streaming pass, see the module docstring).

    Returns a dict: ``run`` (run_id, generator, class_names, created), ``status``
    (``labelgen.store.status.run_status``), ``images`` (rows / ok / failed), ``instances``,
    ``instances_per_image`` ({k: labelled images with k instances}), ``scores`` ({column: {edges,
    counts, out_of_range, count, min, max, mean}}), ``mask_area_fraction`` ({edges, counts, empty}),
    ``labels_per_class`` ({class name: instances}), ``failures_by_reason``, ``throughput`` (per done
    shard in shard order: shard, images, seconds, images_per_second) and ``sample`` (image ids of
    the contact sheet, in plan order).
    """
    stats, _ = _collect(RunStore(run_dir), sample_images, seed)
    return stats


def build_report(run_dir: str | Path, out_path: str | Path | None = None, *, sample_images: int = 12,
                 seed: int = 0) -> Path:
    """Write the HTML report (default ``RUN_DIR/report.html``) and return its path."""
    store = RunStore(run_dir)
    stats, sample_rows = _collect(store, sample_images, seed)
    class_names = stats["run"]["class_names"]
    plots = [
        ("Scores", report_plots.score_histograms_png(stats["scores"]),
         f"one panel per score column; {SCORE_BINS} fixed bins over [0, 1]"),
        ("Instances per labelled image", report_plots.instances_per_image_png(stats["instances_per_image"]),
         f"{stats['images']['ok']} labelled images"),
        ("Mask areas", report_plots.mask_areas_png(stats["mask_area_fraction"]),
         "mask pixels / image pixels, log-spaced bins"),
        ("Labels per class", report_plots.labels_per_class_png(stats["labels_per_class"]),
         f"{stats['instances']} instances"),
        ("Throughput per shard", report_plots.throughput_png(stats["throughput"]),
         "images / busy second of each done shard (done record `seconds`), in shard order"),
        ("Failures by reason", report_plots.failures_png(stats["failures_by_reason"]),
         f"{stats['images']['failed']} failed images"),
    ]
    cards = [_contact_card(row, class_names) for row in sample_rows]
    page = _render_page(stats, plots, cards, seed, diffs=_diffs_section(store.root))
    out = Path(out_path) if out_path is not None else store.root / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, page.encode("utf-8"), "report")
    return out


# -- one streaming pass ----------------------------------------------------------------
class _Accumulator:
    """Fixed-size statistics of the rows seen so far, plus the reservoir sample."""

    def __init__(self, class_names: list[str] | None, sample_images: int, seed: int):
        self.class_names = class_names
        self.rows = self.ok = self.failed = self.instances = 0
        self.per_image: collections.Counter[int] = collections.Counter()
        self.per_class: collections.Counter[str] = collections.Counter()
        self.reasons: collections.Counter[str] = collections.Counter()
        self.scores: dict[str, dict[str, Any]] = {}
        self.area_counts = np.zeros(len(AREA_EDGES) - 1, np.int64)
        self.empty_masks = 0
        self.sample_size, self.rng = sample_images, random.Random(seed)
        self.reservoir: list[tuple[int, Row]] = []

    def add(self, row: Row) -> None:
        self.rows += 1
        instances = row.instances
        if instances is None:
            self.failed += 1
            self.reasons[row.failure.get("reason", "unknown")] += 1
            return
        self._sample(row)
        self.ok += 1
        count = len(instances)
        self.instances += count
        self.per_image[count] += 1
        self._add_classes(None if instances.class_ids is None else instances.class_ids.tolist(), count)
        for name, values in instances.scores.items():
            self._add_scores(name, np.asarray(values, dtype=np.float64))
        if count:
            fractions = rle_areas(instances.masks_rle) / float(instances.height * instances.width)
            self.empty_masks += int(np.count_nonzero(fractions == 0))
            nonzero = np.clip(fractions[fractions > 0], AREA_EDGES[0], AREA_EDGES[-1])
            self.area_counts += np.histogram(nonzero, bins=AREA_EDGES)[0]

    def _sample(self, row: Row) -> None:
        """Algorithm R over labelled rows: row ``i`` replaces a random slot with probability k / (i + 1)."""
        if len(self.reservoir) < self.sample_size:
            self.reservoir.append((self.ok, row))
            return
        slot = self.rng.randrange(self.ok + 1)
        if slot < self.sample_size:
            self.reservoir[slot] = (self.ok, row)

    def _add_classes(self, class_ids: list[int] | None, count: int) -> None:
        if class_ids is None or self.class_names is None:
            self.per_class[AGNOSTIC] += count
        else:
            self.per_class.update(_class_name(self.class_names, i) for i in class_ids)

    def _add_scores(self, name: str, values: np.ndarray) -> None:
        column = self.scores.setdefault(name, {"counts": np.zeros(SCORE_BINS, np.int64), "out_of_range": 0,
                                               "count": 0, "sum": 0.0, "min": None, "max": None})
        if not values.size:
            return
        column["counts"] += np.histogram(np.clip(values, 0.0, 1.0), bins=SCORE_BINS, range=(0.0, 1.0))[0]
        column["out_of_range"] += int(np.count_nonzero((values < 0) | (values > 1)))
        column["count"] += int(values.size)
        column["sum"] += float(values.sum())
        low, high = float(values.min()), float(values.max())
        column["min"] = low if column["min"] is None else min(column["min"], low)
        column["max"] = high if column["max"] is None else max(column["max"], high)

    def to_dict(self) -> dict[str, Any]:
        score_edges = np.linspace(0.0, 1.0, SCORE_BINS + 1).tolist()
        scores = {name: {"edges": score_edges, "counts": c["counts"].tolist(), "out_of_range": c["out_of_range"],
                         "count": c["count"], "min": c["min"], "max": c["max"],
                         "mean": c["sum"] / c["count"] if c["count"] else None}
                  for name, c in sorted(self.scores.items())}
        if self.class_names is not None:
            labels = {name: self.per_class.get(name, 0) for name in self.class_names}
            labels.update(self.per_class)  # ids outside the vocabulary, if any
        else:
            labels = dict(self.per_class) if self.instances else {}
        return {
            "images": {"rows": self.rows, "ok": self.ok, "failed": self.failed},
            "instances": self.instances,
            "instances_per_image": dict(sorted(self.per_image.items())),
            "scores": scores,
            "mask_area_fraction": {"edges": AREA_EDGES.tolist(), "counts": self.area_counts.tolist(),
                                   "empty": self.empty_masks},
            "labels_per_class": labels,
            "failures_by_reason": dict(sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            "sample": [row.image.image_id for _, row in self.sample_rows()],
        }

    def sample_rows(self) -> list[tuple[int, Row]]:
        return sorted(self.reservoir, key=lambda item: item[0])


def _collect(store: RunStore, sample_images: int, seed: int) -> tuple[dict[str, Any], list[Row]]:
    if isinstance(sample_images, bool) or not isinstance(sample_images, int) or sample_images < 0:
        raise ValidationError(f"sample_images must be an int >= 0 (e.g. 12); got {sample_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValidationError(f"seed must be an int (e.g. 0); got {seed!r}")
    manifest = store.manifest()
    status = run_status(store.root)
    acc = _Accumulator(manifest.get("class_names"), sample_images, seed)
    for row in store.iter_rows():
        acc.add(row)
    stats = {
        "run": {**{key: manifest.get(key) for key in ("run_id", "generator", "class_names", "created")},
                "models": _models(store)},
        "status": status,
        **acc.to_dict(),
        "throughput": _shard_throughput(store, manifest["fingerprint"]),
    }
    return stats, [row for _, row in acc.sample_rows()]


def _models(store: RunStore) -> list[str]:
    """The models of the run's generator (and labeler), from its first committed shard's provenance."""
    from .diff import model_names

    for shard in store.iter_plan():
        done = store.done_record(shard)
        if done is not None:
            return model_names(done.get("provenance") or {})
    return []


def _shard_throughput(store: RunStore, fingerprint: str) -> list[dict[str, Any]]:
    shards = []
    for shard in store.iter_plan():
        done = store.done_record(shard, fingerprint)
        if done is None:
            continue
        images, seconds = done.get("images", len(shard.images)), done.get("seconds")
        rate = round(images / seconds, 3) if seconds else None
        shards.append({"shard": shard.index, "images": images, "seconds": seconds, "images_per_second": rate})
    return shards


def _class_name(class_names: list[str], class_id: int) -> str:
    return class_names[class_id] if 0 <= class_id < len(class_names) else f"class {class_id}"


# -- contact sheet ----------------------------------------------------------------------
class _NotShown(Exception):
    """A sampled image that cannot be drawn now; ``reason`` is a decode reason code or ``size_changed``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def _contact_card(row: Row, class_names: list[str] | None) -> str:
    """One ``<figure>``: the overlaid thumbnail, or a placeholder naming why the image can't be shown."""
    image, instances = row.image, row.instances
    count = len(instances)
    caption = f"{_e(image.image_id)}<br>{image.width}×{image.height}, {count} instances"
    if count > MAX_DRAWN:
        caption += f" ({MAX_DRAWN} drawn)"
    try:
        jpeg = _overlay_thumbnail(image.uri, instances, class_names)
    except _NotShown as exc:
        body = f'<div class="placeholder"><b>{_e(exc.reason)}</b><br>{_e(exc.message)}</div>'
        return f'<figure class="card">{body}<figcaption>{caption}</figcaption></figure>'
    body = f'<img alt="{_e(image.image_id)}" src="{_data_uri(jpeg, "image/jpeg")}">'
    return f'<figure class="card">{body}<figcaption>{caption}</figcaption></figure>'


def _overlay_thumbnail(uri: str, instances: Instances, class_names: list[str] | None) -> bytes:
    """JPEG bytes: the image scaled to ``THUMB_WIDTH`` with masks, boxes and labels drawn on."""
    from PIL import Image, ImageDraw, ImageFont

    from ..engine.decode import read_image_rgb

    try:
        rgb, info = read_image_rgb(uri, compute_sha256=False)
    except ImageDecodeError as exc:
        raise _NotShown(exc.reason, str(exc)) from None
    height, width = instances.height, instances.width
    if (info["height"], info["width"]) != (height, width):
        raise _NotShown("size_changed", f"the image is now {info['width']}x{info['height']} but its labels are"
                                        f" for {width}x{height}; was the file replaced?")
    scale = min(THUMB_WIDTH / width, THUMB_MAX_HEIGHT / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR
    thumb = Image.fromarray(rgb).resize(size, resample)
    labels = _instance_labels(instances, class_names)
    order = _draw_order(instances)
    for i in order:  # masks first, so boxes and text stay on top
        mask = rles_to_masks([instances.masks_rle[i]], height, width)[0]
        alpha = Image.fromarray(mask.astype(np.uint8) * 110).resize(size, resample)
        thumb.paste(_colour(i), (0, 0, *size), alpha)
    draw, font = ImageDraw.Draw(thumb), ImageFont.load_default(size=11)
    for i in order:
        x1, y1, x2, y2 = (v * s for v, s in zip(instances.boxes_xyxy[i].tolist(), (scale, scale) * 2))
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=_colour(i), width=2)
        if labels[i]:
            left, top, right, bottom = draw.textbbox((x1 + 2, y1 + 1), labels[i], font=font)
            draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=(0, 0, 0))
            draw.text((x1 + 2, y1 + 1), labels[i], fill=_colour(i), font=font)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _confidence_column(instances: Instances) -> list[float] | None:
    scores = instances.scores
    if "confidence" in scores:
        return scores["confidence"].tolist()
    return scores[sorted(scores)[0]].tolist() if scores else None


def _draw_order(instances: Instances) -> list[int]:
    """Indices of the instances to draw: at most ``MAX_DRAWN``, highest confidence first."""
    count = len(instances)
    confidence = _confidence_column(instances)
    if confidence is None:
        return list(range(min(count, MAX_DRAWN)))
    return sorted(range(count), key=lambda i: (-confidence[i], i))[:MAX_DRAWN]


def _instance_labels(instances: Instances, class_names: list[str] | None) -> list[str]:
    count = len(instances)
    class_ids = None if instances.class_ids is None else instances.class_ids.tolist()
    confidence = _confidence_column(instances)
    labels = []
    for i in range(count):
        parts = []
        if class_ids is not None and class_names is not None:
            parts.append(_class_name(class_names, class_ids[i]))
        if confidence is not None:
            parts.append(f"{confidence[i]:.2f}")
        labels.append(" ".join(parts))
    return labels


def _colour(index: int) -> tuple[int, int, int]:
    """Distinct colours: hues spaced by the golden ratio, saturated and bright."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.8, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


# -- HTML -------------------------------------------------------------------------------
_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 17px; margin: 28px 0 8px; }
table.facts td { padding: 1px 14px 1px 0; vertical-align: top; } table.facts td:first-child { color: #666; }
.warning { background: #fde2e1; border: 2px solid #c0392b; color: #7b1d14; padding: 8px 12px; font-weight: bold; }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 16px; }
.plot { background: white; border: 1px solid #ddd; padding: 8px; margin: 0; }
.plot img { width: 100%; height: auto; } .plot figcaption, .card figcaption { color: #666; font-size: 12px; }
.sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 10px; align-items: start; }
.card { margin: 0; background: white; border: 1px solid #ddd; padding: 5px; }
.card img { display: block; max-width: 100%; }
.placeholder { height: 180px; background: #eee; color: #444; padding: 10px; font-size: 12px; overflow: auto; }
"""


def _diffs_section(root: Path) -> str:
    """``Run diffs``: one table per ``RUN_DIR/diffs/*.json`` (``labelgen diff``); empty without any."""
    from .diff import format_table, read_diffs

    diffs = read_diffs(root)
    if not diffs:
        return ""
    parts = ["<h2>Run diffs</h2>"]
    for name, data in diffs:
        other = data.get("b", {})
        what = other.get("kind", "run") + (f" {other['name']}" if other.get("name") else "")
        parts.append(f"<h3>{_e(name)}</h3><p>against run {_e(other.get('run_id'))} ({_e(what)}),"
                     f" {_e(other.get('run_dir'))}</p><pre>{_e(format_table(data))}</pre>")
    return "\n".join(parts)


def _render_page(stats: dict[str, Any], plots: list[tuple[str, bytes, str]], cards: list[str], seed: int,
                 diffs: str = "") -> str:
    run = stats["run"]
    title = f"labelgen report {run['run_id']}"
    figures = "\n".join(
        f'<figure class="plot"><h2>{_e(name)}</h2><img alt="{_e(name)}" src="{_data_uri(png, "image/png")}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>" for name, png, caption in plots)
    sample_note = (f"{len(cards)} of {stats['images']['ok']} labelled images, reservoir sample with seed {seed}"
                   if cards else "no labelled images to show")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _header(stats),
        '<h2>Plots</h2><div class="plots">', figures, "</div>", diffs,
        f"<h2>Contact sheet</h2><p>{_e(sample_note)}</p>",
        '<div class="sheet">', *cards, "</div>",
        "</body></html>", ""])


def _header(stats: dict[str, Any]) -> str:
    run, status = stats["run"], stats["status"]
    shards, images, tp = status["shards"], status["images"], status["throughput"]
    names = run["class_names"]
    per_image = f" ({status['instances'] / images['ok']:.2f} per labelled image)" if images["ok"] else ""
    facts = [
        ("run directory", status["run_dir"]), ("run id", run["run_id"]), ("generator", run["generator"]),
        ("models", ", ".join(run.get("models") or []) or "none recorded"), ("created", run["created"]),
        ("classes", AGNOSTIC if names is None else f"{len(names)}: " + ", ".join(names)),
        ("shards", f"{shards['done']} done, {shards['pending']} pending, {shards['failed']} failed,"
                   f" of {shards['total']}"),
        ("images", f"{images['done']} of {images['planned']} processed: {images['ok']} labelled,"
                   f" {images['failed']} failed"),
        ("instances", f"{status['instances']}{per_image}"),
        ("failures", ", ".join(f"{r}: {n}" for r, n in status["failures_by_reason"].items()) or "none"),
        ("throughput", f"{_fmt(tp['images_per_second'])} images/s (first to last shard),"
                       f" {_fmt(tp['images_per_worker_second'])} images/s per busy worker"),
    ]
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(str(v))}</td></tr>" for k, v in facts)
    warning = ('<p class="warning">WARNING: made with RANDOM WEIGHTS (smoke test): these labels are meaningless.</p>'
               if status.get("random_weights") else "")
    return f'{warning}<table class="facts">{rows}</table>'


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
