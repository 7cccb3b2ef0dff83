"""CLIP ViT image tower: open_clip's own forward (nn.MultiheadAttention) against labelgen's
batch-first block path (``surgery_forward`` at depth 0, what the labeler and the unsurgered blocks
of stage 1 run), in fp32 and bf16, on a batch of crops. Random weights; outputs are compared.
Then stage 1's tower (CLIP Surgery at 512 px, bf16) per image at batch 1 and 2.

Rerun (about 2 minutes on 2 CPU cores):
  .venv/bin/python bench/bench_vit_blocks.py --model ViT-B-16 --batch 32 --size 224
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: kernel selection, allocator
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import open_clip
    import torch

    from labelgen.generators.zip.semantic import surgery_forward

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    pixels = torch.randn(args.batch, 3, args.size, args.size)
    print(f"{args.model}, batch {args.batch} x {args.size} px, {torch.get_num_threads()} threads")
    for precision in ("fp32", "bf16"):
        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

        def open_clip_forward():
            with torch.inference_mode(), autocast():
                return model.encode_image(pixels).float()

        def batch_first_forward():
            with torch.inference_mode(), autocast():
                return surgery_forward(model.visual, pixels, 0)[:, 0].float()

        diff = (open_clip_forward() - batch_first_forward()).abs().max().item()
        ours, theirs = timed(batch_first_forward, args.repeats), timed(open_clip_forward, args.repeats)
        print(f"{precision}: open_clip encode_image {theirs:.2f} s, batch-first blocks {ours:.2f} s"
              f" ({theirs / ours:.1f}x); max |difference| {diff:.2e}", flush=True)
    surgery = torch.randn(2, 3, 512, 512)
    for batch in (1, 2):
        def stage_one():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return surgery_forward(model.visual, surgery[:batch], 6)
        print(f"stage 1 (CLIP Surgery, depth 6, 512 px, bf16), batch {batch}:"
              f" {timed(stage_one, args.repeats) / batch:.2f} s/image", flush=True)


if __name__ == "__main__":
    main()
