"""Cross-image batching of the Zip encoders, its out-of-memory back-off, and the shard pipeline.

"Same outputs as batch size 1" means identical here: every mask, box, class, attribute and score,
bit for bit (``assert_same_instances``). On this CPU the batched encoders compute exactly what the
single-image ones do (SAM's neck runs per image for that; see ``refine._encode_images``).
"""
import logging
import threading

import numpy as np
import pytest

pytest.importorskip("torch")  # the Zip encoders: the `models` extra
pytest.importorskip("open_clip")
pytest.importorskip("segment_anything")

from conftest import REPO  # noqa: E402
from labelgen.config import load_recipe
from labelgen.engine.decode import read_image_rgb
from labelgen.errors import ValidationError
from labelgen.generators import GENERATORS
from labelgen.structures.instances import ImageRecord
from labelgen.engine.pipeline import label_images
from labelgen.engine.runner import run
from labelgen.engine.sources import ListFileSource
from labelgen.store.run_store import RunStore
from labelgen.generators.zip.boundary import resize_for_boundary

TINY = REPO / "recipes" / "zip-tiny-random.yaml"
# mixed sizes: 640x480, 640x426, 481x640 (portrait) ... so the boundary stage groups by shape
NAMES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg", "000000000034.jpg",
         "000000000036.jpg", "000000000042.jpg", "000000000049.jpg"]
OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"


@pytest.fixture(scope="module")
def generator():
    return GENERATORS.get("zip").from_config(load_recipe(TINY).generator.params)


@pytest.fixture(scope="module")
def batch(coco128_images):
    images, records = [], []
    for name in NAMES:
        image, info = read_image_rgb(str(coco128_images / name))
        images.append(image)
        records.append(ImageRecord(name, str(coco128_images / name), info["width"], info["height"]))
    return images, records


@pytest.fixture(scope="module")
def one_by_one(generator, batch):
    generator.batch_size = 1
    return [generator.generate(image, record).to_dict() for image, record in zip(*batch)]


@pytest.fixture
def fresh(generator):
    """The module's generator with batch size 1 again after the test (its batchers reset)."""
    yield generator
    generator.batch_size = 1


def assert_same_instances(got: dict, expected: dict) -> None:
    assert got == expected


def _finish_all(finishers):
    out = []
    for finish in finishers:
        try:
            out.append(finish().to_dict())
        except Exception as exc:  # noqa: BLE001 - the test looks at which image failed
            out.append(exc)
    return out


# -- the stages' batch encoders -------------------------------------------------------------------
def test_stage_batch_encoders_match_one_image_encoders(generator, batch):
    images, _ = batch
    for single, batched in [
        ([generator.semantic.encode(i) for i in images], generator.semantic.encode_batch(images)),
        ([generator.boundary.encode(i) for i in images], generator.boundary.encode_batch(images)),
        ([generator.refiner.image_embedding(i) for i in images], generator.refiner.embed_batch(images)),
    ]:
        assert len(batched) == len(images)
        for one, many in zip(single, batched):
            assert tuple(many.shape) == one.shape
            np.testing.assert_array_equal(many.cpu().numpy(), one)


def test_boundary_batch_runs_one_forward_per_resized_size(generator, batch, monkeypatch):
    images, _ = batch
    images = images + [np.ascontiguousarray(images[0][::-1]), np.ascontiguousarray(images[4][:, ::-1])]
    cfg = generator.boundary.config
    sizes = {tuple(resize_for_boundary(i, cfg.short_side, cfg.max_long_side)[0].shape) for i in images}
    calls = []
    real = generator.boundary._features
    monkeypatch.setattr(generator.boundary, "_features", lambda t: calls.append(tuple(t.shape)) or real(t))
    generator.boundary.encode_batch(images)
    assert sorted(c[2:] for c in calls) == sorted(s[2:] for s in sizes)  # images of one resized size share a pass
    assert sum(c[0] for c in calls) == len(images) and max(c[0] for c in calls) == 2


