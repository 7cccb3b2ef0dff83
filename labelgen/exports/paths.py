"""Path safety for exports: nothing is ever written outside the export's target folder.

Also the target folder's lock (``export_lock``: one export per folder at a time) and the removal of
what killed exports leave behind (temp files, staging folders), never following a symlink.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
import stat
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..atomic import EXPORT_NOTE, remove_stale_temps, store_write_error
from ..errors import ExportError


def safe_join(root: str | Path, relative: str) -> Path:
    """``root / relative`` for a relative posix path that stays inside ``root``.

    Raises ``ExportError`` for absolute paths, ``..`` segments, or anything that resolves
    outside ``root`` (e.g. through a symlinked folder).
    """
    root = Path(root).resolve()
    rel = PurePosixPath(relative.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or relative.strip() == "":
        raise ExportError(f"refusing to write {relative!r}: expected a relative path inside {root}")
    target = root.joinpath(*rel.parts)
    resolved = target.resolve() if target.exists() else target.parent.resolve() / target.name
    if resolved != root and root not in resolved.parents:
        raise ExportError(f"refusing to write {relative!r}: it resolves to {resolved}, outside {root}")
    return target


def relative_to_root(uri: str, images_root: str | Path) -> str:
    """``uri`` as a posix path relative to ``images_root``; an image outside it is an error."""
    rel = os.path.relpath(os.path.abspath(uri), os.path.abspath(images_root))
    if rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
        raise ExportError(
            f"image {uri} is not inside the images root {images_root}; pass --images-root with a folder"
            " that contains every image"
        )
    return PurePosixPath(*Path(rel).parts).as_posix()


# -- one export per target folder -----------------------------------------------------------------
LOCK_NAME = ".labelgen-export.lock"


class ExportLockedError(ExportError):
    """Another labelgen export is writing into the same target folder."""


@contextlib.contextmanager
def export_lock(out: Path, what: str) -> Iterator[None]:
    """Hold ``OUT/.labelgen-export.lock`` (``flock``) for one export; a second export is refused at once.

    Refuse-immediately, like the run directory's lock: an export can take minutes, and waiting
    silently behind another one would hide that two exports were started into one folder. The lock
    file is opened with ``O_NOFOLLOW`` (a planted symlink is refused, never followed) and
    close-on-exec; it holds ``pid P on HOST since T`` for the refusal message and is removed on release
    (the inode is re-checked after locking, so a removed lock file cannot be held twice). A killed
    exporter's lock is released by the kernel.
    """
    path = Path(out) / LOCK_NAME
    fd = _lock_fd(path, what)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise store_write_error(exc, path, f"{what} lock", note=EXPORT_NOTE) from exc
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still ours: we hold the flock on this inode
        os.close(fd)


def _lock_fd(path: Path, what: str) -> int:
    for _ in range(16):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ExportError(f"{path} is a symbolic link; refusing to follow it. Remove it (it is only a"
                                  " lock file), then rerun the export") from None
            raise store_write_error(exc, path, f"{what} lock", note=EXPORT_NOTE) from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ExportError(f"{path} is not a regular file; remove it (it is only a lock file), then rerun"
                                  " the export")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                raise ExportLockedError(f"another labelgen export into {path.parent} is running ({holder});"
                                        " wait for it to finish, or export to another --out folder") from None
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the file was removed by its previous holder in between: lock the new one
    raise ExportLockedError(f"cannot take the export lock {path}: it keeps being replaced; is another export"
                            " running into this folder?")


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def remove_stale_export_temps(out: Path, names: tuple[str, ...]) -> int:
    """Remove temp files (``NAME.*tmp-*``) of the export files ``names`` left in ``out`` by killed exports.

    Call with ``export_lock`` held: every exporter holds it while writing, so none of them is live.
    Only regular files and symlinks of those names are unlinked (never followed); a user's own files
    (other names) are never touched. Returns how many were removed."""
    return remove_stale_temps(out, tuple(f"{name}." for name in names))
