"""Crash-safe file writes: write a temp file beside the target, fsync, rename.

A reader sees either the old file or the whole new one, never a torn write; a
process killed mid-write leaves only a ``.tmp-*`` file that the store cleans up.
OS errors (disk full, permissions, read-only file system) become ``StoreWriteError``.
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .errors import StoreWriteError

TMP_MARK = ".tmp-"

_HINTS = {
    errno.ENOSPC: "the disk is full: free space, then rerun the same command to resume",
    errno.EDQUOT: "the disk quota is exceeded: free space, then rerun the same command to resume",
    errno.EFBIG: "the file size limit was hit: raise the limit (ulimit -f), then rerun to resume",
    errno.EACCES: "permission denied: choose a writable --out folder or fix its permissions",
    errno.EPERM: "operation not permitted: choose a writable --out folder",
    errno.EROFS: "the file system is read-only: choose a writable --out folder",
}


def store_write_error(exc: OSError, path: Path | str, what: str) -> StoreWriteError:
    """Turn an ``OSError`` into a ``StoreWriteError`` that says what to do."""
    hint = _HINTS.get(exc.errno or 0, "check the folder, then rerun the same command to resume")
    return StoreWriteError(
        f"cannot write {what} at {path}: {exc.strerror or exc}; {hint}. Already committed shards are intact."
    )


@contextlib.contextmanager
def atomic_file(path: Path, what: str) -> Iterator[BinaryIO]:
    """Open a temp file for binary writing; on clean exit fsync it and rename onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise store_write_error(exc, path, what) from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_bytes_atomic(path: Path, data: bytes, what: str) -> None:
    with atomic_file(path, what) as handle:
        handle.write(data)


def json_bytes(obj: Any, **options: Any) -> bytes:
    """``json.dumps(obj, sort_keys=True, **options)`` as UTF-8, readable where it can be.

    Text is written unescaped, except where it holds lone surrogates (file names that are
    not UTF-8, decoded with ``surrogateescape``): those are written ``\\udcff``-escaped,
    which ``json.loads`` turns back into the same string, so such ids round-trip.
    """
    try:
        return json.dumps(obj, sort_keys=True, ensure_ascii=False, **options).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, sort_keys=True, ensure_ascii=True, **options).encode("ascii")


def write_json_atomic(path: Path, obj: Any, what: str) -> None:
    write_bytes_atomic(path, json_bytes(obj, indent=1) + b"\n", what)


def write_jsonl_gz_atomic(path: Path, rows: list[dict], what: str, level: int = 6) -> None:
    """Gzip JSON Lines, byte-reproducible (no mtime or file name in the header)."""
    with atomic_file(path, what) as handle:
        with gzip.GzipFile(filename="", mode="wb", fileobj=handle, compresslevel=level, mtime=0) as gz:
            for row in rows:
                gz.write(json_bytes(row, separators=(",", ":")))
                gz.write(b"\n")


def read_jsonl_gz(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Persist a rename (best effort: some file systems refuse fsync on directories)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> int:
    """Delete leftover ``*.tmp-*`` files of killed writers; return how many."""
    removed = 0
    for tmp in Path(folder).glob(f"*{TMP_MARK}*"):
        _unlink_quietly(tmp)
        removed += 1
    return removed


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
