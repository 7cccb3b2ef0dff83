"""Zip against the SAM automatic-mask baseline on the same images with the same SAM backbone.

Both generators use real architectures with random weights (no weights here; compute is the same):
Zip as in `recipes/zip-cpu.yaml` (CLIP ViT-B/16, CLIP RN50x4 @1024, SAM ViT-B) and `sam-auto` with SAM
ViT-B and SAM's default automatic settings (32x32 points, batches of 64). Each generator runs in a
fresh process over the same real COCO images, decode included; printed: per-stage seconds per image
(mean over the images after the first), images/s, and peak RSS. The SAM image encoder is timed
separately inside both, so the table shows what each method adds on top of one SAM embedding.

Rerun (about 10 minutes on 2 CPU cores):
  .venv/bin/python bench/bench_vs_baseline.py --precision bf16 --images 000000000009.jpg 000000000025.jpg 000000000030.jpg
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
from labelgen.config import load_recipe
from labelgen.engine.decode import read_image_rgb
from labelgen.generators import GENERATORS
from labelgen.structures.instances import ImageRecord

which, precision, device, images = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
common = ["generator.random_weights=true", "generator.allow_download=false", f"generator.precision={precision}"]
if which == "zip":
    recipe = load_recipe("recipes/zip-cpu.yaml", common + ["generator.semantic.class_threshold=0.0"])
else:
    recipe = load_recipe("recipes/sam-auto.yaml", common + ["generator.model_type=vit_b"])
sync = (lambda: __import__("torch").cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
t0 = time.perf_counter()
gen = GENERATORS.get(recipe.generator.name).from_config(recipe.generator.params, device=device)
build = time.perf_counter() - t0
encoder = {"s": 0.0}
if which == "sam-auto":  # time SAM's image encoder inside the automatic mask generator
    predictor = gen.mask_generator.predictor
    original = predictor.set_image
    def timed_set_image(*a, **k):
        sync(); t = time.perf_counter(); out = original(*a, **k); sync(); encoder["s"] += time.perf_counter() - t
        return out
    predictor.set_image = timed_set_image
rows = []
for path in images:
    t = time.perf_counter()
    image, info = read_image_rgb(path)
    record = ImageRecord(path, path, info["width"], info["height"])
    encoder["s"] = 0.0
    out = gen.generate(image, record)
    sync()
    total = time.perf_counter() - t
    if which == "zip":
        stages = dict(gen.last_timings)
    else:
        stages = {"sam_encoder": encoder["s"], "mask_generation": total - encoder["s"]}
    rows.append({"total": total, "stages": stages, "instances": len(out)})
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"build_s": build, "rows": rows, "peak_rss_mib": rss}))
"""


def run_one(which: str, precision: str, device: str, images: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, which, precision, device, *images],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", nargs="+", default=["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"])
    args = parser.parse_args()
    images = [str(COCO / name) for name in args.images]
    print(f"device {args.device}, {args.precision}, {len(images)} images; seconds per image = mean after the first")
    for which in ("zip", "sam-auto"):
        report = run_one(which, args.precision, args.device, images)
        timed = report["rows"][1:] or report["rows"]
        stages = {k: sum(r["stages"][k] for r in timed) / len(timed) for k in timed[0]["stages"]}
        total = sum(r["total"] for r in timed) / len(timed)
        stage_text = ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
        print(f"{which:<9} build {report['build_s']:.1f} s | {stage_text} | total {total:.2f} s/img"
              f" = {1 / total:.3f} img/s | peak RSS {report['peak_rss_mib']:.0f} MiB"
              f" | instances {[r['instances'] for r in report['rows']]}", flush=True)


if __name__ == "__main__":
    main()
