"""SIGKILL a real `labelgen run` at several points, resume, and compare with an uninterrupted run."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labelgen.testing.images import make_image_folder

SHARDS = 8


def _cmd(images, out, workers, slow=0.04):
    return [
        sys.executable, "-m", "labelgen.cli", "run", "recipes/fake-smoke.yaml", "--plugin", "labelgen.testing",
        "--images", str(images), "--out", str(out), "--set", "store.shard_size=4",
        "--set", f"generator.seconds_per_image={slow}", "--workers", str(workers), "--no-progress",
    ]


def _env():
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _rows(root):
    rows = []
    lines = (root / "plan.jsonl").read_text().splitlines()[1:]
    for shard in map(json.loads, lines):
        with gzip.open(root / "shards" / f"{shard['index']:06d}.jsonl.gz", "rt") as handle:
            rows.extend(json.loads(line) for line in handle)
    return rows


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill") / "images"
    make_image_folder(folder, SHARDS * 4, size=(40, 30))
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    done = subprocess.run(_cmd(images, out, 1, slow=0), env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    return _rows(out)


def _wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def _kill_when(proc, shards_dir, point):
    if point == "startup":
        time.sleep(0.3)
    elif point == "first_temp_file":
        _wait_for(lambda: shards_dir.is_dir() and any(".tmp-" in p.name for p in shards_dir.iterdir()))
    else:  # "after_N_done"
        n = int(point.split("_")[1])
        _wait_for(lambda: shards_dir.is_dir() and len(list(shards_dir.glob("*.done.json"))) >= n)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("point", ["startup", "first_temp_file", "after_1_done", "after_5_done"])
def test_sigkill_then_resume_gives_identical_outputs(images, reference, tmp_path, workers, point):
    out = tmp_path / "run"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(_cmd(images, out, workers), env=_env(), cwd=repo, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, out / "shards", point)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    survivors = {p.name: p.read_bytes() for p in (out / "shards").glob("*.done.json")} if out.exists() else {}

    resumed = subprocess.run(_cmd(images, out, workers), env=_env(), cwd=repo, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows = _rows(out)
    assert rows == reference  # same records, same order, nothing missing or duplicated
    ids = [r["image"]["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) == SHARDS * 4
    for name, data in survivors.items():  # shards committed before the kill were not redone
        assert (out / "shards" / name).read_bytes() == data
    assert not list((out / "shards").glob("*.tmp-*"))
