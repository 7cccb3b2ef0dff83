"""Path safety for exports: nothing is ever written outside the export's target folder."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

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
