"""SAM 2.1: the models (official configs, tiny test config, weights_only checkpoints, parameter counts),
Zip's stage 4 on SAM 2.1 (Sam2Refiner: equal to the sam2 package's own predictor, batched equals
unbatched, cache round trip, out-of-memory back-off), the sam2-auto generator, and both tiny recipes
through `labelgen run` (kill -9 and resume, COCO / YOLO / FiftyOne exports, offline errors)."""
import dataclasses
import json
import logging
import pickle
import warnings

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sam2")

import torch  # noqa: E402

from conftest import REPO, assert_fiftyone_export_keeps_scores, needs_models, kill_9_after_first_shard  # noqa: E402
from labelgen.cli import main  # noqa: E402
from labelgen.config import load_recipe  # noqa: E402
from labelgen.engine.decode import read_image_rgb  # noqa: E402
from labelgen.errors import ConfigError, GeneratorError, ValidationError, WeightsNotFoundError  # noqa: E402
from labelgen.generators import GENERATORS  # noqa: E402
from labelgen.generators.sam2_auto import Sam2AutoConfig, Sam2AutoGenerator  # noqa: E402
from labelgen.generators.zip.config import SamConfig  # noqa: E402
from labelgen.generators.zip.refine_sam2 import Sam2Refiner  # noqa: E402
from labelgen.models import weights  # noqa: E402
from labelgen.models.sam2 import SAM2_PUBLISHED_MILLIONS, build_sam2, feature_sizes, parameter_count  # noqa: E402
from labelgen.store.run_store import RunStore  # noqa: E402
from labelgen.structures.instances import ImageRecord, Instances  # noqa: E402
from test_kill_resume import _rows  # noqa: E402

