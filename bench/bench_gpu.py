"""Zip on a GPU: images/s, peak GPU memory and the fraction of the GPU's bf16 matmul peak.

Real architectures with random weights (the compute of the real models), coco128 images, bf16:
for each recipe (``zip-cpu``: ViT-B/16 + RN50x4 @1024 + SAM ViT-B; ``zip-paper``: ViT-B/16 + RN50x64 @2048 +
SAM ViT-H), each batch size and torch.compile off/on, the images go through ``generate_batch`` in
batches and every ``finish()`` runs (the whole per-image work). FLOPs per image are counted once per
recipe (``FlopCounterMode`` on one image: matmuls and convolutions) and divided by the measured time
per image, against a bf16 GEMM's rate measured in the same run.

FLOPs are counted on an fp32 build of the same recipe (the counter cannot follow bf16 autocast through
SAM's relative-position einsum), then freed.

Run by ``bench/bench_gpu.sh``; alone:
  python bench/bench_gpu.py --recipes zip-cpu zip-paper --batch-sizes 1 4 8 --compile off on --images 24
A dry run of the script's logic without a GPU (tiny models; ``tests/test_bench_gpu.py`` runs it):
  python bench/bench_gpu.py --device cpu --recipes zip-tiny-random --batch-sizes 1 2 --compile off --images 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
COCO = Path(os.environ.get("LABELGEN_COCO128", REPO.parent / "shared" / "assets" / "data" / "coco128-seg")) \
    / "images" / "train2017"


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bf16_peak_tflops(device: str = "cuda", size: int = 8192, repeats: int = 20) -> float:
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    synchronize(device)
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


def build(recipe_name: str, compile_on: bool, device: str = "cuda", precision: str = "bf16"):
    from labelgen.config import load_recipe
    from labelgen.generators import GENERATORS
    from labelgen.models.compile import compile_encoders

    recipe = load_recipe(str(REPO / "recipes" / f"{recipe_name}.yaml"),
                         ["generator.random_weights=true", "generator.allow_download=false",
                          f"generator.precision={precision}", "generator.semantic.class_threshold=0.0"])
    gen = GENERATORS.get(recipe.generator.name).from_config(recipe.generator.params, device=device)
    if compile_on:
        compile_encoders(gen)
    return gen


def flops_per_image(recipe_name: str, image, record, device: str) -> int:
    """FLOPs of one image through the recipe, counted on an fp32 build (freed afterwards)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    gen = build(recipe_name, False, device, "fp32")
    with FlopCounterMode(display=False) as counter:
        gen.generate_batch([image], [record])[0]()
    del gen
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return int(counter.get_total_flops())


def images_per_second(gen, images, records, batch_size: int, device: str = "cuda") -> tuple[float, float]:
    """Images/s over ``images`` in batches, and peak GPU memory in GiB (NaN off CUDA)."""
    import torch

    cuda = device.startswith("cuda")
    gen.batch_size = batch_size
    warm = batch_size  # compile / autotune / allocator warm-up on one batch
    for finish in gen.generate_batch(images[:warm], records[:warm]):
        finish()
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for start in range(0, len(images), batch_size):
        for finish in gen.generate_batch(images[start:start + batch_size], records[start:start + batch_size]):
            finish()
    synchronize(device)
    seconds = time.perf_counter() - t0
    return len(images) / seconds, (torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["zip-cpu", "zip-paper"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--out", default=str(REPO / "bench" / "gpu-results.json"))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script's logic (no GPU figures)")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="start no new setting after this many seconds (what is skipped is listed); the GPU "
                             "machine's device time is short")
    args = parser.parse_args()
    started = time.perf_counter()
    device = args.device
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    peak = bf16_peak_tflops(device, 8192 if cuda else 512, 20 if cuda else 2)
    print(f"{name}, torch {torch.__version__}: bf16 matmul peak {peak:.2f} TFLOP/s")
    images, records = load_images(COCO, args.images)
    results, skipped, flops = [], [], {}
    print("| recipe | compile | batch | images/s | peak GPU GiB | TFLOP/image | achieved TFLOP/s | fraction of bf16 peak |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    out_of_time = lambda: time.perf_counter() - started > args.budget_s  # noqa: E731
    for compile_mode in args.compile:  # every recipe without compile first: the figures that matter most
        for recipe in args.recipes:
            if out_of_time():
                skipped += [(recipe, compile_mode, batch) for batch in args.batch_sizes]
                continue
            if recipe not in flops:
                flops[recipe] = flops_per_image(recipe, images[0], records[0], device)
            gen = build(recipe, compile_mode == "on", device)
            for batch in args.batch_sizes:
                if out_of_time():
                    skipped.append((recipe, compile_mode, batch))
                    continue
                rate, memory = images_per_second(gen, images, records, batch, device)
                achieved = flops[recipe] * rate / 1e12
                row = {"recipe": recipe, "compile": compile_mode, "batch_size": batch, "images_per_second": rate,
                       "peak_gpu_gib": memory, "tflop_per_image": flops[recipe] / 1e12, "achieved_tflops": achieved,
                       "fraction_of_peak": achieved / peak, "gpu": name, "peak_tflops": peak}
                results.append(row)
                print(f"| {recipe} | {compile_mode} | {batch} | {rate:.2f} | {memory:.1f} | {flops[recipe] / 1e12:.3f} |"
                      f" {achieved:.2f} | {achieved / peak:.0%} |", flush=True)
            del gen
            if cuda:
                torch.cuda.empty_cache()
    for recipe, compile_mode, batch in skipped:
        print(f"skipped (over --budget-s {args.budget_s:.0f}): {recipe} compile {compile_mode} batch {batch}")
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out} after {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
