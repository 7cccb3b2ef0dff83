"""How close each encoder of a Zip recipe runs to this machine's matmul peak, and what the CPU finish costs.

For each encoder of the recipe (stage 1: CLIP ViT with CLIP Surgery at the recipe's input size; stage 2:
the CLIP ResNet trunk to layer3 at the recipe's short side; stage 4: SAM's image encoder, reference
attention and labelgen's fast path), on a real coco128 image, real architectures with random weights:

* FLOPs per image, counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions:
  2 FLOPs per multiply-add; softmax, norms and activations are not counted);
* seconds per image (median of ``--repeats`` after a warm-up), achieved GFLOP/s, and the fraction of this
  machine's matmul peak, measured in the same run (a square GEMM of ``--peak-size`` in fp32 and bf16);
* for SAM's fast path the largest absolute difference of the embedding against the reference, and the
  IoU of the masks the decoder gives for the same prompt boxes from both embeddings.

Then k-means (the recipe's k on stage 2's real features: seconds per iteration and GFLOP/s of the
distance GEMM) and the CPU finish of stage 4 on one thread at 50, 200 and 1,000 masks per image
(RLE encoding of SAM's dense masks, tight boxes, the mask NMS, and the labeler's crops); RLE encoding is
timed on masks as the refiner hands them over (column by column) and, for the before figure, on C-order
masks, as it handed them over before.

Rerun (about 6 minutes on 2 CPU cores for zip-cpu; zip-paper takes about 20):
  .venv/bin/python bench/bench_encoders.py --recipe recipes/zip-cpu.yaml --precisions fp32 bf16
  .venv/bin/python bench/bench_encoders.py --recipe recipes/zip-paper.yaml --precisions bf16 --repeats 1
GPU:  add --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
COCO = REPO.parent / "shared" / "assets" / "data" / "coco128-seg" / "images" / "train2017"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run (NaN, nothing run, for 0)."""
    if repeats <= 0:
        return float("nan")
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn) -> int:
    """FLOPs of ``fn()``, fused attention included: the counter has no formula for the CPU flash kernel, so
    ``scaled_dot_product_attention`` runs as its math decomposition (matmuls the counter sees) while counting."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return int(counter.get_total_flops())


def fused_attention_flops(fn) -> int:
    """FLOPs of ``fn()``'s ``scaled_dot_product_attention`` calls alone (total minus what the counter sees
    with the fused kernels, which it does not count)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return count_flops(fn) - int(counter.get_total_flops())


_GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
             "aten::convolution_overrideable", "aten::_convolution", "aten::mkldnn_rnn", "aten::_mkldnn_linear")
_ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
                  "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention")


def time_split(fn) -> dict[str, float]:
    """Seconds of one ``fn()`` by kind of op (self time, CPU profiler): matrix products and convolutions,
    fused attention, everything else (norms, activations, copies, softmax of unfused attention...)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    split = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kind = "gemm" if event.key in _GEMM_OPS else "attention" if event.key in _ATTENTION_OPS else "other"
        split[kind] += event.self_cpu_time_total / 1e6
    return split


def matmul_peak(precision: str, size: int, device: str) -> float:
    """GFLOP/s of a ``size`` x ``size`` GEMM in ``precision`` (the best of 5 after a warm-up)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    with torch.inference_mode():
        torch.mm(a, b)
        for _ in range(5):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def build_generator(recipe_path: str, precision: str, device: str):
    from labelgen.config import load_recipe
    from labelgen.generators import GENERATORS

    recipe = load_recipe(recipe_path, ["generator.random_weights=true", "generator.allow_download=false",
                                       f"generator.precision={precision}"])
    return GENERATORS.get(recipe.generator.name).from_config(recipe.generator.params, device=device)


