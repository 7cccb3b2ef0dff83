"""read_image_rgb: every corpus file, bit-depth scaling, EXIF, size limits, hashing."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from labelgen.engine import decode
from labelgen.engine.decode import read_image_rgb
from labelgen.errors import ImageDecodeError, ValidationError
from labelgen.engine.sources import FolderSource
from labelgen.testing.images import (
    BAD_IMAGE_REASONS,
    GOOD_IMAGE_SIZES,
    bomb_png_bytes,
    make_corrupt_corpus,
    make_image_folder,
)

COCO128 = Path(
    os.environ.get("LABELGEN_COCO128")
    or Path(__file__).resolve().parents[2] / "shared/assets/data/coco128-seg"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, make_corrupt_corpus(folder)


def _save(tmp_path: Path, name: str, image: Image.Image, **params) -> Path:
    path = tmp_path / name
    image.save(path, **params)
    return path


def test_corpus_lists_every_expected_entry(corpus):
    folder, expected = corpus
    assert set(expected) == set(GOOD_IMAGE_SIZES) | set(BAD_IMAGE_REASONS)
    assert all((folder / name).is_file() for name in expected)
    assert expected["sub/nested.png"] is None and expected["bomb.png"] == "too_large"


@pytest.mark.parametrize("name", sorted(GOOD_IMAGE_SIZES))
def test_good_corpus_files_decode_to_rgb_uint8(corpus, name):
    folder, _ = corpus
    rgb, info = read_image_rgb(folder / name)
    width, height = GOOD_IMAGE_SIZES[name]
    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
    assert rgb.flags.c_contiguous and rgb.flags.writeable
    assert (info["width"], info["height"]) == (width, height)
    assert info["exif_transposed"] is (name == "exif_rotated.jpg")
    assert isinstance(info["source_mode"], str) and info["source_mode"]


@pytest.mark.parametrize("name", sorted(BAD_IMAGE_REASONS))
def test_bad_corpus_files_fail_with_expected_reason(corpus, name):
    folder, expected = corpus
    with pytest.raises(ImageDecodeError) as caught:
        read_image_rgb(folder / name)
    assert caught.value.reason == expected[name]
    assert name in str(caught.value) and "expected" in str(caught.value)


def test_truncated_images_are_not_loaded_silently():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # importing labelgen.engine.decode changes nothing global


@pytest.mark.parametrize(
    ("name", "source_mode"),
    [("gray16.png", "I;16"), ("cmyk.jpg", "CMYK"), ("palette.png", "P"), ("rgba.png", "RGBA"),
     ("gray.jpg", "L"), ("bilevel.png", "1")],
)
def test_source_mode_is_reported(corpus, name, source_mode):
    _, info = read_image_rgb(corpus[0] / name)
    assert info["source_mode"] == source_mode


@pytest.mark.parametrize(
    ("values", "expected"),
    [([0, 32768, 65535], [0, 128, 255]), ([255, 256, 4095], [0, 1, 15]), ([65280, 65279, 1], [255, 254, 0])],
)
def test_16bit_gray_is_scaled_by_bit_depth_not_clipped(tmp_path, values, expected):
    path = _save(tmp_path, "g16.png", Image.fromarray(np.array([values], dtype=np.uint16)))
    rgb, info = read_image_rgb(path)
    assert info["source_mode"] == "I;16"
    assert rgb[0, :, 0].tolist() == expected
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_corpus_16bit_gradient_is_monotone_and_full_range(corpus):
    rgb, _ = read_image_rgb(corpus[0] / "gray16.png")
    row = rgb[0, :, 0].astype(int)
    assert row[0] == 0 and row[128] == 128 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16B", [0, 32768, 65535], [0, 128, 255]),
        ("I", [0, 32768, 65535], [0, 128, 255]),  # 16-bit data held in int32
        ("I", [-5, 2**30, 2**31 - 1], [0, 128, 255]),  # genuine 32-bit data
        ("F", [-3.0, 127.6, 900.0], [0, 128, 255]),  # float: clipped and rounded
    ],
)
def test_wide_gray_modes_convert_without_clipping(mode, values, expected):
    dtype = {"I;16B": ">u2", "I": np.int32, "F": np.float32}[mode]
    image = Image.frombytes(mode, (3, 1), np.array(values, dtype=dtype).tobytes())
    rgb = decode._to_rgb_array(image, "memory")
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == expected


def test_16bit_rgb_png_keeps_the_high_byte(corpus):
    rgb, _ = read_image_rgb(corpus[0] / "rgb16.png")
    assert rgb.tolist() == [[[0, 0, 255], [128, 18, 255]]]


def test_cmyk_red_becomes_rgb_red(corpus):
    rgb, _ = read_image_rgb(corpus[0] / "cmyk.jpg")
    red, green, blue = rgb.reshape(-1, 3).mean(axis=0)
    assert red > 230 and green < 25 and blue < 25


def test_exif_orientation_6_rotates_clockwise(corpus):
    rgb, info = read_image_rgb(corpus[0] / "exif_rotated.jpg")
    assert (info["width"], info["height"]) == (20, 40) and info["exif_transposed"]
    top, bottom = rgb[:15].reshape(-1, 3).mean(axis=0), rgb[-15:].reshape(-1, 3).mean(axis=0)
    assert top[0] > 200 and top[2] < 50  # stored left half (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_palette_with_transparency_and_rgba_drop_alpha(corpus):
    palette, _ = read_image_rgb(corpus[0] / "palette.png")
    assert palette[0, :4].tolist() == [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]
    rgba, _ = read_image_rgb(corpus[0] / "rgba.png")
    stored = np.asarray(Image.open(corpus[0] / "rgba.png"))
    assert np.array_equal(rgba, stored[:, :, :3])


@pytest.mark.parametrize("mode", ["LA", "PA", "YCbCr", "LAB", "HSV", "RGBX"])
def test_other_modes_convert_to_rgb(mode):
    image = Image.new(mode, (4, 2))
    rgb = decode._to_rgb_array(image, "memory")
    assert rgb.shape == (2, 4, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous


def test_lab_white_is_rgb_white():
    rgb = decode._to_rgb_array(Image.new("LAB", (1, 1), (255, 128, 128)), "memory")
    assert np.all(rgb >= 250)


@pytest.mark.parametrize(
    ("max_pixels", "reason"), [(64 * 48, None), (64 * 48 - 1, "too_large"), (10, "too_large")]
)
def test_max_pixels_is_respected(tmp_path, max_pixels, reason):
    path = _save(tmp_path, "a.png", Image.new("RGB", (64, 48)))
    if reason is None:
        assert read_image_rgb(path, max_pixels=max_pixels)[0].shape == (48, 64, 3)
    else:
        with pytest.raises(ImageDecodeError) as caught:
            read_image_rgb(path, max_pixels=max_pixels)
        assert caught.value.reason == reason and "max_pixels" in str(caught.value)


@pytest.mark.parametrize("max_pixels", [0, -1, 1.5, True, "100"])
def test_invalid_max_pixels_is_a_validation_error(tmp_path, max_pixels):
    path = _save(tmp_path, "a.png", Image.new("RGB", (2, 2)))
    with pytest.raises(ValidationError, match="max_pixels"):
        read_image_rgb(path, max_pixels=max_pixels)


def test_bomb_below_pillow_limit_is_rejected_from_the_header(tmp_path):
    # 10_000 x 10_000 passes Pillow's hard limit (it only warns) but not ours
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png_bytes(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError) as caught:
            read_image_rgb(path, max_pixels=1_000_000)
    assert caught.value.reason == "too_large" and "10000x10000" in str(caught.value)


def test_bomb_warning_turned_into_error_is_too_large(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png_bytes(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError) as caught:
            read_image_rgb(path)
    assert caught.value.reason == "too_large"


@pytest.mark.parametrize(("size", "reason"), [((0, 5), "bad_dimensions"), ((5, 0), "bad_dimensions")])
def test_zero_dimensions_are_bad_dimensions(size, reason):
    # Pillow's own readers refuse zero sizes before we see them; check our guard directly
    with pytest.raises(ImageDecodeError) as caught:
        decode._check_size(size, "x.png", 100)
    assert caught.value.reason == reason


@pytest.mark.parametrize("compute", [True, False])
def test_sha256_is_hash_of_file_bytes(corpus, compute):
    path = corpus[0] / "rgb.jpg"
    _, info = read_image_rgb(path, compute_sha256=compute)
    expected = hashlib.sha256(path.read_bytes()).hexdigest() if compute else None
    assert info["sha256"] == expected


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError) as missing:
        read_image_rgb(tmp_path / "nope.jpg")
    with pytest.raises(ImageDecodeError) as below_file:
        read_image_rgb(tmp_path / "nope.jpg" / "x.jpg")
    with pytest.raises(ImageDecodeError) as folder:
        read_image_rgb(tmp_path)
    reasons = (missing.value.reason, below_file.value.reason, folder.value.reason)
    assert reasons == ("missing", "missing", "unreadable")


@contextlib.contextmanager
def _fails_instead_of_hanging(seconds: int = 30):
    """A blocking call (open of a FIFO) becomes a failed test instead of a hung suite."""
    class Hung(Exception):  # not an OSError: code under test must not turn it into a reason
        pass

    def hung(signum, frame):
        raise Hung(f"blocked for {seconds} s: the read must never block")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "fifo.jpg")
    return tmp_path / "fifo.jpg"


def _link(tmp_path: Path, target: str, name: str = "link.jpg") -> Path:
    os.symlink(target, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize(
    ("make", "reason", "message"),
    [
        (_fifo, "not_a_regular_file", "is a FIFO"),
        (lambda tmp: _link(tmp, str(_fifo(tmp))), "not_a_regular_file", "FIFO (named pipe) (through a symlink)"),
        (lambda tmp: _link(tmp, "/dev/zero"), "not_a_regular_file", "is a character device"),
        (lambda tmp: Path("/dev/zero"), "not_a_regular_file", "is a character device"),
        (lambda tmp: _link(tmp, "link.jpg"), "symlink_loop", "symlink loop"),
        (lambda tmp: (_link(tmp, "b.jpg", "a.jpg"), _link(tmp, "a.jpg", "b.jpg"))[0], "symlink_loop", "symlink loop"),
        (lambda tmp: _link(tmp, "nowhere.jpg"), "missing", "symlink to 'nowhere.jpg', which does not exist"),
    ],
)
def test_special_files_fail_alone_and_never_block(tmp_path, make, reason, message):
    path = make(tmp_path)
    with _fails_instead_of_hanging(), pytest.raises(ImageDecodeError) as caught:
        read_image_rgb(path)
    assert caught.value.reason == reason and message in str(caught.value)


def test_sparse_6gb_file_is_too_large_file_without_reading_it(tmp_path, monkeypatch):
    assert decode.DEFAULT_MAX_FILE_BYTES == 1 << 30  # first: today's code would read the 6 GB
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as handle:
        handle.truncate(6 << 30)  # sparse: no disk used
    reads = []
    real_read = os.read
    monkeypatch.setattr(decode.os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(ImageDecodeError) as caught:
        read_image_rgb(path)
    assert caught.value.reason == "too_large_file" and str(6 << 30) in str(caught.value)
    assert reads == []
    with pytest.raises(ImageDecodeError) as capped:
        read_image_rgb(path, max_file_bytes=1 << 20)
    assert capped.value.reason == "too_large_file" and "max_file_bytes=1048576" in str(capped.value)


def test_max_file_bytes_is_inclusive(tmp_path):
    path = _save(tmp_path, "a.png", Image.new("RGB", (3, 2), (9, 8, 7)))
    size = path.stat().st_size
    rgb, _ = read_image_rgb(path, max_file_bytes=size)
    assert rgb.shape == (2, 3, 3)
    with pytest.raises(ImageDecodeError) as caught:
        read_image_rgb(path, max_file_bytes=size - 1)
    assert caught.value.reason == "too_large_file"


def test_read_stops_at_the_cap_when_the_size_is_wrong():
    """procfs files say 0 bytes and hold more: the cap holds on what is read, not on st_size."""
    assert os.stat("/proc/self/status").st_size == 0
    with pytest.raises(ImageDecodeError) as caught:
        decode.read_file_bytes("/proc/self/status", max_file_bytes=64)
    assert caught.value.reason == "too_large_file" and "more than 64 bytes were read" in str(caught.value)
    assert b"Name:" in decode.read_file_bytes("/proc/self/status", max_file_bytes=1 << 20)


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "1"])
def test_max_file_bytes_must_be_a_positive_int(tmp_path, value):
    with pytest.raises(ValidationError, match="max_file_bytes must be a positive int"):
        read_image_rgb(tmp_path / "a.png", max_file_bytes=value)


@pytest.mark.parametrize("name", ["a\x00b.jpg", "\ud800.jpg"])
def test_paths_no_file_can_have_are_unreadable(tmp_path, name):
    with pytest.raises(ImageDecodeError) as caught:
        read_image_rgb(str(tmp_path / name))
    assert caught.value.reason == "unreadable" and "cannot be a file path" in str(caught.value)


def test_non_utf8_file_names_decode(tmp_path):
    raw = os.fsencode(tmp_path) + b"/bad\xff\xfename.png"
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (1, 2, 3)).save(buffer, "PNG")
    with open(raw, "wb") as handle:
        handle.write(buffer.getvalue())
    rgb, info = read_image_rgb(os.fsdecode(raw))
    assert rgb.shape == (3, 4, 3) and info["sha256"] == hashlib.sha256(buffer.getvalue()).hexdigest()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root posix user")
def test_permission_denied_is_unreadable(tmp_path):
    path = _save(tmp_path, "a.png", Image.new("RGB", (2, 2)))
    path.chmod(0)
    try:
        with pytest.raises(ImageDecodeError) as caught:
            read_image_rgb(path)
    finally:
        path.chmod(0o644)
    assert caught.value.reason == "unreadable"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "not_an_image"),  # signature, broken header
        (b"\xff\xd8\xff", "not_an_image"),  # JPEG start marker only
        (b"GIF89a", "not_an_image"),
        (b"BM" + b"\x00" * 10, "not_an_image"),
    ],
)
def test_garbage_with_image_magic_never_leaks_pillow_errors(tmp_path, payload, reason):
    path = tmp_path / "x.img"
    path.write_bytes(payload)
    with pytest.raises(ImageDecodeError) as caught:
        read_image_rgb(path)
    assert caught.value.reason == reason


@pytest.mark.parametrize("fraction", [0.2, 0.66, 0.99])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_cut_files_of_every_format_are_truncated(tmp_path, fmt, fraction):
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: int(len(buffer.getvalue()) * fraction)])
    with pytest.raises(ImageDecodeError) as caught:
        read_image_rgb(path)
    assert caught.value.reason == "truncated"


def test_make_image_folder_writes_distinct_images(tmp_path):
    names = make_image_folder(tmp_path, 20, size=(24, 16), seed=3)
    assert names[0] == "img_00000.png" and len(names) == 20
    hashes = set()
    for name in names:
        rgb, info = read_image_rgb(tmp_path / name)
        assert rgb.shape == (16, 24, 3)
        hashes.add(info["sha256"])
    assert len(hashes) == 20
    again = make_image_folder(tmp_path / "again", 20, size=(24, 16), seed=3)
    assert (tmp_path / "again" / again[7]).read_bytes() == (tmp_path / names[7]).read_bytes()


@pytest.mark.skipif(not (COCO128 / "images/train2017").is_dir(), reason="coco128-seg not available")
def test_real_coco128_images_decode():
    records = FolderSource(COCO128 / "images/train2017").list_records()[:3]
    assert len(records) == 3
    for record in records:
        rgb, info = read_image_rgb(record.uri)
        with Image.open(record.uri) as stored:
            assert sorted(stored.size) == sorted((info["width"], info["height"]))
        assert rgb.shape == (info["height"], info["width"], 3) and rgb.dtype == np.uint8
        assert record.with_size(info["width"], info["height"], info["sha256"]).sha256 == info["sha256"]


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00garbage-garbage",  # not TIFF at all
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05",  # IFD cut short
        # one IFD entry: orientation (0x0112) = 9, which does not exist
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00\x00\x00",
    ],
)
def test_corrupt_exif_keeps_the_stored_orientation(tmp_path, exif):
    path = _save(tmp_path, "e.jpg", Image.new("RGB", (6, 4)), exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow warns "Corrupt EXIF data"
        rgb, info = read_image_rgb(path)
    assert rgb.shape == (4, 6, 3) and info["exif_transposed"] is False
