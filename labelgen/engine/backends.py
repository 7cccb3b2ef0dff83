"""Where pending shards run: on this machine (in-process or joblib loky) or on Ray actors.

A backend only decides *where* shards run. What one shard run yields (an outcome, or a fatal
error that stops the run) is the runner's ``run_shard``; workers commit their shards to the run
store themselves and the driver only records outcomes. So resume is the same for every backend:
the plan and the done records in the run directory say what is left.
"""
from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

from ..config import ExecutionConfig, Recipe, recipe_from_dict
from ..errors import ConfigError, GeneratorError, RunStoreError
from ..generators import load_plugins
from ..store.run_store import RunStore, ShardSpec

log = logging.getLogger(__name__)

# One shard in the calling process: (root, shard, recipe, on_image) -> outcome dict; fatal errors raise.
RunShard = Callable[[str, ShardSpec, Recipe, Callable[[int], None]], dict[str, Any]]


@dataclass
class ShardWork:
    """The pending shards of one run, and the driver-side callbacks a backend reports to."""

    root: str  # run directory; workers commit their shards into it
    recipe: Recipe
    shards: Iterable[ShardSpec]  # pending shards, in plan order
    count: int  # how many ``shards`` holds
    plugins: list[str]  # modules a worker imports so the generator is registered
    run_shard: RunShard
    on_outcome: Callable[[int, dict[str, Any]], None]  # record one shard's outcome (driver)
    on_images: Callable[[int], None]  # n more images labelled (driver)


class Backend(Protocol):
    name: str

    def execute(self, work: ShardWork) -> None:
        """Run every shard of ``work``; return when all are recorded, raise on a fatal error."""


def backend_for(execution: ExecutionConfig) -> Backend:
    """The backend ``execution.backend`` names."""
    if execution.backend == "ray":
        return RayBackend(execution.ray_address)
    return LocalBackend()


# -- devices ---------------------------------------------------------------------------
def assign_devices(device: str, devices: tuple[str, ...], workers: int, cuda_count: int) -> list[str]:
    """The device of each of ``workers`` workers: worker i gets ``devices[i % len(devices)]``;
    ``device="cuda"`` means every visible GPU (``cuda:{i % cuda_count}``); anything else is shared."""
    if devices:
        return [devices[i % len(devices)] for i in range(workers)]
    if device == "cuda":
        if cuda_count < 1:
            raise GeneratorError(
                "execution.device=cuda asks for the GPUs, but torch sees none (torch.cuda.device_count() == 0);"
                " use --device cpu, or check CUDA_VISIBLE_DEVICES and that torch was built with CUDA"
            )
        return [f"cuda:{i % cuda_count}" for i in range(workers)]
    return [device] * workers


def wants_gpu(execution: ExecutionConfig) -> bool:
    return any(d.startswith("cuda") for d in (execution.devices or (execution.device,)))


def with_device(recipe: Recipe, device: str) -> Recipe:
    """``recipe`` with ``execution.device`` set (execution is not fingerprinted: outputs are the same)."""
    if recipe.execution.device == device:
        return recipe
    return dataclasses.replace(recipe, execution=dataclasses.replace(recipe.execution, device=device))


def _cuda_count(execution: ExecutionConfig) -> int:
    """Visible GPUs, asked of torch only when ``device=cuda`` must be spread over them."""
    if execution.device != "cuda" or execution.devices:
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


@dataclass(frozen=True)
class _WorkerSetup:
    """What every worker of one run needs (pickled to each worker)."""

    root: str
    recipe_dict: dict[str, Any]
    plugins: tuple[str, ...]
    run_shard: RunShard

    @classmethod
    def of(cls, work: ShardWork) -> "_WorkerSetup":
        return cls(work.root, work.recipe.to_dict(), tuple(work.plugins), work.run_shard)

    def recipe(self, device: str) -> Recipe:
        load_plugins(self.plugins)
        return with_device(recipe_from_dict(self.recipe_dict), device)


# -- local -----------------------------------------------------------------------------
class LocalBackend:
    """This machine: in-process for one worker (or one shard), else ``workers`` loky processes.

    With several workers, worker i claims ``assign_devices(...)[i]`` once and keeps it, so each
    process builds its generator on one device only (``device=cuda`` spreads workers over the GPUs).
    """

    name = "local"

    def execute(self, work: ShardWork) -> None:
        execution = work.recipe.execution
        if execution.workers <= 1 or work.count == 1:
            recipe = with_device(work.recipe, execution.devices[0] if execution.devices else execution.device)
            for shard in work.shards:
                work.on_outcome(shard.index, work.run_shard(work.root, shard, recipe, work.on_images))
            return
        devices = assign_devices(execution.device, execution.devices, execution.workers, _cuda_count(execution))
        _execute_loky(work, devices)


