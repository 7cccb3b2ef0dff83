"""Export speed and peak memory: COCO (RLE and polygons), YOLO-seg and FiftyOne for a synthetic run.

A synthetic run of ``--images`` images with ``--per-image`` ellipse instances each (5 classes;
``labelgen.testing.write_synthetic_run``) is written once; each export then runs in a fresh child
process, so each peak RSS (``VmHWM``) is that export's own. Run it at two sizes to see that memory
does not grow with the dataset. FiftyOne uses a private database folder under the temp dir.

Rerun:  .venv/bin/python bench/bench_export.py --images 1000 10000 --per-image 10
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CLASSES = ("cat", "dog", "car", "tree", "cup")
FORMATS = ("coco-rle", "coco-polygon", "yolo-segment", "fiftyone")

CHILD = r"""
import json, sys, time
from labelgen.exports.source import open_export_source
root, fmt, out = sys.argv[1], sys.argv[2], sys.argv[3]
source = open_export_source(root)
t0 = time.perf_counter()
if fmt.startswith("coco"):
    from labelgen.exports.coco import export_coco
    export_coco(source, out, mask_format=fmt.split("-")[1], polygon_tolerance=0.5)
elif fmt == "yolo-segment":
    from labelgen.exports.yolo import export_yolo
    export_yolo(source, out, task="segment", images="none")
else:
    from labelgen.exports.fiftyone import export_fiftyone
    export_fiftyone(source, "bench-" + str(abs(hash(root))), persistent=False)
seconds = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"seconds": seconds, "peak_rss_mib": int(hwm) / 1024}))
"""


def build(root: Path, images: int, per_image: int) -> None:
    code = ("import sys; from labelgen.testing import write_synthetic_run; "
            f"write_synthetic_run({str(root)!r}, {images}, {per_image}, 64, 48, 256, {CLASSES!r})")
    subprocess.run([sys.executable, "-c", code], check=True)


def measure(root: Path, fmt: str, out: Path, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), fmt, str(out)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{fmt} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--per-image", type=int, default=10)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    args = parser.parse_args()
    print(f"synthetic runs: 64x48 images, {args.per_image} instances each, 5 classes")
    print(f"{'images':>8} {'format':<14} {'seconds':>8} {'images/s':>9} {'instances/s':>12} {'peak RSS MiB':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "FIFTYONE_DATABASE_DIR": str(Path(tmp) / "fodb"),
               "FIFTYONE_DATABASE_VALIDATION": "false", "FIFTYONE_DO_NOT_TRACK": "true"}
        for n in args.images:
            root = Path(tmp) / f"run{n}"
            build(root, n, args.per_image)
            for fmt in args.formats:
                got = measure(root, fmt, Path(tmp) / f"{fmt}-{n}", env)
                print(f"{n:>8} {fmt:<14} {got['seconds']:>8.2f} {n / got['seconds']:>9.0f}"
                      f" {n * args.per_image / got['seconds']:>12.0f} {got['peak_rss_mib']:>13.1f}", flush=True)


if __name__ == "__main__":
    main()
