"""Throughput of the Zip generator: 1 vs 2 workers, encoder batch sizes, and the decode/finish overlap.

Real architectures with RANDOM weights (no weight files needed) on real COCO images
(coco128-seg, the first N in name order: mixed sizes, as a real folder has).

* ``workers``: ``labelgen run`` (the real runner, local backend, torch threads = cores / workers)
  on ``--images`` images with 1 and then 2 workers, one image per shard. Reported: wall time of the
  whole run (worker start and model loading included), the time to the first labelled image, and
  the steady-state rate (images after the first one / time since the first one).
* ``batching``: one in-process generator, ``labelgen.engine.pipeline.label_images`` over the same images at
  each ``--batch-sizes`` value, with the decode/finish overlap on, then batch size 1 with the
  overlap off. Rows are checked to be identical to batch size 1's. ``cpu_side``: the decode and
  finish (RLE, boxes, NMS) seconds per image that the overlap takes off the model thread.

Rerun (about 12 minutes on 2 CPU cores):
  .venv/bin/python bench/bench_scale.py --recipe recipes/zip-cpu.yaml --images 16
Quick (tiny models, where per-call overhead dominates, as on a fast GPU):
  .venv/bin/python bench/bench_scale.py --recipe recipes/zip-tiny-random.yaml --images 64
GPU: add --device cuda (the workers part then uses one worker per GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
COCO = REPO.parent / "shared" / "assets" / "data" / "coco128-seg" / "images" / "train2017"
RANDOM = ["generator.random_weights=true", "generator.allow_download=false"]


def bench_workers(recipe_path: Path, overrides: list[str], paths: list[Path], workers: int, device: str) -> dict:
    from labelgen.config import load_recipe
    from labelgen.engine.runner import RunProgress, run
    from labelgen.engine.sources import ListFileSource

    recipe = load_recipe(recipe_path, [*RANDOM, *overrides, f"execution.workers={workers}",
                                       f"execution.device={device}", "store.shard_size=1"])
    events: list[tuple[float, int]] = []
    progress = RunProgress(on_images=lambda n: events.append((time.perf_counter(), n)))
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        listing = Path(tmp) / "list.txt"
        listing.write_text("".join(f"{p}\n" for p in paths))
        t0 = time.perf_counter()
        result = run(recipe, ListFileSource(listing), Path(tmp) / "run", progress=progress)
        wall = time.perf_counter() - t0
    # steady state: images done after the first one, over the time since the first one was done
    first_t, first_n = events[0]
    steady = (sum(n for _, n in events) - first_n) / (events[-1][0] - first_t)
    return {"workers": workers, "images": len(paths), "failures": result.failures, "wall_s": round(wall, 1),
            "first_image_s": round(first_t - t0, 1), "images_per_s_wall": round(len(paths) / wall, 4),
            "images_per_s_steady": round(steady, 4)}


def bench_batching(recipe_path: Path, overrides: list[str], paths: list[Path], sizes: list[int], device: str) -> dict:
    from labelgen.config import load_recipe
    from labelgen.generators import GENERATORS
    from labelgen.structures.instances import ImageRecord
    from labelgen.engine.pipeline import label_images
    from labelgen.engine.worker import _limit_torch_threads

    recipe = load_recipe(recipe_path, [*RANDOM, *overrides, f"execution.device={device}"])
    generator = GENERATORS.get(recipe.generator.name).from_config(recipe.generator.params, device=device)
    _limit_torch_threads(recipe.execution)
    records = [ImageRecord(p.name, str(p)) for p in paths]
    label_images(generator, records[:2], recipe.images, batch_size=2)  # warm-up: text embeddings, allocator
    runs = [(size, True) for size in sizes] + [(1, False)]
    report, reference = {}, None
    for size, overlap in runs:
        generator.batch_size = size
        sync(device)
        t0 = time.perf_counter()
        rows = label_images(generator, records, recipe.images, batch_size=size, overlap=overlap)
        sync(device)
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = rows
        name = f"batch{size}" + ("" if overlap else "_no_overlap")
        report[name] = {"s_per_image": round(seconds / len(records), 3),
                        "images_per_s": round(len(records) / seconds, 4),
                        "same_as_batch1": same_rows(rows, reference)}
    report["cpu_side"] = cpu_side(generator, records, recipe.images)
    return report


def cpu_side(generator, records: list, images_config) -> dict:
    """Seconds per image of the work the pipeline takes off the model thread: decoding, and the
    finishers (RLE encoding, boxes, NMS), each timed alone."""
    from labelgen.engine.decode import read_image_rgb

    decode_s = finish_s = 0.0
    for record in records:
        t0 = time.perf_counter()
        image, info = read_image_rgb(record.uri, max_pixels=images_config.max_pixels,
                                     compute_sha256=images_config.compute_sha256)
        decode_s += time.perf_counter() - t0
        (finish,) = generator.generate_batch([image], [record.with_size(info["width"], info["height"])])
        t0 = time.perf_counter()
        finish()
        finish_s += time.perf_counter() - t0
    return {"decode_s_per_image": round(decode_s / len(records), 4),
            "finish_s_per_image": round(finish_s / len(records), 4)}


def same_rows(rows: list[dict], reference: list[dict]) -> bool:
    """Identical shard rows (every mask, box and score), ignoring nothing."""
    return rows == reference


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "zip-cpu.yaml")
    parser.add_argument("--images", type=int, default=16, help="first N coco128 images")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", choices=("workers", "batching"), action="append", default=[])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override")
    args = parser.parse_args()

    paths = sorted(COCO.glob("*.jpg"))[:args.images]
    overrides = ["generator.semantic.class_threshold=0.0", *args.overrides]
    print(f"recipe {args.recipe.name}, {len(paths)} images, device {args.device}, {os.cpu_count()} CPU cores")
    if "workers" not in args.skip:
        for workers in (1, 2):
            print("workers:", json.dumps(bench_workers(args.recipe, overrides, paths, workers, args.device)), flush=True)
    if "batching" not in args.skip:
        report = bench_batching(args.recipe, overrides, paths, args.batch_sizes, args.device)
        for name, value in report.items():
            print(f"{name}: {json.dumps(value)}", flush=True)


if __name__ == "__main__":
    main()
