"""Weight resolution: local files, the checksummed SAM cache, open_clip tags, and offline errors."""
import hashlib

import pytest

import labelgen.weights as weights
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
        (lambda: weights.resolve_clip_weights("ViT-B-16", "no-such-tag"), "known tags: ['openai'"),
        (lambda: weights.resolve_clip_weights("ViT-B-16", "openai"), "not cached and huggingface.co is not reachable"),
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


def test_zip_preflight_needs_weights_unless_random_weights_is_asked_for(offline, caplog):
    zip_cls = GENERATORS.get("zip")
    recipe = recipe_from_dict({"generator": {"name": "zip"}})
    with pytest.raises(WeightsNotFoundError, match="ViT-B-16"):
        zip_cls.preflight(recipe.generator.params)
    smoke = recipe_from_dict({"generator": {"name": "zip", "random_weights": True}})
    zip_cls.preflight(smoke.generator.params)
    assert "RANDOM WEIGHTS" in caplog.text
