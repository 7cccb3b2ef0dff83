"""Weight resolution: local files, the checksummed SAM cache, open_clip tags, and offline errors."""
import hashlib

import pytest

import labelgen.models.weights as weights
from conftest import needs_models
from labelgen.config import recipe_from_dict
from labelgen.errors import WeightsNotFoundError
from labelgen.generators import GENERATORS


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("LABELGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_resolves", lambda host: False)
    return tmp_path / "cache"


def test_official_sam_checkpoint_offline_names_file_url_and_fix(offline):
    with pytest.raises(WeightsNotFoundError) as info:
        weights.resolve_sam_checkpoint("vit_b")
    message = str(info.value)
    assert "sam_vit_b_01ec64.pth" in message and "https://dl.fbaipublicfiles.com" in message
    assert str(offline / "sam" / "sam_vit_b_01ec64.pth") in message and "generator.sam.checkpoint" in message


def test_cached_sam_checkpoint_is_checked_against_its_sha256(offline, monkeypatch):
    target = offline / "sam" / "sam_vit_b_01ec64.pth"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the real checkpoint")
    with pytest.raises(WeightsNotFoundError, match="corrupt or not the official file"):
        weights.resolve_sam_checkpoint("vit_b")
    fake = weights.SamCheckpoint("vit_b", weights.SAM_CHECKPOINTS["vit_b"].url,
                                 hashlib.sha256(b"not the real checkpoint").hexdigest())
    monkeypatch.setitem(weights.SAM_CHECKPOINTS, "vit_b", fake)
    assert weights.resolve_sam_checkpoint("vit_b") == target


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: weights.resolve_sam_checkpoint("vit_x"), "expected one of ['vit_b', 'vit_h', 'vit_l']"),
        (lambda: weights.resolve_sam_checkpoint("vit_b", "/no/such/sam.pth"), "/no/such/sam.pth does not exist"),
        (lambda: weights.resolve_clip_weights("RN50", "/no/such/clip.pt"), "/no/such/clip.pt does not exist"),
        pytest.param(lambda: weights.resolve_clip_weights("ViT-B-16", "no-such-tag"), "known tags: ['openai'",
                     marks=needs_models),
        pytest.param(lambda: weights.resolve_clip_weights("ViT-B-16", "openai"),
                     "not cached and huggingface.co is not reachable", marks=needs_models),
    ],
)
def test_clear_errors(offline, call, message):
    with pytest.raises(WeightsNotFoundError) as info:
        call()
    assert message in str(info.value)


def test_local_files_are_used_as_given(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"x")
    assert weights.resolve_sam_checkpoint("vit_h", str(path)) == path
    assert weights.resolve_clip_weights("RN50", str(path)) == path


@needs_models
def test_zip_preflight_needs_weights_unless_random_weights_is_asked_for(offline, caplog):
    zip_cls = GENERATORS.get("zip")
    recipe = recipe_from_dict({"generator": {"name": "zip"}})
    with pytest.raises(WeightsNotFoundError, match="ViT-B-16"):
        zip_cls.preflight(recipe.generator.params)
    smoke = recipe_from_dict({"generator": {"name": "zip", "random_weights": True}})
    zip_cls.preflight(smoke.generator.params)
    assert "RANDOM WEIGHTS" in caplog.text


@needs_models
def test_paper_recipe_without_weights_lists_every_missing_file_at_once(offline, monkeypatch):
    """One error naming ViT-B-16, RN50x64 and SAM vit_h, each with how to supply it (not one per attempt)."""
    from pathlib import Path

    from labelgen.config import load_recipe

    monkeypatch.setattr(weights, "_clip_cached_file", lambda cfg: None)  # whatever this machine has cached
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "zip-paper.yaml")
    with pytest.raises(WeightsNotFoundError) as info:
        GENERATORS.get("zip").preflight(recipe.generator.params)
    message = str(info.value)
    assert "3 weight files are missing" in message and "\n" not in message
    for name in ("ViT-B-16/openai", "RN50x64/openai", "sam_vit_h_4b8939.pth"):
        assert message.count(name) >= 1, name
    for key in ("generator.semantic.pretrained", "generator.boundary.pretrained", "generator.sam.checkpoint="):
        assert key in message, key  # how to supply each
    assert len(info.value.missing) == 3 and all(isinstance(e, WeightsNotFoundError) for e in info.value.missing)


@needs_models
def test_run_preflight_adds_the_labeler_weights_and_writes_nothing(offline, monkeypatch, tmp_path, image_dir):
    from labelgen.config import apply_overrides
    from labelgen.engine.runner import run
    from labelgen.engine.sources import FolderSource

    monkeypatch.setattr(weights, "_clip_cached_file", lambda cfg: None)
    data = {"generator": {"name": "zip", "sam": {"model_type": "vit_b", "checkpoint": str(tmp_path / "no.pth")}},
            "labeler": {"classes": {"cat": []}, "model": "ViT-L-14"}}
    recipe = recipe_from_dict(apply_overrides(data, []))
    with pytest.raises(WeightsNotFoundError) as info:
        run(recipe, FolderSource(image_dir), tmp_path / "run")
    message = str(info.value)
    assert "4 weight files are missing" in message  # ViT-B-16 (stage 1), RN50x64, SAM, ViT-L-14 (labeler)
    assert "ViT-L-14/openai" in message and "labeler.pretrained" in message and str(tmp_path / "no.pth") in message
    assert not (tmp_path / "run").exists()
    same = recipe_from_dict(apply_overrides(data, ["labeler.model=ViT-B-16"]))
    with pytest.raises(WeightsNotFoundError) as info:
        run(same, FolderSource(image_dir), tmp_path / "run")
    message = str(info.value)
    assert "3 weight files are missing" in message and message.count("ViT-B-16/openai are not cached") == 1
    assert "(also needed by labeler.pretrained)" in message  # the shared CLIP is named once, with both keys


def test_one_missing_file_is_reported_as_before(offline):
    with pytest.raises(WeightsNotFoundError) as info:
        weights.check_all([lambda: weights.resolve_sam_checkpoint("vit_b"), lambda: None])
    assert "weight files are missing" not in str(info.value) and "sam_vit_b_01ec64.pth" in str(info.value)