# -- generate_batch == generate, at every batch size ----------------------------------------------
@pytest.mark.parametrize("batch_size", [2, 3, 7, 16])
def test_generate_batch_equals_one_image_at_a_time(fresh, batch, one_by_one, batch_size):
    fresh.batch_size = batch_size
    got = _finish_all(fresh.generate_batch(*batch))
    assert len(got) == len(one_by_one)
    for g, e in zip(got, one_by_one):
        assert_same_instances(g, e)
    assert sum(len(e["masks_rle"]) for e in one_by_one) > 0  # the comparison compares masks


def test_encoders_get_batches_of_the_configured_size(fresh, batch, monkeypatch):
    sizes = []
    real = fresh.semantic.encode_batch
    monkeypatch.setattr(fresh.semantic, "encode_batch", lambda images: sizes.append(len(images)) or real(images))
    fresh.batch_size = 3
    fresh.generate_batch(*batch)
    assert sizes == [3, 3, 1]


def test_one_bad_image_fails_alone_in_a_batch(fresh, batch, one_by_one):
    images, records = batch
    tiny = np.full((1, 5000, 3), 128, np.uint8)  # a 1-px strip: too thin for one boundary feature cell
    fresh.batch_size = 4
    got = _finish_all(fresh.generate_batch([images[0], tiny, *images[1:3]],
                                           [records[0], ImageRecord("strip", "/strip", 5000, 1), *records[1:3]]))
    assert isinstance(got[1], ValidationError) and "feature cell" in str(got[1])
    for g, e in zip([got[0], *got[2:]], one_by_one[:3]):
        assert_same_instances(g, e)


# -- out-of-memory back-off (simulated) ------------------------------------------------------------
def _oom_above(stage, method, limit, monkeypatch, calls):
    real = getattr(stage, method)

    def encode(images):
        calls.append(len(images))
        if len(images) > limit:
            raise RuntimeError(OOM)
        return real(images)

    monkeypatch.setattr(stage, method, encode)


@pytest.mark.parametrize("stage, method", [("semantic", "encode_batch"), ("boundary", "encode_batch"),
                                           ("refiner", "embed_batch")])
