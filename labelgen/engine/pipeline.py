"""Labelling a run of images: decode ahead, batch the model, finish behind.

Three kinds of work overlap, so the model is never kept waiting by the CPU:

* a **decode** thread reads and decodes the next images (Pillow releases the GIL while it decodes);
* the calling thread runs ``generator.generate_batch`` on ``batch_size`` images at a time
  (torch releases the GIL while it computes);
* a **finish** thread runs each image's finisher (RLE encoding, NMS), the CLIP labeler and the
  score combination, and builds the image's shard row.

With ``images.tiling`` on, an image that is tiled goes through ``tiling.tiled_work`` instead: its
tiles are the batches (``batch_size`` tiles per call), and its finisher stitches (``docs/tiling.md``).

Memory stays bounded: at most one batch is decoded ahead and at most two batches wait to be
finished. Rows come back in input order, identical to ``overlap=False`` (everything inline).
Nothing here raises for a bad image or a model failure: each becomes a failed row.
"""
from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..config import ImagesConfig
from .decode import DEFAULT_MAX_FILE_BYTES, open_tiff_regions, read_image_rgb
from .tiling import tiled_work, wants_tiles
from ..errors import ImageDecodeError, LabelgenError, ValidationError
from ..generators import Generator
from ..generators.base import failed
from ..labelers.protocol import Labeler
from ..structures.instances import ImageRecord, Instances
from ..structures.rows import Row
from ..structures.scoring import ScoringConfig, with_combined_score

log = logging.getLogger(__name__)


def label_images(
    generator: Generator,
    records: Sequence[ImageRecord],
    images: ImagesConfig,
    *,
    scoring: ScoringConfig | None = None,
    labeler: Labeler | None = None,
    batch_size: int = 1,
    overlap: bool = True,
    on_image: Callable[[int], None] | None = None,
) -> list[Row]:
    """One ``Row`` per record, in order: labelled, or failed with a reason code.

    ``batch_size``: images per ``generate_batch`` call; the one way the generator learns it
    (``generator.batch_size`` is set to it before the first batch). ``overlap``: decode and finish on
    background threads (``False``: all inline, for debugging and benchmarks; same rows).
    ``on_image(1)`` is called as each row is done (from either thread, never two calls at once).
    """
    if batch_size < 1:
        raise ValidationError(f"batch_size must be >= 1, got {batch_size}")
    if generator.batch_size != batch_size:  # only on a change: setting it restarts a generator's OOM back-off
        generator.batch_size = batch_size
    rows: list[Row | None] = [None] * len(records)
    lock = threading.Lock()  # rows are done on two threads; on_image is never called concurrently

    def done(index: int, row: Row) -> None:
        with lock:
            rows[index] = row
            if on_image is not None:
                on_image(1)

    finish = _Finisher(labeler, scoring, done)
    with _pool(overlap, "labelgen-decode") as decode_pool, _pool(overlap, "labelgen-finish") as finish_pool:
        pending: collections.deque[Future] = collections.deque()
        regions = labeler is None  # a labeler crops the whole decoded image: no region reading then
        for batch in _batches(_decoded(records, images, decode_pool, ahead=batch_size, regions=regions),
                              batch_size, done):
            indices, batch_records, batch_images = zip(*batch)
            work = _tiled_or_whole(generator, batch_images, batch_records, images, batch_size)
            for index, record, image, finisher in zip(indices, batch_records, batch_images, work):
                pending.append(finish_pool.submit(finish, index, record, image, finisher))
            while len(pending) > 2 * batch_size:  # bound what waits to be finished
                pending.popleft().result()
        for future in pending:
            future.result()
    return rows  # type: ignore[return-value]


def _tiled_or_whole(generator: Generator, images_rgb: Sequence[Any], records: Sequence[ImageRecord],
                    images: ImagesConfig, batch_size: int) -> list[Callable[[], Instances]]:
    """``_model_work`` on the batch's whole images (one call), ``tiling.tiled_work`` on each image that
    ``images.tiling`` tiles (its tiles batched ``batch_size`` at a time); finishers in batch order."""
    tiling = getattr(images, "tiling", None)
    tiled = [wants_tiles(image, tiling) for image in images_rgb]
    if not any(tiled):
        return _model_work(generator, images_rgb, records)
    work: list[Callable[[], Instances] | None] = [None] * len(records)
    whole = [i for i, t in enumerate(tiled) if not t]
    if whole:
        for i, finisher in zip(whole, _model_work(generator, [images_rgb[i] for i in whole],
                                                  [records[i] for i in whole])):
            work[i] = finisher
    for i in (i for i, t in enumerate(tiled) if t):
        work[i] = tiled_work(generator, images_rgb[i], records[i], tiling, batch_size)
    return work  # type: ignore[return-value]


def _model_work(generator: Generator, images_rgb: Sequence[np.ndarray],
                records: Sequence[ImageRecord]) -> list[Callable[[], Instances]]:
    """``generator.generate_batch``; a generator bug that escapes it fails the batch's images only."""
    try:
        finishers = generator.generate_batch(list(images_rgb), list(records))
        if len(finishers) != len(records):
            raise ValidationError(f"{type(generator).__name__}.generate_batch returned {len(finishers)} results"
                                  f" for {len(records)} images")
        return finishers
    except Exception as exc:
        log.exception("generate_batch failed on a batch of %d images", len(records))
        return [failed(exc)] * len(records)