def encoder_rows(gen, image: np.ndarray, precision: str, peak: float, repeats: int, device: str,
                 flops: dict[str, int]) -> list[dict]:
    """One row per encoder; ``flops`` (name -> FLOPs per image) is filled on the first (fp32) call and reused:
    FLOPs do not depend on the precision, and the counter cannot follow bf16 autocast through every op."""
    import torch

    from labelgen.models.sam_fast import restore_reference_attention, use_fast_attention

    rows = []
    semantic, boundary, refiner = gen.semantic, gen.boundary, gen.refiner
    cfg = gen.config
    stage1 = f"stage 1 CLIP {cfg.semantic.model} @{cfg.semantic.input_size}"
    if device == "cpu" and precision in ("bf16", "fp16"):  # before: the fused SDPA kernel; now blocked attention
        from labelgen.models import blocked_attention as blocked_module

        chooser = blocked_module.use_blocked_attention
        blocked_module.use_blocked_attention = lambda q: False
        try:
            rows.append(_measure(stage1 + " (fused SDPA)", lambda: semantic.encode_batch([image]), precision, peak,
                                 repeats, device, flops, flops_of=stage1))
        finally:
            blocked_module.use_blocked_attention = chooser
        stage1 += " (blocked attention)"
    work = [(stage1, lambda: semantic.encode_batch([image]), stage1.split(" (")[0], "(blocked" not in stage1)]
    stage2 = f"stage 2 CLIP {cfg.boundary.model} layer3 @{cfg.boundary.short_side}"
    if boundary.memory_format == torch.channels_last:  # before: the NCHW trunk (release fidelity's layout)
        set_memory_format(boundary, torch.contiguous_format)
        rows.append(_measure(stage2 + " (NCHW)", lambda: boundary.encode_batch([image]), precision, peak, repeats,
                             device, flops, flops_of=stage2))
        set_memory_format(boundary, torch.channels_last)
        stage2 += " (channels-last)"
    work.append((stage2, lambda: boundary.encode_batch([image]), stage2.split(" (")[0], True))
    sam_name = f"stage 4 SAM {cfg.sam.model_type} encoder @1024"
    encoder = refiner.predictor.model.image_encoder
    restore_reference_attention(encoder)
    work.append((sam_name + " (reference)", lambda: refiner.embed_batch([image]), None, True))
    for name, fn, flops_of, fused in work:
        rows.append(_measure(name, fn, precision, peak, repeats, device, flops, flops_of=flops_of, fused=fused))
    reference = refiner.embed_batch([image])[0].float()
    use_fast_attention(encoder)
    fast_row = _measure(sam_name + " (fast: SDPA + bias mask)", lambda: refiner.embed_batch([image]), precision,
                        peak, repeats, device, flops, flops_of=sam_name + " (reference)")
    fast = refiner.embed_batch([image])[0].float()
    fast_row["max_abs_diff"] = float((fast - reference).abs().max())
    fast_row["mask_iou"] = _mask_iou(refiner, image, reference, fast)
    rows.append(fast_row)
    if device == "cpu" and precision in ("bf16", "fp16"):  # attention: fast = the blocked kernel here
        use_fast_attention(encoder, kernel="fast")
        blocked_row = _measure(sam_name + " (fast: blocked attention)", lambda: refiner.embed_batch([image]),
                               precision, peak, repeats, device, flops, flops_of=sam_name + " (reference)",
                               fused=False)
        blocked = refiner.embed_batch([image])[0].float()
        blocked_row["max_abs_diff"] = float((blocked - reference).abs().max())
        blocked_row["mask_iou"] = _mask_iou(refiner, image, reference, blocked)
        rows.append(blocked_row)
    restore_reference_attention(encoder)
    return rows


def set_memory_format(boundary, memory_format) -> None:
    """Run the boundary stage's trunk in ``memory_format`` (weights and inputs)."""
    boundary.memory_format = memory_format
    boundary.trunk.to(memory_format=memory_format)


def _measure(name: str, fn, precision: str, peak: float, repeats: int, device: str, flops: dict[str, int],
             flops_of: str | None = None, fused: bool = True) -> dict:
    if flops_of and flops_of not in flops:
        flops[flops_of] = count_flops(fn)
    key = flops_of or name  # the fast SAM path does the reference's work: its FLOPs are the reference's
    if key not in flops:
        flops[key] = count_flops(fn)
    attention_key = name + " (fused attention)"
    if attention_key not in flops:  # fused=False: no fused attention kernel runs (blocked attention is bmm)
        flops[attention_key] = fused_attention_flops(fn) if fused else 0
    seconds = timed(fn, repeats, device)
    gflops = flops[key] / seconds / 1e9
    row = {"encoder": name, "precision": precision, "gflop": flops[key] / 1e9, "seconds": seconds,
           "gflop_s": gflops, "fraction_of_peak": gflops / peak}
    if repeats > 0 and device == "cpu":
        split = time_split(fn)
        attention_flops = flops[attention_key] if split["attention"] > 0 else 0  # 0: attention ran as bmm
        row["split"] = split
        row["gemm_fraction"] = (flops[key] - attention_flops) / max(split["gemm"], 1e-9) / 1e9 / peak
        row["attention_fraction"] = (attention_flops / max(split["attention"], 1e-9) / 1e9 / peak
                                     if attention_flops else float("nan"))
    return row