def _execute_loky(work: ShardWork, devices: list[str]) -> None:
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from joblib import Parallel, delayed, parallel_config

    setup, run_id = _WorkerSetup.of(work), uuid.uuid4().hex
    # spawn, not fork: a forked Manager would inherit the run lock's descriptor and keep the run
    # locked after a kill -9 of the driver; and it exits on its own when the driver dies.
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=exit_with_parent)
    with manager:
        ticks, slots = manager.Queue(), manager.Queue()
        for device in devices:
            slots.put(device)
        pump = threading.Thread(target=_pump, args=(ticks, work.on_images), daemon=True)
        pump.start()
        try:
            jobs = (delayed(_run_shard_in_worker)(setup, shard, ticks, run_id, slots, devices[k % len(devices)])
                    for k, shard in enumerate(work.shards))
            # every worker watches the driver from its start, even one that never gets a shard
            with parallel_config(backend="loky", initializer=exit_with_parent):
                parallel = Parallel(n_jobs=len(devices), return_as="generator_unordered")
                for shard_index, outcome in parallel(jobs):
                    work.on_outcome(shard_index, outcome)
        finally:
            ticks.put(None)
            pump.join(timeout=5)


def _pump(ticks: Any, on_images: Callable[[int], None]) -> None:
    while True:
        try:
            item = ticks.get()
        except (EOFError, OSError):
            return
        if item is None:
            return
        on_images(item)


_CLAIMED_DEVICES: dict[str, str] = {}  # per worker process: run id -> the device this process claimed


def keep_worker_with_its_models() -> None:
    """Stop loky from replacing this worker process when its memory grows.

    loky restarts a worker whose RSS has grown by 300 MB since its first job, taking it for a leak.
    Ours grow on purpose (models load on the first shard, allocator pools grow with image sizes), and a
    restart reloads every model (tens of seconds, minutes on a GPU box), so the limit is lifted in
    worker processes. Reads loky's module setting; does nothing if loky no longer has it.
    """
    try:
        from joblib.externals.loky import process_executor
    except ImportError:
        return
    if hasattr(process_executor, "_MAX_MEMORY_LEAK_SIZE"):
        process_executor._MAX_MEMORY_LEAK_SIZE = 1 << 62


_WATCHING_PARENT: list[int] = []  # per process: the parent pid a watchdog thread is watching


def exit_with_parent(poll_seconds: float = 0.5) -> None:
    """Start (once per process) a daemon thread that ends this process when its parent dies.

    Helper processes (the Manager, loky workers) would otherwise outlive a driver killed with
    kill -9 and keep labelling, or holding resources, for a run nobody owns any more. The parent
    is the process that started this one; when it dies this process is re-parented (to init or
    a subreaper), which ``os.getppid()`` shows."""
    if _WATCHING_PARENT:
        return
    parent = os.getppid()
    _WATCHING_PARENT.append(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        os._exit(70)  # the driver is gone: nothing this process does can be committed by it any more

    threading.Thread(target=watch, name="labelgen-parent-watch", daemon=True).start()


def _run_shard_in_worker(setup: _WorkerSetup, shard: ShardSpec, ticks: Any, run_id: str, slots: Any,
                         fallback_device: str) -> tuple[int, dict[str, Any]]:
    exit_with_parent()
    keep_worker_with_its_models()
    if run_id not in _CLAIMED_DEVICES:
        try:
            _CLAIMED_DEVICES[run_id] = slots.get_nowait()
        except queue.Empty:  # a replacement process after every slot was claimed
            _CLAIMED_DEVICES[run_id] = fallback_device
    recipe = setup.recipe(_CLAIMED_DEVICES[run_id])
    return shard.index, setup.run_shard(setup.root, shard, recipe, ticks.put)


# -- ray -------------------------------------------------------------------------------
def ray_actor_resources(execution: ExecutionConfig) -> tuple[float, float, str]:
    """``(num_cpus, num_gpus, device)`` of one Ray actor. Ray picks the GPU and sets
    ``CUDA_VISIBLE_DEVICES``, so a GPU actor always uses ``cuda:0``; ``devices`` is not used."""
    num_cpus = float(execution.threads_per_worker or 1)
    if wants_gpu(execution):
        return num_cpus, 1.0, "cuda:0"
    return num_cpus, 0.0, execution.devices[0] if execution.devices else execution.device


class RayBackend:
    """Ray actors, one per worker: each builds the generator once and runs shards as it frees up.

    ``address``: "" starts a private local Ray runtime (shut down at the end); "auto",
    "HOST:PORT" or "ray://HOST:10001" connect to a running cluster, whose nodes must have labelgen
    (and plugins) installed and see the run directory and the images at the same paths.
    Progress reaches the driver per image, batched every ~0.25 s, through a Ray queue.
    """

    name = "ray"

    def __init__(self, address: str = ""):
        self.address = address

    def execute(self, work: ShardWork) -> None:
        ray = _import_ray()
        started = self._connect(ray, work.recipe.execution)
        try:
            _execute_ray(ray, work)
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ray: Any, execution: ExecutionConfig) -> bool:
        """Start or join Ray; False when the calling program had already connected (it owns that)."""
        from ray.exceptions import RayError

        if ray.is_initialized():
            return False
        if self.address:
            check_reachable(self.address)
        try:
            if self.address:
                ray.init(address=self.address)
            else:
                num_cpus, _, _ = ray_actor_resources(execution)
                start_local_ray(ray, max(os.cpu_count() or 1, int(execution.workers * num_cpus)))
        except (ConnectionError, TimeoutError, RuntimeError, ValueError, RayError) as exc:
            where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray runtime"
            raise ConfigError(f"execution.backend=ray: cannot start or reach {where}: {exc}. Check"
                              " execution.ray_address (--ray-address), or leave it empty to start a local"
                              " runtime") from exc
        return True


