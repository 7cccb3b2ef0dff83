"""Read one image file robustly into an ``(H, W, 3) uint8`` RGB array.

Every failure becomes an ``ImageDecodeError`` with a stable ``reason`` code (see
``labelgen.errors``); no Pillow exception escapes ``read_image_rgb``. A file whose
format Pillow does not recognise is ``not_an_image``; a recognised file whose header
or pixel data is cut short or corrupt is ``truncated`` (Pillow gives no reliable way
to tell "cut short" from "corrupt"); a pixel mode with no RGB conversion is
``not_an_image``.

Choices, stated once:

* The file is read into memory once; the sha256 and the decode both use those bytes.
* Only regular files are read, never blocking, and at most ``max_file_bytes`` of them
  (default ``DEFAULT_MAX_FILE_BYTES``, 1 GiB). The path is ``stat``-ed first (a device
  is never opened: opening some has side effects), then opened with
  ``O_RDONLY | O_NONBLOCK | O_NOCTTY`` and the open file checked again with ``fstat``
  (it may have been swapped in between), and read up to ``max_file_bytes + 1`` bytes:
  a FIFO, socket or device (``/dev/zero``, a symlink to it) is ``not_a_regular_file``;
  a file over the cap, by size or by what a read returns (a sparse 6 GB file, a file
  that grows), is ``too_large_file``; a symlink loop is ``symlink_loop``; a dangling
  symlink is ``missing``. Paths that are not UTF-8 (``surrogateescape`` str) are fine.
* The pixel count is checked from the header *before* pixels are decoded, so a
  "decompression bomb" that declares a huge size never allocates its pixels.
  Pillow itself refuses images over ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels at
  open time; those are reported as ``too_large`` too, whatever ``max_pixels`` says.
  Pillow's global settings (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``) and the
  warning filters are never changed here, so truncated files are detected as long as
  no other code enables ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``.
* EXIF orientation is applied; a corrupt EXIF block is ignored (image kept as stored).
* Alpha is dropped, not composited: a transparent pixel keeps its stored colour.
* 16/32-bit integer grayscale is scaled by its bit depth (16-bit: ``v >> 8``), never
  clipped. 32-bit float grayscale (mode ``F``) is clipped to ``0..255`` and rounded;
  NaN becomes 0. ICC profiles are not applied (no colour management).
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError, ValidationError

__all__ = ["DEFAULT_MAX_FILE_BYTES", "TiffRegions", "check_image_file", "open_tiff_regions", "read_file_bytes",
           "read_image_rgb"]

#: Largest image file read by default (bytes); larger files fail as ``too_large_file``.
DEFAULT_MAX_FILE_BYTES = 1 << 30

#: Never block (FIFOs), never take a controlling terminal, never leak the fd to children.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_READ_CHUNK = 1 << 22

_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ORIENTATION_TAG = ExifTags.Base.Orientation


def read_image_rgb(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = 200_000_000,
    compute_sha256: bool = True,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode the image at ``path`` to RGB.

    Args:
        path: a local file path.
        max_pixels: largest allowed ``width * height`` (checked from the header).
        compute_sha256: also hash the file's bytes.
        max_file_bytes: largest file read, in bytes.

    Returns:
        ``(rgb, info)``: ``rgb`` is a writable, C-contiguous ``(H, W, 3) uint8`` array
        in the EXIF-corrected frame; ``info`` is ``{"width": W, "height": H,
        "sha256": hex str or None, "source_mode": Pillow mode as stored (e.g. "CMYK"),
        "exif_transposed": bool}``.

    Raises:
        ImageDecodeError: ``reason`` is one of ``missing``, ``unreadable``,
            ``symlink_loop``, ``not_a_regular_file``, ``too_large_file``,
            ``empty_file``, ``not_an_image``, ``truncated``, ``too_large``,
            ``bad_dimensions``.
        ValidationError: ``max_pixels`` or ``max_file_bytes`` is not a positive int.
    """
    name = os.fspath(path)
    _check_positive("max_pixels", max_pixels, "200_000_000")
    _check_positive("max_file_bytes", max_file_bytes, "1 << 30")
    data = read_file_bytes(name, max_file_bytes)
    digest = hashlib.sha256(data).hexdigest() if compute_sha256 else None
    with _open_checked(data, name, max_pixels) as image:
        source_mode = image.mode
        _load_pixels(image, name)
        oriented, transposed = _apply_exif_orientation(image)
        rgb = _to_rgb_array(oriented, name)
    height, width = rgb.shape[:2]
    info = {
        "width": int(width),
        "height": int(height),
        "sha256": digest,
        "source_mode": source_mode,
        "exif_transposed": transposed,
    }
    return rgb, info


