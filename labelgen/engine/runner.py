"""Run a recipe over an image source into a run directory: plan, resume, hand shards to a backend."""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..atomic import store_write_error
from .backends import ShardWork, backend_for, check_backend_available
from ..config import Recipe
from ..errors import GeneratorError, LabelgenError, RunStoreError, StoreWriteError, WeightsNotFoundError
from ..generators import GENERATORS, Generator
from ..labelers.config import preflight as labeler_preflight
from .sources import ImageSource
from ..store.run_store import RunStore, ShardSpec
from ..models.weights import check_all
from .worker import process_shard

log = logging.getLogger(__name__)

# Errors that would fail every shard the same way: stop the run instead of recording each.
FATAL_ERRORS = (StoreWriteError, WeightsNotFoundError, GeneratorError)


@dataclass
class RunProgress:
    """Callbacks the CLI uses to draw progress; the library itself never prints."""

    on_start: Callable[[int, int], None] = lambda total_images, done_images: None
    on_images: Callable[[int], None] = lambda n: None


@dataclass
class RunResult:
    root: Path
    shards_total: int
    shards_skipped: int
    shards_done: int
    shards_failed: list[int] = field(default_factory=list)
    images_added: int = 0
    failures: int = 0
    shards_corrupt: list[int] = field(default_factory=list)  # failed verification: moved to corrupt/, redone


def run(
    recipe: Recipe,
    source: ImageSource,
    out: str | Path,
    *,
    extend: bool = False,
    new_run: bool = False,
    plugins: Sequence[str] = (),
    progress: RunProgress | None = None,
) -> RunResult:
    """Label every image of ``source`` not yet committed in ``out``. Safe to kill and rerun."""
    progress = progress or RunProgress()
    store = RunStore(out)
    generator_cls = GENERATORS.get(recipe.generator.name)
    checked = not store.exists() or new_run
    check_backend_available(recipe.execution)
    records = None
    if checked:  # before anything is written: fixing the recipe must not look like a new config
        _preflight(generator_cls, recipe)
        records = source.list_records()  # an empty or unlistable source is refused before --out exists
    _make_root(store.root)
    with store.locked():
        store.cleanup_temps()
        if store.exists() and not new_run:
            store.recover_plan()
        added = _prepare(store, recipe, source, extend=extend, new_run=new_run, records=records)
        plan = _verified_plan(store, recipe.fingerprint())
        result = RunResult(store.root, plan.shards, plan.shards - len(plan.pending), 0, images_added=added,
                           shards_corrupt=[index for index, _ in plan.corrupt])
        if plan.pending:
            if not checked:
                _preflight(generator_cls, recipe)
            progress.on_start(plan.images, plan.images - plan.pending_images)
            work = ShardWork(
                root=str(store.root), recipe=recipe, shards=store.iter_pending(set(plan.pending)),
                count=len(plan.pending), plugins=[*plugins, generator_cls.__module__],  # workers import these
                run_shard=_run_shard, on_outcome=lambda index, outcome: _collect(store, index, outcome, result),
                on_images=progress.on_images,
            )
            backend_for(recipe.execution).execute(work)
        result.failures = store.write_failures_ledger()
    return result


def _verified_plan(store: RunStore, fingerprint: str) -> Any:
    """Which shards are left, after re-hashing every committed one: a shard that does not verify is
    moved to ``RUN_DIR/corrupt/`` (named in a warning) and counts as pending, so it is redone."""
    plan = store.plan_summary(fingerprint, verify=True)
    shards = {shard.index: shard for shard in store.iter_pending({index for index, _ in plan.corrupt})}
    for index, problem in plan.corrupt:
        moved = store.quarantine(shards[index], problem)
        log.warning("shard %06d does not verify (%s): moved to %s; it will be redone", index, problem, moved)
    return plan


def _preflight(generator_cls: type[Generator], recipe: Recipe) -> None:
    """Cheap checks (weights present) for the generator and the labeler, before any work starts.

    Every missing weight file of both is named in one ``WeightsNotFoundError`` (``weights.check_all``).
    """
    checks = [lambda: generator_cls.preflight(recipe.generator.params)]
    if recipe.labeler is not None:
        checks.append(lambda: labeler_preflight(recipe.labeler))
    check_all(checks)


def _make_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise RunStoreError(f"--out {root} exists and is not a folder; choose a folder path")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise store_write_error(exc, root, "run directory") from exc


def _prepare(store: RunStore, recipe: Recipe, source: ImageSource, *, extend: bool, new_run: bool,
             records: Sequence[Any] | None = None) -> int:
    """New run: freeze the plan of the source's ``records`` (listed now if not given). Existing run:
    check identity, maybe extend."""
    spec = source.describe()
    if store.exists() and new_run:
        log.warning("archived the previous run to %s", store.archive())
    if not store.exists():
        records = source.list_records() if records is None else records
        store.initialize(recipe, spec, records)
        return len(records)
    store.check_same_run(recipe, spec)
    if not extend:
        _hint_new_images(store, source)
        return 0
    added = store.extend(source.list_records(), recipe.store.shard_size, recipe.fingerprint())
    return sum(len(s.images) for s in added)


def _hint_new_images(store: RunStore, source: ImageSource) -> None:
    """One warning when the source holds images the frozen plan does not (they need ``--extend``)."""
    try:
        listed = {record.image_id for record in source.list_records()}
    except LabelgenError:  # the source cannot be listed now; resuming committed work still can
        return
    for shard in store.iter_plan():
        listed.difference_update(record.image_id for record in shard.images)
    if listed:
        log.warning("%d images in the source are not in this run's plan and will not be labelled;"
                    " rerun with --extend to add them", len(listed))


def _run_shard(root: str, shard: ShardSpec, recipe: Recipe, on_image: Callable[[int], None]) -> dict[str, Any]:
    """Run one shard; fatal errors propagate, anything else becomes an error outcome."""
    try:
        return {"ok": True, "done": process_shard(root, shard, recipe, on_image)}
    except FATAL_ERRORS:
        raise
    except Exception as exc:
        log.exception("shard %s failed", shard.key)
        return {"ok": False, "error": {"type": type(exc).__name__, "message": str(exc),
                                       "traceback": traceback.format_exc()}}


def _collect(store: RunStore, index: int, outcome: dict[str, Any], result: RunResult) -> None:
    if outcome["ok"]:
        result.shards_done += 1
    else:
        store.record_shard_error(index, outcome["error"])
        result.shards_failed.append(index)
