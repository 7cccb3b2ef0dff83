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
      corrupt/          committed files that failed verification, moved aside (their shards are redone)
      filtered/NAME/, reviewed/NAME/   copies: per-shard rows, sealed by their checksums.json

Readers get ``Row``s (``labelgen.structures.rows``): of the run (``iter_rows``, ``iter_committed``)
or of one of its copies (the same calls with ``copy=store.copy_dir(kind, name)``).

Every committed file is checksummed where it cannot be edited with it: ``run.json`` seals itself and
holds the sha256 of ``config.yaml`` and of ``plan.jsonl``; each done record seals itself and holds
its output's sha256 and size. Readers verify; see ``docs/run-directory.md``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import stat
import secrets
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import yaml

from ..atomic import (
    atomic_file,
    fsync_dir,
    remove_stale_temps,
    sha256_file,
    store_write_error,
    write_bytes_atomic,
    write_json_atomic,
    write_jsonl_gz_atomic,
)
from ..config import IDENTITY_SECTIONS, Recipe, canonical_json, config_diff, load_yaml
from ..errors import ConfigError, ConfigMismatchError, CorruptRunError, ExportError, RunLockedError, RunStoreError
from ..structures.instances import ImageRecord
from ..structures.rows import Row
from ..versions import library_versions

log = logging.getLogger(__name__)

RUN_FORMAT = "labelgen-run/2"
LEGACY_RUN_FORMAT = "labelgen-run/1"  # no checksums: read as before, never written
PLAN_FORMAT = "labelgen-plan/1"
DONE_FORMAT = "labelgen-shard-done/2"
LEGACY_DONE_FORMAT = "labelgen-shard-done/1"
SEAL_KEY = "checksum"
CHECKSUMS = "checksums.json"  # a copy's sealed sha256 of every file, written last


