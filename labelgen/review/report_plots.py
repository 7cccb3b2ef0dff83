"""The plots of ``labelgen report``: each function takes a part of ``report_stats`` and returns PNG bytes.

Figures are drawn on an explicit Agg canvas (``FigureCanvasAgg``) inside each function: no pyplot,
no global backend switch, no display needed, and nothing happens at import time. Text that comes
from the run (class names, failure reasons) is drawn as plain text: ``$`` is escaped so matplotlib
never parses it as mathtext.
"""
from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

MAX_BARS = 40  # classes / reasons shown in one bar chart (most frequent); the rest are summed in the title
_BAR_COLOUR = "#3b6ea5"
_EMPTY_COLOUR = "#999999"


def score_histograms_png(scores: Mapping[str, Mapping[str, Any]]) -> bytes:
    """One small multiple per score column: counts in fixed bins over [0, 1]."""
    names = sorted(scores)
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = _figure(4.2 * cols, 2.6 * rows, rows, cols)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    if not names:
        _note(axes[0], "no score columns (no instances)")
    for ax, name in zip(axes, names):
        column = scores[name]
        edges = np.asarray(column["edges"])
        ax.bar(edges[:-1], column["counts"], width=np.diff(edges), align="edge", color=_BAR_COLOUR,
               edgecolor="white", linewidth=0.5)
        extra = f", {column['out_of_range']} outside [0, 1] (clipped)" if column["out_of_range"] else ""
        ax.set_title(f"{_plain(name)}  (n={column['count']}{extra})", fontsize=9)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel("score", fontsize=8)
        ax.set_ylabel("instances", fontsize=8)
    return _png(fig)


def instances_per_image_png(histogram: Mapping[int, int]) -> bytes:
    """Bars: how many labelled images have k instances."""
    fig, (ax,) = _figure(6, 3.2)
    if not histogram:
        _note(ax, "no labelled images")
    else:
        ks = sorted(histogram)
        ax.bar(ks, [histogram[k] for k in ks], width=0.9, color=_BAR_COLOUR)
        ax.set_xlim(-0.6, max(ks) + 0.6)  # counts start at 0: always show where 0 is
        ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("instances in the image")
    ax.set_ylabel("labelled images")
    return _png(fig)


def mask_areas_png(areas: Mapping[str, Any]) -> bytes:
    """Log-x histogram of mask area as a fraction of the image area (empty masks noted)."""
    fig, (ax,) = _figure(6, 3.2)
    edges = np.asarray(areas["edges"])
    ax.bar(edges[:-1], areas["counts"], width=np.diff(edges), align="edge", color=_BAR_COLOUR,
           edgecolor="white", linewidth=0.5)
    ax.set_xscale("log")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("mask area / image area (log scale)")
    ax.set_ylabel("instances")
    if areas["empty"]:
        ax.set_title(f"{areas['empty']} empty masks (area 0) not shown", fontsize=9)
    if not sum(areas["counts"]):
        _note(ax, "no non-empty masks")
    return _png(fig)


def labels_per_class_png(labels: Mapping[str, int]) -> bytes:
    """Horizontal bars, one per class (most frequent first)."""
    return _bars(labels, "instances", "no labels", ascending=False)


def failures_png(reasons: Mapping[str, int]) -> bytes:
    """Horizontal bars, one per failure reason; a "no failures" note when there are none."""
    return _bars(reasons, "images", "no failures", ascending=False)


def throughput_png(shards: Sequence[Mapping[str, Any]]) -> bytes:
    """Images per busy second of each done shard, in shard order."""
    fig, (ax,) = _figure(6, 3.2)
    points = [(s["shard"], s["images_per_second"]) for s in shards if s["images_per_second"] is not None]
    if not points:
        _note(ax, "no done shards with timings")
    elif len(points) <= 100:
        ax.bar(range(len(points)), [v for _, v in points], color=_BAR_COLOUR)  # even spacing, shard labels
        ticks = range(0, len(points), max(1, len(points) // 10))
        ax.set_xticks(list(ticks), [str(points[t][0]) for t in ticks])
    else:
        ax.plot([i for i, _ in points], [v for _, v in points], color=_BAR_COLOUR, linewidth=0.8)
    ax.set_xlabel("shard")
    ax.set_ylabel("images / s (busy time)")
    return _png(fig)


# -- helpers ----------------------------------------------------------------------------
def _bars(counts: Mapping[str, int], xlabel: str, empty_note: str, ascending: bool) -> bytes:
    items = sorted(counts.items(), key=lambda kv: (kv[1] if ascending else -kv[1], kv[0]))
    rest, items = items[MAX_BARS:], items[:MAX_BARS]
    fig, (ax,) = _figure(6, max(2.2, 0.9 + 0.24 * len(items)))
    if rest:
        ax.set_title(f"top {len(items)} of {len(items) + len(rest)}; the other {len(rest)} have"
                     f" {sum(v for _, v in rest)} {xlabel} in all", fontsize=9)
    if not items:
        _note(ax, empty_note)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        labels = [_plain(name) for name, _ in items][::-1]
        values = [value for _, value in items][::-1]
        ax.barh(range(len(items)), values, color=_BAR_COLOUR)
        ax.set_yticks(range(len(items)), labels, fontsize=8)
        ax.xaxis.set_major_locator(_integer_ticks())
        for y, value in enumerate(values):
            ax.text(value, y, f" {value}", va="center", fontsize=7)
    ax.set_xlabel(xlabel)
    return _png(fig)


def _figure(width_in: float, height_in: float, rows: int = 1, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    return fig, axes


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _png(fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color=_EMPTY_COLOUR, fontsize=12)


def _plain(text: str, limit: int = 32) -> str:
    """Run text for matplotlib: shortened, ``$`` escaped (no mathtext)."""
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")
