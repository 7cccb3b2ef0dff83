"""Filtering-after-the-fact benchmark: ``save_filtered`` and a 9-value ``sweep`` on a synthetic run.

The run directory is written directly with ``RunStore`` APIs (no images, no model): ``--images``
images of ``--size`` pixels with ``--per-image`` instances each (ellipses; every third one nested
in its predecessor, so NMS has work), five classes, ``confidence`` plus two score components.
The run is built, and each measured operation runs, in a fresh child process of a parent that
imports nothing heavy, so each peak RSS (``resource.getrusage`` of the child; ``VmHWM`` from
/proc beside it where available) is that operation's own.

Operations: ``save_filtered`` with a realistic config (min_confidence, area bounds, NMS IoU+IoS,
max_instances); the same plus mask cleanup (fill_holes, min_component_area: decodes every mask);
``sweep`` of min_confidence over 9 values with the realistic config.

Rerun:  .venv/bin/python bench/bench_filter.py --images 10000 --per-image 10 --size 64 48
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REALISTIC = dict(min_confidence=0.3, min_area=20, max_area_fraction=0.5, nms_iou=0.7, nms_ios=0.85, max_instances=8)
CLEANUP = dict(REALISTIC, fill_holes=True, min_component_area=4)
SWEEP_VALUES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
CLASSES = ("cat", "dog", "car", "tree", "cup")


def build_run(root: Path, images: int, per_image: int, width: int, height: int, shard_size: int) -> None:
    from labelgen.testing import write_synthetic_run

    write_synthetic_run(root, images, per_image, width, height, shard_size, CLASSES)


CHILD = r"""
import json, resource, sys, time
from labelgen.postprocess.filter_store import save_filtered, sweep
from labelgen.postprocess.filtering import FilterConfig
from labelgen.store.run_store import RunStore

root, operation, options, values, classes = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:6])
store, config = RunStore(root), FilterConfig(**options)
t0 = time.perf_counter()
if operation == "sweep":
    out = sweep(store, config, "confidence", values, classes)
else:
    path = save_filtered(store, config, operation, classes)
    out = json.loads((path / "summary.json").read_text())["total"]
seconds = time.perf_counter() - t0
rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    hwm_mib = int(hwm) / 1024
except (OSError, IndexError):
    hwm_mib = None
print(json.dumps({"seconds": seconds, "peak_rss_mib": rss_mib, "vm_hwm_mib": hwm_mib, "result": out}))
"""


def measure(root: Path, operation: str, options: dict) -> dict:
    args = [root, operation, json.dumps(options), json.dumps(SWEEP_VALUES), json.dumps(CLASSES)]
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--per-image", type=int, default=10)
    parser.add_argument("--size", type=int, nargs=2, default=[64, 48], metavar=("W", "H"))
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--build-into", type=Path, help=argparse.SUPPRESS)  # internal: the build child
    args = parser.parse_args()
    if args.build_into:
        build_run(args.build_into, args.images, args.per_image, args.size[0], args.size[1], args.shard_size)
        return
    total = args.images * args.per_image
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--build-into", str(root), "--images", str(args.images),
                        "--per-image", str(args.per_image), "--size", *map(str, args.size),
                        "--shard-size", str(args.shard_size)], check=True)
        size_mib = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
        print(f"synthetic run: {args.images} images x {args.per_image} = {total} instances,"
              f" {args.size[0]}x{args.size[1]}, shards of {args.shard_size}, {size_mib:.1f} MiB,"
              f" built in {time.perf_counter() - t0:.1f} s; parent peak RSS"
              f" {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")
        print(f"{'operation':<34} {'seconds':>8} {'instances/s':>12} {'peak RSS MiB':>13} {'VmHWM MiB':>10}  result")
        for label, operation, options in [
            ("save_filtered (realistic)", "realistic", REALISTIC),
            ("save_filtered (+ cleanup)", "cleanup", CLEANUP),
            (f"sweep {len(SWEEP_VALUES)} values (realistic)", "sweep", REALISTIC),
        ]:
            got = measure(root, operation, options)
            result = got["result"] if operation != "sweep" else [k for _, k in got["result"]]
            hwm = f"{got['vm_hwm_mib']:.1f}" if got["vm_hwm_mib"] is not None else "-"
            print(f"{label:<34} {got['seconds']:>8.2f} {total / got['seconds']:>12.0f} {got['peak_rss_mib']:>13.1f}"
                  f" {hwm:>10}  {result}")


if __name__ == "__main__":
    main()
