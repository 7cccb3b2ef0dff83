"""Small image files for tests and benchmarks, written with Pillow and numpy only.

``make_corrupt_corpus`` writes good files in many pixel modes plus broken files, each
with the ``ImageDecodeError`` reason ``read_image_rgb`` must report.
``make_image_folder`` writes many small distinct images quickly.
"""
from __future__ import annotations

import io
import pathlib
import struct
import zlib

import numpy as np
from PIL import ExifTags, Image

from ..errors import ValidationError

__all__ = ["BAD_IMAGE_REASONS", "GOOD_IMAGE_SIZES", "bomb_png_bytes", "make_corrupt_corpus", "make_image_folder"]

#: ``(width, height)`` each good corpus file must decode to, after EXIF orientation.
GOOD_IMAGE_SIZES: dict[str, tuple[int, int]] = {
    "rgb.jpg": (32, 24),
    "exif_rotated.jpg": (20, 40),  # stored 40x20 with EXIF orientation 6
    "gray16.png": (257, 8),
    "cmyk.jpg": (32, 24),
    "palette.png": (16, 8),
    "rgba.png": (16, 8),
    "gray.jpg": (32, 24),
    "tiny.png": (1, 1),
    "bilevel.png": (16, 8),
    "rgb16.png": (2, 1),
    "sub/nested.png": (16, 12),
}

#: Reason each broken corpus file must fail with.
BAD_IMAGE_REASONS: dict[str, str] = {
    "truncated.jpg": "truncated",
    "empty.jpg": "empty_file",
    "text.jpg": "not_an_image",
    "bomb.png": "too_large",
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_corrupt_corpus(folder: pathlib.Path) -> dict[str, str | None]:
    """Write the corpus into ``folder`` (created if needed).

    Returns:
        ``{posix path relative to folder: expected failure reason, or None if the file
        must decode}``. Sizes of the good files are in ``GOOD_IMAGE_SIZES``.
    """
    folder = pathlib.Path(folder)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    _write_good_files(folder)
    _write_bad_files(folder)
    expected: dict[str, str | None] = {name: None for name in GOOD_IMAGE_SIZES}
    expected.update(BAD_IMAGE_REASONS)
    return expected


def _write_good_files(folder: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(_gradient_rgb(24, 32)).save(folder / "rgb.jpg", quality=90)
    _write_exif_rotated(folder / "exif_rotated.jpg")
    gray16 = np.minimum(np.arange(257, dtype=np.uint32) * 256, 0xFFFF).astype(np.uint16)
    Image.fromarray(np.tile(gray16, (8, 1))).save(folder / "gray16.png")
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    _write_palette_png(folder / "palette.png")
    rgba = np.dstack([_gradient_rgb(8, 16), np.tile(np.arange(16, dtype=np.uint8) * 16, (8, 1))])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(_gradient_rgb(24, 32)[:, :, 0]).save(folder / "gray.jpg", quality=90)
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "tiny.png")
    Image.fromarray(rng.integers(0, 2, (8, 16)).astype(bool)).save(folder / "bilevel.png")
    (folder / "rgb16.png").write_bytes(_rgb16_png())
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(folder / "sub/nested.png")


def _write_bad_files(folder: pathlib.Path) -> None:
    (folder / "truncated.jpg").write_bytes(_truncated_jpeg())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is a text file, not a JPEG\n", encoding="utf-8")
    (folder / "bomb.png").write_bytes(bomb_png_bytes(100_000, 100_000))


def _gradient_rgb(height: int, width: int) -> np.ndarray:
    """``(height, width, 3) uint8``: red grows along x, green along y, blue constant."""
    ys, xs = np.mgrid[0:height, 0:width]
    red = xs * 255 // max(width - 1, 1)
    green = ys * 255 // max(height - 1, 1)
    return np.dstack([red, green, np.full_like(xs, 96)]).astype(np.uint8)


def _write_exif_rotated(path: pathlib.Path) -> None:
    """Stored 40x20: left half red, right half blue; orientation 6 (rotate 90 deg CW).

    Displayed (after EXIF transpose) it is 20x40 with red on top, blue at the bottom.
    """
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())


def _write_palette_png(path: pathlib.Path) -> None:
    """16x8 palette image, 4 colours, colour 0 fully transparent (tRNS chunk)."""
    image = Image.fromarray((np.arange(16 * 8, dtype=np.uint8) % 4).reshape(8, 16), "P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    image.save(path, transparency=bytes([0, 255, 255, 255]))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG file from already filtered scanlines ``raw`` (one filter byte per row)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def bomb_png_bytes(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width x height`` 8-bit gray pixels, with a tiny IDAT.

    Decoding it fully would need ``width * height`` bytes; a careful reader rejects it
    from the header alone.
    """
    return _png(width, height, 8, 0, b"\x00" * 16)


def _rgb16_png() -> bytes:
    """2x1 16-bit RGB PNG: pixels (0, 0, 65535) and (32768, 4660, 65280)."""
    pixels = np.array([[0, 0, 0xFFFF], [0x8000, 0x1234, 0xFF00]], dtype=">u2")
    return _png(2, 1, 16, 2, b"\x00" + pixels.tobytes())


def _truncated_jpeg() -> bytes:
    """A valid 64x64 noise JPEG cut to about half, always past the start-of-scan marker."""
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = _encode(Image.fromarray(noise), "JPEG", quality=95)
    start_of_scan = buffer.index(b"\xff\xda")
    return buffer[: max(len(buffer) // 2, start_of_scan + 64)]


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    with io.BytesIO() as out:
        image.save(out, fmt, **params)
        return out.getvalue()


def make_image_folder(
    folder: pathlib.Path,
    n: int,
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
    fmt: str = "png",
) -> list[str]:
    """Write ``n`` distinct deterministic images ``img_00000.<fmt>`` ... into ``folder``.

    Each image is ``size = (width, height)`` of per-pixel random noise (so results of
    content-dependent generators are "busy", and compress poorly); pixel ``(0, 0)``
    encodes the index, so PNG files are pairwise distinct (for ``n <= 2**24``). ``fmt`` is ``"png"``
    or ``"jpg"``. About 10,000 PNGs of the default size take a few seconds.

    Returns:
        the file names written, in index order.
    """
    if fmt not in ("png", "jpg"):
        raise ValidationError(f"fmt must be 'png' or 'jpg'; got {fmt!r}")
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    rng = np.random.default_rng(seed)
    digits = max(5, len(str(max(n - 1, 0))))
    names = []
    for index in range(n):
        name = f"img_{index:0{digits}d}.{fmt}"
        image = Image.fromarray(_noise_image(rng, index, width, height))
        if fmt == "png":
            image.save(folder / name, compress_level=0)  # noise does not compress
        else:
            image.save(folder / name, quality=90)
        names.append(name)
    return names


def _noise_image(rng: np.random.Generator, index: int, width: int, height: int) -> np.ndarray:
    """``(height, width, 3) uint8`` uniform noise; pixel ``(0, 0)`` encodes ``index``."""
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[0, 0] = (index & 0xFF, (index >> 8) & 0xFF, (index >> 16) & 0xFF)
    return pixels
