"""Nothing labelgen starts listens on the network: a private local Ray runtime (gcs_server, raylet,
agents, workers), FiftyOne's embedded MongoDB. Every listening socket of every process of each is on
loopback (127.0.0.0/8, ::1, or IPv4-mapped 127.x); a wildcard (0.0.0.0, ::) or a LAN address fails.
(The FiftyOne App server started by ``labelgen review`` is checked in test_review.py.)"""
import importlib.util
import ipaddress
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

from labelgen.testing.images import make_image_folder

psutil = pytest.importorskip("psutil")
REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")


def is_loopback(host):
    address = ipaddress.ip_address(host.split("%", 1)[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def listening_sockets(processes):
    """``{(pid, process name, ip, port)}``: the TCP sockets in LISTEN state and the UDP sockets
    bound without a peer of ``processes``; processes that are gone are skipped."""
    found = {}
    for process in processes:
        try:
            name = process.name()
            for conn in process.net_connections(kind="inet"):
                tcp_listen = conn.status == psutil.CONN_LISTEN
                udp_bound = conn.type == socket.SOCK_DGRAM and conn.laddr and not conn.raddr
                if tcp_listen or udp_bound:
                    found.setdefault((process.pid, conn.laddr.ip, conn.laddr.port), name)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return {(pid, name, ip, port) for (pid, ip, port), name in found.items()}


def not_on_loopback(sockets):
    return sorted(s for s in sockets if not is_loopback(s[2]))


def session_processes(session_id):
    """The driver ``session_id`` and every live process of its session (Ray's processes stay in it)
    or below it (children, recursively)."""
    procs = {}
    try:
        root = psutil.Process(session_id)
        procs[root.pid] = root
        procs.update((p.pid, p) for p in root.children(recursive=True))
    except psutil.NoSuchProcess:
        pass
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_id:
                procs.setdefault(process.pid, process)
        except (OSError, psutil.Error):
            continue
    return list(procs.values())


def _names(processes):
    names = set()
    for process in processes:
        try:
            names.add(process.name())
        except psutil.Error:
            pass
    return names


# -- Ray: the local runtime `labelgen run --backend ray` starts ------------------------------------
@needs_ray
@pytest.mark.slow
def test_local_ray_runtime_listens_on_loopback_only(tmp_path):
    images, out = tmp_path / "images", tmp_path / "run"
    make_image_folder(images, 24, size=(40, 30))
    ray_tmp = tempfile.mkdtemp(prefix="lgnet-")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the fix must not rely on the caller's environment
    cmd = [sys.executable, "-m", "labelgen.cli", "run", "recipes/fake-smoke.yaml", "--plugin", "labelgen.testing",
           "--images", str(images), "--out", str(out), "--set", "store.shard_size=4",
           "--set", "generator.seconds_per_image=0.4", "--workers", "2", "--backend", "ray", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sockets, seen = set(), set()
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:  # snapshots for the whole run
            processes = session_processes(proc.pid)
            seen |= _names(processes)
            sockets |= {s for s in listening_sockets(processes) if s[::2] not in {t[::2] for t in sockets}}
            time.sleep(0.2)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, output
    # the snapshots saw the runtime while it worked: Ray's servers and both shard actors
    assert {"gcs_server", "raylet"} <= seen, seen
    assert any("_ShardActor" in name for name in seen), seen
    assert {s[1] for s in sockets} >= {"gcs_server", "raylet"}, sockets
    assert not not_on_loopback(sockets), f"reachable from the network: {not_on_loopback(sockets)}"


@needs_ray
def test_start_local_ray_restores_ray_cluster_mode_afterwards(monkeypatch):
    """The loopback switch is scoped to the start of the private runtime: a later ``ray.init`` of a
    cluster from the same process (``--ray-address``) must see Ray's own setting again."""
    import ray
    from ray._private import ray_constants

    from labelgen.engine import backends

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    before = ray_constants.ENABLE_RAY_CLUSTER
    seen = {}

    class FakeRay:  # records what Ray would see while starting, without starting it
        util = ray.util

        @staticmethod
        def init(**kwargs):
            seen.update(kwargs, env=os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
                        cluster=ray_constants.ENABLE_RAY_CLUSTER,
                        node_ip=ray._private.services.get_node_ip_address())

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    backends.start_local_ray(FakeRay, 2)
    assert seen["env"] == "0" and seen["cluster"] is False and seen["node_ip"] == "127.0.0.1"
    assert seen["include_dashboard"] is False and seen["_node_ip_address"] == "127.0.0.1"
    assert ray_constants.ENABLE_RAY_CLUSTER == before
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


@needs_ray
def test_a_runtime_off_loopback_is_refused():
    from labelgen.engine import backends
    from labelgen.errors import ConfigError

    shut = []

    class FakeRay:
        class util:
            @staticmethod
            def get_node_ip_address():
                return "192.0.2.7"

        @staticmethod
        def init(**kwargs):
            pass

        @staticmethod
        def shutdown():
            shut.append(True)

    with pytest.raises(ConfigError, match=r"came up on 192\.0\.2\.7, not on loopback"):
        backends.start_local_ray(FakeRay, 2)
    assert shut == [True]


# -- FiftyOne's embedded MongoDB ----------------------------------------------------------------------
def test_fiftyone_mongod_listens_on_loopback_only(fiftyone_db):
    fiftyone_db.list_datasets()  # starts (or connects to) the embedded mongod of this test session
    folder = os.path.realpath(os.environ["FIFTYONE_DATABASE_DIR"])
    mongods = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if (process.info["name"] or "").startswith("mongod") and any(os.path.realpath(a) == folder
                                                                      for a in cmdline if a.startswith("/")):
            mongods.append(process)
    assert mongods, f"no mongod with --dbpath {folder} is running: {_mongods()}"
    sockets = listening_sockets(mongods)
    assert sockets, "mongod listens nowhere?"
    assert not not_on_loopback(sockets), f"reachable from the network: {not_on_loopback(sockets)}"


def _mongods():
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if "mongod" in (process.info["name"] or ""):
            found.append((process.pid, process.info["cmdline"]))
    return found
