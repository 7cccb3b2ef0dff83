"""Attack campaign: kill -9 at random instants and damage committed files, then check nothing is lost.

Kill campaign: each attempt starts a real `labelgen` process (run with 1 or 2 workers, run --extend,
filter --save, export coco / yolo), SIGKILLs it at a random instant, reruns the same command, and
compares the result with an uninterrupted reference (rows of every shard, filtered copy, exported
files). An attempt *holds* when the rerun exits 0 and the result is identical.

Corruption campaign: each attempt damages one committed file of a finished run (bit flip at a random
offset in a shard, edited done record, torn done record, deleted output, truncated / flipped plan,
flipped run.json, garbled config.yaml). It holds when the damage is named (status --verify exits
non-zero and names the file, or every command refuses the run naming the file and changes nothing)
and, for shard damage, the rerun redoes exactly that shard and the rows equal the reference.

    python bench/attack.py [--kills 14] [--seed 0] [--images 96]

Prints one line per attempt, then "N attempts, N held" per campaign. Uses the FAKE generator
(labelgen.testing) over coco128 images linked under new names; needs no model weights.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO128 = Path(os.environ.get("LABELGEN_COCO128", REPO.parent / "shared" / "assets" / "data" / "coco128-seg"))
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def labelgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "labelgen.cli", *map(str, args)]


def run_cmd(images: Path, out: Path, workers: int, *extra: str) -> list[str]:
    return labelgen("run", REPO / "recipes/fake-smoke.yaml", "--plugin", "labelgen.testing", "--images", images,
                    "--out", out, "--set", "store.shard_size=8", "--set", "generator.seconds_per_image=0.02",
                    "--workers", workers, "--no-progress", *extra)


def call(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def timed(cmd: list[str]) -> float:
    start = time.monotonic()
    done = call(cmd)
    if done.returncode != 0:
        raise SystemExit(f"reference command failed: {' '.join(cmd)}\n{done.stderr}")
    return time.monotonic() - start


def kill_at(cmd: list[str], delay: float) -> None:
    """Start ``cmd`` and SIGKILL it after ``delay`` seconds (if it is still running)."""
    process = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()


# -- what a result is -------------------------------------------------------------------
def shard_rows(root: Path) -> list:
    rows = []
    for line in (root / "plan.jsonl").read_text().splitlines()[1:]:
        index = json.loads(line)["index"]
        with gzip.open(root / "shards" / f"{index:06d}.jsonl.gz", "rt") as handle:
            rows.extend(json.loads(row) for row in handle)
    return rows


def tree(folder: Path, skip: tuple[str, ...] = ("export_report.json", ".labelgen-export.lock")) -> dict:
    """Relative path -> bytes (symlinks by target) of every file under ``folder``; the folder's own
    path (data.yaml names it) reads as ``<OUT>`` so copies in two folders compare equal."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.name in skip:
            continue
        if path.is_symlink():
            out[rel] = os.readlink(path).encode()
        elif path.is_file():
            out[rel] = path.read_bytes().replace(str(folder).encode(), b"<OUT>")
    return out


def coco_content(folder: Path) -> dict:
    return json.loads((folder / "annotations.json").read_text())


# -- setup --------------------------------------------------------------------------------
def make_images(folder: Path, count: int) -> list[Path]:
    sources = sorted((COCO128 / "images" / "train2017").glob("*.jpg"))
    if not sources:
        raise SystemExit(f"coco128 not found at {COCO128} (set LABELGEN_COCO128)")
    folder.mkdir(parents=True)
    links = []
    for i in range(count):
        link = folder / f"img{i:05d}_{sources[i % len(sources)].name}"
        link.symlink_to(sources[i % len(sources)])
        links.append(link)
    return links


class Campaign:
    def __init__(self, name: str):
        self.name, self.attempts, self.held = name, 0, 0

    def record(self, what: str, held: bool, detail: str = "") -> None:
        self.attempts += 1
        self.held += bool(held)
        print(f"  [{self.name} {self.attempts:2d}] {'held ' if held else 'BROKE'} {what}{'  ' + detail if detail else ''}",
              flush=True)

    def summary(self) -> str:
        return f"{self.name}: {self.attempts} attempts, {self.held} held"


