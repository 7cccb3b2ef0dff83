"""Exports of a run's labels (COCO, YOLO, FiftyOne) and importers of ground truth.

Every exporter streams ``Row``s from ``labelgen.exports.source`` (memory does not grow
with the dataset) and writes only inside its target folder (``labelgen.exports.paths``).
Formats are looked up by name in ``EXPORTERS`` (``labelgen.exports.registry``); the built-in
ones register in ``labelgen.exports.formats``, plugins register theirs the same way.
"""
from __future__ import annotations

from .registry import EXPORTERS, Exporter, ExportRequest, export
from . import formats as _formats  # noqa: E402,F401  (built-ins: register "coco", "yolo", "fiftyone")

__all__ = ["EXPORTERS", "Exporter", "ExportRequest", "export"]
