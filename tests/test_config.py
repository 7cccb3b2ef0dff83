import json
from pathlib import Path

import numpy as np
import pytest
import yaml

import labelgen.testing  # noqa: F401  registers the fake generator
from labelgen.config import Recipe, apply_overrides, config_diff, load_recipe, recipe_from_dict
from labelgen.errors import ConfigError
from labelgen.generators import GENERATORS
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
        ({"generator": {"name": "fake"}, "store": {"shard_size": 0}}, "store.shard_size: expected an integer in 1..100000"),
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


# -- precision: auto ---------------------------------------------------------------------------------
CPUINFO_WITH_BF16 = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 avx512_vnni
processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_bf16 avx512_vnni
"""
CPUINFO_WITH_AMX = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16 amx_int8\n"
CPUINFO_WITHOUT = "processor\t: 0\nflags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni\n"


@pytest.fixture
def loading(monkeypatch):
    loading = pytest.importorskip("labelgen.models.loading")
    monkeypatch.setattr(loading, "_LOGGED_CHOICES", set())
    return loading


@pytest.mark.parametrize("text, flag, expected", [
    (CPUINFO_WITH_BF16, "avx512_bf16", "bf16"), (CPUINFO_WITH_AMX, "amx_bf16", "bf16"),
    (CPUINFO_WITHOUT, None, "fp32"), ("", None, "fp32"),
])
def test_precision_auto_on_cpu_follows_the_cpu_flags(loading, caplog, text, flag, expected):
    import logging

    assert loading.native_bf16_cpu_flag(text) == flag
    with caplog.at_level(logging.INFO, logger="labelgen.models.loading"):
        assert loading.resolve_precision("auto", "cpu", cpuinfo_text=text) == expected
        assert loading.resolve_precision("auto", "cpu", cpuinfo_text=text) == expected
    lines = [r.getMessage() for r in caplog.records if "precision auto" in r.getMessage()]
    reason = f"cpu has {flag}" if flag else "cpu has none of avx512_bf16, amx_bf16"
    assert len(lines) == 1 and lines[0].startswith(f"precision auto -> {expected} ({reason}")  # logged once


def test_explicit_precisions_are_kept_whatever_the_cpu(loading):
    for precision in ("fp32", "bf16", "fp16"):
        assert loading.resolve_precision(precision, "cpu", cpuinfo_text=CPUINFO_WITHOUT) == precision
        assert loading.resolve_precision(precision, "cpu", cpuinfo_text=CPUINFO_WITH_BF16) == precision
    with pytest.raises(Exception, match="precision must be one of"):
        loading.resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_precision_auto_on_cuda_asks_for_native_bf16(loading, monkeypatch, native, expected):
    import torch

    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native or including_emulation  # recent GPUs without bf16 answer True when emulation counts

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert loading.resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert calls == [False]


def test_precision_auto_keeps_the_fingerprint_and_records_the_choice(loading, monkeypatch, tmp_path, image_dir):
    """The recipe says `auto` (one fingerprint on every machine); each shard records what ran."""
    from labelgen.engine.runner import run
    from labelgen.engine.sources import FolderSource
    overrides = ["generator.precision=auto", "store.shard_size=10"]
    recipe = load_recipe(RECIPES / "zip-tiny-random.yaml", overrides)
    assert recipe.generator.params.precision == "auto" and recipe.identity()["generator"]["precision"] == "auto"
    seen = {}
    for flag, expected in ((None, "fp32"), ("avx512_bf16", "bf16")):
        monkeypatch.setattr(loading, "native_bf16_cpu_flag", lambda text=None, flag=flag: flag)
        generator = GENERATORS.get("zip").from_config(recipe.generator.params)
        facts = generator.provenance()
        assert (facts["precision"], facts["precision_requested"]) == (expected, "auto")
        seen[expected] = generator.cache_keys(np.zeros((4, 4, 3), np.uint8))["clip_layer3"]["precision"]
    assert seen == {"fp32": "fp32", "bf16": "bf16"}  # the feature cache never mixes the two
    monkeypatch.setattr(loading, "native_bf16_cpu_flag", lambda text=None: None)
    run(recipe, FolderSource(image_dir), tmp_path / "run")
    record = json.loads((tmp_path / "run" / "shards" / "000000.done.json").read_text())
    assert record["provenance"]["precision"] == "fp32" and record["provenance"]["precision_requested"] == "auto"
    assert record["fingerprint"] == recipe.fingerprint()


def test_cpu_recipes_default_to_auto_and_test_recipes_to_a_fixed_precision():
    for name in ("zip-cpu.yaml", "zip-smoke-random.yaml"):
        assert load_recipe(RECIPES / name).generator.params.precision == "auto", name
    for name in ("zip-tiny-random.yaml", "sam-auto-tiny-random.yaml"):  # tests compare their outputs
        assert load_recipe(RECIPES / name).generator.params.precision == "fp32", name


# -- the recipe that shows every field ---------------------------------------------------------------
def _field_paths(cls, prefix=""):
    """Dotted names of every leaf field of config dataclass ``cls`` (nested config sections expanded)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        options = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        nested = next((a for a in options if dataclasses.is_dataclass(a)), None)
        if nested is not None:
            yield from _field_paths(nested, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def _paper_recipe_with_optional_sections():
    text = (RECIPES / "zip-paper.yaml").read_text(encoding="utf-8")
    optional = text[text.index("# labeler:"):].splitlines()
    assert all(line.startswith("# ") for line in optional)
    return text, {**yaml.safe_load(text), **yaml.safe_load("\n".join(line[2:] for line in optional))}


def test_paper_recipe_lists_every_field_at_its_default_with_a_comment():
    """README says zip-paper.yaml shows every field: each field of the Recipe dataclasses is in it
    (labeler and scoring as commented-out sections), at its default, with a comment."""
    from labelgen.config import ExecutionConfig, ImagesConfig, StoreConfig
    from labelgen.labelers.config import LabelerConfig
    from labelgen.structures.scoring import ScoringConfig
    from labelgen.generators.zip.config import ZipConfig

    text, data = _paper_recipe_with_optional_sections()
    expected = ["description", "generator.name", *(f"generator.{p}" for p in _field_paths(ZipConfig))]
    for section, cls in (("images", ImagesConfig), ("store", StoreConfig), ("execution", ExecutionConfig),
                         ("labeler", LabelerConfig), ("scoring", ScoringConfig)):
        expected += [f"{section}.{p}" for p in _field_paths(cls)]
    missing = []
    for path in expected:
        node = data
        for part in path.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is KeyError:
            missing.append(path)
    assert missing == [], f"add these fields to recipes/zip-paper.yaml: {missing}"
    recipe = recipe_from_dict(data)  # the commented-out sections are valid when uncommented
    assert recipe.generator.params == ZipConfig() and recipe.images == ImagesConfig()
    assert recipe.store == StoreConfig() and recipe.execution == ExecutionConfig()
    assert recipe.scoring == ScoringConfig()
    assert recipe.labeler == LabelerConfig(classes=recipe.labeler.classes)
    assert load_recipe(RECIPES / "zip-paper.yaml").labeler is None  # the optional sections stay off
    import re

    leaves = [line for line in text.splitlines() if re.match(r"^(# )?\s*\w+: \S", line)]
    assert len(leaves) >= len(expected) and all(" # " in line for line in leaves), \
        [line for line in leaves if " # " not in line]
