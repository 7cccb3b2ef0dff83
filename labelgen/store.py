"""The run directory: a self-describing, resumable, crash-safe store of results.

Layout (the contract is ``docs/run-directory.md``)::

    RUN_DIR/
      run.json          identity: format, run id, fingerprint, source, versions (written last at init)
      config.yaml       the resolved recipe
      plan.jsonl        the frozen shard plan: a header line, then one line per shard (ids, uris)
      shards/NNNNNN.jsonl.gz    one JSON line per image, in plan order
      shards/NNNNNN.done.json   commit record, written after the output (atomic rename)
      shards/NNNNNN.error.json  last crash of a shard that is not done
      failures.jsonl    ledger of per-image failures, rebuilt from the done records
      .lock             held (flock) by the one process running the plan
      archive/RUN_ID/   an earlier run moved aside by --new-run
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import itertools
import json
import os
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import yaml

from .atomic import (
    atomic_file,
    read_jsonl_gz,
    remove_stale_temps,
    sha256_file,
    store_write_error,
    write_bytes_atomic,
    write_json_atomic,
    write_jsonl_gz_atomic,
)
from .config import IDENTITY_SECTIONS, Recipe, canonical_json, config_diff
from .errors import ConfigMismatchError, RunLockedError, RunStoreError
from .instances import ImageRecord
from .versions import library_versions

RUN_FORMAT = "labelgen-run/1"
PLAN_FORMAT = "labelgen-plan/1"
DONE_FORMAT = "labelgen-shard-done/1"


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work and of commit: a fixed list of images."""

    index: int
    images: tuple[ImageRecord, ...]

    @property
    def key(self) -> str:
        return f"{self.index:06d}"


    @property
    def digest(self) -> str:
        """sha256 of the shard's (image_id, uri) list: ties a done record to this exact plan entry."""
        return hashlib.sha256(canonical_json([[r.image_id, r.uri] for r in self.images]).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "images": [[r.image_id, r.uri, r.width, r.height] for r in self.images]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardSpec":
        images = tuple(ImageRecord(i, u, w, h) for i, u, w, h in data["images"])
        return cls(index=int(data["index"]), images=images)


@dataclass
class PlanSummary:
    shards: int = 0
    images: int = 0
    pending: list[int] = field(default_factory=list)
    pending_images: int = 0


def plan_shards(records: Sequence[ImageRecord], shard_size: int, first_index: int = 0) -> list[ShardSpec]:
    """Cut records (already in their stable order) into shards of ``shard_size``."""
    return [
        ShardSpec(first_index + i, tuple(records[start : start + shard_size]))
        for i, start in enumerate(range(0, len(records), shard_size))
    ]


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunStore:
    """Reads and writes one run directory. Cheap to construct; touches nothing until asked."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.run_json = self.root / "run.json"
        self.config_yaml = self.root / "config.yaml"
        self.plan_jsonl = self.root / "plan.jsonl"
        self.shards_dir = self.root / "shards"
        self.failures_jsonl = self.root / "failures.jsonl"
        self.lock_path = self.root / ".lock"
        self._lock_fd: int | None = None

    # -- lock -------------------------------------------------------------------------
    def acquire_lock(self) -> None:
        """Take the run's exclusive lock or raise ``RunLockedError`` naming the holder."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.root} is in use by {holder}. Wait for that run to finish or stop it;"
                " two processes must not write one run directory."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {utc_now()}\n".encode(), 0)
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunStore"]:
        self.acquire_lock()
        try:
            yield self
        finally:
            self.release_lock()

    # -- identity ----------------------------------------------------------------------
    def exists(self) -> bool:
        return self.run_json.is_file()

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunStoreError(f"{self.root} is not a labelgen run directory (no run.json)") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise RunStoreError(f"{self.run_json} is unreadable or corrupt: {exc}") from None

    def stored_config(self) -> dict[str, Any]:
        with open(self.config_yaml, encoding="utf-8") as handle:
            return yaml.safe_load(handle)

    def initialize(self, recipe: Recipe, source_spec: dict[str, Any], records: Sequence[ImageRecord]) -> None:
        """Create a new run: config, plan, then run.json last (its presence marks a complete init)."""
        if any(self.shards_dir.glob("*.done.json")):
            raise RunStoreError(f"{self.root} has committed shards but no run.json; refusing to overwrite them")
        self._make_dirs()
        write_bytes_atomic(self.config_yaml, yaml.safe_dump(recipe.to_dict(), sort_keys=False).encode(), "config")
        self._write_plan(plan_shards(records, recipe.store.shard_size), recipe.fingerprint())
        manifest = {
            "format": RUN_FORMAT,
            "run_id": f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}",
            "created": utc_now(),
            "fingerprint": recipe.fingerprint(),
            "generator": recipe.generator.name,
            "class_names": None if recipe.class_names() is None else list(recipe.class_names()),
            "source": source_spec,
            "versions": library_versions(),
        }
        write_json_atomic(self.run_json, manifest, "run manifest")

    def initialize_import(self, spec: dict[str, Any], class_names: Sequence[str],
                          records: Sequence[ImageRecord], shard_size: int) -> None:
        """Like ``initialize``, for labels imported from a dataset (generator ``"import"``): no recipe;
        the fingerprint covers the import ``spec`` (the run's ``source``), class names and shard size."""
        if any(self.shards_dir.glob("*.done.json")):
            raise RunStoreError(f"{self.root} has committed shards but no run.json; refusing to overwrite them")
        identity = {"generator": {"name": "import"}, "source": spec, "class_names": list(class_names),
                    "store": {"shard_size": shard_size, "compress_level": 6}}
        fingerprint = hashlib.sha256(canonical_json(identity).encode()).hexdigest()
        self._make_dirs()
        config = {"description": f"labels imported from {spec.get('import', {}).get('format', 'a dataset')}",
                  **identity}
        write_bytes_atomic(self.config_yaml, yaml.safe_dump(config, sort_keys=False).encode(), "config")
        self._write_plan(plan_shards(records, shard_size), fingerprint)
        manifest = {
            "format": RUN_FORMAT,
            "run_id": f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}",
            "created": utc_now(),
            "fingerprint": fingerprint,
            "generator": "import",
            "class_names": list(class_names),
            "source": spec,
            "versions": library_versions(),
        }
        write_json_atomic(self.run_json, manifest, "run manifest")

    def check_same_run(self, recipe: Recipe, source_spec: dict[str, Any]) -> None:
        """Raise ``ConfigMismatchError`` with a readable diff if the run was made differently."""
        manifest = self.manifest()
        if manifest.get("format") != RUN_FORMAT:
            raise RunStoreError(f"{self.run_json}: format {manifest.get('format')!r}; this labelgen reads {RUN_FORMAT!r}")
        lines = []
        if manifest["fingerprint"] != recipe.fingerprint():
            old = {k: v for k, v in self.stored_config().items() if k in IDENTITY_SECTIONS}
            lines += config_diff(old, recipe.identity()) or ["  (configuration fingerprint differs)"]
        if manifest["source"] != source_spec:
            lines += config_diff({"source": manifest["source"]}, {"source": source_spec})
        if lines:
            raise ConfigMismatchError(
                f"{self.root} holds a run made with different settings:\n" + "\n".join(lines) + "\n"
                "Resume with the original recipe, --set options and --images; or choose another --out;"
                " or pass --new-run to move the old results to archive/ and start over."
            )

    def archive(self) -> Path:
        """Move the current run's files to ``archive/RUN_ID/`` (used by --new-run)."""
        run_id = self.manifest().get("run_id", "unknown") if self.exists() else f"partial-{secrets.token_hex(3)}"
        target = self.root / "archive" / run_id
        try:
            target.mkdir(parents=True, exist_ok=False)
            for path in (self.run_json, self.config_yaml, self.plan_jsonl, self.shards_dir, self.failures_jsonl):
                if path.exists():
                    shutil.move(str(path), str(target / path.name))
        except OSError as exc:
            raise store_write_error(exc, target, "archive of the previous run") from exc
        return target

    # -- plan ------------------------------------------------------------------------
    def iter_plan(self) -> Iterator[ShardSpec]:
        """Shards in index order, read lazily: memory stays flat however large the plan."""
        try:
            with open(self.plan_jsonl, encoding="utf-8") as handle:
                header = json.loads(handle.readline() or "null")
                if not isinstance(header, dict) or header.get("format") != PLAN_FORMAT:
                    raise RunStoreError(f"{self.plan_jsonl}: not a {PLAN_FORMAT} file")
                for line in handle:
                    yield ShardSpec.from_dict(json.loads(line))
        except FileNotFoundError:
            raise RunStoreError(f"{self.plan_jsonl} is missing; {self.root} is not a complete run directory") from None
        except (OSError, json.JSONDecodeError, KeyError, ValueError) as exc:
            raise RunStoreError(f"{self.plan_jsonl} is corrupt: {exc}") from None

    def plan_summary(self, fingerprint: str) -> "PlanSummary":
        """One lazy pass: shard/image totals and which shards are pending."""
        summary = PlanSummary()
        for shard in self.iter_plan():
            summary.shards += 1
            summary.images += len(shard.images)
            if self.done_record(shard, fingerprint) is None:
                summary.pending.append(shard.index)
                summary.pending_images += len(shard.images)
        return summary

    def iter_pending(self, pending: set[int]) -> Iterator[ShardSpec]:
        return (shard for shard in self.iter_plan() if shard.index in pending)

    def extend(self, records: Sequence[ImageRecord], shard_size: int, fingerprint: str) -> list[ShardSpec]:
        """Append shards for images not yet in the plan; existing shards never change."""
        planned, count = set(), 0
        for shard in self.iter_plan():
            planned.update(r.image_id for r in shard.images)
            count += 1
        added = plan_shards([r for r in records if r.image_id not in planned], shard_size, first_index=count)
        if added:
            self._write_plan(itertools.chain(self.iter_plan(), added), fingerprint)
        return added

    def _write_plan(self, shards: Iterable[ShardSpec], fingerprint: str) -> None:
        with atomic_file(self.plan_jsonl, "shard plan") as handle:
            header = {"format": PLAN_FORMAT, "fingerprint": fingerprint}
            handle.write((json.dumps(header) + "\n").encode())
            for shard in shards:
                handle.write((json.dumps(shard.to_dict(), separators=(",", ":")) + "\n").encode())

    def _make_dirs(self) -> None:
        try:
            self.shards_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise store_write_error(exc, self.shards_dir, "run directory") from exc

    # -- shards ----------------------------------------------------------------------
    def shard_output(self, index: int) -> Path:
        return self.shards_dir / f"{index:06d}.jsonl.gz"

    def shard_done(self, index: int) -> Path:
        return self.shards_dir / f"{index:06d}.done.json"

    def shard_error(self, index: int) -> Path:
        return self.shards_dir / f"{index:06d}.error.json"

    def done_record(self, shard: ShardSpec, fingerprint: str | None = None, verify: bool = False) -> dict | None:
        """The shard's commit record if it is valid for this plan entry (and config), else ``None``."""
        try:
            done = json.loads(self.shard_done(shard.index).read_text(encoding="utf-8"))
            size = self.shard_output(shard.index).stat().st_size
        except (OSError, json.JSONDecodeError):
            return None
        if done.get("format") != DONE_FORMAT or done.get("plan_digest") != shard.digest or done.get("bytes") != size:
            return None
        if fingerprint is not None and done.get("fingerprint") != fingerprint:
            return None
        if verify and done.get("sha256") != sha256_file(self.shard_output(shard.index)):
            return None
        return done

    def commit_shard(self, shard: ShardSpec, rows: list[dict], summary: dict[str, Any], level: int = 6) -> dict:
        """Write the shard's output, then its done record; both atomic. Returns the done record."""
        output = self.shard_output(shard.index)
        write_jsonl_gz_atomic(output, rows, f"shard {shard.key} output", level=level)
        done = {
            "format": DONE_FORMAT,
            "shard": shard.index,
            "plan_digest": shard.digest,
            "output": output.name,
            "bytes": output.stat().st_size,
            "sha256": sha256_file(output),
            **summary,
        }
        write_json_atomic(self.shard_done(shard.index), done, f"shard {shard.key} done record")
        with contextlib.suppress(OSError):
            self.shard_error(shard.index).unlink()
        return done

    def record_shard_error(self, index: int, error: dict[str, Any]) -> None:
        """Best effort: a crash record must never hide the original error."""
        with contextlib.suppress(Exception):
            write_json_atomic(self.shard_error(index), {"shard": index, "time": utc_now(), **error}, "error")

    def shard_error_record(self, index: int) -> dict | None:
        try:
            return json.loads(self.shard_error(index).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def cleanup_temps(self) -> int:
        return remove_stale_temps(self.shards_dir) + remove_stale_temps(self.root)

    # -- reading results ----------------------------------------------------------------
    def iter_rows(self) -> Iterator[dict]:
        """Every committed image row, shard by shard in plan order."""
        for shard in self.iter_plan():
            if self.done_record(shard) is not None:
                yield from read_jsonl_gz(self.shard_output(shard.index))

    def write_failures_ledger(self) -> int:
        """Rebuild ``failures.jsonl`` from the done records (streaming); return the number of failures."""
        count = 0
        with atomic_file(self.failures_jsonl, "failures ledger") as handle:
            for shard in self.iter_plan():
                for failure in (self.done_record(shard) or {}).get("failures", []):
                    handle.write((json.dumps({"shard": shard.index, **failure}, sort_keys=True) + "\n").encode())
                    count += 1
        return count

