"""Exports of a run's labels (COCO, YOLO, FiftyOne) and importers of ground truth.

Every exporter streams ``ExportItem``s from ``labelgen.exports.source`` (memory does not grow
with the dataset) and writes only inside its target folder (``labelgen.exports.paths``).
"""
