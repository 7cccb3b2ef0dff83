from pathlib import Path

import pytest
import yaml

import labelgen.testing  # noqa: F401  registers the fake generator
from labelgen.config import Recipe, apply_overrides, config_diff, load_recipe, recipe_from_dict
from labelgen.errors import ConfigError
from labelgen.registry import Registry

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _write(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_types():
    recipe = recipe_from_dict({"generator": {"name": "fake"}})
    assert recipe.store.shard_size == 256
    assert recipe.generator.params.instances_per_image == 3
    assert isinstance(recipe.images.extensions, tuple)
    with pytest.raises(Exception):
        recipe.store.shard_size = 3  # frozen


@pytest.mark.parametrize(
    "data, message",
    [
        ({"generator": {"name": "fake"}, "stor": {}}, "unknown key 'stor'. Did you mean 'store'?"),
        ({"generator": {"name": "fake"}, "store": {"shard_sise": 3}}, "Did you mean 'store.shard_size'?"),
        ({"generator": {"name": "fake", "instances_per_imag": 2}}, "Did you mean 'generator.instances_per_image'?"),
        ({"generator": {"name": "fake"}, "store": {"shard_size": "ten"}}, "store.shard_size: expected an integer"),
        ({"generator": {"name": "fake"}, "store": {"shard_size": True}}, "expected an integer"),
        ({"generator": {"name": "fake"}, "store": {"shard_size": 0}}, "store.shard_size: expected 1..100000"),
        ({"generator": {"name": "fake"}, "images": {"compute_sha256": "yes"}}, "expected true/false"),
        ({"generator": {"name": "fake", "class_names": "cat"}}, "generator.class_names: expected a list"),
        ({"generator": {"name": "fake"}, "store": 3}, "store: expected a mapping"),
        ({"generator": {"name": "fak"}}, "unknown generator 'fak'; available:"),
        ({"store": {}}, "'generator' must be a mapping with a 'name'"),
        ({"generator": {"name": "zip", "sam": {"model_typ": "vit_b"}}}, "Did you mean 'generator.sam.model_type'?"),
    ],
)
def test_strict_loading_errors(data, message):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(data)
    assert message in str(info.value)


def test_unknown_generator_lists_available():
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({"generator": {"name": "nope"}})
    assert "fake" in str(info.value) and "zip" in str(info.value)


def test_overrides_parse_yaml_values(tmp_path):
    path = _write(tmp_path, {"generator": {"name": "fake"}})
    recipe = load_recipe(path, ["store.shard_size=7", "generator.class_names=[cat, dog]",
                                "generator.seconds_per_image=0.5", "execution.device=cuda:1"])
    assert recipe.store.shard_size == 7
    assert recipe.generator.params.class_names == ("cat", "dog")
    assert recipe.generator.params.seconds_per_image == 0.5
    assert recipe.execution.device == "cuda:1"


@pytest.mark.parametrize(
    "override, message",
    [("store.shard_size", "dotted.key=value"), ("=3", "dotted.key=value"),
     ("store.shard_size.x=1", "is a value, not a section"), ("store.nope=1", "unknown key 'store.nope'")],
)
def test_bad_overrides(tmp_path, override, message):
    path = _write(tmp_path, {"generator": {"name": "fake"}, "store": {"shard_size": 3}})
    with pytest.raises(ConfigError, match=message):
        load_recipe(path, [override])


@pytest.mark.parametrize("text, message", [("[1, 2]", "mapping at the top level"), ("a: [", "not valid YAML")])
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe("/nonexistent/recipe.yaml")


def test_round_trip_and_fingerprint_ignores_execution():
    recipe = recipe_from_dict({"generator": {"name": "fake", "class_names": ["a"]}, "store": {"shard_size": 9}})
    again = recipe_from_dict(recipe.to_dict())
    assert again == recipe and again.fingerprint() == recipe.fingerprint()
    other_exec = recipe_from_dict(apply_overrides(recipe.to_dict(), ["execution.workers=4", "execution.device=cuda"]))
    assert other_exec.fingerprint() == recipe.fingerprint()
    other_store = recipe_from_dict(apply_overrides(recipe.to_dict(), ["store.shard_size=10"]))
    assert other_store.fingerprint() != recipe.fingerprint()


def test_config_diff_is_readable():
    lines = config_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "d": 4}})
    assert lines == ["  a.c: 2 -> 3", '  a.d: "<absent>" -> 4']


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.description


def test_registry_lookup_lists_names():
    reg = Registry("widget")
    reg.register("alpha")(object)
    with pytest.raises(KeyError) as info:
        reg.get("alpah")
    assert "available: alpha" in str(info.value) and "Did you mean 'alpha'?" in str(info.value)
