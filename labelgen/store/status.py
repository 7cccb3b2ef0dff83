"""Summaries of a run directory, for ``labelgen status``. Reads only; takes no lock."""
from __future__ import annotations

import collections
import datetime as dt
from pathlib import Path
from typing import Any

from .run_store import RunStore


def run_status(root: str | Path, verify: bool = False) -> dict[str, Any]:
    """Counts of shards, images, instances and failures; throughput from the done records."""
    store = RunStore(root)
    manifest = store.manifest()
    done, failed_shards, corrupt, reasons = [], [], [], collections.Counter()
    total_shards = planned_images = 0
    for shard in store.iter_plan():
        total_shards += 1
        planned_images += len(shard.images)
        state = store.shard_state(shard, manifest["fingerprint"], verify=verify)
        if state.record is not None:
            record = {k: v for k, v in state.record.items() if k != "failures"}  # flat memory: counts only
            done.append(record)
            reasons.update(record.get("failure_reasons", {}))
        elif state.state == "corrupt":
            corrupt.append({"shard": shard.index, "problem": state.problem})
        elif store.shard_error_record(shard.index) is not None:
            failed_shards.append(shard.index)
    return {
        "run_dir": str(store.root),
        "run_id": manifest.get("run_id"),
        "generator": manifest.get("generator"),
        "created": manifest.get("created"),
        "shards": {"total": total_shards, "done": len(done), "failed": len(failed_shards), "corrupt": len(corrupt),
                   "pending": total_shards - len(done) - len(failed_shards) - len(corrupt),
                   "failed_indices": failed_shards},
        "corrupt": corrupt,
        "verified": verify,
        "images": {"planned": planned_images, "done": sum(d["images"] for d in done),
                   "ok": sum(d["ok"] for d in done), "failed": sum(d["failed"] for d in done)},
        "instances": sum(d["instances"] for d in done),
        "failures_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "throughput": _throughput(done),
        "random_weights": any(_random_weights(d.get("provenance", {})) for d in done),
    }


def _random_weights(provenance: dict[str, Any]) -> bool:
    labeler = provenance.get("labeler")
    return bool(provenance.get("random_weights") or (isinstance(labeler, dict) and labeler.get("random_weights")))


def _throughput(done: list[dict[str, Any]]) -> dict[str, float | None]:
    images = sum(d["images"] for d in done)
    busy = sum(d.get("seconds", 0.0) for d in done)
    if not done:
        return {"images_per_second": None, "images_per_worker_second": None}
    start = min(dt.datetime.fromisoformat(d["started"]) for d in done)
    end = max(dt.datetime.fromisoformat(d["finished"]) for d in done)
    span = (end - start).total_seconds()
    return {
        "images_per_second": round(images / span, 3) if span > 0 else None,
        "images_per_worker_second": round(images / busy, 3) if busy > 0 else None,
    }


def format_status(status: dict[str, Any]) -> str:
    shards, images, tp = status["shards"], status["images"], status["throughput"]
    lines = [
        f"run       {status['run_dir']}  (id {status['run_id']}, generator {status['generator']})",
        f"shards    {shards['done']} done, {shards['pending']} pending, {shards['failed']} failed,"
        + (f" {shards['corrupt']} CORRUPT," if shards.get("corrupt") else "") + f" of {shards['total']}",
        f"images    {images['done']} of {images['planned']} processed: {images['ok']} labelled, {images['failed']} failed",
        f"instances {status['instances']}"
        + (f"  ({status['instances'] / images['ok']:.2f} per labelled image)" if images["ok"] else ""),
    ]
    if status["failures_by_reason"]:
        lines.append("failures  " + ", ".join(f"{r}: {n}" for r, n in status["failures_by_reason"].items()))
    if status.get("verified"):
        lines.append(f"verified  {shards['done']} committed shards re-hashed: "
                     + (f"{shards['corrupt']} do not verify" if shards.get("corrupt") else "all verify"))
    for item in status.get("corrupt", [])[:20]:
        lines.append(f"CORRUPT   shard {item['shard']:06d}: {item['problem']}")
    if status.get("corrupt"):
        lines.append("          `labelgen run` with the same command moves corrupt shards to corrupt/ and redoes them")
    if shards["failed_indices"]:
        lines.append(f"failed shards (see shards/NNNNNN.error.json): {shards['failed_indices'][:20]}")
    if status.get("random_weights"):
        lines.append("WARNING   made with RANDOM WEIGHTS (smoke test): these labels are meaningless")
    if tp["images_per_second"] is not None or tp["images_per_worker_second"] is not None:
        lines.append(
            f"throughput {_fmt(tp['images_per_second'])} images/s (first to last shard),"
            f" {_fmt(tp['images_per_worker_second'])} images/s per busy worker"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
