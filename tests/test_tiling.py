"""Tiled generation (``labelgen/engine/tiling.py``, ``docs/tiling.md``): the plan, region reading of
TIFFs, the pipeline with tiles (exact against whole images for a pixel-local generator), the global
view, the decompression-bomb key, the fingerprint, resume after kill -9, exports, and the mosaic
oracle check on coco128 (recall of seam-crossing objects, duplicates, AP against untiled)."""
import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelgen.config import TilingConfig, recipe_from_dict
from labelgen.engine.decode import open_tiff_regions, read_image_rgb
from labelgen.engine.pipeline import label_images
from labelgen.engine.tiling import (axis_starts, parse_tile_id, plan_tiles, shrunk, tile_record, wants_tiles)
from labelgen.errors import ConfigError, ImageDecodeError
from labelgen.generators import Generator
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.structures.stitch import TileWindow
from labelgen.testing import fake_recipe_dict

from conftest import COCO128, plugin_imported, kill_9_after_first_shard

tifffile = pytest.importorskip("tifffile")
REPO = Path(__file__).resolve().parents[1]


class ColourBlobs(Generator):
    """One instance per distinct non-black colour of the image (pixel-local: a tile sees exactly
    the part of each object inside it). Records every image it was given."""

    name = "colour-blobs"

    def __init__(self):
        self.seen = []

    @classmethod
    def from_config(cls, config, *, device="cpu"):
        return cls()

    def generate(self, image_rgb, record):
        self.seen.append((record.image_id, image_rgb.shape[:2]))
        codes = image_rgb.astype(np.int64) @ np.int64([1, 256, 65536])
        colours = [c for c in np.unique(codes) if c]
        masks = np.stack([codes == c for c in colours]) if colours else np.zeros((0, *codes.shape), bool)
        return Instances.from_masks(masks, scores={"confidence": np.float32([c % 251 / 251 for c in colours])},
                                    class_ids=np.int32([c % 3 for c in colours]),
                                    attributes={"colour": [int(c) for c in colours]})


