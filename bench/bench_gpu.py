"""Zip on a GPU: images/s, peak GPU memory and the fraction of the GPU's bf16 matmul peak.

Real architectures with random weights (the compute of the real models), coco128 images, bf16:
for each recipe (``zip-cpu``: ViT-B/16 + RN50x4 @1024 + SAM ViT-B; ``zip-paper``: ViT-B/16 + RN50x64 @2048 +
SAM ViT-H), each batch size and torch.compile off/on, the images go through ``generate_batch`` in
batches and every ``finish()`` runs (the whole per-image work). FLOPs per image are counted once per
recipe (``FlopCounterMode`` on one image: matmuls and convolutions) and divided by the measured time
per image, against a bf16 GEMM's rate measured in the same run.

Run by ``bench/bench_gpu.sh``; alone:
  python bench/bench_gpu.py --recipes zip-cpu zip-paper --batch-sizes 1 4 8 --compile off on --images 24
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
COCO = REPO.parent / "shared" / "assets" / "data" / "coco128-seg" / "images" / "train2017"


def bf16_peak_tflops(size: int = 8192) -> float:
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        torch.mm(a, b)
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - t0) / 1e12


def load_images(folder: Path, count: int):
    from labelgen.engine.decode import read_image_rgb
    from labelgen.structures.instances import ImageRecord

    images, records = [], []
    for path in sorted(folder.glob("*.jpg"))[:count]:
        image, info = read_image_rgb(str(path))
        images.append(image)
        records.append(ImageRecord(path.name, str(path), info["width"], info["height"]))
    return images, records


def build(recipe_name: str, compile_on: bool):
    from labelgen.config import load_recipe
    from labelgen.generators import GENERATORS
    from labelgen.models.compile import compile_encoders

    recipe = load_recipe(str(REPO / "recipes" / f"{recipe_name}.yaml"),
                         ["generator.random_weights=true", "generator.allow_download=false",
                          "generator.precision=bf16", "generator.semantic.class_threshold=0.0"])
    gen = GENERATORS.get(recipe.generator.name).from_config(recipe.generator.params, device="cuda")
    if compile_on:
        compile_encoders(gen)
    return gen


def flops_per_image(gen, image, record) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        gen.generate_batch([image], [record])[0]()
    return int(counter.get_total_flops())


def images_per_second(gen, images, records, batch_size: int) -> tuple[float, float]:
    import torch

    gen.batch_size = batch_size
    warm = batch_size  # compile / autotune / allocator warm-up on one batch
    for finish in gen.generate_batch(images[:warm], records[:warm]):
        finish()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for start in range(0, len(images), batch_size):
        for finish in gen.generate_batch(images[start:start + batch_size], records[start:start + batch_size]):
            finish()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return len(images) / seconds, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["zip-cpu", "zip-paper"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--out", default=str(REPO / "bench" / "gpu-results.json"))
    args = parser.parse_args()
    name = torch.cuda.get_device_name(0)
    peak = bf16_peak_tflops()
    print(f"{name}, torch {torch.__version__}: bf16 matmul peak {peak:.0f} TFLOP/s (8192^2 GEMM)")
    images, records = load_images(COCO, args.images)
    results = []
    print("| recipe | compile | batch | images/s | peak GPU GiB | TFLOP/image | achieved TFLOP/s | fraction of bf16 peak |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for recipe in args.recipes:
        flops = None
        for compile_mode in args.compile:
            gen = build(recipe, compile_mode == "on")
            flops = flops or flops_per_image(gen, images[0], records[0])
            for batch in args.batch_sizes:
                rate, memory = images_per_second(gen, images, records, batch)
                achieved = flops * rate / 1e12
                row = {"recipe": recipe, "compile": compile_mode, "batch_size": batch, "images_per_second": rate,
                       "peak_gpu_gib": memory, "tflop_per_image": flops / 1e12, "achieved_tflops": achieved,
                       "fraction_of_peak": achieved / peak, "gpu": name, "peak_tflops": peak}
                results.append(row)
                print(f"| {recipe} | {compile_mode} | {batch} | {rate:.2f} | {memory:.1f} | {flops / 1e12:.2f} |"
                      f" {achieved:.0f} | {achieved / peak:.0%} |", flush=True)
            del gen
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