def test_out_of_memory_halves_the_batch_and_keeps_the_outputs(fresh, batch, one_by_one, monkeypatch, caplog,
                                                              stage, method):
    calls = []
    _oom_above(getattr(fresh, stage), method, 2, monkeypatch, calls)
    fresh.batch_size = 8
    with caplog.at_level(logging.WARNING, logger="labelgen.models.oom"):
        got = _finish_all(fresh.generate_batch(*batch))
    for g, e in zip(got, one_by_one):
        assert_same_instances(g, e)
    failed = [c for c in calls if c > 2]  # tried big first, then half the failed size each time
    assert calls[0] > 2 and failed == calls[:len(failed)]
    assert all(b == a // 2 for a, b in zip(failed, failed[1:]))
    assert max(calls[len(failed):]) <= 2 and sum(calls[len(failed):]) == sum(1 for e in one_by_one if e) > 0
    assert "out of memory on a batch" in caplog.text
    # the smaller size is kept: the next batch never tries more than 2 images at once
    calls.clear()
    _finish_all(fresh.generate_batch(*batch))
    assert calls and max(calls) <= 2


def test_out_of_memory_on_a_single_image_fails_that_image_only(fresh, batch, one_by_one, monkeypatch):
    images, records = batch
    real = fresh.refiner.embed_batch
    big = images[2]

    def embed(batch_images):
        if any(i is big for i in batch_images):
            raise RuntimeError(OOM)
        return real(batch_images)

    monkeypatch.setattr(fresh.refiner, "embed_batch", embed)
    fresh.batch_size = 4
    got = _finish_all(fresh.generate_batch(images[:4], records[:4]))
    assert isinstance(got[2], RuntimeError) and "out of memory" in str(got[2])
    for index in (0, 1, 3):
        assert_same_instances(got[index], one_by_one[index])


# -- the shard pipeline ------------------------------------------------------------------------------
@pytest.fixture
def broken_list(tmp_path, coco128_images):
    """Good images with a truncated JPEG and a text file named .jpg among them."""
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((coco128_images / NAMES[0]).read_bytes()[:2000])
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    paths = [coco128_images / NAMES[0], truncated, coco128_images / NAMES[1], coco128_images / NAMES[2],
             text, coco128_images / NAMES[3]]
    return [ImageRecord(p.name, str(p)) for p in paths]


@pytest.mark.parametrize("batch_size, overlap", [(1, False), (1, True), (3, True), (4, False)])
def test_pipeline_rows_equal_one_image_at_a_time(fresh, broken_list, one_by_one, batch_size, overlap):
    rows = label_images(fresh, broken_list, load_recipe(TINY).images, batch_size=batch_size, overlap=overlap)
    assert [r["image"]["image_id"] for r in rows] == [r.image_id for r in broken_list]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok", "failed", "ok"]
    assert rows[1]["failure"]["reason"] == "truncated" and rows[4]["failure"]["reason"] == "not_an_image"
    for row, expected in zip([rows[i] for i in (0, 2, 3, 5)], one_by_one[:4]):
        assert_same_instances(row["instances"], expected)


def test_pipeline_decodes_and_finishes_on_background_threads(fresh, broken_list, monkeypatch):
    import labelgen.generators.zip.generator as zip_module
    import labelgen.engine.pipeline as pipeline

    threads = {"decode": set(), "finish": set(), "model": set()}
    real_read, real_rles = pipeline.read_image_rgb, zip_module.masks_to_rles
    real_batch = fresh.generate_batch

    def read(*args, **kwargs):
        threads["decode"].add(threading.current_thread().name)
        return real_read(*args, **kwargs)

    def rles(masks):
        threads["finish"].add(threading.current_thread().name)
        return real_rles(masks)

    def generate_batch(images, records):
        threads["model"].add(threading.current_thread().name)
        return real_batch(images, records)

    monkeypatch.setattr(pipeline, "read_image_rgb", read)
    monkeypatch.setattr(zip_module, "masks_to_rles", rles)
    monkeypatch.setattr(fresh, "generate_batch", generate_batch)
    label_images(fresh, broken_list, load_recipe(TINY).images, batch_size=2)
    main = threading.current_thread().name
    assert threads["model"] == {main}
    assert threads["decode"] and all(n.startswith("labelgen-decode") for n in threads["decode"])
    assert threads["finish"] and all(n.startswith("labelgen-finish") for n in threads["finish"])


def test_a_generate_batch_crash_fails_that_batch_only(fresh, broken_list, monkeypatch):
    real = fresh.generate_batch
    seen = []

    def crash_on_second(images, records):
        seen.append([r.image_id for r in records])
        if len(seen) == 2:
            raise AssertionError("a generator bug")
        return real(images, records)

    monkeypatch.setattr(fresh, "generate_batch", crash_on_second)
    rows = label_images(fresh, broken_list, load_recipe(TINY).images, batch_size=2)
    failed = {r["image"]["image_id"] for r in rows if r["status"] == "failed"}
    assert failed == {"truncated.jpg", "text.jpg", *seen[1]} and len(seen) == 2
    assert all("a generator bug" in r["failure"]["message"] for r in rows if r["image"]["image_id"] in seen[1])


def test_batch_size_is_checked(fresh, broken_list):
    with pytest.raises(ValidationError, match="batch_size"):
        label_images(fresh, broken_list, load_recipe(TINY).images, batch_size=0)


# -- through labelgen run ------------------------------------------------------------------------------
def _rows_by_image(root):
    return {r["image"]["image_id"]: r for r in RunStore(root).iter_rows()}


def test_run_with_batches_equals_run_without_and_resumes_across_batch_sizes(tmp_path, coco128_images):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(coco128_images / n) for n in NAMES) + "\n")
    source = ListFileSource(listing)
    run(load_recipe(TINY, ["execution.batch_size=1"]), source, tmp_path / "one")
    run(load_recipe(TINY, ["execution.batch_size=4"]), source, tmp_path / "four")
    one, four = _rows_by_image(tmp_path / "one"), _rows_by_image(tmp_path / "four")
    assert one == four and len(one) == len(NAMES)
    assert all(row["status"] == "ok" for row in one.values())
    # batch size is an execution setting: changing it on resume is allowed (no config mismatch)
    result = run(load_recipe(TINY, ["execution.batch_size=2"]), source, tmp_path / "four")
    assert result.shards_done == 0


