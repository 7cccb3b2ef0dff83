"""Per-stage time and memory of the Zip generator on this machine (real architectures, RANDOM weights).

For each recipe and precision, in a fresh process: build the models, then run the four stages on
real COCO images and print seconds per stage per image (the mean over the images after the first,
which also pays one-time costs such as text embeddings) and the peak RSS. Stage 4 is split into
SAM's image encoder and its batched box decoder; when random weights propose no box, the decoder is
timed on 8 fixed boxes so that it is always measured.

A recipe may carry overrides after a colon, to compare variants side by side in one run:
  recipes/zip-cpu.yaml:generator.sam.attention=reference,generator.fidelity=release

Rerun (about 15 minutes on 2 CPU cores):
  .venv/bin/python bench/bench_zip.py --recipes recipes/zip-paper.yaml recipes/zip-cpu.yaml --precisions fp32 bf16
GPU:  add --device cuda
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "assets" / "data" / "coco128-seg" / "images" / "train2017"

CHILD = r"""
import json, resource, sys, time
import numpy as np
from labelgen.config import load_recipe
from labelgen.engine.decode import read_image_rgb
from labelgen.generators import GENERATORS

spec, precision, device, images = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
recipe_path, _, extra = spec.partition(":")
overrides = ["generator.random_weights=true", "generator.allow_download=false", f"generator.precision={precision}",
             "generator.semantic.class_threshold=0.0"] + [o for o in extra.split(",") if o]
recipe = load_recipe(recipe_path, overrides)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
gen = GENERATORS.get("zip").from_config(recipe.generator.params, device=device)
sync = (lambda: __import__("torch").cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
report = {"build_s": time.perf_counter() - t0, "rss_after_build_mib": rss(), "images": []}
for path in images:
    image, info = read_image_rgb(path)
    h, w = image.shape[:2]
    row, t = {"size": [w, h]}, time.perf_counter()
    def lap(name):
        global t
        sync(); now = time.perf_counter(); row[name] = now - t; row[name + "_peak_rss_mib"] = rss(); t = now
    sem = gen.semantic(image); lap("semantic")
    act = sem.maps[sem.kept].max(axis=0) if recipe.generator.params.boundary.init == "semantic" else None
    bnd = gen.boundary(image, act); lap("boundary")
    props = gen.propose(sem, bnd, h, w); lap("discovery")
    boxes = props.boxes_xyxy
    if len(boxes) == 0:
        xs = np.linspace(0, w, 5)
        boxes = np.array([[xs[i], 0, xs[i + 1], h / (1 + j)] for i in range(4) for j in range(2)], np.float32)
    row["boxes"] = int(len(boxes)); row["grid"] = [bnd.grid_height, bnd.grid_width]
    t = time.perf_counter()
    gen.refiner.embed_image(image); lap("sam_encoder")
    gen.refiner.decode_boxes(boxes); lap("sam_decoder")
    report["images"].append(row)
print(json.dumps(report))
"""

STAGES = ("semantic", "boundary", "discovery", "sam_encoder", "sam_decoder")


def run_one(recipe: str, precision: str, device: str, images: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, recipe, precision, device, *images],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} {precision} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["recipes/zip-paper.yaml", "recipes/zip-cpu.yaml"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", nargs="+", default=["000000000009.jpg", "000000000025.jpg"])
    args = parser.parse_args()
    images = [str(COCO / name) for name in args.images]
    header = f"{'recipe':<22}{'prec':<6}{'build s':>8}" + "".join(f"{s:>13}" for s in STAGES) + f"{'total s':>9}{'peak RSS MiB':>14}"
    print(f"device {args.device}; seconds per image (mean of images after the first); images {args.images}")
    print(header)
    for recipe in args.recipes:
        for precision in args.precisions:
            report = run_one(recipe, precision, args.device, images)
            timed = report["images"][1:] or report["images"]
            means = {s: sum(r[s] for r in timed) / len(timed) for s in STAGES}
            peak = max(r[f"{s}_peak_rss_mib"] for r in report["images"] for s in STAGES)
            name = Path(recipe.partition(":")[0]).stem + (f" [{recipe.partition(':')[2]}]" if ":" in recipe else "")
            print(f"{name:<22}{precision:<6}{report['build_s']:>8.1f}"
                  + "".join(f"{means[s]:>13.2f}" for s in STAGES)
                  + f"{sum(means.values()):>9.1f}{peak:>14.0f}", flush=True)
            print(f"    grids {[r['grid'] for r in report['images']]}, boxes {[r['boxes'] for r in report['images']]},"
                  f" RSS after build {report['rss_after_build_mib']:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