# Ray's own switch between a cluster node (its processes listen on every interface, the node is
# reachable by its LAN address) and a single-machine runtime (node IP 127.0.0.1: gcs_server,
# raylet, agents and workers listen on loopback only). Ray reads it at import and in child processes.
_RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


def start_local_ray(ray: Any, num_cpus: int, **options: Any) -> None:
    """Start a private Ray runtime on this machine that listens on loopback only, and connect to it.

    Ray has no network authentication by default, so nothing of a private runtime may be reachable
    from other machines: the node IP is 127.0.0.1 (every gRPC server, the agents and the workers
    bind it), the dashboard is off (its helper processes bind localhost). ``options`` go to
    ``ray.init``. Raises ``ConfigError`` (after shutting Ray down) when Ray picked another address.
    """
    options = {"include_dashboard": False, "dashboard_host": LOOPBACK, **options}
    with _ray_loopback_only():
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, **options)
    node_ip = ray.util.get_node_ip_address()
    if not _is_loopback(node_ip):
        ray.shutdown()
        raise ConfigError(f"execution.backend=ray: the local Ray runtime came up on {node_ip}, not on loopback"
                          f" ({LOOPBACK}), so it would be reachable from the network; refusing to run on it. Use"
                          " --backend local, or start a cluster yourself (ray start) and pass --ray-address")


@contextlib.contextmanager
def _ray_loopback_only() -> Iterator[None]:
    """While Ray starts: its single-machine mode (node IP 127.0.0.1), in this process (Ray's constant
    is read at ``import ray``, which may have happened already) and in the processes it starts.
    Restored afterwards, so that joining a cluster later from this process still works."""
    constants = sys.modules.get("ray._private.ray_constants")
    saved_env, saved_flag = os.environ.get(_RAY_LOCAL_ONLY_ENV), getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_RAY_LOCAL_ONLY_ENV] = "0"
    if saved_flag is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(_RAY_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_RAY_LOCAL_ONLY_ENV] = saved_env
        if saved_flag is not None:
            constants.ENABLE_RAY_CLUSTER = saved_flag


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast when nothing listens at a ``HOST:PORT`` / ``ray://HOST:PORT`` address (Ray itself
    retries for minutes). "auto" and addresses of other shapes are left to Ray."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"execution.ray_address={address!r}: nothing answers there ({exc}). Start the"
                          " cluster (ray start --head), fix --ray-address, or leave it empty to start a local"
                          " runtime") from None


def check_backend_available(execution: ExecutionConfig) -> None:
    """Before anything is written: ``ConfigError`` if the backend's package is not installed."""
    import importlib.util

    if execution.backend == "ray" and importlib.util.find_spec("ray") is None:
        _import_ray()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("execution.backend=ray needs the ray package (pip install 'labelgen[cluster]');"
                          " or use --backend local") from None
    return ray


def _execute_ray(ray: Any, work: ShardWork) -> None:
    from ray.util.queue import Queue

    num_cpus, num_gpus, device = ray_actor_resources(work.recipe.execution)
    count = _actor_count(ray.cluster_resources(), work.recipe.execution, work.count, num_cpus, num_gpus)
    ticks = Queue(actor_options={"num_cpus": 0})
    actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_ShardActor)
    setup, actors = _WorkerSetup.of(work), []

    def new_actor() -> Any:
        actors.append(actor_cls.remote(setup, device, ticks))
        return actors[-1]

    def drain_ticks() -> None:
        waiting = ticks.qsize()
        if waiting:
            for n in ticks.get_nowait_batch(waiting):
                work.on_images(n)

    try:
        _dispatch(ray, work, count, new_actor, drain_ticks)
        drain_ticks()
    finally:
        for actor in actors:
            ray.kill(actor)
        ticks.shutdown()