class _Finisher:
    """An image's finisher -> frame check -> labeler -> combined score -> shard row."""

    def __init__(self, labeler: Labeler | None, scoring: ScoringConfig | None, done: Callable[[int, Row], None]):
        self.labeler, self.scoring, self.done = labeler, scoring, done

    def __call__(self, index: int, record: ImageRecord, image_rgb: np.ndarray,
                 finisher: Callable[[], Instances]) -> None:
        self.done(index, self.row(record, image_rgb, finisher))

    def row(self, record: ImageRecord, image_rgb: np.ndarray, finisher: Callable[[], Instances]) -> Row:
        try:
            instances = finisher()
            check_frame(instances, record)
            if self.labeler is not None:
                instances = self.labeler.label(image_rgb, instances)
            if self.scoring is not None:
                instances = with_combined_score(instances, self.scoring)
        except LabelgenError as exc:
            return Row.failed(record, "generator_error", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a model bug or OOM on one image must not abort the run
            log.error("generator failed on %s: %s: %s", record.image_id, type(exc).__name__, exc,
                      exc_info=(type(exc), exc, exc.__traceback__))
            return Row.failed(record, "generator_error", f"{type(exc).__name__}: {exc}")
        return Row(record, instances)


def _decode(record: ImageRecord, images: ImagesConfig, regions: bool = False
            ) -> tuple[ImageRecord, Any, Row | None]:
    """(record with its size, image, None) or (record, None, failed row). ``images.max_file_bytes``
    caps the bytes read (``decode.DEFAULT_MAX_FILE_BYTES`` where the config has no such key).

    With tiling on, ``images.tiling.max_pixels`` is the pixel limit, and (``regions``) a tiled or
    striped TIFF becomes a ``decode.TiffRegions`` reader that is never decoded whole."""
    tiling = getattr(images, "tiling", None)
    tiling_on = tiling is not None and tiling.mode != "never"
    max_pixels = max(images.max_pixels, tiling.max_pixels) if tiling_on else images.max_pixels
    try:
        reader = open_tiff_regions(record.uri, max_pixels=max_pixels, compute_sha256=images.compute_sha256) \
            if tiling_on and regions else None
        if reader is not None:
            image, info = reader
            if tiling.mode == "auto" and max(info["width"], info["height"]) <= tiling.tile_size:
                image = _read_whole(image)  # fits one tile: a whole image, as any other format
        else:
            image, info = read_image_rgb(record.uri, max_pixels=max_pixels, compute_sha256=images.compute_sha256,
                                         max_file_bytes=getattr(images, "max_file_bytes", DEFAULT_MAX_FILE_BYTES))
    except ImageDecodeError as exc:
        return record, None, Row.failed(record, exc.reason, str(exc))
    except Exception as exc:  # a decoder bug (or MemoryError) on one image must not cost the shard
        log.error("decoding %r failed: %s: %s", record.uri, type(exc).__name__, exc,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return record, None, Row.failed(record, "unreadable", f"cannot decode {record.uri!r}: "
                                                             f"{type(exc).__name__}: {exc}")
    return record.with_size(info["width"], info["height"], info.get("sha256")), image, None


def _read_whole(reader: Any) -> np.ndarray:
    try:
        return reader.read_window_xyxy(0, 0, reader.width, reader.height)
    finally:
        reader.close()


def _decoded(records: Sequence[ImageRecord], images: ImagesConfig, pool: Any, ahead: int, regions: bool = False
             ) -> Iterator[tuple[int, ImageRecord, np.ndarray | None, Row | None]]:
    """``_decode`` of each record in order, up to ``ahead`` images decoded in advance on ``pool``."""
    queue: collections.deque[tuple[int, Future]] = collections.deque()
    upcoming = iter(enumerate(records))
    while True:
        while len(queue) <= ahead:
            nxt = next(upcoming, None)
            if nxt is None:
                break
            queue.append((nxt[0], pool.submit(_decode, nxt[1], images, regions)))
        if not queue:
            return
        index, future = queue.popleft()
        yield (index, *future.result())


def _batches(decoded: Iterator[tuple[int, ImageRecord, np.ndarray | None, Row | None]], batch_size: int,
             done: Callable[[int, Row], None]) -> Iterator[list[tuple[int, ImageRecord, np.ndarray]]]:
    """Batches of decoded images; images that failed to decode are done at once (failed rows)."""
    batch: list[tuple[int, ImageRecord, np.ndarray]] = []
    for index, record, image, failure in decoded:
        if failure is not None:
            done(index, failure)
            continue
        batch.append((index, record, image))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Inline:
    """The ``ThreadPoolExecutor`` interface, running each call at once (``overlap=False``)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # delivered by .result(), as a pool would
            future.set_exception(exc)
        return future

    def __enter__(self) -> "_Inline":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _pool(overlap: bool, name: str) -> Any:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) if overlap else _Inline()


def check_frame(instances: Instances, record: ImageRecord) -> None:
    """``ValidationError`` unless ``instances`` is an ``Instances`` in ``record``'s pixel frame."""
    if not isinstance(instances, Instances):
        raise ValidationError(f"generator must return Instances; got {type(instances).__name__}")
    if (instances.height, instances.width) != (record.height, record.width):
        raise ValidationError(
            f"generator returned a {instances.width}x{instances.height} frame for a "
            f"{record.width}x{record.height} image"
        )
