"""Crash-safe file writes: write a temp file beside the target, fsync, rename.

A reader sees either the old file or the whole new one, never a torn write; a
process killed mid-write leaves only a ``.tmp-*`` file that the store cleans up.
OS errors (disk full, permissions, read-only file system) become ``StoreWriteError``.

Temp files are named ``NAME.tmp-PID-RANDOM`` and created exclusively (``O_CREAT | O_EXCL |
O_NOFOLLOW``): a file or symlink planted at a predictable name is never opened, so a write can
never be redirected outside its folder. The final ``os.replace`` replaces a symlink at the
target itself, never the file it points to.

Whole folders (a filtered or reviewed copy, an imported run, a YOLO split) are replaced the same
way by ``staged_folder``: built under ``.NAME.tmp-PID-RANDOM`` beside ``NAME``, then swapped in.
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from .errors import StoreWriteError

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"  # a replaced folder, moved aside by ``staged_folder`` until it is deleted
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

    def discard() -> None:
        if tmp is not None:
            _unlink_quietly(tmp)

    with _on_failure(discard, path, what, note):
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


@contextlib.contextmanager
def _on_failure(discard: Callable[[], None], target: Path, what: str, note: str) -> Iterator[None]:
    """Call ``discard()`` (remove the temp file or folder) if the block raises; an ``OSError``
    becomes a ``StoreWriteError`` about ``target``."""
    try:
        yield
    except OSError as exc:
        discard()
        raise store_write_error(exc, target, what, note=note) from exc
    except BaseException:
        discard()
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


# -- whole folders --------------------------------------------------------------------------------
@contextlib.contextmanager
def staged_folder(final: Path, what: str, *, finish: Callable[[Path], None] | None = None,
                  note: str = STORE_NOTE) -> Iterator[Path]:
    """Build the folder ``final`` in a new hidden folder beside it; swap it into place on success.

    Yields the new folder, ``.NAME.tmp-PID-RANDOM`` (an unpredictable name, created exclusively: never
    one planted in advance). On a clean exit ``finish(folder)`` runs last (e.g. writing a
    ``checksums.json`` of what the body wrote), then the folder replaces ``final`` (``swap_into_place``).
    On any error it is removed and an existing ``final`` is left as it was. Leftovers of writers that
    no longer run are removed first (``remove_staged_leftovers``). OS errors become ``StoreWriteError``
    (``note``: its last sentence).
    """
    final, tmp = Path(final), None

    def discard() -> None:
        if tmp is not None:
            remove_tree(tmp)

    remove_staged_leftovers(final)
    with _on_failure(discard, final, what, note):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_folder(final)
        yield tmp
        if finish is not None:
            finish(tmp)
        swap_into_place(tmp, final)


def _new_folder(final: Path) -> Path:
    for _ in range(16):
        folder = final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(8)}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # 64 random bits taken: try another name
            continue
    raise FileExistsError(errno.EEXIST, "no free temp folder name", str(final))


def swap_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (or a link there) is moved aside first, then deleted."""
    old = final.with_name(f".{final.name}{OLD_MARK}{os.getpid()}-{secrets.token_hex(8)}")
    if final.exists() or final.is_symlink():
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    remove_tree(old)


def remove_staged_leftovers(final: Path, *, any_writer: bool = False) -> int:
    """Delete the temp and old folders of ``final`` (``.NAME.tmp-*``, ``.NAME.old-*``) left by killed
    writers; return how many. By default only those whose writer pid no longer runs (or is this
    process); ``any_writer``: all of them, for a caller holding the lock every writer holds."""
    try:
        names = [] if final.parent.is_symlink() else os.listdir(final.parent)
    except OSError:
        return 0
    prefixes = tuple(f".{final.name}{mark}" for mark in (TMP_MARK, OLD_MARK))
    removed = 0
    for name in names:
        if name.startswith(prefixes) and (any_writer or _writer_gone(name)):
            remove_tree(final.parent / name)
            removed += 1
    return removed


def _writer_gone(name: str) -> bool:
    """Whether the pid in a staged folder's name is this process or one that no longer runs."""
    pid = temp_pid(name.replace(OLD_MARK, TMP_MARK))
    return pid is not None and (pid == os.getpid() or not process_alive(pid))


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_tree(path: Path) -> None:
    """Remove a file, a link (unlinked, never followed) or a folder (without following the links in it)."""
    try:
        kind = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(kind):
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink_quietly(path)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
