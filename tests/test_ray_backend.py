"""Backends: device assignment, Ray resources, and real Ray runs (local runtime, 2 CPUs) vs local runs."""
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import make_recipe
from labelgen.engine.backends import (
    LocalBackend,
    RayBackend,
    ShardWork,
    _actor_count,
    assign_devices,
    ray_actor_resources,
)
from labelgen.cli import _backend_overrides
from labelgen.config import ExecutionConfig
from labelgen.errors import ConfigError, GeneratorError, RunStoreError, StoreWriteError
from labelgen.store.run_store import RunStore, ShardSpec
from labelgen.testing.images import make_image_folder

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
IMAGES, SHARD_SIZE = 24, 4
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")


# -- pure: devices, resources, CLI flags ----------------------------------------------
@pytest.mark.parametrize("device, devices, workers, cuda_count, expected", [
    ("cpu", (), 3, 0, ["cpu", "cpu", "cpu"]),
    ("cpu", (), 2, 4, ["cpu", "cpu"]),  # GPUs present but not asked for
    ("cuda", (), 2, 4, ["cuda:0", "cuda:1"]),
    ("cuda", (), 3, 2, ["cuda:0", "cuda:1", "cuda:0"]),
    ("cuda", (), 1, 1, ["cuda:0"]),
    ("cuda:1", (), 2, 0, ["cuda:1", "cuda:1"]),  # one explicit GPU is shared
    ("cpu", ("cuda:0", "cuda:2"), 3, 0, ["cuda:0", "cuda:2", "cuda:0"]),  # devices win over device
    ("cuda", ("cuda:3",), 2, 0, ["cuda:3", "cuda:3"]),
    ("cuda", (), 2, 0, GeneratorError("asks for the GPUs, but torch sees none")),
])
def test_assign_devices(device, devices, workers, cuda_count, expected):
    if isinstance(expected, Exception):
        with pytest.raises(type(expected), match=str(expected)):
            assign_devices(device, devices, workers, cuda_count)
    else:
        assert assign_devices(device, devices, workers, cuda_count) == expected


@pytest.mark.parametrize("execution, expected", [
    (ExecutionConfig(), (1.0, 0.0, "cpu")),
    (ExecutionConfig(threads_per_worker=4), (4.0, 0.0, "cpu")),
    (ExecutionConfig(device="cuda"), (1.0, 1.0, "cuda:0")),
    (ExecutionConfig(device="cuda:3"), (1.0, 1.0, "cuda:0")),  # Ray picks the GPU
    (ExecutionConfig(devices=("cuda:0", "cuda:1")), (1.0, 1.0, "cuda:0")),
])
def test_ray_actor_resources(execution, expected):
    assert ray_actor_resources(execution) == expected


@pytest.mark.parametrize("resources, execution, shards, expected", [
    ({"CPU": 2.0}, ExecutionConfig(workers=2), 6, 2),
    ({"CPU": 2.0}, ExecutionConfig(workers=4), 6, 2),  # capped by the cluster (warning)
    ({"CPU": 8.0}, ExecutionConfig(workers=4), 3, 3),  # no more actors than shards
    ({"CPU": 8.0, "GPU": 2.0}, ExecutionConfig(workers=4, device="cuda"), 6, 2),
    ({"CPU": 8.0}, ExecutionConfig(workers=2, device="cuda"), 6, GeneratorError("the Ray cluster has none")),
    ({"CPU": 2.0}, ExecutionConfig(workers=2, threads_per_worker=4), 6, ConfigError("needs 4 CPUs")),
])
def test_ray_actor_count(resources, execution, shards, expected):
    num_cpus, num_gpus, _ = ray_actor_resources(execution)
    if isinstance(expected, Exception):
        with pytest.raises(type(expected), match=str(expected)):
            _actor_count(resources, execution, shards, num_cpus, num_gpus)
    else:
        assert _actor_count(resources, execution, shards, num_cpus, num_gpus) == expected


@pytest.mark.parametrize("backend, address, expected", [
    (None, None, []),
    ("local", None, ["execution.backend=local"]),
    ("ray", None, ["execution.backend=ray"]),
    (None, "ray://head:10001", ["execution.backend=ray", 'execution.ray_address="ray://head:10001"']),
    ("ray", "auto", ["execution.backend=ray", 'execution.ray_address="auto"']),
    ("local", "auto", ConfigError("--ray-address is for --backend ray")),
])
def test_cli_backend_flags(backend, address, expected):
    if isinstance(expected, Exception):
        with pytest.raises(type(expected), match=str(expected)):
            _backend_overrides(backend, address)
    else:
        overrides = _backend_overrides(backend, address)
        assert overrides == expected
        execution = make_recipe(*overrides).execution
        assert execution.backend == (backend or ("ray" if address else "local"))
        assert execution.ray_address == (address or "")


def test_unreachable_ray_address_fails_fast():
    from labelgen.engine.backends import check_reachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")
        check_reachable(f"ray://127.0.0.1:{port}")
    check_reachable("auto")  # Ray finds it (or says it cannot)
    for address in (f"127.0.0.1:{port}", f"ray://localhost:{port}"):
        started = time.monotonic()
        with pytest.raises(ConfigError, match="nothing answers there"):
            check_reachable(address)
        assert time.monotonic() - started < 5


