"""A bounded, content-addressed, crash- and concurrency-safe cache of numpy feature arrays.

Used by the Zip generator to skip its image encoders when an image is seen again with the same
models and encoder settings (another vocabulary, other thresholds, a resumed run). Imports no torch.

Layout: ``root/<kind>/<key[:2]>/<key>.feat``, one file per entry, where ``key`` is the SHA-256 of
the caller's key dict as canonical JSON (sorted keys, no spaces). The key dict must name
everything the array depends on (image content hash, model, weights identity, resolution,
precision...); the cache cannot tell what it was not told.

Entry file (no pickle anywhere: arrays are written and read with ``allow_pickle=False``)::

    b"LGFEAT1\\n" | header length (8 bytes, little-endian) | header JSON (UTF-8) | .npy bytes

The header holds the kind, the canonical key JSON, the array's shape and dtype, and the SHA-256
and length of the ``.npy`` bytes. ``get`` checks all of them; an entry that fails (truncated,
flipped byte, wrong shape, object array, foreign file) is deleted and counted as ``corrupt`` and
as a miss; corruption never raises.

Writes go to a uniquely named temp file beside the target, are fsynced and renamed into place,
so a reader sees a whole entry or none; two workers writing the same key both write whole
entries and the last rename wins. Least-recently-used entries (file mtime; a hit touches the
file) are evicted when the total passes ``max_bytes``, down to ``low_water`` of it; files that
another worker deleted first are skipped.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..atomic import fsync_dir
from ..errors import ValidationError

log = logging.getLogger(__name__)

MAGIC = b"LGFEAT1\n"
SUFFIX = ".feat"
TMP_MARK = ".tmp-"
_LENGTH = struct.Struct("<Q")
_MAX_HEADER = 1 << 20
_KIND = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
STALE_TEMP_SECONDS = 3600.0  # temp files older than this belong to killed writers and are removed


@dataclass(frozen=True)
class CacheStats:
    """Counters of this process's ``FeatureCache`` object, and what is on disk now.

    ``hits``/``misses``/``corrupt``/``writes``/``evictions`` count calls made through this object
    (a corrupt entry is also a miss); ``bytes``/``entries`` are the files under the root.
    """

    hits: int
    misses: int
    corrupt: int
    writes: int
    evictions: int
    bytes: int
    entries: int


def cache_key(key: dict[str, Any]) -> str:
    """Hex SHA-256 of ``key`` as canonical JSON (sorted keys, compact, no NaN)."""
    return hashlib.sha256(canonical_json(key).encode("utf-8")).hexdigest()


def canonical_json(key: dict[str, Any]) -> str:
    if not isinstance(key, dict) or not key:
        raise ValidationError(f"a cache key must be a non-empty dict, got {key!r}")
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"a cache key must hold JSON values only (str, int, float, bool, lists, dicts): {exc}") from exc


class FeatureCache:
    """Numpy arrays under ``root``, keyed by ``(kind, key dict)``, at most ~``max_bytes`` on disk.

    Args:
        root: cache folder (created when missing). Several processes may share it.
        max_bytes: size bound of all entries; an array larger than this is not stored.
        low_water: eviction frees space down to ``low_water * max_bytes`` (0 < low_water <= 1),
            so that a full cache does not rescan the folder on every write.
        rescan_every: writes between two scans of the folder, so that bytes written by other
            processes are noticed (each process only counts its own writes in between).
    """

    def __init__(self, root: Path | str, max_bytes: int, *, low_water: float = 0.9, rescan_every: int = 64):
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValidationError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if not 0.0 < low_water <= 1.0:
            raise ValidationError(f"low_water must be in (0, 1], got {low_water!r}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.low_water = low_water
        self.rescan_every = max(1, int(rescan_every))
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "corrupt": 0, "writes": 0, "evictions": 0}
        self._known_bytes: int | None = None  # bytes on disk at the last scan + our writes since
        self._writes_since_scan = 0

    # -- public API ---------------------------------------------------------------------
    def path_of(self, kind: str, key: dict[str, Any]) -> Path:
        """Where the entry of ``(kind, key)`` lives (whether or not it exists)."""
        digest = cache_key(key)
        return self.root / _check_kind(kind) / digest[:2] / f"{digest}{SUFFIX}"

    def get(self, kind: str, key: dict[str, Any]) -> np.ndarray | None:
        """The stored array, or ``None`` on a miss. A damaged entry is deleted and is a miss."""
        path = self.path_of(kind, key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._count("misses")
            return None
        except OSError as exc:
            log.warning("feature cache: cannot read %s (%s); treating it as a miss", path, exc)
            self._count("misses")
            return None
        array, problem = _decode_entry(data, kind, canonical_json(key))
        if problem:
            log.warning("feature cache: corrupt entry %s (%s); deleted, will recompute", path, problem)
            _unlink_quietly(path)
            self._count("corrupt")
            self._count("misses")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # LRU: a hit makes the entry the most recently used
        self._count("hits")
        return array

    def put(self, kind: str, key: dict[str, Any], array: np.ndarray) -> bool:
        """Store ``array`` (a numeric/bool ndarray, not object) under ``(kind, key)``.

        Returns False, with a warning, when the entry could not be written (disk full,
        permissions) or is larger than ``max_bytes``; the cache is an optimisation, so a
        failed write never stops the caller. Raises ``ValidationError`` for a bad array or key.
        """
        payload = _npy_bytes(array)
        path = self.path_of(kind, key)
        header = {
            "kind": kind,
            "key": canonical_json(key),
            "shape": list(array.shape),
            "dtype": array.dtype.str,
            "npy_bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
        blob = b"".join((MAGIC, _LENGTH.pack(len(header_bytes)), header_bytes, payload))
        if len(blob) > self.max_bytes:
            log.warning("feature cache: %s entry of %d bytes exceeds max_bytes=%d; not stored",
                        kind, len(blob), self.max_bytes)
            return False
        try:
            _write_atomic(path, blob)
        except OSError as exc:
            log.warning("feature cache: cannot write %s (%s); continuing without caching it", path, exc)
            return False
        self._count("writes")
        self._after_write(len(blob))
        return True

    def stats(self) -> CacheStats:
        """This object's counters and the current size of the cache on disk."""
        total, entries = 0, 0
        for _, size, _ in self._scan():
            total += size
            entries += 1
        with self._lock:
            return CacheStats(bytes=total, entries=entries, **self._counts)

    def evict(self) -> int:
        """Scan the folder and, if it holds more than ``max_bytes``, delete least-recently-used
        entries down to ``low_water * max_bytes``. Returns how many entries were deleted."""
        entries = sorted(self._scan(), key=lambda e: (e[2], str(e[0])))  # oldest mtime first
        total = sum(size for _, size, _ in entries)
        removed = 0
        if total > self.max_bytes:
            target = int(self.max_bytes * self.low_water)
            for path, size, _ in entries:
                if total <= target:
                    break
                try:
                    os.unlink(path)
                    removed += 1
                except FileNotFoundError:
                    pass  # another worker evicted it first
                except OSError as exc:
                    log.warning("feature cache: cannot evict %s (%s)", path, exc)
                    continue
                total -= size
        with self._lock:
            self._counts["evictions"] += removed
            self._known_bytes = total
            self._writes_since_scan = 0
        return removed

    # -- internals ----------------------------------------------------------------------
    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _after_write(self, size: int) -> None:
        with self._lock:
            self._writes_since_scan += 1
            if self._known_bytes is not None:
                self._known_bytes += size
            scan = (self._known_bytes is None or self._known_bytes > self.max_bytes
                    or self._writes_since_scan >= self.rescan_every)
        if scan:
            self.evict()

    def _scan(self) -> Iterator[tuple[Path, int, int]]:
        """(path, size, mtime_ns) of every entry; removes temp files of long-dead writers."""
        now = time.time()
        for kind_dir in _subdirs(self.root):
            for shard in _subdirs(kind_dir):
                for entry in _files(shard):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    if TMP_MARK in entry.name:
                        if now - st.st_mtime > STALE_TEMP_SECONDS:
                            _unlink_quietly(Path(entry.path))
                        continue
                    if entry.name.endswith(SUFFIX):
                        yield Path(entry.path), st.st_size, st.st_mtime_ns


