"""The run lock: never inherited by helper processes, never followed through a symlink, never stale
after kill -9 of a run with several workers (real processes)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from labelgen.errors import RunStoreError
from labelgen.store.run_store import RunStore
from labelgen.testing.images import make_image_folder

REPO = Path(__file__).resolve().parents[1]


def _cmd(images, out, workers):
    return [sys.executable, "-m", "labelgen.cli", "run", "recipes/fake-smoke.yaml", "--plugin", "labelgen.testing",
            "--images", str(images), "--out", str(out), "--set", "store.shard_size=2",
            "--set", "generator.seconds_per_image=0.05", "--workers", str(workers), "--no-progress"]


def _start(images, out, workers):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(_cmd(images, out, workers), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _descendants(pid):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _holds(process, path):
    try:
        return any(Path(f.path) == path for f in process.open_files())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@pytest.mark.slow
def test_kill_9_with_two_workers_leaves_no_lock_holder_and_no_orphan(tmp_path):
    images = tmp_path / "images"
    make_image_folder(images, 24, size=(40, 30))
    out = tmp_path / "run"
    driver = _start(images, out, workers=2)
    try:
        assert _wait_for(lambda: any((out / "shards").glob("*.done.json"))), "no shard committed"
        helpers = _descendants(driver.pid)
        assert len(helpers) >= 2, helpers  # the Manager and the loky workers are running
        lock = (out / ".lock").resolve()
        assert not [p.pid for p in helpers if _holds(p, lock)], "a helper process holds the run lock"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    # helpers notice the driver is gone and exit (resource trackers exit when their pipes close)
    assert _wait_for(lambda: not [p for p in helpers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
                     timeout=60), [p.cmdline() for p in helpers if p.is_running()]
    rerun = subprocess.run(_cmd(images, out, 2), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert len(list((out / "shards").glob("*.done.json"))) == 12


def test_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (root / ".lock").symlink_to(victim)
    with pytest.raises(RunStoreError, match="symlink"):
        RunStore(root).acquire_lock()
    assert victim.read_text() == "precious\n"


def test_lock_descriptor_is_not_inherited_across_exec(tmp_path):
    store = RunStore(tmp_path)
    store.acquire_lock()
    try:
        fd = store._lock_fd
        assert not os.get_inheritable(fd)
        child = subprocess.run([sys.executable, "-c", f"import os; os.fstat({fd})"], capture_output=True,
                               close_fds=False, timeout=120)
        assert child.returncode != 0  # the descriptor does not exist in the exec'd child
    finally:
        store.release_lock()