def seal(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``checksum``: the sha256 of its canonical JSON without that key."""
    body = {k: v for k, v in record.items() if k != SEAL_KEY}
    return {**body, SEAL_KEY: hashlib.sha256(canonical_json(body).encode()).hexdigest()}


def is_sealed(record: Any) -> bool:
    """True iff ``record`` is a dict whose ``checksum`` matches its other keys."""
    return isinstance(record, dict) and isinstance(record.get(SEAL_KEY), str) and seal(record) == record


@dataclass(frozen=True)
class ShardState:
    """What the store knows of one plan entry: ``done`` (``record`` is its done record), ``pending``
    (never committed, or a commit that did not finish) or ``corrupt`` (``problem`` says which file
    does not verify and how)."""

    state: str
    record: dict | None = None
    problem: str | None = None


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
    pending: list[int] = field(default_factory=list)  # includes corrupt shards: they are redone
    pending_images: int = 0
    corrupt: list[tuple[int, str]] = field(default_factory=list)  # (shard index, problem)


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
        self.plan_next = self.root / "plan.jsonl.next"  # a longer plan while --extend commits it
        self.corrupt_dir = self.root / "corrupt"
        self.shards_dir = self.root / "shards"
        self.failures_jsonl = self.root / "failures.jsonl"
        self.lock_path = self.root / ".lock"
        self._lock_fd: int | None = None
        self._warned: set[int] = set()  # corrupt shards already named in a warning

    # -- lock -------------------------------------------------------------------------
    def acquire_lock(self) -> None:
        """Take the run's exclusive lock or raise ``RunLockedError`` naming the holder."""
        try:  # never through a planted symlink; not inherited by exec'd children (O_CLOEXEC)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise RunStoreError(
                f"cannot open the run lock {self.lock_path}: {exc.strerror or exc}; expected a regular file"
                " (a symlink there is refused). Remove it and rerun."
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunStoreError(f"the run lock {self.lock_path} is not a regular file; remove it and rerun")
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
        """``run.json``, verified against its own checksum (``CorruptRunError`` if it does not)."""
        try:
            manifest = json.loads(self.run_json.read_bytes())
        except FileNotFoundError:
            raise RunStoreError(f"{self.root} is not a labelgen run directory (no run.json)") from None
        except OSError as exc:
            raise RunStoreError(f"{self.run_json} is unreadable: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise CorruptRunError(f"{self.run_json} is corrupt (not valid JSON: {exc}). {_RESTORE}") from None
        if not isinstance(manifest, dict):
            raise CorruptRunError(f"{self.run_json} is corrupt (not a JSON object). {_RESTORE}")
        if manifest.get("format") == LEGACY_RUN_FORMAT and SEAL_KEY not in manifest:
            return manifest  # a run made before checksums: nothing to verify it against
        if manifest.get("format") != RUN_FORMAT and SEAL_KEY not in manifest:
            raise RunStoreError(f"{self.run_json}: format {manifest.get('format')!r}; this labelgen reads"
                                f" {RUN_FORMAT!r} (and {LEGACY_RUN_FORMAT!r})")
        if not is_sealed(manifest):
            raise CorruptRunError(f"{self.run_json} does not match its own checksum: it was altered or damaged"
                                  f" after it was written. {_RESTORE}")
        return manifest

    def is_legacy(self) -> bool:
        """A run made before checksums (``labelgen-run/1``): readers cannot verify it."""
        return self.manifest().get("format") == LEGACY_RUN_FORMAT

    def stored_config(self) -> dict[str, Any]:
        """``config.yaml``, verified against the sha256 that ``run.json`` holds for it."""
        expected = self.manifest().get("config_sha256")
        try:
            data = self.config_yaml.read_bytes()
        except OSError as exc:
            raise CorruptRunError(f"{self.config_yaml} is unreadable: {exc.strerror or exc}. {_RESTORE}") from None
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise CorruptRunError(f"{self.config_yaml} does not match the sha256 recorded in run.json: it was"
                                  f" altered or damaged. {_RESTORE}")
        try:  # the same bounded, strict loader as recipes: a run directory may come from anywhere
            config = load_yaml(data.decode("utf-8"), str(self.config_yaml), what="run config")
        except (UnicodeDecodeError, ConfigError) as exc:
            raise CorruptRunError(f"{self.config_yaml} is not readable YAML ({exc}). {_RESTORE}") from None
        if not isinstance(config, dict):
            raise CorruptRunError(f"{self.config_yaml} is not a YAML mapping. {_RESTORE}")
        return config

    def initialize(self, recipe: Recipe, source_spec: dict[str, Any], records: Sequence[ImageRecord]) -> None:
        """Create a new run: config, plan, then run.json last (its presence marks a complete init)."""
        self._initialize(recipe.to_dict(), records, recipe.store.shard_size, {
            "fingerprint": recipe.fingerprint(),
            "generator": recipe.generator.name,
            "class_names": None if recipe.class_names() is None else list(recipe.class_names()),
            "source": source_spec,
        })

    def _initialize(self, config: dict[str, Any], records: Sequence[ImageRecord], shard_size: int,
                    identity: dict[str, Any]) -> None:
        """config.yaml, plan.jsonl (``records`` in shards of ``shard_size``), then run.json (``identity``
        plus format, run id, versions; sealed, holding both files' sha256) last."""
        if any(self.shards_dir.glob("*.done.json")):
            raise RunStoreError(f"{self.root} has committed shards but no run.json; refusing to overwrite them")
        self._make_dirs()
        config_yaml = yaml.safe_dump(config, sort_keys=False).encode()
        write_bytes_atomic(self.config_yaml, config_yaml, "config")
        plan = self._write_plan(self.plan_jsonl, plan_shards(records, shard_size), identity["fingerprint"])
        manifest = {
            "format": RUN_FORMAT,
            "run_id": f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}",
            "created": utc_now(),
            **identity,
            "versions": library_versions(),
            "config_sha256": hashlib.sha256(config_yaml).hexdigest(),
            "plan": plan,
        }
        write_json_atomic(self.run_json, seal(manifest), "run manifest")

    def initialize_import(self, spec: dict[str, Any], class_names: Sequence[str],
                          records: Sequence[ImageRecord], shard_size: int) -> None:
        """Like ``initialize``, for labels imported from a dataset (generator ``"import"``): no recipe;
        the fingerprint covers the import ``spec`` (the run's ``source``), class names and shard size."""
        identity = {"generator": {"name": "import"}, "source": spec, "class_names": list(class_names),
                    "store": {"shard_size": shard_size, "compress_level": 6}}
        fingerprint = hashlib.sha256(canonical_json(identity).encode()).hexdigest()
        config = {"description": f"labels imported from {spec.get('import', {}).get('format', 'a dataset')}",
                  **identity}
        self._initialize(config, records, shard_size, {
            "fingerprint": fingerprint, "generator": "import", "class_names": list(class_names), "source": spec,
        })

    def check_same_run(self, recipe: Recipe, source_spec: dict[str, Any]) -> None:
        """Raise ``ConfigMismatchError`` with a readable diff if the run was made differently."""
        manifest = self.manifest()
        stored = self.stored_config()  # verified against run.json even when nothing changed
        lines = []
        if manifest["fingerprint"] != recipe.fingerprint():
            old = {k: v for k, v in stored.items() if k in IDENTITY_SECTIONS}
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
            for path in (self.run_json, self.config_yaml, self.plan_jsonl, self.plan_next, self.shards_dir,
                         self.failures_jsonl):
                if path.exists():
                    shutil.move(str(path), str(target / path.name))
        except OSError as exc:
            raise store_write_error(exc, target, "archive of the previous run") from exc
        return target

    # -- plan ------------------------------------------------------------------------
    def iter_plan(self) -> Iterator[ShardSpec]:
        """Shards in index order, read lazily (memory stays flat however large the plan), after the
        file is checked against the sha256 and size ``run.json`` holds for it."""
        path = self._verified_plan_path()
        try:
            with open(path, encoding="utf-8") as handle:
                header = json.loads(handle.readline() or "null")
                if not isinstance(header, dict) or header.get("format") != PLAN_FORMAT:
                    raise RunStoreError(f"{path}: not a {PLAN_FORMAT} file")
                for line in handle:
                    yield ShardSpec.from_dict(json.loads(line))
        except FileNotFoundError:
            raise RunStoreError(f"{path} is missing; {self.root} is not a complete run directory") from None
        except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
            raise CorruptRunError(f"{path} is corrupt: {exc}. {_RESTORE}") from None

    def _verified_plan_path(self) -> Path:
        """The plan file that matches ``run.json``: ``plan.jsonl``, or ``plan.jsonl.next`` while an
        ``--extend`` is between its two renames. ``CorruptRunError`` names the file if neither does."""
        expected = self.manifest().get("plan")
        if expected is None:  # legacy run: no checksum to hold it to
            return self.plan_jsonl
        found = _file_digest(self.plan_jsonl)
        if found == (expected["sha256"], expected["bytes"]):
            return self.plan_jsonl
        if _file_digest(self.plan_next) == (expected["sha256"], expected["bytes"]):
            return self.plan_next
        what = "is missing" if found is None else (
            f"has sha256 {found[0][:12]}... and {found[1]} bytes; run.json expects {expected['sha256'][:12]}..."
            f" and {expected['bytes']} bytes ({expected['shards']} shards, {expected['images']} images)")
        raise CorruptRunError(f"{self.plan_jsonl} {what}: it was truncated, altered or damaged, and no"
                              f" committed work is trusted against it. {_RESTORE}")

    def recover_plan(self) -> None:
        """Under the lock: finish or drop an ``--extend`` that was killed between its steps."""
        if not self.plan_next.exists():
            return
        if self._verified_plan_path() == self.plan_next:  # run.json already names the longer plan
            os.replace(self.plan_next, self.plan_jsonl)
            fsync_dir(self.root)
        else:  # run.json still names the old plan: the longer one was never committed
            self.plan_next.unlink()

    def plan_summary(self, fingerprint: str, verify: bool = False) -> "PlanSummary":
        """One lazy pass: shard/image totals, which shards are pending and which are corrupt
        (``verify``: re-hash every committed output too)."""
        summary = PlanSummary()
        for shard in self.iter_plan():
            summary.shards += 1
            summary.images += len(shard.images)
            state = self.shard_state(shard, fingerprint, verify=verify)
            if state.state != "done":
                summary.pending.append(shard.index)
                summary.pending_images += len(shard.images)
            if state.state == "corrupt":
                summary.corrupt.append((shard.index, str(state.problem)))
        return summary

    def iter_pending(self, pending: set[int]) -> Iterator[ShardSpec]:
        return (shard for shard in self.iter_plan() if shard.index in pending)

    def extend(self, records: Sequence[ImageRecord], shard_size: int, fingerprint: str) -> list[ShardSpec]:
        """Append shards for images not yet in the plan; existing shards never change.

        Crash-safe in three steps: the longer plan goes to ``plan.jsonl.next``, then ``run.json``
        names its checksum, then it is renamed over ``plan.jsonl`` (``recover_plan`` finishes a
        killed extend from either side)."""
        planned, count = set(), 0
        for shard in self.iter_plan():
            planned.update(r.image_id for r in shard.images)
            count += 1
        added = plan_shards([r for r in records if r.image_id not in planned], shard_size, first_index=count)
        if added:
            plan = self._write_plan(self.plan_next, itertools.chain(self.iter_plan(), added), fingerprint)
            manifest = self.manifest()
            if SEAL_KEY in manifest:
                write_json_atomic(self.run_json, seal({**manifest, "plan": plan}), "run manifest")
            os.replace(self.plan_next, self.plan_jsonl)
            fsync_dir(self.root)
        return added

    def _write_plan(self, path: Path, shards: Iterable[ShardSpec], fingerprint: str) -> dict[str, Any]:
        """Write the plan atomically; return what ``run.json`` records of it (sha256, bytes, counts)."""
        digest, info = hashlib.sha256(), {"bytes": 0, "shards": 0, "images": 0}

        def write(line: str) -> None:
            encoded = (line + "\n").encode()
            handle.write(encoded)
            digest.update(encoded)
            info["bytes"] += len(encoded)

        with atomic_file(path, "shard plan") as handle:
            write(json.dumps({"format": PLAN_FORMAT, "fingerprint": fingerprint}))
            for shard in shards:
                write(json.dumps(shard.to_dict(), separators=(",", ":")))
                info["shards"] += 1
                info["images"] += len(shard.images)
        return {"sha256": digest.hexdigest(), **info}

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

    def shard_state(self, shard: ShardSpec, fingerprint: str | None = None, verify: bool = False) -> ShardState:
        """Whether ``shard`` is committed. Cheap checks always (the done record's own checksum, its
        plan entry, config and the output's size); ``verify`` also re-hashes the output."""
        done_path, output = self.shard_done(shard.index), self.shard_output(shard.index)
        try:
            text = done_path.read_bytes()
        except FileNotFoundError:
            return ShardState("pending")
        except OSError as exc:
            return ShardState("corrupt", problem=f"{done_path} is unreadable ({exc.strerror or exc})")
        problem = self._done_problem(text, shard, fingerprint)
        if isinstance(problem, str):
            return ShardState("corrupt", problem=f"{done_path} {problem}")
        done = problem
        try:
            size = output.stat().st_size
        except OSError:
            return ShardState("corrupt", problem=f"{output} is missing; its done record says {done['bytes']} bytes")
        if size != done.get("bytes"):
            return ShardState("corrupt", problem=f"{output} has {size} bytes; its done record says {done.get('bytes')}")
        if verify and sha256_file(output) != done.get("sha256"):
            return ShardState("corrupt", problem=f"{output} does not match the sha256 in its done record")
        return ShardState("done", record=done)

    def _done_problem(self, text: bytes, shard: ShardSpec, fingerprint: str | None) -> dict | str:
        """The parsed done record, or what is wrong with it."""
        try:
            done = json.loads(text)
        except ValueError:
            return "is not valid JSON (torn or damaged)"
        if not isinstance(done, dict):
            return "is not a JSON object"
        legacy = done.get("format") == LEGACY_DONE_FORMAT and SEAL_KEY not in done and self.is_legacy()
        if not legacy and (done.get("format") != DONE_FORMAT or not is_sealed(done)):
            return "does not match its own checksum (altered or damaged after commit)"
        if done.get("shard") != shard.index or done.get("plan_digest") != shard.digest:
            return "belongs to another plan entry"
        if fingerprint is not None and done.get("fingerprint") != fingerprint:
            return "was made with other settings"
        return done

    def done_record(self, shard: ShardSpec, fingerprint: str | None = None, verify: bool = False) -> dict | None:
        """The shard's commit record if it is valid for this plan entry (and config), else ``None``."""
        return self.shard_state(shard, fingerprint, verify=verify).record

    def read_rows(self, shard: ShardSpec, done: dict) -> list[Row]:
        """The committed rows of ``shard``, after its bytes are checked against ``done``'s sha256.

        Raises ``CorruptRunError`` naming the file when they are not: no row of a damaged shard is
        ever returned. Holds one shard in memory (shards are small by design)."""
        return _parse_rows(self.shard_output(shard.index), self._verified_output(shard, done))

    def _verified_output(self, shard: ShardSpec, done: dict) -> bytes:
        path = self.shard_output(shard.index)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CorruptRunError(f"{path} is unreadable ({exc.strerror or exc})") from None
        if len(data) != done.get("bytes") or hashlib.sha256(data).hexdigest() != done.get("sha256"):
            raise CorruptRunError(f"{path} does not match the sha256 in its done record: it was damaged after"
                                  " commit. `labelgen run` moves it to corrupt/ and redoes the shard.")
        return data

    def iter_committed(self, on_corrupt: Any = None, copy: Path | None = None
                       ) -> Iterator[tuple[ShardSpec, dict, list[Row]]]:
        """``(shard, done record, rows)`` of every committed shard that verifies, in plan order.

        A shard that does not verify is skipped: ``on_corrupt(shard, problem)`` is called, or a
        warning naming the file is logged. ``copy`` (``copy_dir(kind, name)``): the rows are that
        copy's rows of the shard (``read_copy_rows``: a damaged or missing one raises)."""
        for shard in self.iter_plan():
            state = self.shard_state(shard)
            if state.state == "pending":
                continue
            try:
                if state.record is None:
                    raise CorruptRunError(str(state.problem))
                data = self._verified_output(shard, state.record)
                rows = _parse_rows(self.shard_output(shard.index), data) if copy is None else None
            except CorruptRunError as exc:
                self._skip_corrupt(shard, exc, on_corrupt)
                continue
            yield shard, state.record, rows if rows is not None else self.read_copy_rows(copy, shard.index)

    def _skip_corrupt(self, shard: ShardSpec, exc: CorruptRunError, on_corrupt: Any) -> None:
        if on_corrupt is not None:
            on_corrupt(shard, str(exc))
        elif shard.index not in self._warned:  # once per shard, however often it is read
            self._warned.add(shard.index)
            log.warning("skipping shard %s: %s", shard.key, exc)

    def quarantine(self, shard: ShardSpec, problem: str) -> Path:
        """Under the lock: move a corrupt shard's files to ``corrupt/`` so the shard is redone."""
        target = self.corrupt_dir / f"{shard.key}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%fZ}"
        try:
            target.mkdir(parents=True, exist_ok=False)
            for path in (self.shard_done(shard.index), self.shard_output(shard.index)):
                if path.exists() or path.is_symlink():
                    os.replace(path, target / path.name)
            write_json_atomic(target / "why.json", {"shard": shard.index, "problem": problem, "moved": utc_now()},
                              "quarantine note")
            fsync_dir(self.shards_dir)
        except OSError as exc:
            raise store_write_error(exc, target, "quarantine of a corrupt shard") from exc
        return target

    def commit_shard(self, shard: ShardSpec, rows: Sequence[Row], summary: dict[str, Any], level: int = 6) -> dict:
        """Write the shard's output, then its sealed done record; both atomic. Returns the done record."""
        output = self.shard_output(shard.index)
        write_jsonl_gz_atomic(output, [row.to_dict() for row in rows], f"shard {shard.key} output", level=level)
        done = seal({
            "format": DONE_FORMAT,
            "shard": shard.index,
            "plan_digest": shard.digest,
            "output": output.name,
            "bytes": output.stat().st_size,
            "sha256": sha256_file(output),
            **summary,
        })
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
    def iter_rows(self, on_corrupt: Any = None, copy: Path | None = None) -> Iterator[Row]:
        """Every committed image row that verifies (or the ``copy``'s rows of those shards), shard by
        shard in plan order (see ``iter_committed``)."""
        for _, _, rows in self.iter_committed(on_corrupt, copy):
            yield from rows

    # -- copies: filtered/NAME, reviewed/NAME ---------------------------------------------
    def copy_dir(self, kind: str, name: str) -> Path:
        """The folder of the ``kind`` (``filtered`` | ``reviewed``) copy ``name``."""
        return self.root / kind / name

    def read_copy_rows(self, copy: Path, index: int) -> list[Row]:
        """The rows of shard ``index`` of the copy in folder ``copy``, verified against its
        ``checksums.json`` (``read_verified``). ``ExportError`` when the copy has no such shard."""
        path = copy / f"{index:06d}.jsonl.gz"
        if not path.is_file():
            raise ExportError(f"{copy.parent.name} copy {copy.name!r} has no shard {index:06d} ({path});"
                              f" re-create it (it predates shards committed since)")
        return _parse_rows(path, read_verified(copy, path.name))

    def write_failures_ledger(self) -> int:
        """Rebuild ``failures.jsonl`` from the done records (streaming); return the number of failures."""
        count = 0
        with atomic_file(self.failures_jsonl, "failures ledger") as handle:
            for shard in self.iter_plan():
                for failure in (self.done_record(shard) or {}).get("failures", []):
                    handle.write((json.dumps({"shard": shard.index, **failure}, sort_keys=True) + "\n").encode())
                    count += 1
        return count



_RESTORE = ("Nothing was changed. Restore the file from a backup, or start over with --new-run"
            " (moves this run to archive/)")


def write_checksums(folder: Path) -> None:
    """Seal a copy: ``checksums.json`` with the sha256 of every file in ``folder`` (write it last)."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    write_json_atomic(folder / CHECKSUMS, seal({"files": files}), "checksums")


def read_verified(folder: Path, name: str) -> bytes:
    """The bytes of ``folder/name`` (a file of a filtered or reviewed copy) after checking them
    against the folder's ``checksums.json``; ``CorruptRunError`` naming the file if they differ.
    Copies made before checksums (no ``checksums.json``) are read as they are."""
    path = folder / name
    try:
        data = path.read_bytes()
        listing = json.loads((folder / CHECKSUMS).read_bytes())
    except FileNotFoundError as exc:
        if Path(exc.filename or "").name != CHECKSUMS:
            raise CorruptRunError(f"{path} is missing; re-create the copy") from None
        return data
    except (OSError, ValueError) as exc:
        raise CorruptRunError(f"{folder / CHECKSUMS} is unreadable or damaged ({exc}); re-create the copy") from None
    if not is_sealed(listing):
        raise CorruptRunError(f"{folder / CHECKSUMS} does not match its own checksum; re-create the copy")
    if hashlib.sha256(data).hexdigest() != listing["files"].get(name):
        raise CorruptRunError(f"{path} does not match its sha256 in {CHECKSUMS}: it was damaged after it was"
                              " written. Re-create the copy (labelgen filter --save / labelgen pull)")
    return data


def _parse_rows(path: Path, data: bytes) -> list[Row]:
    """The rows of a verified shard file's bytes (gzip JSON Lines)."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as handle:
            return [Row.from_dict(json.loads(line)) for line in handle if line.strip()]
    except (OSError, EOFError, ValueError) as exc:  # verified bytes that do not parse: a writer bug
        raise CorruptRunError(f"{path} verifies but does not parse ({exc})") from None


def _file_digest(path: Path) -> tuple[str, int] | None:
    """``(sha256 hex, size)`` of a file, ``None`` if it does not exist."""
    try:
        return sha256_file(path), path.stat().st_size
    except FileNotFoundError:
        return None