def _check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise ValidationError(f"a cache kind must match {_KIND.pattern} (it names a folder), got {kind!r}")
    return kind


def _npy_bytes(array: np.ndarray) -> bytes:
    if not isinstance(array, np.ndarray):
        raise ValidationError(f"the feature cache stores numpy arrays, got {type(array).__name__}")
    if array.dtype.hasobject or array.dtype.kind not in "biufc":
        raise ValidationError(
            f"the feature cache stores numeric or bool arrays only (no pickle), got dtype {array.dtype}")
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _decode_entry(data: bytes, kind: str, key_json: str) -> tuple[np.ndarray | None, str]:
    """(array, "") for a sound entry, else (None, what is wrong)."""
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start or not data.startswith(MAGIC):
        return None, "not a feature-cache entry (bad magic or truncated)"
    (header_len,) = _LENGTH.unpack_from(data, len(MAGIC))
    if header_len > _MAX_HEADER or len(data) < start + header_len:
        return None, "truncated header"
    try:
        header = json.loads(data[start:start + header_len].decode("utf-8"))
        shape, dtype = tuple(int(s) for s in header["shape"]), np.dtype(header["dtype"])
        expected = (header["kind"], header["key"], int(header["npy_bytes"]), str(header["sha256"]))
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable header ({exc})"
    payload = memoryview(data)[start + header_len:]
    if expected[:2] != (kind, key_json):
        return None, "the entry belongs to another key"
    if len(payload) != expected[2]:
        return None, f"payload is {len(payload)} bytes, the header says {expected[2]}"
    if hashlib.sha256(payload).hexdigest() != expected[3]:
        return None, "SHA-256 mismatch"
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # object arrays are refused here: no unpickling
        return None, f"unreadable array ({exc})"
    if array.shape != shape or array.dtype != dtype:
        return None, f"array is {array.dtype}{array.shape}, the header says {dtype}{shape}"
    return array, ""


def _write_atomic(path: Path, blob: bytes) -> None:
    """Unique temp file beside ``path``, fsync, rename (concurrent writers never share a temp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def _subdirs(folder: Path) -> list[os.DirEntry]:
    return [e for e in _listdir(folder) if _is_dir(e)]


def _files(folder: os.DirEntry | Path) -> list[os.DirEntry]:
    return [e for e in _listdir(folder) if not _is_dir(e)]


def _listdir(folder: os.DirEntry | Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []  # removed by another worker meanwhile


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