# -- simulated devices: which worker runs on which device ------------------------------
def probe_shard(root, shard, recipe, on_image):
    """A ``run_shard`` stand-in (importable by workers): reports where the shard ran."""
    time.sleep(0.1)
    if shard.index == 99:
        raise StoreWriteError("disk full (simulated)")
    on_image(1)
    return {"ok": True, "device": recipe.execution.device, "pid": os.getpid(),
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def die_on_shard_1(root, shard, recipe, on_image):
    if shard.index == 1:
        os._exit(3)  # the worker process dies mid-shard (OOM killer, segfault)
    return probe_shard(root, shard, recipe, on_image)


def _probe_work(root, recipe, indices, run_shard=probe_shard):
    outcomes, images = {}, []
    work = ShardWork(root=str(root), recipe=recipe, shards=[ShardSpec(i, ()) for i in indices], count=len(indices),
                     plugins=[], run_shard=run_shard, on_outcome=outcomes.__setitem__, on_images=images.append)
    return work, outcomes, images


def _by_pid(outcomes):
    devices = {}
    for outcome in outcomes.values():
        devices.setdefault(outcome["pid"], set()).add(outcome["device"])
    return devices


@pytest.mark.slow
@pytest.mark.parametrize("overrides, gpus, expected", [
    (["execution.devices=[cuda:0,cuda:2]"], 0, {"cuda:0", "cuda:2"}),
    (["execution.device=cuda"], 4, {"cuda:0", "cuda:1"}),  # 2 workers on 4 GPUs (loky processes are reused)
])
def test_local_workers_each_keep_one_device(tmp_path, monkeypatch, overrides, gpus, expected):
    import labelgen.engine.backends as backends

    monkeypatch.setattr(backends, "_cuda_count", lambda execution: gpus)
    work, outcomes, images = _probe_work(tmp_path, make_recipe("execution.workers=2", *overrides), range(8))
    LocalBackend().execute(work)
    assert sorted(outcomes) == list(range(8)) and sum(images) == 8
    devices = _by_pid(outcomes)
    assert all(len(used) == 1 for used in devices.values()), devices  # a model on one GPU per worker
    claimed = [next(iter(used)) for used in devices.values()]
    assert len(claimed) == len(set(claimed)) and set(claimed) <= expected


def test_cuda_without_gpus_stops_before_any_worker_starts(tmp_path, monkeypatch):
    import labelgen.engine.backends as backends

    monkeypatch.setattr(backends, "_cuda_count", lambda execution: 0)
    work, outcomes, _ = _probe_work(tmp_path, make_recipe("execution.workers=2", "execution.device=cuda"), range(3))
    with pytest.raises(GeneratorError, match="torch sees none"):
        LocalBackend().execute(work)
    assert outcomes == {}


# -- real Ray: in-process runtime with two simulated GPUs ------------------------------
@pytest.fixture(scope="module")
def ray_env():
    """Private Ray temp dir (short: Ray's socket paths must fit 107 bytes) and token (nothing in ~/.ray)."""
    folder = tempfile.mkdtemp(prefix="lgray-")
    env = {"RAY_TMPDIR": folder, "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    yield env
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="class")
def ray_gpus(ray_env):
    """Ray connected in this process, told it has 2 GPUs: the backend uses it and leaves it running."""
    saved = {k: os.environ.get(k) for k in [*ray_env, "RAY_AUTH_MODE"]}  # ray.init sets RAY_AUTH_MODE=token
    os.environ.update(ray_env)
    import ray

    from labelgen.engine.backends import start_local_ray

    start_local_ray(ray, 2, num_gpus=2, log_to_driver=False, object_store_memory=100 * 2**20)  # loopback only
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _run_dir(tmp_path):
    (tmp_path / "run.json").write_text("{}")  # actors check they can see the run directory
    return tmp_path


@needs_ray
@pytest.mark.slow
class TestRayInProcess:
    """One Ray runtime for these tests (torn down before the CLI tests start their own)."""

    def test_actors_get_one_gpu_each(self, tmp_path, ray_gpus):
        recipe = make_recipe("execution.backend=ray", "execution.workers=3", "execution.device=cuda")
        work, outcomes, images = _probe_work(_run_dir(tmp_path), recipe, range(6))
        RayBackend().execute(work)
        assert ray_gpus.is_initialized()  # the caller's connection is left alone
        assert sorted(outcomes) == list(range(6)) and sum(images) == 6
        assert {o["device"] for o in outcomes.values()} == {"cuda:0"}  # CUDA_VISIBLE_DEVICES holds the one GPU
        visible = {}
        for outcome in outcomes.values():
            visible.setdefault(outcome["pid"], set()).add(outcome["cuda_visible"])
        assert len(visible) <= 2 and all(len(v) == 1 for v in visible.values())  # 2 GPUs: 2 actors, not 3
        assert len({next(iter(v)) for v in visible.values()}) == len(visible)
        assert set().union(*visible.values()) <= {"0", "1"}

    def test_run_reports_every_image_and_matches_the_local_backend(self, tmp_path, image_dir, ray_gpus):
        from labelgen.engine.runner import RunProgress, run
        from labelgen.engine.sources import FolderSource

        run(make_recipe(), FolderSource(image_dir), tmp_path / "local")
        ticks = []
        progress = RunProgress(on_start=lambda total, done: ticks.append(("start", total, done)),
                               on_images=ticks.append)
        result = run(make_recipe("execution.backend=ray", "execution.workers=2"), FolderSource(image_dir),
                     tmp_path / "ray", progress=progress)
        assert result.shards_done == 3 and not result.shards_failed
        assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")
        assert ticks[0] == ("start", 10, 0) and sum(ticks[1:]) == 10

    def test_fatal_error_stops_the_run_with_the_workers_error(self, tmp_path, ray_gpus):
        work, outcomes, _ = _probe_work(_run_dir(tmp_path), make_recipe("execution.workers=2"), [0, 99, 1, 2, 3, 4])
        with pytest.raises(StoreWriteError, match="disk full"):
            RayBackend().execute(work)
        assert 99 not in outcomes

    def test_worker_death_is_a_shard_error_and_the_worker_is_replaced(self, tmp_path, ray_gpus):
        work, outcomes, _ = _probe_work(_run_dir(tmp_path), make_recipe("execution.workers=2"), range(5),
                                        run_shard=die_on_shard_1)
        RayBackend().execute(work)
        assert sorted(outcomes) == list(range(5))
        assert not outcomes[1]["ok"] and "Actor" in outcomes[1]["error"]["type"]
        assert all(outcomes[i]["ok"] for i in (0, 2, 3, 4))

    def test_workers_that_cannot_see_the_run_directory_stop_the_run(self, tmp_path, ray_gpus):
        work, _, _ = _probe_work(tmp_path / "elsewhere", make_recipe("execution.workers=2"), range(2))
        with pytest.raises(RunStoreError, match="cannot see the run directory"):
            RayBackend().execute(work)


# -- real Ray through the CLI: same rows as local, SIGKILL + resume ---------------------
def _cmd(images, out, backend, workers=2, slow=0.0):
    return [
        sys.executable, "-m", "labelgen.cli", "run", "recipes/fake-smoke.yaml", "--plugin", "labelgen.testing",
        "--images", str(images), "--out", str(out), "--set", f"store.shard_size={SHARD_SIZE}",
        "--set", f"generator.seconds_per_image={slow}", "--workers", str(workers), "--backend", backend,
        "--no-progress",
    ]


def _rows(root):
    return list(RunStore(root).iter_rows())


def _session_processes(session_id):
    """Pids still alive in session ``session_id`` (Ray's processes stay in the driver's session)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session_id:
            alive.append(int(stat.parent.name))
    return alive


def _assert_no_ray_left(session_id, timeout=20):
    deadline = time.monotonic() + timeout
    while _session_processes(session_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _session_processes(session_id), "processes of the run were left behind"


def _run(cmd, env):
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _assert_no_ray_left(proc.pid)
    assert proc.returncode == 0, stderr
    return stderr


def _run_and_kill_after_first_commit(cmd, env, out):
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "shards").glob("*.done.json")):
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    _assert_no_ray_left(proc.pid)
    return {p.name: p.read_bytes() for p in (out / "shards").glob("*.done.json")}


@pytest.fixture(scope="module")
def cli_env(ray_env):
    return {**os.environ, **ray_env}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray") / "images"
    make_image_folder(folder, IMAGES, size=(40, 30))
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory, cli_env):
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(_cmd(images, out, "local", workers=1), cli_env)
    return _rows(out)


def _check_complete(out, reference, survivors=None):
    rows = _rows(out)
    assert rows == reference  # same records, same order, nothing missing or duplicated
    ids = [r["image"]["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) == IMAGES
    for name, data in (survivors or {}).items():  # shards committed before the kill were not redone
        assert (out / "shards" / name).read_bytes() == data
    assert not list((out / "shards").glob("*.tmp-*")) and not list((out / "shards").glob("*.error.json"))


@needs_ray
@pytest.mark.slow
def test_ray_backend_gives_the_same_rows_as_local(images, reference, tmp_path, cli_env):
    stderr = _run(_cmd(images, tmp_path / "run", "ray"), cli_env)
    assert f"{IMAGES // SHARD_SIZE} shards run, 0 already done" in stderr
    _check_complete(tmp_path / "run", reference)


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("resume_backend", ["ray", "local"])
def test_sigkill_ray_run_then_resume(images, reference, tmp_path, cli_env, resume_backend):
    out = tmp_path / "run"
    survivors = _run_and_kill_after_first_commit(_cmd(images, out, "ray", slow=0.1), cli_env, out)
    assert 1 <= len(survivors) < IMAGES // SHARD_SIZE
    stderr = _run(_cmd(images, out, resume_backend, slow=0.1), cli_env)  # same recipe: same fingerprint
    assert f"{len(survivors)} already done" in stderr
    _check_complete(out, reference, survivors)
