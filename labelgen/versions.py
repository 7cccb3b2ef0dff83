"""Library versions for the run manifest, read from package metadata (imports nothing heavy)."""
from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = (
    "labelgen", "numpy", "pillow", "pycocotools", "joblib", "torch", "torchvision",
    "open_clip_torch", "segment-anything", "sam2", "sam3", "fiftyone",
)


def library_versions() -> dict[str, str | None]:
    """``{package: version or None when not installed}`` plus python and platform."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = sys.version.split()[0]
    versions["platform"] = platform.platform()
    return versions
