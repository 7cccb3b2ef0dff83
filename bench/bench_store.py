"""Run-store overhead benchmark with the fake generator (no model).

For each dataset size it prints:
  * end-to-end images/s of `labelgen.engine.runner.run` (decode + fake generator + store);
  * images/s of the same decode + generate loop without the store, and the difference
    per image = the store's overhead (plan, JSON, RLE, gzip, fsync, atomic renames);
  * peak RSS of the first run (measured in a fresh child process per size), which includes the
    one-time listing of the source when the plan is made; and peak RSS of a "redo" run in a fresh
    process after every done record was deleted: all shards are processed again from the existing
    plan, which shows the memory of processing itself (flat in the dataset size).

Rerun:  .venv/bin/python bench/bench_store.py --sizes 1000 10000
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import labelgen.testing  # registers the fake generator
from labelgen.config import recipe_from_dict
from labelgen.engine.runner import run
from labelgen.engine.sources import FolderSource
from labelgen.engine.decode import read_image_rgb
from labelgen.engine.worker import get_generator

images, out, mode, shard_size, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
recipe = recipe_from_dict({"generator": {"name": "fake", "instances_per_image": 3},
                           "store": {"shard_size": shard_size}, "execution": {"workers": workers}})
source = FolderSource(images)
t0 = time.perf_counter()
if mode == "store":
    run(recipe, source, out)
else:  # the same work without the store
    generator = get_generator(recipe)
    for record in source.list_records():
        image, info = read_image_rgb(record.uri)
        generator.generate(image, record.with_size(info["width"], info["height"], info["sha256"]))
seconds = time.perf_counter() - t0
rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_rss_mib": rss_kib / 1024, "peak_child_rss_mib": children / 1024}))
"""


def measure(images: Path, out: Path, mode: str, shard_size: int, workers: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(images), str(out), mode, str(shard_size), str(workers)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from labelgen.testing.images import make_image_folder

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--image-size", type=int, nargs=2, default=[64, 48], metavar=("W", "H"))
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    print(f"fake generator, {args.image_size[0]}x{args.image_size[1]} PNGs, shard_size {args.shard_size},"
          f" workers {args.workers}")
    print(f"{'images':>8} {'store img/s':>12} {'no-store img/s':>15} {'overhead ms/img':>16} {'peak RSS MiB':>13}"
          f" {'redo RSS MiB':>13} {'run dir MiB':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            folder = Path(tmp) / f"images{n}"
            make_image_folder(folder, n, size=tuple(args.image_size))
            with_store = measure(folder, Path(tmp) / f"run{n}", "store", args.shard_size, args.workers)
            without = measure(folder, Path(tmp) / f"none{n}", "bare", args.shard_size, args.workers)
            size_mib = sum(p.stat().st_size for p in (Path(tmp) / f"run{n}").rglob("*") if p.is_file()) / 2**20
            for done in (Path(tmp) / f"run{n}" / "shards").glob("*.done.json"):
                done.unlink()
            redo = measure(folder, Path(tmp) / f"run{n}", "store", args.shard_size, args.workers)
            overhead_ms = (with_store["seconds"] - without["seconds"]) / n * 1000
            peak = max(with_store["peak_rss_mib"], with_store["peak_child_rss_mib"])
            redo_peak = max(redo["peak_rss_mib"], redo["peak_child_rss_mib"])
            print(f"{n:>8} {n / with_store['seconds']:>12.1f} {n / without['seconds']:>15.1f} {overhead_ms:>16.3f}"
                  f" {peak:>13.1f} {redo_peak:>13.1f} {size_mib:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
