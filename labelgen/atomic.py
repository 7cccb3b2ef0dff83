"""Crash-safe file writes: write a temp file beside the target, fsync, rename.

A reader sees either the old file or the whole new one, never a torn write; a
process killed mid-write leaves only a ``.tmp-*`` file that the store cleans up.
OS errors (disk full, permissions, read-only file system) become ``StoreWriteError``.

Temp files are named ``NAME.tmp-PID-RANDOM`` and created exclusively (``O_CREAT | O_EXCL |
O_NOFOLLOW``): a file or symlink planted at a predictable name is never opened, so a write can
never be redirected outside its folder. The final ``os.replace`` replaces a symlink at the
target itself, never the file it points to.
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .errors import StoreWriteError

TMP_MARK = ".tmp-"
STORE_NOTE = "Already committed shards are intact."
EXPORT_NOTE = "The export was not finished; an earlier export in that folder, if any, is unchanged."
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_HINTS = {
    errno.ENOSPC: "the disk is full: free space, then rerun the same command to resume",
    errno.EDQUOT: "the disk quota is exceeded: free space, then rerun the same command to resume",
    errno.EFBIG: "the file size limit was hit: raise the limit (ulimit -f), then rerun to resume",
    errno.EACCES: "permission denied: choose a writable --out folder or fix its permissions",
    errno.EPERM: "operation not permitted: choose a writable --out folder",
    errno.EROFS: "the file system is read-only: choose a writable --out folder",
}


def store_write_error(exc: OSError, path: Path | str, what: str, *, note: str = STORE_NOTE) -> StoreWriteError:
    """Turn an ``OSError`` into a ``StoreWriteError`` that says what to do.

    ``note``: the last sentence, what is still intact (exporters pass ``EXPORT_NOTE``)."""
    hint = _HINTS.get(exc.errno or 0, "check the folder, then rerun the same command to resume")
    return StoreWriteError(f"cannot write {what} at {path}: {exc.strerror or exc}; {hint}. {note}")


def temp_path(target: Path | str, label: str = "") -> Path:
    """An unpredictable temp name beside ``target``: ``NAME[.LABEL].tmp-PID-RANDOM``."""
    target = Path(target)
    middle = f".{label}" if label else ""
    return target.with_name(f"{target.name}{middle}{TMP_MARK}{os.getpid()}-{secrets.token_hex(8)}")


def temp_pid(name: str) -> int | None:
    """The writer pid in a temp name (``...tmp-PID`` or ``...tmp-PID-RANDOM``), else ``None``."""
    if TMP_MARK not in name:
        return None
    tail = name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0]
    return int(tail) if tail.isdigit() else None


def create_exclusive(path: Path | str, mode: int = 0o666) -> BinaryIO:
    """Open a NEW file for binary writing: never an existing file, never through a symlink."""
    fd = os.open(path, _CREATE_FLAGS, mode)
    try:
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def create_temp(target: Path | str, label: str = "") -> tuple[BinaryIO, Path]:
    """A new exclusively created temp file beside ``target`` (``temp_path``), open for binary writing."""
    for _ in range(16):
        tmp = temp_path(target, label)
        try:
            return create_exclusive(tmp), tmp
        except FileExistsError:  # 64 random bits taken: try another name
            continue
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(target))


@contextlib.contextmanager
def atomic_file(path: Path, what: str, *, durable: bool = True, note: str = STORE_NOTE) -> Iterator[BinaryIO]:
    """Open a temp file for binary writing; on clean exit fsync it and rename onto ``path``.

    ``durable=False`` skips the fsyncs (derived files that a rerun rewrites); the rename stays atomic.
    A symlink at ``path`` is replaced by the file, never written through."""
    path = Path(path)
    tmp: Path | None = None
    try:
        handle, tmp = create_temp(path)
        with handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable:
            fsync_dir(path.parent)
    except OSError as exc:
        if tmp is not None:
            _unlink_quietly(tmp)
        raise store_write_error(exc, path, what, note=note) from exc
    except BaseException:
        if tmp is not None:
            _unlink_quietly(tmp)
        raise


def write_bytes_atomic(path: Path, data: bytes, what: str, *, durable: bool = True, note: str = STORE_NOTE) -> None:
    with atomic_file(path, what, durable=durable, note=note) as handle:
        handle.write(data)


def json_bytes(obj: Any, sort_keys: bool = True, **options: Any) -> bytes:
    """``json.dumps(obj, sort_keys=sort_keys, **options)`` as UTF-8, readable where it can be.

    Text is written unescaped, except where it holds lone surrogates (file names that are
    not UTF-8, decoded with ``surrogateescape``): those are written ``\\udcff``-escaped,
    which ``json.loads`` turns back into the same string, so such ids round-trip.
    """
    try:
        return json.dumps(obj, sort_keys=sort_keys, ensure_ascii=False, **options).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, sort_keys=sort_keys, ensure_ascii=True, **options).encode("ascii")


def write_json_atomic(path: Path, obj: Any, what: str, *, note: str = STORE_NOTE) -> None:
    write_bytes_atomic(path, json_bytes(obj, indent=1) + b"\n", what, note=note)


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


def remove_stale_temps(folder: Path, prefixes: tuple[str, ...] | None = None) -> int:
    """Delete leftover ``*.tmp-*`` files of killed writers; return how many were removed.

    Only regular files and symlinks are unlinked (a link itself, never what it points to); folders
    and anything else are left alone. ``prefixes``: only names starting with one of them. The caller
    must hold the lock that every writer into ``folder`` holds (so no live writer owns a temp)."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if TMP_MARK not in entry.name or (prefixes is not None and not entry.name.startswith(prefixes)):
            continue
        try:
            kind = os.lstat(entry.path).st_mode
            if stat.S_ISREG(kind) or stat.S_ISLNK(kind):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
