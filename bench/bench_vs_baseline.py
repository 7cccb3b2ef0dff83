"""Every generator on the same images: Zip (SAM 1 or SAM 2.1 refiner), the SAM and SAM 2.1 automatic
mask generators, and SAM 3 concept segmentation.

All use real architectures with random weights (no weights here; the compute is the same): Zip as in
`recipes/zip-cpu.yaml` (CLIP ViT-B/16, CLIP RN50x4 @1024, SAM ViT-B or SAM 2.1 Hiera base+), `sam-auto`
with SAM ViT-B and `sam2-auto` with SAM 2.1 base+ at their default automatic settings (32x32 points),
and `sam3` (the official SAM 3 image model) with ``--sam3-classes`` concept prompts. Each generator runs
in a fresh process over the same real COCO images, decode included; printed: per-stage seconds per image
(mean over the images after the first), images/s, and peak RSS. The automatic generators' image encoder
is timed inside them, so the table shows what each method adds on top of one embedding.

Rerun (about 20 minutes on 2 CPU cores):
  .venv/bin/python bench/bench_vs_baseline.py --precision bf16 --images 000000000009.jpg 000000000025.jpg 000000000030.jpg
One generator: --generators zip sam2-auto.  GPU: add --device cuda
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

recipe_path, overrides, device, images = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4:]
recipe = load_recipe(recipe_path, overrides)
sync = (lambda: __import__("torch").cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
t0 = time.perf_counter()
gen = GENERATORS.get(recipe.generator.name).from_config(recipe.generator.params, device=device)
build = time.perf_counter() - t0
encoder = {"s": 0.0}
predictor = getattr(getattr(gen, "mask_generator", None), "predictor", None)
if predictor is not None:  # an automatic mask generator: time SAM's image encoder inside it
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
    if hasattr(gen, "last_timings"):
        gen.last_timings = {}
    out = gen.generate(image, record)
    sync()
    total = time.perf_counter() - t
    if predictor is not None:
        stages = {"SAM encoder": encoder["s"], "mask generation": total - encoder["s"]}
    elif getattr(gen, "last_timings", None):
        stages = dict(gen.last_timings)
    else:
        stages = {"all": total}
    rows.append({"total": total, "stages": stages, "instances": len(out)})
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"build_s": build, "rows": rows, "peak_rss_mib": rss}))
"""


RANDOM = ["generator.random_weights=true", "generator.allow_download=false"]
# (label, recipe, overrides): every generator on comparable backbones (SAM ViT-B ~ SAM 2.1 base+ in size)
CONTENDERS = {
    "zip": ("recipes/zip-cpu.yaml", ["generator.semantic.class_threshold=0.0"]),
    "zip-sam2": ("recipes/zip-cpu.yaml", ["generator.semantic.class_threshold=0.0", "generator.sam.backend=sam2",
                                          "generator.sam.model_type=sam2.1_hiera_base_plus"]),
    "sam-auto": ("recipes/sam-auto.yaml", ["generator.model_type=vit_b"]),
    "sam2-auto": ("recipes/sam2-auto.yaml", ["generator.model_type=sam2.1_hiera_base_plus"]),
    "sam3": ("recipes/sam3.yaml", []),
}


def run_one(which: str, precision: str, device: str, images: list[str], sam3_classes: int) -> dict:
    recipe, overrides = CONTENDERS[which]
    overrides = RANDOM[:1 if which == "sam3" else None] + overrides + [f"generator.precision={precision}"]  # sam3 never downloads
    if which == "sam3":
        overrides.append("generator.classes={" + ", ".join(f"{c}: []" for c in SAM3_CLASSES[:sam3_classes]) + "}")
    proc = subprocess.run([sys.executable, "-c", CHILD, recipe, json.dumps(overrides), device, *images],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


SAM3_CLASSES = ["person", "bowl", "dog", "car", "chair", "cup", "bus", "pizza"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", nargs="+", default=["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"])
    parser.add_argument("--generators", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--sam3-classes", type=int, default=3, help="concept prompts per image for sam3 (one pass each)")
    args = parser.parse_args()
    images = [str(COCO / name) for name in args.images]
    print(f"device {args.device}, {args.precision}, {len(images)} images; seconds per image = mean after the first")
    print("| generator | build s | stages (s/image) | total s/image | images/s | peak RSS MiB | instances |")
    print("|---|---:|---|---:|---:|---:|---|")
    for which in args.generators:
        report = run_one(which, args.precision, args.device, images, args.sam3_classes)
        timed = report["rows"][1:] or report["rows"]
        stages = {k: sum(r["stages"].get(k, 0.0) for r in timed) / len(timed) for k in timed[0]["stages"]}
        total = sum(r["total"] for r in timed) / len(timed)
        stage_text = ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
        print(f"| {which} | {report['build_s']:.1f} | {stage_text} | {total:.2f} | {1 / total:.3f} |"
              f" {report['peak_rss_mib']:,.0f} | {[r['instances'] for r in report['rows']]} |", flush=True)


if __name__ == "__main__":
    main()
