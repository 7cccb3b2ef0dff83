"""Zip generator seconds per image without the feature cache, with a cold cache and a warm one.

Real architectures with RANDOM weights (no weight files needed) on real COCO images. For each image:
``uncached`` (no cache), ``cold`` (empty cache: encoders run and entries are written), ``warm``
(same images again: the three encoders are read from the cache), ``warm_vocab`` (warm cache,
another generator with a different vocabulary: the encoders are still skipped) and ``uncached``
once more at the end (the spread of the two uncached passes shows the machine's noise). Outputs of
uncached, cold and warm are checked to be identical. Models are built before timing.

Rerun (about 2 minutes on 2 CPU cores):
  .venv/bin/python bench/bench_cache.py --recipe recipes/zip-cpu.yaml --precision bf16
Quick:  .venv/bin/python bench/bench_cache.py --recipe recipes/zip-tiny-random.yaml --precision fp32
GPU:    add --device cuda
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
COCO = REPO.parent / "shared" / "assets" / "data" / "coco128-seg" / "images" / "train2017"
IMAGES = ("000000000009.jpg", "000000000025.jpg", "000000000030.jpg")


def build(recipe: Path, overrides: list[str], device: str):
    from labelgen.config import load_recipe
    from labelgen.generators import GENERATORS

    config = load_recipe(recipe, ["generator.random_weights=true", "generator.allow_download=false", *overrides])
    return GENERATORS.get("zip").from_config(config.generator.params, device=device)


def timed_pass(generator, images, sync) -> tuple[list[float], list[dict], list[dict]]:
    seconds, stages, outputs = [], [], []
    for image, record in images:
        sync()
        t0 = time.perf_counter()
        out = generator.generate(image, record)
        sync()
        seconds.append(time.perf_counter() - t0)
        stages.append(dict(generator.last_timings))
        outputs.append(out.to_dict())
    return seconds, stages, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "zip-cpu.yaml")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", nargs="*", default=[str(COCO / name) for name in IMAGES])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra recipe override, e.g. generator.discovery.min_cells=10")
    args = parser.parse_args()

    from labelgen.engine.decode import read_image_rgb
    from labelgen.models.feature_cache import FeatureCache
    from labelgen.structures.instances import ImageRecord

    overrides = [f"generator.precision={args.precision}", "generator.semantic.class_threshold=0.0", *args.overrides]
    sync = _sync(args.device)
    images = []
    for path in args.images:
        image, info = read_image_rgb(path)
        images.append((image, ImageRecord(Path(path).name, path, info["width"], info["height"])))

    t0 = time.perf_counter()
    generator = build(args.recipe, overrides, args.device)
    vocab_generator = build(args.recipe, [*overrides, "generator.semantic.vocabulary=[cat, dog, person]",
                                          "generator.semantic.class_agnostic=false"], args.device)
    build_s = time.perf_counter() - t0
    generator.generate(*images[0])  # warm-up: text embeddings, allocator, lazy imports
    vocab_generator.generate(*images[0])

    report: dict = {"recipe": str(args.recipe), "precision": args.precision, "device": args.device,
                    "build_s": round(build_s, 1), "images": [r.image_id for _, r in images]}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as root:
        uncached = timed_pass(generator, images, sync)
        generator.feature_cache = FeatureCache(root, 8 << 30)
        cold = timed_pass(generator, images, sync)
        warm = timed_pass(generator, images, sync)
        vocab_generator.feature_cache = FeatureCache(root, 8 << 30)
        warm_vocab = timed_pass(vocab_generator, images, sync)
        stats = generator.feature_cache.stats()
        generator.feature_cache = None
        uncached_again = timed_pass(generator, images, sync)  # CPU noise check: same work as ``uncached``
        vocab_stats = vocab_generator.feature_cache.stats()
        kinds = {kind.name: sum(f.stat().st_size for f in kind.rglob("*.feat")) for kind in Path(root).iterdir()}
    passes = {"uncached": uncached, "cold": cold, "warm": warm, "warm_vocab": warm_vocab,
              "uncached_again": uncached_again}
    for name, (seconds, stages, _) in passes.items():
        report[name] = {"s_per_image": [round(s, 3) for s in seconds], "mean_s": round(statistics.mean(seconds), 3),
                        "stages_mean_s": {k: round(statistics.mean(st.get(k, 0.0) for st in stages), 3)
                                          for k in ("semantic", "boundary", "discovery", "refine")}}
    report["identical_outputs"] = uncached[2] == cold[2] == warm[2] == uncached_again[2]
    report["instances_per_image"] = [len(o["masks_rle"]) for o in uncached[2]]
    report["cache"] = {"generator": stats.__dict__, "vocab_generator": vocab_stats.__dict__,
                       "bytes_per_kind": kinds}
    for name, value in report.items():
        print(f"{name}: {json.dumps(value)}")
    print(f"\nseconds per image (mean of {len(images)}): uncached {report['uncached']['mean_s']:.2f}"
          f" / {report['uncached_again']['mean_s']:.2f} (before / after the cached passes), "
          f"cold {report['cold']['mean_s']:.2f}, warm {report['warm']['mean_s']:.2f}, "
          f"warm + other vocabulary {report['warm_vocab']['mean_s']:.2f}; identical={report['identical_outputs']}")


def _sync(device: str):
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


if __name__ == "__main__":
    main()