def kill_campaign(work: Path, images: Path, kills: int, rng: random.Random) -> Campaign:
    campaign = Campaign("kill -9")
    reference = work / "reference"
    ref_seconds = timed(run_cmd(images, reference, 1))
    ref_rows = shard_rows(reference)
    timed(labelgen("filter", reference, "--min-confidence", "0.3", "--save", "keep"))
    ref_filtered = tree(reference / "filtered" / "keep")
    timed(labelgen("export", reference, "--format", "coco", "--out", work / "ref-coco"))
    timed(labelgen("export", reference, "--format", "yolo", "--out", work / "ref-yolo"))
    ref_coco, ref_yolo = coco_content(work / "ref-coco"), tree(work / "ref-yolo")
    print(f"reference run: {ref_seconds:.1f} s for {len(ref_rows)} images", flush=True)

    kinds = ["run-1", "run-2", "extend", "filter", "coco", "yolo"]
    for attempt in range(kills):
        kind = kinds[attempt % len(kinds)]
        out = work / f"k{attempt:02d}"
        delay = rng.uniform(0.3, max(0.6, ref_seconds))
        if kind in ("run-1", "run-2"):
            cmd = run_cmd(images, out, int(kind[-1]))
            kill_at(cmd, delay)
            done = call(cmd)
            held = done.returncode == 0 and shard_rows(out) == ref_rows
        elif kind == "extend":  # the run sees the first half, then --extend adds the rest and is killed
            half = work / f"half{attempt:02d}"
            half.mkdir()
            names = sorted(p.name for p in images.iterdir())
            for name in names[: len(names) // 2]:
                (half / name).symlink_to(os.readlink(images / name))
            call(run_cmd(half, out, 1))
            for name in names[len(names) // 2:]:
                (half / name).symlink_to(os.readlink(images / name))
            cmd = run_cmd(half, out, 2, "--extend")
            kill_at(cmd, delay / 2)
            done = call(cmd)
            rows = shard_rows(out) if done.returncode == 0 else None
            key = lambda row: row["image"]["image_id"]  # noqa: E731  ids keep the order of the plan
            held = rows is not None and sorted(map(json.dumps, (strip_uri(r) for r in rows))) == \
                sorted(map(json.dumps, (strip_uri(r) for r in ref_rows))) and len({key(r) for r in rows}) == len(rows)
        else:
            shutil.copytree(reference, out, symlinks=True, ignore=shutil.ignore_patterns("filtered", ".lock"))
            if kind == "filter":
                cmd = labelgen("filter", out, "--min-confidence", "0.3", "--save", "keep")
                check = lambda: tree(out / "filtered" / "keep") == ref_filtered  # noqa: E731
            elif kind == "coco":
                cmd = labelgen("export", out, "--format", "coco", "--out", out / "coco")
                check = lambda: coco_content(out / "coco") == ref_coco  # noqa: E731
            else:
                cmd = labelgen("export", out, "--format", "yolo", "--out", out / "yolo")
                check = lambda: tree(out / "yolo") == ref_yolo  # noqa: E731
            kill_at(cmd, rng.uniform(0.2, 2.5))
            done = call(cmd)
            leftovers = [p.name for p in out.rglob("*.tmp-*")]
            held = done.returncode == 0 and check() and not leftovers
        campaign.record(f"{kind:7s} killed at {delay:5.2f} s, rerun", held,
                        "" if held else (done.stderr.strip().splitlines() or [""])[-1])
    return campaign


def strip_uri(row: dict) -> dict:
    """A row without the folder part of its uri (the extend case labels links in another folder)."""
    image = {**row["image"], "uri": os.path.basename(row["image"]["uri"])}
    return {**row, "image": image}


def flip(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"offset {offset}"


def corruption_campaign(work: Path, images: Path, rng: random.Random) -> Campaign:
    campaign = Campaign("corruption")
    reference = work / "reference"
    ref_rows = shard_rows(reference)
    shard_count = len((reference / "plan.jsonl").read_text().splitlines()) - 1
    shard_damages = ["flip-output", "flip-output", "flip-output", "edit-done", "torn-done", "delete-output",
                     "flip-done"]
    root_damages = ["truncate-plan", "flip-plan", "flip-plan", "edit-run-json", "garble-config"]
    for attempt, damage in enumerate(shard_damages + root_damages):
        out = work / f"c{attempt:02d}"
        shutil.copytree(reference, out, symlinks=True, ignore=shutil.ignore_patterns("filtered", ".lock"))
        index = rng.randrange(shard_count)
        output, done = out / "shards" / f"{index:06d}.jsonl.gz", out / "shards" / f"{index:06d}.done.json"
        if damage in shard_damages:
            if damage == "flip-output":
                where = flip(output, rng)
            elif damage == "flip-done":
                where = flip(done, rng)
            elif damage == "edit-done":
                record = json.loads(done.read_text())
                record["instances"] += 1
                done.write_text(json.dumps(record, indent=1))
                where = "instances + 1"
            elif damage == "torn-done":
                done.write_bytes(done.read_bytes()[: rng.randrange(1, 200)])
                where = "cut short"
            else:
                output.unlink()
                where = "deleted"
            status = call(labelgen("status", out, "--verify"))
            named = status.returncode != 0 and f"{index:06d}" in status.stdout
            rerun = call(run_cmd(images, out, 1))
            redone = f"1 shards run, {shard_count - 1} already done" in rerun.stderr
            held = named and rerun.returncode == 0 and redone and shard_rows(out) == ref_rows
            detail = "" if held else f"named={named} rerun={rerun.returncode} redone={redone}"
            campaign.record(f"{damage:14s} shard {index} ({where})", held, detail)
            continue
        plan, manifest, config = out / "plan.jsonl", out / "run.json", out / "config.yaml"
        if damage == "truncate-plan":
            lines = plan.read_text().splitlines(keepends=True)
            plan.write_text("".join(lines[: rng.randrange(1, len(lines))]))
            where = "cut at a line boundary"
        elif damage == "flip-plan":
            where = flip(plan, rng)
        elif damage == "edit-run-json":
            record = json.loads(manifest.read_text())
            record["fingerprint"] = record["fingerprint"][::-1]
            manifest.write_text(json.dumps(record, indent=1))
            where = "fingerprint reversed"
        else:
            config.write_text(config.read_text()[:40] + "\n  ]: [\n")
            where = "garbled"
        before = tree(out, skip=(".lock",))
        name = {"truncate-plan": "plan.jsonl", "flip-plan": "plan.jsonl", "edit-run-json": "run.json",
                "garble-config": "config.yaml"}[damage]
        commands = [labelgen("status", out, "--verify"), run_cmd(images, out, 1),
                    labelgen("export", out, "--format", "coco", "--out", work / f"c{attempt:02d}-coco")]
        if damage == "garble-config":  # read only when a run is resumed
            commands = [run_cmd(images, out, 1)]
        results = [call(cmd) for cmd in commands]
        refused = all(r.returncode == 2 and "labelgen: error:" in r.stderr and name in r.stderr
                      and "Traceback" not in r.stderr for r in results)
        unchanged = tree(out, skip=(".lock",)) == before
        held = refused and unchanged
        campaign.record(f"{damage:14s} ({where})", held, "" if held else f"refused={refused} unchanged={unchanged}")
    return campaign


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=14, help="kill -9 attempts (default 14)")
    parser.add_argument("--images", type=int, default=96, help="images in the test folder (default 96)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="labelgen-attack-"))
    try:
        images = work / "images"
        make_images(images, args.images)
        start = time.monotonic()
        kills = kill_campaign(work, images, args.kills, rng)
        corruption = corruption_campaign(work, images, rng)
        print(kills.summary())
        print(corruption.summary())
        total = Campaign("total")
        total.attempts, total.held = kills.attempts + corruption.attempts, kills.held + corruption.held
        print(f"{total.attempts} attempts, {total.held} held ({time.monotonic() - start:.0f} s)")
        return 0 if total.held == total.attempts else 1
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
