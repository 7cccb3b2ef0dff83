"""Tiled generation (docs/tiling.md): a huge tiled TIFF with the tiny random models, and coco128 mosaics
with the ground-truth oracle.

``tiff``: writes a synthetic W x W RGB tiled TIFF (zlib, 512-px TIFF tiles, written tile by tile so
the writer never holds the image), then labels it with a recipe's generator through
``label_images`` with ``images.tiling`` on: the TIFF is read region by region. Prints seconds,
seconds per megapixel, the peak resident memory while labelling (Linux ``VmHWM``, reset after the models
are loaded) next to the memory of the loaded models, the largest window ever read (proof that the image was never decoded whole), and
the size a whole decode would have taken.

``mosaic``: builds 4x4 / 8x8 mosaics of coco128-seg and runs ``labelgen.testing.mosaic.mosaic_check``
(tiled zip-oracle-mosaic vs the source images untiled with zip-oracle): AP, recall, recall of the
objects a tile border cuts, duplicates and fragments left.

Rerun (the figures in docs/benchmarks.md, "Tiling"):
  .venv/bin/python bench/bench_tiling.py tiff --size 20000 --tile 2048 --overlap 128
  tiling's own memory: add --recipe recipes/fake-smoke.yaml --set generator.instances_per_image=8
  .venv/bin/python bench/bench_tiling.py mosaic --grid 4 8
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
COCO128 = REPO.parent / "shared" / "assets" / "data" / "coco128-seg"


def rss_mb() -> float:
    """Peak resident memory (MiB) since the last ``reset_peak_rss`` (Linux ``VmHWM``), else since start."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Start the peak over from the current resident size (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def synthetic_tiles(size: int, tile: int, seed: int = 0):
    """Tiles (row by row) of a size x size RGB scene: a smooth gradient and a few thousand discs."""
    rng = np.random.default_rng(seed)
    count = max(1, (size // 200) ** 2)
    discs = np.stack([rng.uniform(0, size, count), rng.uniform(0, size, count), rng.uniform(8, 120, count)], 1)
    colours = rng.integers(0, 256, (count, 3)).astype(np.uint8)
    for y0 in range(0, size, tile):
        for x0 in range(0, size, tile):
            yy, xx = np.mgrid[y0:y0 + tile, x0:x0 + tile]
            out = np.stack([(xx * 255 // size), (yy * 255 // size), np.full_like(xx, 128)], -1).astype(np.uint8)
            near = np.flatnonzero((np.abs(discs[:, 0] - (x0 + tile / 2)) < tile / 2 + discs[:, 2])
                                  & (np.abs(discs[:, 1] - (y0 + tile / 2)) < tile / 2 + discs[:, 2]))
            for i in near:
                out[(xx - discs[i, 0]) ** 2 + (yy - discs[i, 1]) ** 2 <= discs[i, 2] ** 2] = colours[i]
            yield out


def write_tiff(path: Path, size: int, tile: int = 512) -> None:
    import tifffile

    tifffile.imwrite(path, synthetic_tiles(size, tile), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", bigtiff=size * size * 3 > 2**32 - 2**25, photometric="rgb")


def bench_tiff(args: argparse.Namespace) -> dict:
    from labelgen.config import load_recipe, recipe_from_dict
    from labelgen.engine import decode
    from labelgen.engine.pipeline import label_images
    from labelgen.generators import GENERATORS
    from labelgen.structures.instances import ImageRecord

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tiling-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"synthetic_{args.size}.tif"
    if not path.exists():
        started = time.perf_counter()
        write_tiff(path, args.size)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s",
              flush=True)
    import labelgen.testing  # noqa: F401  registers the model-free `fake` generator (--recipe recipes/fake-smoke.yaml)

    recipe = load_recipe(args.recipe, args.set)
    data = recipe.to_dict()
    data["images"] = {**data["images"], "compute_sha256": False, "tiling": {
        "mode": "auto", "tile_size": args.tile, "overlap": args.overlap, "global_pass": args.global_pass}}
    recipe = recipe_from_dict(data)
    generator = GENERATORS.get(recipe.generator.name).from_config(recipe.generator.params)
    baseline = current_rss_mb()
    peak_reset = reset_peak_rss()  # the peak of labelling only (not of writing the TIFF, nor of loading)
    largest = [0]
    original = decode.TiffRegions.read_window_xyxy

    def tracked(self, x0, y0, x1, y1):
        largest[0] = max(largest[0], (x1 - x0) * (y1 - y0))
        return original(self, x0, y0, x1, y1)

    decode.TiffRegions.read_window_xyxy = tracked
    started = time.perf_counter()
    [row] = label_images(generator, [ImageRecord(path.name, str(path))], recipe.images, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    decode.TiffRegions.read_window_xyxy = original
    if row.instances is None:
        raise SystemExit(f"the run failed: {row.failure}")
    megapixels = args.size * args.size / 1e6
    return {"recipe": args.recipe, "size": args.size, "tile": args.tile, "overlap": args.overlap,
            "global_pass": args.global_pass, "tiles": row.instances.provenance["tiling"]["tiles"],
            "instances": len(row.instances), "record": [row.image.width, row.image.height],
            "seconds": round(seconds, 1), "seconds_per_megapixel": round(seconds / megapixels, 3),
            "rss_after_models_mb": round(baseline), "peak_rss_mb": round(rss_mb()), "peak_reset": peak_reset,
            "largest_window_read_px": largest[0], "whole_decode_would_be_mb": round(args.size ** 2 * 3 / 2**20)}


def bench_mosaic(args: argparse.Namespace) -> list[dict]:
    from labelgen.testing.mosaic import mosaic_check

    results = []
    for grid in args.grid:
        tiling = {"mode": "always", "tile_size": args.tile, "overlap": args.overlap}
        if args.global_pass:
            tiling.update(global_pass=True, global_size=args.global_size, global_min_side=args.global_min_side)
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            result = mosaic_check(str(COCO128), grid, folder, tiling)
            result["grid"], result["seconds"] = grid, round(time.perf_counter() - started, 1)
        results.append(result)
        print(json.dumps(result), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    tiff = sub.add_parser("tiff")
    tiff.add_argument("--size", type=int, default=20000)
    tiff.add_argument("--tile", type=int, default=2048)
    tiff.add_argument("--overlap", type=int, default=128)
    tiff.add_argument("--recipe", default="recipes/zip-tiny-random.yaml")
    tiff.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    tiff.add_argument("--batch-size", type=int, default=1)
    tiff.add_argument("--global-pass", action="store_true")
    tiff.add_argument("--workdir", default="")
    mosaic = sub.add_parser("mosaic")
    mosaic.add_argument("--grid", type=int, nargs="+", default=[4, 8])
    mosaic.add_argument("--tile", type=int, default=512)
    mosaic.add_argument("--overlap", type=int, default=96)
    mosaic.add_argument("--global-pass", action="store_true")
    mosaic.add_argument("--global-size", type=int, default=1280)
    mosaic.add_argument("--global-min-side", type=int, default=400)
    args = parser.parse_args()
    if args.what == "tiff":
        print(json.dumps(bench_tiff(args), indent=1))
    else:
        bench_mosaic(args)


if __name__ == "__main__":
    main()