def _mask_iou(refiner, image: np.ndarray, reference, fast) -> float:
    """Mean IoU of the masks decoded from both embeddings for a fixed grid of 16 prompt boxes."""
    height, width = image.shape[:2]
    xs, ys = np.linspace(0, width, 5), np.linspace(0, height, 5)
    boxes = np.array([[xs[i], ys[j], xs[i + 1], ys[j + 1]] for i in range(4) for j in range(4)], np.float32)
    refiner.set_embedding(reference, height, width)
    a = refiner.decode_boxes(boxes).masks
    refiner.set_embedding(fast, height, width)
    b = refiner.decode_boxes(boxes).masks
    inter = (a & b).reshape(len(a), -1).sum(1)
    union = (a | b).reshape(len(a), -1).sum(1)
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def kmeans_row(gen, image: np.ndarray, device: str, iterations: int = 10) -> dict:
    import torch

    from labelgen.generators.zip import kmeans as kmeans_module

    features = gen.boundary.encode_batch([image])[0]
    points = features[0].flatten(1).T.contiguous().float()  # (n, d)
    n, d = points.shape
    k = gen.config.boundary.num_clusters

    def per_iteration(fn) -> float:
        with torch.inference_mode():
            done = fn(points, k, iterations, 0.0)[2]
            return timed(lambda: fn(points, k, iterations, 0.0), 2, device) / done

    fast = per_iteration(kmeans_module.kmeans)
    release = per_iteration(kmeans_module.kmeans_release)
    cached = kmeans_module._ReleaseDistances
    kmeans_module._ReleaseDistances = lambda rows: (lambda centroids: torch.cdist(rows, centroids, p=2))
    try:  # before: torch.cdist called afresh every iteration, as the release does
        release_before = per_iteration(kmeans_module.kmeans_release)
    finally:
        kmeans_module._ReleaseDistances = cached
    flops = 2 * n * k * d  # the distance GEMM of one assignment step
    return {"n": n, "d": d, "k": k, "seconds_per_iteration": fast, "gflop_s_distances": flops / fast / 1e9,
            "release_seconds_per_iteration": release, "release_before_seconds_per_iteration": release_before}