def _actor_count(resources: dict[str, float], execution: ExecutionConfig, shards: int, num_cpus: float,
                 num_gpus: float) -> int:
    """Actors to start: ``workers``, but no more than the shards or what the cluster can place now."""
    fits = int(resources.get("CPU", 0) // num_cpus)
    if num_gpus:
        if resources.get("GPU", 0) < 1:
            raise GeneratorError(f"execution.device={execution.device} asks for GPUs, but the Ray cluster has none;"
                                 " use --device cpu, or connect to a cluster with GPU nodes (--ray-address)")
        fits = min(fits, int(resources["GPU"] // num_gpus))
    if fits < 1:
        raise ConfigError(f"execution.threads_per_worker={execution.threads_per_worker}: one Ray worker needs"
                          f" {num_cpus:g} CPUs, but the cluster has {resources.get('CPU', 0):g}")
    wanted = min(execution.workers, shards)
    if fits < wanted:
        log.warning("the Ray cluster has room for %d of %d workers; using %d", fits, wanted, fits)
    return min(wanted, fits)


def _dispatch(ray: Any, work: ShardWork, count: int, new_actor: Callable[[], Any],
              drain_ticks: Callable[[], None]) -> None:
    """Keep one shard in flight per actor; record each outcome as it lands, in completion order.

    An actor that dies (OOM, node lost) costs its shard a recorded error and is replaced, at most
    ``count`` times per run; an error that escaped ``run_shard`` is fatal and raised here."""
    shards, in_flight, replacements = iter(work.shards), {}, count

    def submit(actor: Any) -> None:
        shard = next(shards, None)
        if shard is not None:
            in_flight[actor.run.remote(shard)] = (actor, shard)

    for _ in range(count):
        submit(new_actor())
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
        drain_ticks()
        for ref in ready:
            actor, shard = in_flight.pop(ref)
            outcome, alive = _ray_outcome(ray, ref)
            work.on_outcome(shard.index, outcome)
            if not alive:
                if replacements == 0:
                    raise GeneratorError(f"Ray workers died {count + 1} times (last: {outcome['error']['message']});"
                                         " committed shards are kept, rerun to resume")
                replacements -= 1
                actor = new_actor()
            submit(actor)


def _ray_outcome(ray: Any, ref: Any) -> tuple[dict[str, Any], bool]:
    """``(outcome, actor still alive)`` of one finished actor call."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        _, outcome = ray.get(ref)
        return outcome, True
    except RayTaskError as exc:  # escaped run_shard: fatal, re-raised as the worker's own error
        raise (exc.cause if isinstance(exc.cause, Exception) else exc) from exc
    except RayActorError as exc:
        log.error("a Ray worker died: %s", exc)
        return {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc).strip().splitlines()[0],
                                       "traceback": traceback.format_exc()}}, False


class _Ticks:
    """Per-image progress from an actor, sent to the driver's queue at most every ``interval`` s."""

    def __init__(self, ticks: Any, interval: float = 0.25):
        self.ticks, self.interval = ticks, interval
        self.pending, self.sent = 0, time.monotonic()

    def add(self, n: int) -> None:
        self.pending += n
        if time.monotonic() - self.sent >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.ticks.put(self.pending)
        self.pending, self.sent = 0, time.monotonic()


class _ShardActor:
    """One Ray worker process (wrapped by ``ray.remote`` at run time): shards in, outcomes out.
    The generator is built on the first shard and cached by the worker module, as in loky workers."""

    def __init__(self, setup: _WorkerSetup, device: str, ticks: Any):
        self.setup, self.device, self.ticks = setup, device, ticks
        self.recipe: Recipe | None = None

    def run(self, shard: ShardSpec) -> tuple[int, dict[str, Any]]:
        if self.recipe is None:
            self.recipe = self._start()
        ticks = _Ticks(self.ticks)
        try:
            return shard.index, self.setup.run_shard(self.setup.root, shard, self.recipe, ticks.add)
        finally:
            ticks.flush()

    def _start(self) -> Recipe:
        import ray

        if not RunStore(self.setup.root).exists():
            raise RunStoreError(f"a Ray worker on {ray.util.get_node_ip_address()} cannot see the run directory"
                                f" {self.setup.root}; put --out on storage every node mounts at the same path")
        if self.device.startswith("cuda"):
            log.info("Ray worker on GPU %s (as %s)", ray.get_gpu_ids(), self.device)
        return self.setup.recipe(self.device)
