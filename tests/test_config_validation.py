"""Recipes are refused at load time, with one clear error, for hostile YAML and out-of-range values."""
import dataclasses
import math
import typing

import pytest

import labelgen.testing  # noqa: F401  registers the fake generator
from conftest import REPO, needs_models
from labelgen.cli import main
from labelgen.config import (ExecutionConfig, ImagesConfig, Recipe, StoreConfig, apply_overrides, load_recipe,
                             recipe_from_dict)
from labelgen.errors import ConfigError
from labelgen.postprocess.filter_config import load_filter_config
from labelgen.generators.sam_auto import SamAutoConfig
from labelgen.testing import FakeConfig
from labelgen.generators.zip import config as zip_config

FAKE = {"generator": {"name": "fake"}}


def _write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _laughs(levels, width, key="description"):
    """A 'billion laughs' recipe: ``levels`` anchors, each a list of ``width`` aliases of the previous."""
    lines = ["generator: {name: fake}", "l0: &l0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    lines.append(f"{key}: *l{levels}")
    return "\n".join(lines) + "\n"


# -- hostile YAML -------------------------------------------------------------------------------------
def test_billion_laughs_is_refused_before_it_expands(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_recipe(_write(tmp_path, _laughs(9, 9)))
    message = str(info.value)
    assert "expands to more than" in message and "alias" in message and "\n" not in message


def test_a_million_node_alias_tree_is_refused_too(tmp_path):
    """10^6 expanded values: a tenth of a second to copy, but no recipe needs that many (the bound is 100k)."""
    with pytest.raises(ConfigError, match="expands to more than"):
        load_recipe(_write(tmp_path, _laughs(6, 10)))


def test_a_long_string_repeated_by_aliases_is_refused(tmp_path):
    text = "generator: {name: fake}\ns: &s " + "x" * 200_000 + "\nl: &l [" + ", ".join(["*s"] * 100) + "]\n"
    with pytest.raises(ConfigError, match="expands to more than"):
        load_recipe(_write(tmp_path, text))


def test_ordinary_anchors_aliases_and_merge_keys_still_work(tmp_path):
    text = ("generator:\n  <<: &base {name: fake, class_names: &names [cat, dog], instances_per_image: 5}\n"
            "  instances_per_image: 2\n"  # overrides the merged value: not a duplicate key
            "labeler: {classes: {animal: *names}, random_weights: true}\n")
    recipe = load_recipe(_write(tmp_path, text))
    assert recipe.generator.params.class_names == ("cat", "dog") and recipe.generator.params.instances_per_image == 2
    assert recipe.labeler.classes["animal"] == ("cat", "dog")


@pytest.mark.parametrize("text, message", [
    ("generator: {name: fake}\ndescription: &a [*a]\n", "recursive alias"),
    ("generator: {name: fake}\ndescription: &a {x: *a}\n", "recursive alias"),
    ("generator: {name: fake}\nstore:\n  shard_size: 4\n  shard_size: 8\n", "key 'shard_size' appears twice"),
    ("generator: {name: fake}\nstore: {shard_size: 4}\nstore: {compress_level: 3}\n", "key 'store' appears twice"),
    ("generator: {name: fake}\ndescription: !!binary aGVsbG8=\n", "description: expected a string"),
    ("generator: {name: fake}\ndescription: !!set {a, b}\n", "description: expected a string"),
    ("generator: {name: fake}\ndescription: [\n", "is not valid YAML"),
    ("generator: {name: fake}\ndescription: " + "[" * 2000 + "]" * 2000 + "\n", "nested too deeply"),
])
def test_hostile_yaml_is_a_config_error(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_recipe(_write(tmp_path, text))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_duplicate_key_error_names_both_lines(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'shard_size' appears twice at line 5 \(first at line 3\)"):
        load_recipe(_write(tmp_path, "generator: {name: fake}\nstore:\n  shard_size: 4\n  compress_level: 3\n"
                                     "  shard_size: 8\n"))


def test_dates_load_as_plain_strings(tmp_path):
    recipe = load_recipe(_write(tmp_path, "generator: {name: fake, class_names: [2024-01-02]}\n"
                                          "description: 2024-01-01\n"))
    assert recipe.description == "2024-01-01" and recipe.generator.params.class_names == ("2024-01-02",)
    recipe.fingerprint()  # JSON-serialisable


def test_non_utf8_recipe_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_recipe(_write(tmp_path, b"generator: {name: fake}\ndescription: caf\xe9\n"))
    message = str(info.value)
    assert "not UTF-8" in message and "line 2" in message and "save it as UTF-8" in message


def test_override_values_get_the_same_loader(tmp_path):
    path = _write(tmp_path, "generator: {name: fake}\n")
    with pytest.raises(ConfigError, match="recursive alias"):
        load_recipe(path, ["description=&a [*a]"])
    assert load_recipe(path, ["description=2024-01-01"]).description == "2024-01-01"
    assert load_recipe(path, ["description=[unclosed"]).description == "[unclosed"  # not YAML: the raw text


@pytest.mark.parametrize("text, message", [
    (_laughs(9, 9, key="min_confidence"), "expands to more than"),
    ("min_confidence: 0.1\nmin_confidence: 0.2\n", "key 'min_confidence' appears twice"),
    (b"min_confidence: 0.1 # \xff\n", "not UTF-8"),
    ("min_confidence: &a [*a]\n", "recursive alias"),
])
def test_filter_files_get_the_same_loader(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_filter_config(_write(tmp_path, text, "f.yaml"))


@pytest.mark.parametrize("text, message", [
    (_laughs(9, 9), "expands to more than"),
    ("generator: {name: fake}\ndescription: &a [*a]\n", "recursive alias"),
    (b"generator: {name: fake}\ndescription: \xff\xfe\n", "not UTF-8"),
    ("generator: {name: fake}\ngenerator: {name: fake}\n", "key 'generator' appears twice at line 2"),
])
def test_cli_shows_one_error_line_and_writes_nothing(tmp_path, image_dir, capsys, text, message):
    out = tmp_path / "run"
    code = main(["run", str(_write(tmp_path, text)), "--plugin", "labelgen.testing", "--images", str(image_dir),
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("labelgen: error:") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()


def test_cli_date_description_runs(tmp_path, image_dir, capsys):
    path = _write(tmp_path, "generator: {name: fake}\ndescription: 2024-01-01\nstore: {shard_size: 8}\n")
    code = main(["run", str(path), "--plugin", "labelgen.testing", "--images", str(image_dir),
                 "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 0, capsys.readouterr().err


# -- value ranges -------------------------------------------------------------------------------------
ZIP = {"generator": {"name": "zip", "random_weights": True}}
SAM_AUTO = {"generator": {"name": "sam-auto", "model_type": "tiny", "random_weights": True}}
LABELER = {"labeler": {"classes": {"cat": []}}}

BAD_VALUES = [
    (FAKE, "generator.instances_per_image=-1", "generator.instances_per_image: expected an integer in 0..64; got -1"),
    (FAKE, "generator.instances_per_image=65", "generator.instances_per_image: expected an integer in 0..64"),
    (FAKE, "generator.seconds_per_image=-1", "generator.seconds_per_image: expected a number in [0, 3600]; got -1.0"),
    (FAKE, "generator.seconds_per_image=.nan", "generator.seconds_per_image: expected a finite number; got nan"),
    (FAKE, "generator.seconds_per_image=.inf", "generator.seconds_per_image: expected a finite number"),
    (FAKE, "generator.class_names=['', a]", "generator.class_names: expected a list of non-empty strings"),
    (FAKE, "store.shard_size=0", "store.shard_size: expected an integer in 1..100000; got 0"),
    (FAKE, "store.compress_level=10", "store.compress_level: expected an integer in 1..9"),
    (FAKE, "images.max_pixels=0", "images.max_pixels: expected an integer in 1..1000000000000"),
    (FAKE, "execution.workers=0", "execution.workers: expected an integer in 1..1024; got 0"),
    (FAKE, "execution.batch_size=0", "execution.batch_size: expected an integer in 1..4096; got 0"),
    (FAKE, "execution.threads_per_worker=-1", "execution.threads_per_worker: expected an integer in 0..4096; got -1"),
    (FAKE, "execution.cache_max_gb=-1", "execution.cache_max_gb: expected a number in (0, 1000000]; got -1.0"),
    (FAKE, "execution.cache_max_gb=0", "execution.cache_max_gb: expected a number in (0, 1000000]"),
    (FAKE, "execution.cache_max_gb=.nan", "execution.cache_max_gb: expected a finite number"),
    (FAKE, "execution.device=gpu", "execution.device: expected cpu, cuda or cuda:N"),
    (FAKE, "execution.devices=[cpu, 'cuda:x']", "execution.devices: expected cpu, cuda or cuda:N"),
    (FAKE, "execution.backend=slurm", "execution.backend: expected one of ['local', 'ray']"),
    (ZIP, "generator.boundary.num_clusters=-3", "generator.boundary.num_clusters: expected an integer in 1..10000"),
    (ZIP, "generator.boundary.num_clusters=0", "generator.boundary.num_clusters: expected an integer in 1..10000"),
    (ZIP, "generator.boundary.max_iterations=0", "generator.boundary.max_iterations: expected an integer in 1.."),
    (ZIP, "generator.boundary.tolerance=-1", "generator.boundary.tolerance: expected a number >= 0"),
    (ZIP, "generator.boundary.short_side=0", "generator.boundary.short_side: expected an integer in 16..16384"),
    (ZIP, "generator.boundary.max_long_side=100", "generator.boundary.max_long_side: expected >= short_side (2048); got 100"),
    (ZIP, "generator.boundary.model=''", "generator.boundary.model: expected a non-empty string"),
    (ZIP, "generator.boundary.init=random", "generator.boundary.init: expected one of ['even', 'semantic']"),
    (ZIP, "generator.sam.nms_iou=7", "generator.sam.nms_iou: expected a number in [0.0, 1.0]; got 7.0"),
    (ZIP, "generator.sam.nms_ios=-0.5", "generator.sam.nms_ios: expected a number in [0.0, 1.0]"),
    (ZIP, "generator.sam.model_type=vit_z", "generator.sam.model_type: expected one of ['vit_h', 'vit_l', 'vit_b'"),
    (ZIP, "generator.semantic.top_k=-1", "generator.semantic.top_k: expected an integer in 0..10000; got -1"),
    (ZIP, "generator.semantic.class_threshold=1.5", "generator.semantic.class_threshold: expected a number in [0.0, 1.0]"),
    (ZIP, "generator.semantic.input_size=8", "generator.semantic.input_size: expected an integer in 16..4096"),
    (ZIP, "generator.semantic.surgery_depth=-1", "generator.semantic.surgery_depth: expected an integer in 0..1000"),
    (ZIP, "generator.semantic.vocabulary=[cat, '']", "generator.semantic.vocabulary: expected a list of non-empty"),
    (ZIP, "generator.semantic.generic_prompt=''", "generator.semantic.generic_prompt: expected a non-empty string"),
    (ZIP, "generator.discovery.activation_ratio=-1", "generator.discovery.activation_ratio: expected a number >= 0"),
    (ZIP, "generator.discovery.min_activated_fraction=2", "generator.discovery.min_activated_fraction: expected"),
    (ZIP, "generator.discovery.max_box_to_area=0.5", "generator.discovery.max_box_to_area: expected a number > 1.0"),
    (ZIP, "generator.discovery.min_cells=-1", "generator.discovery.min_cells: expected an integer >= 0"),
    (ZIP, "generator.discovery.min_cells_reference_short_side=-5", "min_cells_reference_short_side: expected"),
    (ZIP, "generator.precision=fp8", "generator.precision: expected one of ['fp32', 'bf16', 'fp16', 'auto']"),
    (SAM_AUTO, "generator.model_type=vit_z", "generator.model_type: expected one of"),
    (SAM_AUTO, "generator.pred_iou_thresh=.nan", "generator.pred_iou_thresh: expected a finite number"),
    (SAM_AUTO, "generator.pred_iou_thresh=3", "generator.pred_iou_thresh: expected a number <= 1"),
    (SAM_AUTO, "generator.stability_score_thresh=2", "generator.stability_score_thresh: expected a number <= 1"),
    (SAM_AUTO, "generator.points_per_side=5000", "generator.points_per_side: expected an integer >= 1 and <= 1024"),
    (SAM_AUTO, "generator.precision=fp8", "generator.precision: expected one of ['fp32', 'bf16', 'fp16', 'auto']"),
    (LABELER, "labeler.padding=.nan", "labeler.padding: expected a finite number"),
    (LABELER, "labeler.precision=fp8", "labeler.precision: expected one of ['fp32', 'bf16', 'fp16', 'auto']"),
    ({"scoring": {}}, "scoring.weights=[.nan, 1]", "scoring.weights[0]: expected a finite number"),
]


@pytest.mark.parametrize("base, override, message", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_out_of_range_values_are_refused_at_load_time(base, override, message):
    data = {**FAKE, **base}
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(apply_overrides(data, [override]))
    assert message in str(info.value)


GOOD_VALUES = [
    (FAKE, ["generator.instances_per_image=0", "generator.seconds_per_image=0", "execution.threads_per_worker=0",
            "execution.cache_max_gb=0.5", "execution.device=cuda:1", "execution.devices=[cpu, cuda, 'cuda:3']"]),
    (ZIP, ["generator.semantic.top_k=0", "generator.sam.nms_iou=1", "generator.sam.nms_ios=0",
           "generator.boundary.num_clusters=1", "generator.discovery.min_cells=0", "generator.precision=auto",
           "generator.sam.model_type=tiny"]),
    (SAM_AUTO, ["generator.pred_iou_thresh=-1", "generator.stability_score_thresh=0", "generator.precision=auto"]),
    (LABELER, ["labeler.precision=auto"]),
]


@pytest.mark.parametrize("base, overrides", GOOD_VALUES)
def test_edge_values_inside_the_ranges_load(base, overrides):
    recipe_from_dict(apply_overrides({**FAKE, **base}, overrides))


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError, match="instances_per_image: expected an integer in 0..64"):
        FakeConfig(instances_per_image=-1)
    with pytest.raises(ConfigError, match="nms_iou: expected a number in"):
        zip_config.SamConfig(nms_iou=7.0)
    with pytest.raises(ConfigError, match="cache_max_gb"):
        ExecutionConfig(cache_max_gb=-1.0)


RECIPE_CONFIGS = [ImagesConfig, StoreConfig, ExecutionConfig, FakeConfig, SamAutoConfig, zip_config.ZipConfig,
                  zip_config.SemanticConfig, zip_config.BoundaryConfig, zip_config.DiscoveryConfig,
                  zip_config.SamConfig]


def _numeric_fields():
    for cls in RECIPE_CONFIGS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                yield cls, f.name, hints[f.name]


@pytest.mark.parametrize("cls, name, kind", list(_numeric_fields()), ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_number_of_a_recipe_has_a_checked_range(cls, name, kind):
    """No number is accepted whatever it is: NaN, a huge negative or a huge positive value is refused."""
    probes = [-10**15, 10**15] + ([math.nan] if kind is float else [])
    refused = 0
    for value in probes:
        try:
            cls(**{name: kind(value)})
        except ConfigError as exc:
            assert name in str(exc)
            refused += 1
    assert refused >= len(probes) - 1, f"{cls.__name__}.{name} accepts {probes}"


def test_sam_model_types_match_the_models_that_can_be_built():
    from labelgen.models.weights import SAM_CHECKPOINTS
    from labelgen.models.sam import SAM_MODEL_TYPES

    assert set(zip_config.SAM_MODEL_TYPES) == set(SAM_MODEL_TYPES) == {"tiny", *SAM_CHECKPOINTS}


# -- nothing is written before the values are checked ------------------------------------------------
@pytest.mark.parametrize("recipe, bad, good", [
    ("fake-smoke.yaml", "generator.instances_per_image=-1", "generator.instances_per_image=2"),
    pytest.param("zip-tiny-random.yaml", "generator.sam.model_type=vit_z", "generator.sam.model_type=tiny",
                 marks=needs_models),
    pytest.param("zip-tiny-random.yaml", "generator.semantic.surgery_depth=9", "generator.semantic.surgery_depth=6",
                 marks=needs_models),
])
def test_a_bad_value_writes_nothing_and_the_fixed_recipe_then_runs(tmp_path, image_dir, capsys, recipe, bad, good):
    out = tmp_path / "run"
    base = ["run", str(REPO / "recipes" / recipe), "--plugin", "labelgen.testing", "--images", str(image_dir),
            "--out", str(out), "--no-progress"]
    code = main(base + ["--set", bad])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("labelgen: error:") and bad.split("=")[0] in err, err
    assert not out.exists()
    code = main(base + ["--set", good])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "different settings" not in err


def test_recipe_dataclasses_are_frozen_and_checked_on_replace():
    recipe = recipe_from_dict(FAKE)
    with pytest.raises(ConfigError, match="shard_size"):
        dataclasses.replace(recipe.store, shard_size=-1)
    assert isinstance(recipe, Recipe)


@pytest.mark.parametrize("override, message", [
    ("generator.semantic.surgery_depth=13", "generator.semantic.surgery_depth: expected 0..12 (ViT-B-16 has 12 blocks)"),
    ("generator.semantic.input_size=500", "generator.semantic.input_size: expected a multiple of ViT-B-16's patch size 16"),
    ("generator.semantic.model=ViT-B-17", "generator.semantic.model: unknown open_clip model 'ViT-B-17'. Did you mean"),
    ("generator.semantic.model=RN50", "generator.semantic.model: 'RN50' is a ResNet"),
    ("generator.boundary.model=ViT-B-16", "generator.boundary.model: 'ViT-B-16' is a ViT"),
    ("generator.boundary.model=RN5O", "generator.boundary.model: unknown open_clip model 'RN5O'"),
])
def test_model_dependent_values_are_refused_by_preflight_without_building_models(override, message):
    pytest.importorskip("open_clip")
    from labelgen.generators import GENERATORS

    recipe = recipe_from_dict(apply_overrides({**FAKE, **ZIP}, [override]))
    with pytest.raises(ConfigError) as info:
        GENERATORS.get("zip").preflight(recipe.generator.params)
    assert message in str(info.value)