pytestmark = [needs_models, pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")]

IMAGES = ["000000000009.jpg", "000000000025.jpg", "000000000030.jpg"]  # 640x480, 640x426, 428x640
BOXES = np.array([[10, 20, 300, 240], [0, 0, 640, 400], [350, 100, 600, 380]], np.float32)
RUN_IMAGES = IMAGES[:2]  # through labelgen run: one shard each (shard_size 1)
RECIPES = {"sam2-auto": "sam2-auto-tiny-random", "zip": "zip-sam2-tiny-random"}


@pytest.fixture(scope="module")
def tiny_sam2():
    torch.manual_seed(0)
    return build_sam2("tiny", None)


@pytest.fixture(scope="module")
def coco_images(coco128_images):
    return [read_image_rgb(str(coco128_images / name))[0] for name in IMAGES]


def _refiner(model, **sam):
    return Sam2Refiner(model, SamConfig(backend="sam2", model_type="tiny", **sam))


# -- models ---------------------------------------------------------------------------------
def test_tiny_config_builds_the_real_classes_small(tiny_sam2):
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck
    from sam2.modeling.sam2_base import SAM2Base

    assert isinstance(tiny_sam2, SAM2Base) and not tiny_sam2.training
    assert isinstance(tiny_sam2.image_encoder.trunk, Hiera) and isinstance(tiny_sam2.image_encoder.neck, FpnNeck)
    assert parameter_count(tiny_sam2) < 1_000_000
    assert feature_sizes(tiny_sam2) == [(32, 32), (16, 16), (8, 8)]
    with pytest.raises(GeneratorError, match="expected one of"):
        build_sam2("sam2.1_hiera_huge", None)


def _hiera_outputs(encoder, pixels, bf16):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return [t.float() for t in encoder(pixels)["backbone_fpn"]]


def test_hiera_attention_is_sam2s_in_fp32_and_blocked_in_bf16_on_cpu(monkeypatch):
    """build_sam2 gives Hiera's attention labelgen's forward: sam2's own SDPA call, bit for bit, in fp32; on a CPU
    in bf16 blocked attention, as close to the fp32 encoder as sam2's forward in bf16 is."""
    from sam2.modeling.backbones.hieradet import MultiScaleAttention

    from labelgen.models import blocked_attention

    torch.manual_seed(0)
    encoder = build_sam2("tiny", None).image_encoder
    attentions = [m for m in encoder.modules() if isinstance(m, MultiScaleAttention)]
    assert attentions and all(getattr(m, "_labelgen_blocked", False) for m in attentions)
    assert any(m.q_pool for m in attentions)  # the pooled-query blocks take the kernel too
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    calls = []
    original = blocked_attention.blocked_attention
    monkeypatch.setattr(blocked_attention, "blocked_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    exact, ours_bf16 = _hiera_outputs(encoder, pixels, False), _hiera_outputs(encoder, pixels, True)
    assert len(calls) == len(attentions)  # once per block, in bf16 only
    for module in attentions:
        del module.forward  # sam2's own forward
    sam2_fp32, sam2_bf16 = _hiera_outputs(encoder, pixels, False), _hiera_outputs(encoder, pixels, True)
    assert all(torch.equal(a, b) for a, b in zip(exact, sam2_fp32))
    ours = max((a - b).abs().max().item() for a, b in zip(ours_bf16, exact))
    theirs = max((a - b).abs().max().item() for a, b in zip(sam2_bf16, exact))
    assert 0 < ours <= 1.5 * theirs + 1e-3, (ours, theirs)


def test_checkpoint_official_layout_plain_state_dict_and_refusals(tiny_sam2, tmp_path):
    state = tiny_sam2.state_dict()
    official, plain = tmp_path / "official.pt", tmp_path / "plain.pt"
    torch.save({"model": state}, official)
    torch.save(state, plain)
    for path in (official, plain):
        loaded = build_sam2("tiny", path)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    partial = tmp_path / "partial.pt"
    torch.save({"model": {k: v for k, v in list(state.items())[1:]}}, partial)
    with pytest.raises(GeneratorError, match="1 missing keys"):
        build_sam2("tiny", partial)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": logging.getLogger}))  # an arbitrary global: weights_only refuses it
    with pytest.raises(GeneratorError, match="weights_only loading failed"):
        build_sam2("tiny", evil)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_sam2("tiny", tmp_path / "gone.pt")


def test_official_checkpoints_resolve_offline_with_clear_errors(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LABELGEN_CACHE", str(tmp_path))
    assert sorted(weights.SAM2_CHECKPOINTS) == sorted(SAM2_PUBLISHED_MILLIONS)
    with pytest.raises(WeightsNotFoundError) as caught:
        weights.resolve_sam2_checkpoint("sam2.1_hiera_small", allow_download=False)
    message = str(caught.value)
    assert "sam2.1_hiera_small.pt" in message and "generator.sam.checkpoint=" in message
    assert "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt" in message
    with pytest.raises(WeightsNotFoundError, match="expected one of"):
        weights.resolve_sam2_checkpoint("vit_h")
    cached = tmp_path / "sam2" / "sam2.1_hiera_small.pt"
    cached.parent.mkdir()
    cached.write_bytes(b"weights")
    with caplog.at_level(logging.WARNING):
        assert weights.resolve_sam2_checkpoint("sam2.1_hiera_small", allow_download=False) == cached
    assert "no published SHA-256" in caplog.text  # no hash is invented: the check is skipped, loudly


@pytest.mark.parametrize("sam, error", [
    ({"backend": "sam2", "model_type": "sam2.1_hiera_large"}, None),
    ({"backend": "sam2", "model_type": "tiny"}, None),
    ({"backend": "sam1", "model_type": "vit_b"}, None),
    ({"backend": "sam2", "model_type": "vit_h"}, "backend sam2 takes one of"),
    ({"backend": "sam1", "model_type": "sam2.1_hiera_tiny"}, "backend sam1 takes one of"),
    ({"backend": "sam3", "model_type": "vit_h"}, "expected one of"),
])
def test_sam_backend_and_model_type_must_fit(sam, error):
    if error is None:
        assert SamConfig(**sam).backend == sam["backend"]
    else:
        with pytest.raises(ConfigError, match=error):
            SamConfig(**sam)


# -- the refiner ----------------------------------------------------------------------------
@pytest.mark.parametrize("multimask", [False, True])
def test_refiner_equals_the_sam2_image_predictor(tiny_sam2, coco_images, multimask):
    """Our embedding and box decoding against the sam2 package's own SAM2ImagePredictor."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    image = coco_images[0]
    result = _refiner(tiny_sam2, multimask_output=multimask).refine(image, BOXES)
    predictor = SAM2ImagePredictor(tiny_sam2)
    predictor._bb_feat_sizes = feature_sizes(tiny_sam2)
    predictor.set_image(image)
    for i, box in enumerate(BOXES):
        logits, ious, _ = predictor.predict(box=box, multimask_output=multimask, return_logits=True)
        best = int(np.argmax(ious))
        assert result.mask_choice[i] == best
        assert np.array_equal(result.masks[i], logits[best] > 0.0)
        assert result.predicted_iou[i] == pytest.approx(ious[best], abs=1e-6)
    assert result.masks.shape == (3, 480, 640) and result.masks.any(axis=(1, 2)).all()
    assert ((result.stability_score >= 0) & (result.stability_score <= 1)).all()


def test_batched_encoder_and_boxes_equal_one_at_a_time(tiny_sam2, coco_images):
    refiner = _refiner(tiny_sam2)
    singles = [refiner.refine(image, BOXES) for image in coco_images]
    embeddings = refiner.embed_batch(coco_images)
    for image, embedding, single in zip(coco_images, embeddings, singles):
        refiner.set_embedding(embedding, *image.shape[:2])
        refiner.box_batcher.size = 1  # one box per decoder call
        one_box = refiner.decode_boxes(BOXES)
        refiner.box_batcher.size = len(BOXES)
        batched = refiner.decode_boxes(BOXES)
        for result in (batched, one_box):
            assert np.array_equal(result.masks, single.masks)
            np.testing.assert_allclose(result.predicted_iou, single.predicted_iou, rtol=0, atol=1e-5)
            np.testing.assert_allclose(result.stability_score, single.stability_score, rtol=0, atol=1e-5)


def test_cache_entry_holds_every_map_and_round_trips(tiny_sam2, coco_images):
    refiner = _refiner(tiny_sam2)
    image = coco_images[1]
    host = refiner.image_embedding(image)  # what the feature cache stores: one array
    assert host.shape == (1, sum(c * h * w for c, h, w in refiner.shapes)) and len(refiner.shapes) == 3
    direct = refiner.decode_boxes(BOXES)
    other = _refiner(tiny_sam2)
    other.set_embedding(host.copy(), *image.shape[:2])
    again = other.decode_boxes(BOXES)
    assert np.array_equal(again.masks, direct.masks) and np.array_equal(again.predicted_iou, direct.predicted_iou)
    with pytest.raises(ValidationError, match="packed"):
        other.set_embedding(host[:, :-1], *image.shape[:2])
    with pytest.raises(GeneratorError, match="needs an image embedding"):
        _refiner(tiny_sam2).decode_boxes(BOXES)


def test_out_of_memory_halves_the_box_batch_for_good(tiny_sam2, coco_images, monkeypatch):
    refiner = _refiner(tiny_sam2)
    expected = refiner.refine(coco_images[0], BOXES)
    decode, calls = refiner._decode, []

    def small_memory(boxes):
        calls.append(len(boxes))
        if len(boxes) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return decode(boxes)

    monkeypatch.setattr(refiner, "_decode", small_memory)
    result = refiner.decode_boxes(BOXES)
    assert np.array_equal(result.masks, expected.masks) and refiner.box_batcher.size == 1
    assert calls[0] == 3 and calls[-3:] == [1, 1, 1]


def test_bf16_autocast_gives_float32_outputs(tiny_sam2, coco_images):
    result = Sam2Refiner(tiny_sam2, SamConfig(backend="sam2", model_type="tiny"), precision="bf16").refine(
        coco_images[0], BOXES)
    assert result.predicted_iou.dtype == np.float32 and result.masks.dtype == bool and len(result) == 3


def test_zip_on_sam2_reads_every_map_from_the_feature_cache(tmp_path, coco_images):
    from labelgen.generators.zip.generator import SAM_EMBEDDING, ZipGenerator
    from labelgen.models.feature_cache import FeatureCache

    config = load_recipe(REPO / "recipes" / "zip-sam2-tiny-random.yaml").generator.params
    image = coco_images[2]
    record = ImageRecord(image_id=IMAGES[2], uri=IMAGES[2], width=image.shape[1], height=image.shape[0])
    generator = ZipGenerator.from_config(config)
    assert isinstance(generator.refiner, Sam2Refiner) and generator.provenance()["sam"]["backend"] == "sam2"
    uncached = generator.generate(image, record).to_dict()
    generator.feature_cache = cache = FeatureCache(tmp_path / "cache", 10**8)
    first = generator.generate(image, record).to_dict()
    second = generator.generate(image, record).to_dict()
    assert (cache.stats().misses, cache.stats().hits) == (3, 3)
    assert len(uncached["masks_rle"]) > 0 and first == second == uncached
    facts = {"device": "cpu", **{stage: {"weights": "RANDOM"} for stage in ("semantic", "boundary", "sam")}}
    sam1 = dataclasses.replace(config, sam=SamConfig(backend="sam1", model_type="tiny"))
    sam2_key = ZipGenerator(config, None, None, None, facts).cache_keys(image)[SAM_EMBEDDING]
    sam1_key = ZipGenerator(sam1, None, None, None, facts).cache_keys(image)[SAM_EMBEDDING]
    assert sam1_key != sam2_key and sam2_key["backend"] == "sam2"
    assert "backend" not in sam1_key  # SAM 1's keys are the ones of caches written before SAM 2 existed


# -- sam2-auto -----------------------------------------------------------------------------
def test_sam2_auto_defaults_are_sam2s_own_and_reach_its_generator():
    import inspect

    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    ours = Sam2AutoConfig().amg_kwargs()
    theirs = inspect.signature(SAM2AutomaticMaskGenerator).parameters
    assert ours == {name: theirs[name].default for name in ours}
    assert set(theirs) - set(ours) == {"model", "point_grids", "output_mode", "kwargs"}
    assert GENERATORS.get("sam2-auto") is Sam2AutoGenerator and Sam2AutoConfig().model_type == "sam2.1_hiera_large"
    with pytest.raises(ConfigError, match="box_nms_thresh"):
        Sam2AutoConfig(box_nms_thresh=0.0)
    with pytest.raises(ConfigError, match="model_type"):
        Sam2AutoConfig(model_type="vit_h")


def test_sam2_auto_instances_scores_and_order(coco_images):
    generator = Sam2AutoGenerator.from_config(load_recipe(REPO / "recipes" / "sam2-auto-tiny-random.yaml")
                                              .generator.params)
    image = coco_images[0]
    record = ImageRecord(image_id=IMAGES[0], uri=IMAGES[0], width=image.shape[1], height=image.shape[0])
    out = generator.generate(image, record)
    assert len(out) > 0 and (out.height, out.width) == image.shape[:2] and out.class_ids is None
    assert set(out.scores) == {"confidence", "sam_predicted_iou", "sam_stability_score"}
    assert set(out.attributes) == {"point_xy", "crop_box_xyxy"}
    iou = out.scores["sam_predicted_iou"]
    assert (np.diff(iou) <= 0).all() and ((iou >= 0) & (iou <= 1)).all()  # sorted; SAM 2.1's IoU is a sigmoid
    assert all(box == [0, 0, 640, 480] for box in out.attributes["crop_box_xyxy"])
    assert generator.generate(image, record).to_dict() == out.to_dict()  # deterministic
    assert generator.provenance()["sam2"] == {"model_type": "tiny", "weights": "RANDOM"}


# -- through labelgen run ------------------------------------------------------------------
def _listing(tmp_path, coco128_images, names=RUN_IMAGES):
    listing = tmp_path / "images.txt"
    listing.write_text("".join(f"{coco128_images / n}\n" for n in names))
    return listing


def _run_args(recipe, listing, out):
    return ["run", recipe, "--images", str(listing), "--out", str(out), "--set", "store.shard_size=1", "--no-progress"]


@pytest.fixture(scope="module", params=sorted(RECIPES))
def finished_run(request, coco128_images, tmp_path_factory):
    """(generator name, listing file, run directory) of a complete tiny-recipe run on RUN_IMAGES."""
    folder = tmp_path_factory.mktemp(request.param)
    listing = _listing(folder, coco128_images)
    assert main(_run_args(RECIPES[request.param], listing, folder / "run")) == 0
    return request.param, listing, folder / "run"


def test_run_records_every_image_with_instances(finished_run):
    generator, _, root = finished_run
    rows = list(RunStore(root).iter_rows())
    assert [r["status"] for r in rows] == ["ok"] * len(RUN_IMAGES)
    for row in rows:
        instances = Instances.from_dict(row["instances"])
        assert (instances.height, instances.width) == (row["image"]["height"], row["image"]["width"])
        assert "sam_predicted_iou" in instances.scores
    assert sum(len(r["instances"]["masks_rle"]) for r in rows) > 0
    done = json.loads((root / "shards" / "000000.done.json").read_text())
    sam_facts = done["provenance"]["sam2" if generator == "sam2-auto" else "sam"]
    assert sam_facts["weights"] == "RANDOM" and sam_facts["model_type"] == "tiny"
    assert generator == "sam2-auto" or sam_facts["backend"] == "sam2"


def test_kill_9_then_resume_gives_identical_records(finished_run, tmp_path):
    generator, listing, reference = finished_run
    out = tmp_path / "run"
    kill_9_after_first_shard(_run_args(RECIPES[generator], listing, out), out)
    assert len(list((out / "shards").glob("*.done.json"))) < len(RUN_IMAGES)
    assert main(_run_args(RECIPES[generator], listing, out)) == 0
    assert _rows(out) == _rows(reference)


def test_exports_to_coco_and_yolo(finished_run, tmp_path):
    _, _, root = finished_run
    instances = sum(len(r["instances"]["masks_rle"]) for r in RunStore(root).iter_rows())
    assert main(["export", str(root), "--format", "coco", "--out", str(tmp_path / "coco")]) == 0
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert len(coco["images"]) == len(RUN_IMAGES) and len(coco["annotations"]) == instances
    assert all(a["segmentation"]["size"] and a["score"] >= 0 for a in coco["annotations"])
    assert main(["export", str(root), "--format", "yolo", "--out", str(tmp_path / "yolo"), "--images", "none"]) == 0
    labels = sorted((tmp_path / "yolo" / "labels" / "train").glob("*.txt"))
    assert [path.stem for path in labels] == sorted(name.rsplit(".", 1)[0] for name in RUN_IMAGES)
    lines = [line for path in labels for line in path.read_text().splitlines()]
    assert len(lines) == instances and all(len(line.split()) >= 7 for line in lines)  # class + >= 3 points


def test_fiftyone_export_keeps_every_score(finished_run, request):
    generator, _, root = finished_run
    if generator != "zip":
        pytest.skip("one FiftyOne round trip is enough (the zip-sam2 run)")
    fiftyone_db, dataset_name = request.getfixturevalue("fiftyone_db"), request.getfixturevalue("dataset_name")
    assert_fiftyone_export_keeps_scores(fiftyone_db, dataset_name, root, "sam_predicted_iou")


@pytest.mark.parametrize("recipe, key", [("sam2-auto", "generator.checkpoint"), ("zip-sam2", "generator.sam.checkpoint")])
def test_recipes_needing_weights_stop_at_once_offline(recipe, key, tmp_path, monkeypatch, capsys, coco128_images):
    monkeypatch.setenv("LABELGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_resolves", lambda host: False)  # offline, whatever this machine's network
    out = tmp_path / "run"
    assert main(["run", recipe, "--images", str(coco128_images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("labelgen: error:") and "sam2.1_hiera_large.pt" in err and f"{key}=" in err
    assert not out.exists()


def test_the_tiny_test_model_needs_random_weights():
    from labelgen.generators.zip.generator import ZipGenerator

    zip_config = load_recipe(REPO / "recipes" / "zip-sam2-tiny-random.yaml",
                             ["generator.random_weights=false"]).generator.params
    with pytest.raises(GeneratorError, match="'tiny' is SAM 2.1's test model"):
        ZipGenerator.preflight(zip_config)
    with pytest.raises(GeneratorError, match="'tiny' is a test model"):
        Sam2AutoGenerator.preflight(Sam2AutoConfig(model_type="tiny"))


# -- the real architectures ------------------------------------------------------------------
@pytest.mark.slow
def test_real_architectures_have_the_published_sizes_and_hiera_tiny_runs(coco_images):
    """Every SAM 2.1 architecture against the model card's size, one at a time; the real Hiera-T (1024 px,
    random weights) through the refiner equals the sam2 package's predictor (which assumes 1024 px)."""
    import gc

    from sam2.sam2_image_predictor import SAM2ImagePredictor

    for model_type, millions in SAM2_PUBLISHED_MILLIONS.items():
        torch.manual_seed(0)
        model = build_sam2(model_type, None)
        count = parameter_count(model)
        print(f"{model_type}: {count:,} parameters (published {millions} M)")
        assert abs(count / 1e6 - millions) < 0.1, model_type
        if model_type == "sam2.1_hiera_tiny":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = Sam2Refiner(model, SamConfig(backend="sam2", model_type=model_type)).refine(
                    coco_images[0], BOXES[:1])
                predictor = SAM2ImagePredictor(model)
                predictor.set_image(coco_images[0])
                masks, ious, _ = predictor.predict(box=BOXES[0], multimask_output=False)
            assert np.array_equal(result.masks[0], masks[0] > 0) and result.predicted_iou[0] == pytest.approx(ious[0])
        del model
        gc.collect()
