"""What verification costs: resuming a finished run (every committed shard re-hashed), `status`,
`status --verify`, and reading every row through the verified reader, at a given dataset size.

Makes a run with the fake generator (no model; 3 instances per image) over tiny PNGs, then times each
command on it in a fresh process. Prints a table of seconds and MB/s of shard data verified.

Rerun:  .venv/bin/python bench/bench_verify.py --images 20000 100000
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def labelgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "labelgen.cli", *map(str, args)]


def timed(cmd: list[str], ok: tuple[int, ...] = (0,)) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode not in ok:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return time.perf_counter() - start


READ_ALL = "import sys; from labelgen.store.run_store import RunStore; print(sum(1 for _ in RunStore(sys.argv[1]).iter_rows()))"


def measure(images: int, work: Path) -> dict:
    from labelgen.testing.images import make_image_folder

    folder = work / f"images-{images}"
    make_image_folder(folder, images, size=(64, 48))
    out = work / f"run-{images}"
    run = labelgen("run", REPO / "recipes/fake-smoke.yaml", "--plugin", "labelgen.testing", "--images", folder,
                   "--out", out, "--set", "store.shard_size=256", "--no-progress")
    first = timed(run)
    shard_mb = sum(p.stat().st_size for p in (out / "shards").glob("*.jsonl.gz")) / 1e6
    return {
        "images": images, "shard_mb": shard_mb, "first_run": first,
        "resume": timed(run),
        "status": timed(labelgen("status", out)),
        "verify": timed(labelgen("status", out, "--verify")),
        "read_all": timed([sys.executable, "-c", READ_ALL, str(out)]),
    }


def sha256_mb_per_s(megabytes: int = 256) -> float:
    import hashlib

    block = bytes(range(256)) * (1 << 12)  # 1 MiB
    start = time.perf_counter()
    digest = hashlib.sha256()
    for _ in range(megabytes):
        digest.update(block)
    return megabytes * len(block) / 1e6 / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[20000])
    args = parser.parse_args()
    print(f"sha256 on this CPU: {sha256_mb_per_s():.0f} MB/s (the bound on re-hashing large shards)")
    print("| images | shard data MB | first run s | resume (all re-hashed) s | status s | status --verify s |"
          " read every row s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="labelgen-verify-") as tmp:
        for images in args.images:
            m = measure(images, Path(tmp))
            print(f"| {m['images']:,} | {m['shard_mb']:.1f} | {m['first_run']:.1f} | {m['resume']:.2f} |"
                  f" {m['status']:.2f} | {m['verify']:.2f} | {m['read_all']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