# -- reading and opening ----------------------------------------------------------------
def _check_positive(what: str, value: Any, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValidationError(f"{what} must be a positive int (e.g. {example}); got {value!r}")


def check_image_file(path: str | os.PathLike[str], max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> os.stat_result:
    """``stat`` of ``path`` (symlinks followed) if it is a regular file of at most ``max_file_bytes``;
    else ``ImageDecodeError`` (``missing``, ``symlink_loop``, ``unreadable``, ``not_a_regular_file``,
    ``too_large_file``). Opens nothing."""
    name = os.fspath(path)
    try:
        info = os.stat(name)
    except OSError as exc:
        raise _os_error(exc, name, "find") from None
    except (ValueError, UnicodeError) as exc:  # an embedded NUL, a surrogate no file name can hold
        raise _bad_path(name, exc) from None
    _check_regular(info, name, max_file_bytes)
    return info


def read_file_bytes(path: str | os.PathLike[str], max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """All bytes of a regular file of at most ``max_file_bytes``, read without ever blocking.

    Failures are ``ImageDecodeError`` with the reasons of ``check_image_file``, plus
    ``unreadable`` (a read error) and ``empty_file``.
    """
    name = os.fspath(path)
    check_image_file(name, max_file_bytes)  # before opening: a device is never opened
    try:
        fd = os.open(name, _OPEN_FLAGS)
    except OSError as exc:
        raise _os_error(exc, name, "open") from None
    try:
        info = os.fstat(fd)  # what was opened, which may not be what was stat-ed a moment ago
        _check_regular(info, name, max_file_bytes)
        data = _read_capped(fd, info.st_size, max_file_bytes, name)
    finally:
        os.close(fd)
    if not data:
        raise ImageDecodeError(
            "empty_file", f"image file {name!r} is empty (0 bytes); expected image data. "
            "The file was probably not fully copied; copy it again or remove it."
        )
    return data


def _read_capped(fd: int, size: int, max_file_bytes: int, name: str) -> bytes:
    """At most ``max_file_bytes + 1`` bytes of ``fd``: the first read asks for the whole file (one
    allocation of its size), the next ones confirm the end, or find that it grew."""
    chunks: list[bytes] = []
    total, want = 0, min(size, max_file_bytes) + 1
    try:
        while total <= max_file_bytes:
            chunk = os.read(fd, min(want, max_file_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            want = _READ_CHUNK
        if total > max_file_bytes:
            raise _too_large_file(name, f"more than {max_file_bytes} bytes were read", max_file_bytes)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except OSError as exc:
        raise _os_error(exc, name, "read") from None
    except MemoryError:
        raise _too_large_file(name, f"out of memory after reading {total} bytes", max_file_bytes) from None


def _check_regular(info: os.stat_result, name: str, max_file_bytes: int) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise ImageDecodeError("unreadable", f"{name!r} is a directory; expected an image file.")
    if not stat.S_ISREG(info.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        via = " (through a symlink)" if _is_link(name) else ""
        raise ImageDecodeError(
            "not_a_regular_file", f"{name!r} is {kind}{via}, not a regular file; expected an image file. "
            "It is not read (it could block or never end); remove it from the source."
        )
    if info.st_size > max_file_bytes:
        raise _too_large_file(name, f"it is {info.st_size} bytes", max_file_bytes)


_FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _too_large_file(name: str, why: str, max_file_bytes: int) -> ImageDecodeError:
    return ImageDecodeError(
        "too_large_file", f"image file {name!r} is too large to read: {why}; expected at most "
        f"max_file_bytes={max_file_bytes} bytes. Downscale or recompress it, raise the limit, or remove it."
    )


def _os_error(exc: OSError, name: str, doing: str) -> ImageDecodeError:
    """An ``OSError`` from ``stat``/``open``/``read`` of ``name`` -> the failure with its reason."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        if _is_link(name):
            return ImageDecodeError(
                "missing", f"image file {name!r} is a symlink to {_link_target(name)!r}, which does not exist; "
                "expected a readable image file. Fix or remove the symlink."
            )
        return ImageDecodeError(
            "missing", f"image file {name!r} does not exist; expected a readable image file. "
            "Check the path or remove it from the source."
        )
    if exc.errno == errno.ELOOP:
        return ImageDecodeError(
            "symlink_loop", f"image file {name!r} is a symlink loop (or too many levels of symlinks); "
            "expected a symlink that ends at an image file. Fix or remove the symlink."
        )
    if exc.errno == errno.EISDIR:
        return ImageDecodeError("unreadable", f"{name!r} is a directory; expected an image file.")
    return ImageDecodeError(
        "unreadable", f"cannot {doing} image file {name!r}: {exc.strerror or exc}; "
        "expected a readable file. Check its permissions and the storage it is on."
    )


def _bad_path(name: str, exc: Exception) -> ImageDecodeError:
    return ImageDecodeError(
        "unreadable", f"{name!r} cannot be a file path ({type(exc).__name__}: {exc}); expected the path "
        "of an image file. Fix the entry in the source."
    )


def _is_link(name: str) -> bool:
    try:
        return os.path.islink(name)
    except (ValueError, UnicodeError):
        return False


def _link_target(name: str) -> str:
    try:
        return os.readlink(name)
    except OSError:
        return "?"


def _open_checked(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open (header only) and check the declared size; pixels are not decoded yet."""
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            "too_large", f"image {name!r} declares too many pixels for Pillow ({exc}); "
            f"expected at most {max_pixels} pixels. Downscale it, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS in your program if you trust the file."
        ) from None
    except UnidentifiedImageError:
        raise _not_an_image(name, "Pillow does not recognise its format") from None
    except Exception as exc:  # a plugin recognised the format, then failed: undocumented types
        raise ImageDecodeError(
            "truncated", f"{name!r} looks like an image but its header is cut short or corrupt "
            f"({type(exc).__name__}: {exc}); expected a complete image file. "
            "Copy the file again or remove it."
        ) from None
    try:
        _check_size(image.size, name, max_pixels)
    except ImageDecodeError:
        image.close()
        raise
    return image


def _not_an_image(name: str, why: str) -> ImageDecodeError:
    return ImageDecodeError(
        "not_an_image", f"{name!r} is not a readable image: {why}; expected a JPEG, PNG, "
        "BMP, GIF, TIFF or WebP file. Remove it or fix its extension."
    )


def _check_size(size: tuple[int, int], name: str, max_pixels: int) -> None:
    """``size`` is Pillow's ``(width, height)`` as declared by the header."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(
            "bad_dimensions", f"image {name!r} declares size {width}x{height}; expected "
            "a positive width and height. The file is corrupt; re-export it."
        )
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_large", f"image {name!r} is {width}x{height} = {width * height} pixels; "
            f"expected at most max_pixels={max_pixels}. Downscale it or raise max_pixels."
        )


def _load_pixels(image: Image.Image, name: str) -> None:
    """Decode the pixel data; any failure here means the data is cut short or corrupt."""
    try:
        image.load()
    except MemoryError:
        raise ImageDecodeError(
            "too_large", f"ran out of memory decoding {name!r} ({image.size[0]}x{image.size[1]}); "
            "expected an image that fits in memory. Downscale it or lower max_pixels."
        ) from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageDecodeError(
            "truncated", f"pixel data of {name!r} is truncated or corrupt "
            f"({type(exc).__name__}: {exc}); expected a complete {image.format or 'image'} file. "
            "Copy the file again or remove it."
        ) from None


# -- orientation and colour ---------------------------------------------------------------
def _apply_exif_orientation(image: Image.Image) -> tuple[Image.Image, bool]:
    """Return ``(oriented image, whether a transpose was applied)``.

    A missing or unparsable EXIF block counts as orientation 1 (keep as stored).
    """
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # corrupt EXIF must not fail an otherwise good image
        return image, False
    if not isinstance(orientation, int) or orientation not in range(2, 9):
        return image, False
    try:
        transposed = ImageOps.exif_transpose(image)
    except Exception:  # same: a broken EXIF block is ignored, not fatal
        return image, False
    return (transposed, True) if transposed is not None else (image, False)


def _to_rgb_array(image: Image.Image, name: str) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to a ``(H, W, 3) uint8`` array."""
    mode = image.mode
    if mode in _GRAY16_MODES or mode == "I":
        return _gray_to_rgb(_scale_int_gray(np.asarray(image), mode))
    if mode == "F":
        return _gray_to_rgb(_clip_float_gray(np.asarray(image)))
    try:
        if mode == "RGB":
            return np.array(image, dtype=np.uint8, order="C")
        if mode == "LAB":
            return np.array(_lab_to_rgb(image), dtype=np.uint8, order="C")
        if mode == "PA" or (mode == "P" and "transparency" in image.info):
            # via RGBA: Pillow warns when converting palette+transparency straight to RGB
            return np.ascontiguousarray(np.asarray(image.convert("RGBA"))[:, :, :3])
        return np.array(image.convert("RGB"), dtype=np.uint8, order="C")
    except (ValueError, OSError, ImageCms.PyCMSError) as exc:
        raise _not_an_image(name, f"its pixel mode {mode!r} cannot be converted to RGB ({exc})") from None


def _scale_int_gray(values: np.ndarray, mode: str) -> np.ndarray:
    """``(H, W)`` integer gray -> ``(H, W) uint8``, scaled by bit depth (never clipped).

    ``I;16*`` modes are 16-bit: ``v >> 8``. Mode ``I`` (int32) holding only
    ``0..65535`` is 16-bit data (older Pillow / TIFF readers): ``v >> 8``; otherwise it
    is treated as 31-bit: negatives become 0, then ``v >> 23``.
    """
    wide = values.astype(np.int64, copy=False)
    if mode in _GRAY16_MODES or (wide.size and wide.min() >= 0 and wide.max() <= 0xFFFF):
        return (wide >> 8).astype(np.uint8)
    return (np.clip(wide, 0, None) >> 23).astype(np.uint8)


def _clip_float_gray(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` float gray -> ``(H, W) uint8``: NaN -> 0, clip to ``0..255``, round."""
    clean = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    return np.rint(np.clip(clean, 0.0, 255.0)).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """``(H, W) uint8`` -> C-contiguous ``(H, W, 3) uint8`` with equal channels."""
    return np.repeat(gray[:, :, None], 3, axis=2)


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    """CIE L*a*b* (mode ``LAB``) -> sRGB with LittleCMS; Pillow's plain convert is wrong."""
    transform = ImageCms.buildTransform(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )
    return ImageCms.applyTransform(image, transform)


# -- tiled / striped TIFF read region by region (tiling) --------------------------------------------
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders
_NO_FILE_CAP = 1 << 62  # a region reader holds one segment at a time, not the file
_MAX_SEGMENT_PIXELS = 1 << 26  # a TIFF tile or strip larger than this (64 MP) is not read by region


def open_tiff_regions(path: str | os.PathLike[str], *, max_pixels: int = 200_000_000,
                      compute_sha256: bool = True) -> "tuple[TiffRegions, dict[str, Any]] | None":
    """A ``TiffRegions`` reader and the ``info`` of ``read_image_rgb``, or ``None`` when ``path`` is not
    a TIFF this reader handles (then decode it whole with ``read_image_rgb``).

    Handled: the first page of a classic or Big TIFF, tiled or in strips, chunky (or one sample),
    8- or 16-bit unsigned gray, gray + alpha, RGB or RGBA, orientation 1, any compression tifffile
    decodes, TIFF tiles or strips of at most 64 megapixels (one segment is what a window read holds). Raises ``ImageDecodeError`` (``too_large`` over ``max_pixels``, the file reasons of
    ``check_image_file``, ``truncated`` for a corrupt header).
    """
    name = os.fspath(path)
    _check_positive("max_pixels", max_pixels, "200_000_000")
    check_image_file(name, _NO_FILE_CAP)
    try:
        import tifffile
    except ImportError:  # the core dependency is missing: fall back to Pillow
        return None
    with open(name, "rb") as handle:
        if handle.read(4) not in _TIFF_MAGICS:
            return None
    reader = TiffRegions(name, tifffile)
    try:
        if not reader.supported:
            reader.close()
            return None
        _check_size((reader.width, reader.height), name, max_pixels)
        reader.read_window_xyxy(0, 0, 1, 1)  # the codec works (else: whole decode by Pillow)
    except ImageDecodeError:
        reader.close()
        raise
    except Exception:
        reader.close()
        return None
    digest = _file_sha256(name) if compute_sha256 else None
    info = {"width": reader.width, "height": reader.height, "sha256": digest, "source_mode": reader.mode,
            "exif_transposed": False, "regions": True}
    return reader, info


def _file_sha256(name: str) -> str:
    digest = hashlib.sha256()
    with open(name, "rb") as handle:
        for chunk in iter(lambda: handle.read(_READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TiffRegions:
    """Pixels of one TIFF page read window by window: only the tiles (or strips) a window meets are
    read and decoded. ``shape`` is ``(H, W, 3)``; ``read_window`` returns ``(h, w, 3)`` uint8 RGB.
    Not thread-safe: one reader per image, read from one thread at a time."""

    def __init__(self, name: str, tifffile: Any):
        self.name = name
        try:
            self._file = tifffile.TiffFile(name)
            self._page = self._file.pages.first
        except Exception as exc:
            raise ImageDecodeError(
                "truncated", f"{name!r} looks like a TIFF but its header is cut short or corrupt "
                f"({type(exc).__name__}: {exc}); expected a complete image file. Copy the file again or remove it."
            ) from None
        page = self._page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.samples = int(page.samplesperpixel)
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = int(page.rowsperstrip or self.height), self.width
        self.seg_h = min(self.seg_h, self.height) if not page.is_tiled else self.seg_h
        self.across = -(-self.width // self.seg_w)
        self.mode = f"tiff-{page.photometric.name.lower()}-{page.dtype}-x{self.samples}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    @property
    def supported(self) -> bool:
        page = self._page
        orientation = page.tags.get(274)
        return (int(getattr(page, "imagedepth", 1)) == 1 and str(page.dtype) in ("uint8", "uint16")
                and int(page.photometric) in (1, 2) and self.samples in (1, 2, 3, 4)
                and (self.samples == 1 or int(page.planarconfig) == 1)
                and (orientation is None or int(orientation.value) == 1)
                and self.seg_h * self.seg_w <= _MAX_SEGMENT_PIXELS
                and len(page.dataoffsets) == -(-self.height // self.seg_h) * self.across)

    def read_window(self, window: Any) -> np.ndarray:
        """``window`` has ``x0, y0, x1, y1`` (full-image pixels, exclusive ends)."""
        return self.read_window_xyxy(window.x0, window.y0, window.x1, window.y1)

    def read_window_xyxy(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height):
            raise ValidationError(f"window {(x0, y0, x1, y1)} is outside the {self.width}x{self.height} image")
        out = np.zeros((y1 - y0, x1 - x0, self.samples), self._page.dtype)
        for row in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
            for col in range(x0 // self.seg_w, (x1 - 1) // self.seg_w + 1):
                self._paste(out, row, col, x0, y0, x1, y1)
        return _samples_to_rgb(out)

    def _paste(self, out: np.ndarray, row: int, col: int, x0: int, y0: int, x1: int, y1: int) -> None:
        segment = self._segment(row * self.across + col)  # (h, w, samples)
        sy, sx = row * self.seg_h, col * self.seg_w
        ty0, ty1 = max(y0, sy), min(y1, sy + segment.shape[0], self.height)
        tx0, tx1 = max(x0, sx), min(x1, sx + segment.shape[1], self.width)
        out[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0] = segment[ty0 - sy:ty1 - sy, tx0 - sx:tx1 - sx]

    def _segment(self, index: int) -> np.ndarray:
        page, handle = self._page, self._file.filehandle
        try:
            handle.seek(page.dataoffsets[index])
            data = handle.read(page.databytecounts[index])
            args = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader} if page.compression in (6, 7) else {}
            segment, _, shape = page.decode(data, index, _fullsize=page.is_tiled, **args)
        except Exception as exc:
            raise ImageDecodeError(
                "truncated", f"segment {index} of {self.name!r} is truncated or corrupt "
                f"({type(exc).__name__}: {exc}); expected a complete TIFF. Copy the file again or remove it."
            ) from None
        if segment is None:  # an empty segment: no data written
            return np.zeros((self.seg_h, self.seg_w, self.samples), page.dtype)
        return np.asarray(segment).reshape(shape[1], shape[2], shape[3])

    def close(self) -> None:
        self._file.close()


def _samples_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """``(h, w, samples)`` uint8/uint16 gray, gray + alpha, RGB or RGBA -> ``(h, w, 3)`` uint8."""
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    if pixels.shape[2] in (1, 2):
        return _gray_to_rgb(pixels[:, :, 0])
    return np.ascontiguousarray(pixels[:, :, :3])
