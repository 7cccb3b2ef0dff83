import numpy as np
import pytest

from conftest import make_recipe
from labelgen.errors import ConfigError, ValidationError
from labelgen.structures.instances import Instances
from labelgen.structures.scoring import ScoringConfig, combine_scores, with_combined_score

SCORES = {"a": np.array([0.25, 1.0, 0.0, 0.64]), "b": np.array([1.0, 0.5, 0.5, 1.0])}


@pytest.mark.parametrize(
    "formula, weights, expected",
    [
        ("geometric_mean", (), [0.5, np.sqrt(0.5), 0.0, 0.8]),
        ("geometric_mean", (3, 1), [0.25 ** 0.75, 0.5 ** 0.25, 0.0, 0.64 ** 0.75]),
        ("geometric_mean", (1, 0), [0.25, 1.0, 0.0, 0.64]),
        ("arithmetic_mean", (), [0.625, 0.75, 0.25, 0.82]),
        ("arithmetic_mean", (1, 3), [0.8125, 0.625, 0.375, 0.91]),
        ("harmonic_mean", (), [0.4, 2 / 3, 0.0, 2 * 0.64 / 1.64]),
        ("product", (), [0.25, 0.5, 0.0, 0.64]),
        ("min", (), [0.25, 0.5, 0.0, 0.64]),
        ("max", (), [1.0, 1.0, 0.5, 1.0]),
    ],
)
def test_formulas(formula, weights, expected):
    combined = combine_scores(SCORES, ScoringConfig(formula, ("a", "b"), weights))
    assert combined.dtype == np.float32
    np.testing.assert_allclose(combined, expected, rtol=1e-6, atol=1e-7)


def test_components_are_clipped_to_unit_range():
    scores = {"a": np.array([1.5, -0.2]), "b": np.array([1.0, 1.0])}
    np.testing.assert_allclose(combine_scores(scores, ScoringConfig("product", ("a", "b"))), [1.0, 0.0])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"components": ()}, ConfigError, "at least one"),
        ({"components": ("a", "b"), "weights": (1,)}, ConfigError, "expected 2 weights"),
        ({"components": ("a",), "weights": (-1,)}, ConfigError, "non-negative"),
    ],
)
def test_bad_configs(kwargs, error, message):
    with pytest.raises(error, match=message):
        ScoringConfig(**kwargs)


def test_missing_component_names_what_exists():
    with pytest.raises(ValidationError, match=r"needs score columns \['c'\]; this result has \['a', 'b'\]"):
        combine_scores(SCORES, ScoringConfig(components=("a", "c")))


def test_with_combined_score_keeps_raw_components():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, :2], masks[1, 2:] = True, True
    inst = Instances.from_masks(masks, scores={"a": [0.25, 1.0], "b": [1.0, 0.25], "confidence": [0.9, 0.9]})
    out = with_combined_score(inst, ScoringConfig(components=("a", "b")))
    np.testing.assert_allclose(out.scores["confidence"], [0.5, 0.5])
    np.testing.assert_array_equal(out.scores["a"], inst.scores["a"])
    assert len(with_combined_score(inst[np.array([False, False])], ScoringConfig(components=("a", "b")))) == 0


def test_recipe_scoring_section_is_applied_by_the_run(tmp_path, image_dir):
    from labelgen.engine.runner import run
    from labelgen.engine.sources import FolderSource
    from labelgen.store.run_store import RunStore

    recipe = make_recipe("scoring.formula=product", "scoring.components=[confidence, confidence]")
    run(recipe, FolderSource(image_dir), tmp_path / "scored")
    run(make_recipe(), FolderSource(image_dir), tmp_path / "raw")
    scored = [r["instances"]["scores"]["confidence"] for r in RunStore(tmp_path / "scored").iter_rows()]
    raw = [r["instances"]["scores"]["confidence"] for r in RunStore(tmp_path / "raw").iter_rows()]
    for s, r in zip(scored, raw):
        np.testing.assert_allclose(s, np.square(np.float32(r)), rtol=1e-6)
