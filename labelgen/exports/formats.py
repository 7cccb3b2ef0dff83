"""The built-in export formats (``coco``, ``yolo``, ``fiftyone``) as registered exporters.

Each one imports its module only when it runs, so listing the formats loads no optional library
(pycocotools, opencv, fiftyone).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .registry import EXPORTERS, Exporter, ExportRequest

if TYPE_CHECKING:
    from .source import ExportSource


@EXPORTERS.register("coco")
class CocoExporter(Exporter):
    """``out/annotations.json`` (options ``mask_format``: rle | polygon, ``polygon_tolerance``)."""

    summary = "one annotations.json (RLE or polygon masks) in --out"

    def export(self, source: "ExportSource", request: ExportRequest) -> Any:
        from .coco import export_coco

        return export_coco(source, request.out, images_root=request.images_root,
                           mask_format=request.option("mask_format", "rle"),
                           polygon_tolerance=request.option("polygon_tolerance", 0.9))


@EXPORTERS.register("yolo")
class YoloExporter(Exporter):
    """A YOLO dataset folder (options ``task``, ``multipart``, ``images``)."""

    summary = "a YOLO dataset folder (labels, data.yaml) in --out"

    def export(self, source: "ExportSource", request: ExportRequest) -> Any:
        from .yolo import export_yolo

        return export_yolo(source, request.out, task=request.option("task", "segment"),
                           multipart=request.option("multipart", "largest"),
                           images=request.option("images", "symlink"), images_root=request.images_root)


@EXPORTERS.register("fiftyone")
class FiftyOneExporter(Exporter):
    """A FiftyOne dataset named ``request.dataset`` (default ``labelgen-RUN_ID``)."""

    summary = "a FiftyOne dataset (--dataset NAME, default labelgen-RUN_ID)"
    needs_out = False

    def export(self, source: "ExportSource", request: ExportRequest) -> Any:
        from .fiftyone import export_fiftyone
        from .source import log_incomplete

        log_incomplete(source, "FiftyOne export")  # coco and yolo warn (and record it) themselves
        return export_fiftyone(source, request.dataset or f"labelgen-{source.run_id}")