def synthetic_masks(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``(count, H, W)`` bool ellipses of varied sizes (like SAM's masks of one image: many overlap)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    masks = np.zeros((count, height, width), bool)
    for i in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(4, height / 4), rng.uniform(4, width / 4)
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return masks


def finish_rows(image: np.ndarray, counts: list[int], repeats: int) -> list[dict]:
    """Stage 4's CPU finish on one thread: RLE, boxes, NMS (zip's thresholds), labeler crops."""
    import torch

    from labelgen.labelers.config import instance_crops
    from labelgen.structures.instances import Instances
    from labelgen.structures.masks import column_major_masks, masks_to_rles, rles_to_boxes_xyxy
    from labelgen.structures.nms import mask_nms

    torch.set_num_threads(1)
    height, width = image.shape[:2]
    rows = []
    for count in counts:
        dense = synthetic_masks(count, height, width)  # (N, H, W) C-order: how SAM's masks came before
        masks = column_major_masks(np.ascontiguousarray(dense.transpose(0, 2, 1)))  # how the refiner hands them over
        scores = np.linspace(1.0, 0.1, count, dtype=np.float32)
        rles = masks_to_rles(masks)
        boxes = rles_to_boxes_xyxy(rles)
        instances = Instances(height=height, width=width, masks_rle=tuple(rles), boxes_xyxy=boxes,
                              scores={"confidence": scores})
        parts = {
            "rle_c_order": lambda: masks_to_rles(dense),
            "rle": lambda: masks_to_rles(masks),
            "boxes": lambda: rles_to_boxes_xyxy(rles),
            "nms": lambda: mask_nms(rles, scores, 0.7, 0.9),
            "crops": lambda: instance_crops(image, instances, "box", 0.1),
        }
        row = {"masks": count}
        for name, fn in parts.items():
            row[name] = timed(fn, repeats, "cpu") * 1000
        row["total_ms"] = sum(row[name] for name in parts if name != "rle_c_order")
        row["total_before_ms"] = row["total_ms"] - row["rle"] + row["rle_c_order"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "zip-cpu.yaml"))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image", default="000000000009.jpg")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-size", type=int, default=4096)
    parser.add_argument("--finish-masks", nargs="+", type=int, default=[50, 200, 1000])
    parser.add_argument("--skip-encoders", action="store_true", help="only k-means and the CPU finish")
    args = parser.parse_args()

    from labelgen.engine.decode import read_image_rgb

    image, _ = read_image_rgb(str(COCO / args.image))
    print(f"{args.recipe} on {args.device}, image {args.image} {image.shape[1]}x{image.shape[0]}; random weights")
    gen = None
    flops: dict[str, int] = {}
    if not args.skip_encoders:  # FLOPs counted once, in fp32 (see encoder_rows)
        counting = build_generator(args.recipe, "fp32", args.device)
        encoder_rows(counting, image, "fp32", 1.0, 0, args.device, flops)
        del counting
    for precision in args.precisions:
        peak = matmul_peak(precision, args.peak_size, args.device)
        print(f"\nmatmul peak {precision}: {peak:.0f} GFLOP/s ({args.peak_size}^2 GEMM, best of 5)")
        if args.skip_encoders:
            continue
        gen = build_generator(args.recipe, precision, args.device)
        print("| encoder | precision | GFLOP/image | s/image | GFLOP/s | fraction of peak |"
              " time in matmul+conv / fused attention / other | matmul+conv at / attention at (of peak) | notes |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in encoder_rows(gen, image, precision, peak, args.repeats, args.device, flops):
            notes = ""
            if "max_abs_diff" in row:
                notes = f"max abs diff {row['max_abs_diff']:.2e}, mask IoU {row['mask_iou']:.4f}"
            split = row.get("split")
            shares = kinds = ""
            if split:
                total = sum(split.values())
                shares = " / ".join(f"{split[k] / total:.0%}" for k in ("gemm", "attention", "other"))
                attention = row["attention_fraction"]
                kinds = f"{row['gemm_fraction']:.0%} / " + ("-" if attention != attention else f"{attention:.0%}")
            print(f"| {row['encoder']} | {precision} | {row['gflop']:.1f} | {row['seconds']:.3f} |"
                  f" {row['gflop_s']:.0f} | {row['fraction_of_peak']:.0%} | {shares} | {kinds} | {notes} |", flush=True)
    gen = gen or build_generator(args.recipe, args.precisions[-1], args.device)
    km = kmeans_row(gen, image, args.device)
    print(f"\nk-means: n={km['n']} points, d={km['d']}, k={km['k']}: {km['seconds_per_iteration'] * 1000:.1f} ms per"
          f" iteration (fidelity fast), distances at {km['gflop_s_distances']:.0f} GFLOP/s;"
          f" fidelity release {km['release_seconds_per_iteration'] * 1000:.1f} ms per iteration"
          f" (before, cdist rebuilt every iteration: {km['release_before_seconds_per_iteration'] * 1000:.1f} ms)")
    print("\nCPU finish on one thread (ms per image):")
    print("| masks | RLE before (C-order masks) | RLE (column-major masks) | boxes | NMS | labeler crops |"
          " total before | total |")
    print("|---|---|---|---|---|---|---|---|")
    for row in finish_rows(image, args.finish_masks, args.repeats):
        print(f"| {row['masks']} | {row['rle_c_order']:.1f} | {row['rle']:.1f} | {row['boxes']:.1f} | {row['nms']:.1f} |"
              f" {row['crops']:.1f} | {row['total_before_ms']:.1f} | {row['total_ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