def blob_image(height=300, width=420, seed=0):
    """Black image with rectangles, discs and a long thin bar of distinct colours, many across seams."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for i in range(14):
        colour = np.uint8([40 + 13 * i, 200 - 7 * i, 1 + 17 * i])
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(6, 60)
        image[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour
    image[150:153, 5:width - 5] = (250, 250, 250)  # a thin bar across every vertical seam
    return image


def by_colour(instances):
    return {c: m for c, m in zip(instances.attributes["colour"], instances.masks())}


def images_config(**tiling):
    return recipe_from_dict({**fake_recipe_dict(), "images": {"compute_sha256": False, "tiling": tiling}}).images


# -- the plan ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length,tile,overlap,expected", [
    (100, 128, 16, [0]),
    (128, 128, 16, [0]),
    (129, 128, 16, [0, 1]),
    (1000, 256, 32, [0, 186, 372, 558, 744]),
    (5120, 512, 96, None),
])
def test_axis_starts_cover_the_axis_with_at_least_the_overlap(length, tile, overlap, expected):
    starts = axis_starts(length, tile, overlap)
    if expected is not None:
        assert starts == expected
    ends = [min(s + tile, length) for s in starts]
    assert starts[0] == 0 and ends[-1] == length
    assert all(b - a >= 0 for a, b in zip(starts, starts[1:]))
    assert all(end - nxt >= overlap for end, nxt in zip(ends, starts[1:]))  # neighbours share >= overlap


def test_plan_tiles_are_full_size_and_row_major():
    windows = plan_tiles(300, 420, 128, 16)
    assert len(windows) == 3 * 4
    assert all(w.width == 128 and w.height == 128 for w in windows)
    assert windows[0] == TileWindow(0, 0, 128, 128) and windows[-1] == TileWindow(292, 172, 420, 300)


def test_tile_ids_round_trip_and_whole_images_are_not_tiles():
    record = ImageRecord("sub/a#b.png", "/x/sub/a#b.png", 420, 300, "0" * 64)
    tile = tile_record(record, TileWindow(10, 20, 138, 148))
    assert (tile.width, tile.height, tile.sha256) == (128, 128, None)
    assert parse_tile_id(tile.image_id) == ("sub/a#b.png", TileWindow(10, 20, 138, 148))
    assert parse_tile_id(record.image_id) is None


def test_auto_tiles_only_what_does_not_fit_one_tile():
    auto = TilingConfig(mode="auto", tile_size=128, overlap=16)
    assert not wants_tiles(np.zeros((128, 100, 3), np.uint8), auto)
    assert wants_tiles(np.zeros((129, 100, 3), np.uint8), auto)
    assert wants_tiles(np.zeros((10, 10, 3), np.uint8), TilingConfig(mode="always", tile_size=128, overlap=16))
    assert not wants_tiles(np.zeros((999, 999, 3), np.uint8), TilingConfig())


@pytest.mark.parametrize("tiling,message", [
    ({"overlap": 512}, "images.tiling.overlap: expected less than half of tile_size"),
    ({"mode": "sometimes"}, "images.tiling.mode"),
    ({"tile_sise": 512}, "Did you mean 'images.tiling.tile_size'"),
    ({"seam_ios": 0}, "images.tiling.seam_ios"),
])
def test_bad_tiling_settings_are_refused_with_the_key(tiling, message):
    with pytest.raises(ConfigError, match=message):
        images_config(**tiling)


def test_default_tiling_leaves_the_fingerprint_and_the_stored_config_unchanged():
    plain = recipe_from_dict(fake_recipe_dict())
    assert "tiling" not in plain.to_dict()["images"]  # as before tiling existed: same fingerprint
    tiled = recipe_from_dict({**fake_recipe_dict(), "images": {"tiling": {"mode": "auto"}}})
    assert tiled.to_dict()["images"]["tiling"]["mode"] == "auto"
    assert tiled.fingerprint() != plain.fingerprint()
    assert recipe_from_dict(tiled.to_dict()) == tiled


# -- region reading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"tile": (64, 64), "compression": "zlib"},
    {"tile": (32, 128)},
    {"rowsperstrip": 50, "compression": "zlib"},
    {"tile": (64, 64), "bigtiff": True},
])
def test_tiff_windows_read_by_region_equal_the_whole_decode(tmp_path, options):
    image = blob_image(260, 333)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, image, **options)
    reader, info = open_tiff_regions(path, compute_sha256=True)
    whole, whole_info = read_image_rgb(path)
    assert (info["width"], info["height"], info["sha256"]) == (333, 260, whole_info["sha256"])
    for x0, y0, x1, y1 in [(0, 0, 333, 260), (30, 61, 200, 259), (332, 259, 333, 260)]:
        assert np.array_equal(reader.read_window_xyxy(x0, y0, x1, y1), whole[y0:y1, x0:x1])
    reader.close()


def test_sixteen_bit_gray_tiff_is_scaled_like_the_whole_decode(tmp_path):
    gray = np.random.default_rng(1).integers(0, 65535, (90, 70)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "g.tif", gray, tile=(32, 32))
    reader, _ = open_tiff_regions(tmp_path / "g.tif")
    assert np.array_equal(reader.read_window_xyxy(0, 0, 70, 90), np.repeat((gray >> 8).astype(np.uint8)[..., None], 3, 2))


def test_region_reading_keeps_the_pixel_guard_and_skips_other_formats(tmp_path, monkeypatch):
    Image.fromarray(blob_image(40, 50)).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "big.tif", np.zeros((200, 300, 3), np.uint8), tile=(64, 64))
    assert open_tiff_regions(tmp_path / "a.png") is None  # decoded whole by Pillow instead
    tifffile.imwrite(tmp_path / "one-strip.tif", np.zeros((200, 300, 3), np.uint8), rowsperstrip=200)
    monkeypatch.setattr("labelgen.engine.decode._MAX_SEGMENT_PIXELS", 200 * 300 - 1)
    assert open_tiff_regions(tmp_path / "one-strip.tif") is None  # a segment over the cap: not by region
    with pytest.raises(ImageDecodeError) as err:
        open_tiff_regions(tmp_path / "big.tif", max_pixels=1000)
    assert err.value.reason == "too_large" and "60000 pixels" in str(err.value)


def test_shrunk_is_the_block_mean_whether_read_whole_or_by_strips(tmp_path):
    image = blob_image(130, 170)
    tifffile.imwrite(tmp_path / "a.tif", image, tile=(32, 32))
    reader, _ = open_tiff_regions(tmp_path / "a.tif")
    small = shrunk(image, 3, strip_rows=7)
    assert small.shape == (44, 57, 3)
    assert np.array_equal(small, shrunk(reader, 3, strip_rows=50))
    block = image[:3, :3].astype(np.float32).mean(axis=(0, 1))
    assert np.array_equal(small[0, 0], np.rint(block).astype(np.uint8))


# -- the pipeline with tiles ---------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["png", "tiff"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_tiled_results_equal_whole_image_results_for_a_pixel_local_generator(tmp_path, source, batch_size):
    image = blob_image()
    path = tmp_path / f"blobs.{'png' if source == 'png' else 'tif'}"
    if source == "png":
        Image.fromarray(image).save(path)
    else:
        tifffile.imwrite(path, image, tile=(64, 64), compression="zlib")
    record = ImageRecord(path.name, str(path))
    [whole] = label_images(ColourBlobs(), [record], images_config())
    generator = ColourBlobs()
    [tiled] = label_images(generator, [record], images_config(mode="always", tile_size=128, overlap=24),
                           batch_size=batch_size)
    assert tiled.instances is not None, tiled
    assert (tiled.image.width, tiled.image.height) == (420, 300)  # the record keeps the full size
    assert len(generator.seen) == 12 and all(shape == (128, 128) for _, shape in generator.seen)
    expected, got = by_colour(whole.instances), by_colour(tiled.instances)
    assert sorted(got) == sorted(expected)  # one instance per object: nothing split, nothing doubled
    for colour, mask in expected.items():
        assert np.array_equal(got[colour], mask), colour
    assert max(tiled.instances.attributes["tile_parts"]) >= 4  # some object did cross a corner
    assert tiled.instances.provenance["tiling"]["tiles"] == 12


def test_the_global_view_gives_large_objects_and_tiles_the_small_ones(tmp_path):
    image = np.zeros((400, 400, 3), np.uint8)
    image[40:360, 32:368] = (200, 10, 10)  # large: spans every tile; edges on the 4-px blocks of the shrink
    image[100:110, 100:112] = (10, 200, 10)  # small, on top of the large one
    image[300:306, 390:396] = (10, 10, 200)  # small, in a corner tile
    Image.fromarray(image).save(tmp_path / "g.png")
    generator = ColourBlobs()
    images = images_config(mode="always", tile_size=128, overlap=24, global_pass=True, global_size=100)
    [row] = label_images(generator, [ImageRecord("g.png", str(tmp_path / "g.png"))], images)
    got = by_colour(row.instances)
    assert len(row.instances) == 3 and len(got) == 3
    big = 200 + 10 * 256 + 10 * 65536
    assert got[big].sum() == pytest.approx((320 * 336), rel=0.02)  # enlarged from the 4x shrunk view
    assert row.instances.attributes["tile_parts"][list(got).index(big)] == 0  # from the global view
    assert np.array_equal(got[10 + 200 * 256 + 10 * 65536], image[..., 1] == 200)  # small: exact, from tiles
    assert any(image_id.endswith("#global=4") for image_id, _ in generator.seen)


def test_a_failing_tile_fails_its_image_only(tmp_path):
    class FailsOnTiles(ColourBlobs):
        def generate(self, image_rgb, record):
            if "#tile=" in record.image_id and "#tile=0,0," not in record.image_id:
                raise RuntimeError("boom on a tile")
            return super().generate(image_rgb, record)

    Image.fromarray(blob_image()).save(tmp_path / "big.png")
    Image.fromarray(blob_image(100, 100)).save(tmp_path / "small.png")
    records = [ImageRecord("big.png", str(tmp_path / "big.png")), ImageRecord("small.png", str(tmp_path / "small.png"))]
    rows = label_images(FailsOnTiles(), records, images_config(mode="auto", tile_size=128, overlap=24), batch_size=2)
    assert rows[0].instances is None and "boom on a tile" in rows[0].failure["message"]
    assert rows[1].instances is not None  # 100 x 100 fits one tile: whole, and fine


def test_huge_images_need_the_tiling_pixel_key(tmp_path):
    Image.fromarray(blob_image(300, 420)).save(tmp_path / "a.png")
    record = [ImageRecord("a.png", str(tmp_path / "a.png"))]
    small_limit = {"max_pixels": 100_000, "compute_sha256": False}
    never = recipe_from_dict({**fake_recipe_dict(), "images": small_limit}).images
    [row] = label_images(ColourBlobs(), record, never)
    assert row.failure["reason"] == "too_large"
    tiled = recipe_from_dict({**fake_recipe_dict(), "images": {**small_limit, "tiling": {
        "mode": "auto", "tile_size": 128, "overlap": 24, "max_pixels": 200_000}}}).images
    [row] = label_images(ColourBlobs(), record, tiled)
    assert row.instances is not None
    tight = recipe_from_dict({**fake_recipe_dict(), "images": {**small_limit, "tiling": {
        "mode": "auto", "tile_size": 128, "overlap": 24, "max_pixels": 100_000}}}).images
    [row] = label_images(ColourBlobs(), record, tight)
    assert row.failure["reason"] == "too_large"


# -- a tiled run through the CLI: resume after kill -9, exports -------------------------------------------
TILED = ["--set", "images.tiling.mode=always", "--set", "images.tiling.tile_size=64", "--set",
         "images.tiling.overlap=8"]


def _cmd(images, out, slow):
    return [sys.executable, "-m", "labelgen.cli", "run", "recipes/fake-smoke.yaml", "--plugin", "labelgen.testing",
            "--images", str(images), "--out", str(out), "--set", "store.shard_size=2", "--set",
            f"generator.seconds_per_image={slow}", "--no-progress", *TILED]


def _rows(root):
    rows = []
    for shard in map(json.loads, (root / "plan.jsonl").read_text().splitlines()[1:]):
        with gzip.open(root / "shards" / f"{shard['index']:06d}.jsonl.gz", "rt") as handle:
            rows.extend(json.loads(line) for line in handle)
    return rows


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _committed(out):
    shards = out / "shards"
    return len(list(shards.glob("*.done.json"))) if shards.is_dir() else 0


@pytest.fixture(scope="module")
def tiled_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiled") / "images"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(blob_image(100, 150, seed=i)).save(folder / f"img_{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiled_reference(tiled_images, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled-ref") / "run"
    done = subprocess.run(_cmd(tiled_images, out, 0), env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def test_a_tiled_run_resumed_after_kill_9_gives_identical_records(tiled_images, tiled_reference, tmp_path):
    out = tmp_path / "run"
    done_before = kill_9_after_first_shard(_cmd(tiled_images, out, 0.03), out, env=_env(), timeout=120)
    assert 1 <= done_before < 4
    resumed = subprocess.run(_cmd(tiled_images, out, 0.03), env=_env(), cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    rows, reference = _rows(out), _rows(tiled_reference)
    assert rows == reference
    assert all(r["instances"]["provenance"]["tiling"]["tiles"] == 6 for r in rows)  # 150 x 100 in 64-px tiles
    assert {(r["image"]["width"], r["image"]["height"]) for r in rows} == {(150, 100)}


def test_exports_of_a_tiled_run_load(tiled_reference, tmp_path):
    from pycocotools.coco import COCO

    from labelgen.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(tiled_reference), "--format", "coco", "--out", str(tmp_path / "coco")]) == 0
        assert main(["export", str(tiled_reference), "--format", "yolo", "--out", str(tmp_path / "yolo")]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    total = sum(len(r["instances"]["masks_rle"]) for r in _rows(tiled_reference))
    assert len(coco.getImgIds()) == 8 and len(coco.getAnnIds()) == total > 0
    assert {(i["width"], i["height"]) for i in coco.loadImgs(coco.getImgIds())} == {(150, 100)}
    labels = list((tmp_path / "yolo" / "labels" / "train").glob("*.txt"))
    report = json.loads((tmp_path / "yolo" / "export_report.json").read_text())
    assert report["instances"] == total and len(labels) == 8
    assert sum(len(p.read_text().splitlines()) for p in labels) == total - report["instances_without_shape"]


# -- the mosaic oracle check -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco128_root():
    if not (COCO128 / "images" / "train2017").is_dir():
        pytest.skip(f"coco128-seg not found at {COCO128} (set LABELGEN_COCO128)")
    pytest.importorskip("torch")  # the oracle's real k-means
    return COCO128


@pytest.fixture
def mosaic():
    """``labelgen.testing.mosaic`` (zip-oracle and zip-oracle-mosaic registered) for one test only."""
    with plugin_imported("labelgen.testing.oracle"), plugin_imported("labelgen.testing.mosaic") as module:
        yield module


def _check_mosaic(mosaic, coco128_root, tmp_path, grid, **extra):
    result = mosaic.mosaic_check(str(coco128_root), grid, tmp_path, {"mode": "always", "tile_size": 512, "overlap": 96,
                                                               **extra})
    tiled, untiled = result["tiled"], result["untiled"]
    assert tiled["seam_crossing"] >= 0.4 * tiled["objects"]  # tiles of 512 - 96 on 640-px cells cut many objects
    assert tiled["seam_recall"] >= untiled["seam_recall"] - 0.05
    assert tiled["duplicates"] == 0  # no object found twice ...
    assert tiled["fragments"] <= untiled["fragments"] + 0.01 * tiled["predictions"]  # ... and few pieces left
    assert tiled["AP"] >= untiled["AP"] - 0.02
    return result


def test_mosaic_4x4_tiled_matches_untiled(mosaic, coco128_root, tmp_path):
    _check_mosaic(mosaic, coco128_root, tmp_path, 4)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LABELGEN_MOSAIC_8X8"), reason="2.5-5 minutes on 2 cores; set LABELGEN_MOSAIC_8X8=1"
                    " (bench/bench_tiling.py mosaic prints the same figures)")
def test_mosaic_8x8_tiled_matches_untiled(mosaic, coco128_root, tmp_path):
    _check_mosaic(mosaic, coco128_root, tmp_path, 8)


# -- the feature cache with tiles (real tiny Zip architectures, random weights) ---------------------------
def test_the_feature_cache_serves_tiles_and_changes_nothing(tmp_path, coco128_images):
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from labelgen.config import load_recipe
    from labelgen.generators import GENERATORS
    from labelgen.models.feature_cache import FeatureCache

    recipe = load_recipe(REPO / "recipes" / "zip-tiny-random.yaml",
                         ["images.tiling.mode=always", "images.tiling.tile_size=320", "images.tiling.overlap=64",
                          "images.compute_sha256=false"])
    crop = np.asarray(Image.open(coco128_images / "000000000009.jpg").convert("RGB"))[:300, :480]
    Image.fromarray(crop).save(tmp_path / "crop.png")
    record = [ImageRecord("crop.png", str(tmp_path / "crop.png"))]  # 480 x 300: two tiles side by side
    cache = FeatureCache(tmp_path / "cache", 10**9)

    def run():
        generator = GENERATORS.get("zip").from_config(recipe.generator.params)
        generator.feature_cache = cache
        [row] = label_images(generator, record, recipe.images, batch_size=2)
        assert row.instances is not None, row.failure
        return row.instances.to_dict()

    cold = run()
    assert (cache.stats().misses, cache.stats().writes, cache.stats().hits) == (2 * 3, 2 * 3, 0)  # 3 encoders x 2 tiles
    warm = run()
    assert cache.stats().hits == 2 * 3
    assert cold == warm and cold["provenance"]["tiling"]["tiles"] == 2


def test_a_tiff_that_fits_one_tile_is_labelled_whole_in_auto_mode(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", blob_image(100, 120), tile=(32, 32))
    record = [ImageRecord("s.tif", str(tmp_path / "s.tif"))]
    generator = ColourBlobs()
    [row] = label_images(generator, record, images_config(mode="auto", tile_size=128, overlap=24))
    assert generator.seen == [("s.tif", (100, 120))] and "tiling" not in row.instances.provenance


def test_an_image_with_nothing_found_keeps_the_generators_columns(tmp_path):
    Image.fromarray(np.zeros((200, 300, 3), np.uint8)).save(tmp_path / "black.png")
    [row] = label_images(ColourBlobs(), [ImageRecord("black.png", str(tmp_path / "black.png"))],
                         images_config(mode="always", tile_size=128, overlap=24))
    assert len(row.instances) == 0 and set(row.instances.scores) == {"confidence"}
    assert row.instances.class_ids is not None and "colour" in row.instances.attributes