def test_fp16_autocast_runs_and_is_recorded(coco128_images, batch):
    generator = GENERATORS.get("zip").from_config(load_recipe(TINY, ["generator.precision=fp16"]).generator.params)
    generator.batch_size = 3
    out = _finish_all(generator.generate_batch(batch[0][:3], batch[1][:3]))
    assert all(not isinstance(o, Exception) for o in out)
    assert generator.provenance()["precision"] == "fp16"
    assert out[0]["height"] == batch[1][0].height


def test_batches_with_a_partly_warm_feature_cache_equal_plain_ones(fresh, batch, one_by_one, tmp_path):
    from labelgen.models.feature_cache import FeatureCache

    images, records = batch
    fresh.feature_cache = FeatureCache(tmp_path / "cache", 1 << 30)
    try:
        for index in (1, 4):  # warm the cache for two of the seven images
            fresh.generate(images[index], records[index])
        before = fresh.feature_cache.stats()
        fresh.batch_size = 4
        got = _finish_all(fresh.generate_batch(images, records))
        after = fresh.feature_cache.stats()
    finally:
        fresh.feature_cache = None
    assert got == one_by_one
    assert after.hits - before.hits == 2 * 3  # two images x three encoders read back
    assert after.writes - before.writes == 5 * 3  # the other five computed in batches and stored


def test_batch_size_through_the_cli(tmp_path, coco128_images):
    from labelgen.cli import main

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{coco128_images / n}\n" for n in NAMES[:5]))
    base = ["run", str(TINY), "--images", str(listing), "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "one")]) == 0
    assert main(base + ["--out", str(tmp_path / "three"), "--batch-size", "3"]) == 0
    assert list(RunStore(tmp_path / "one").iter_rows()) == list(RunStore(tmp_path / "three").iter_rows())
    assert main(base + ["--out", str(tmp_path / "zero"), "--batch-size", "0"]) == 2
    assert not (tmp_path / "zero").exists()


def test_sam_decoder_out_of_memory_splits_the_boxes(fresh, batch, monkeypatch, caplog):
    images, records = batch
    refiner = fresh.refiner
    boxes = np.array([[0, 0, 200, 150], [100, 80, 400, 300], [300, 200, 640, 480], [10, 300, 250, 470],
                      [50, 50, 120, 90]], np.float32)
    refiner.embed_image(images[0])
    whole = refiner.decode_boxes(boxes)
    calls = []
    real = refiner.predictor.predict_torch

    def predict_torch(*args, boxes, **kwargs):
        calls.append(len(boxes))
        if len(boxes) > 2:
            raise RuntimeError(OOM)
        return real(*args, boxes=boxes, **kwargs)

    monkeypatch.setattr(refiner.predictor, "predict_torch", predict_torch)
    try:
        with caplog.at_level(logging.WARNING, logger="labelgen.models.oom"):
            split = refiner.decode_boxes(boxes)
        assert calls[:2] == [5, 2] and max(calls[1:]) <= 2 and sum(calls[1:]) == 5
        assert "out of memory on a batch of 5" in caplog.text
        np.testing.assert_array_equal(split.masks, whole.masks)
        np.testing.assert_allclose(split.predicted_iou, whole.predicted_iou, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(split.stability_score, whole.stability_score, rtol=1e-5, atol=1e-6)
        calls.clear()
        refiner.decode_boxes(boxes[:3])  # the smaller size is kept
        assert calls == [2, 1]
    finally:
        refiner.box_batcher = type(refiner.box_batcher)(refiner.box_batcher.batch_size)
