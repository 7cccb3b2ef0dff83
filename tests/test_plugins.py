"""Plugin contracts: the Generator base, the Labeler protocol, the exporter registry, registered names,
and docs/plugins.md, whose example plugin is written out and run through the real CLI."""
import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from labelgen.config import ExecutionConfig, ImagesConfig
from labelgen.engine import worker
from labelgen.engine.pipeline import label_images
from labelgen.errors import ConfigError, RegistryError
from labelgen.exports import EXPORTERS, ExportRequest, export
from labelgen.generators import GENERATORS, Generator
from labelgen.labelers import Labeler
from labelgen.registry import Registry
from labelgen.store.run_store import RunStore
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.testing.images import make_image_folder

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "plugins.md"
BLOCK = re.compile(r"<!-- (file|command): (\S+) -->\n```\w*\n(.*?)```", re.S)


# -- registered names ------------------------------------------------------------------------------------
def test_the_registry_sets_the_name_of_a_class_that_has_none():
    reg = Registry("widget", named=True)

    class Base:
        name = "base"

    @reg.register("child")
    class Child(Base):  # the inherited name is not its own
        pass

    assert Child.name == "child" and reg.get("child") is Child and Base.name == "base"


def test_a_class_that_declares_another_name_is_refused():
    reg = Registry("widget", named=True)

    class Widget:
        name = "widget-a"

    with pytest.raises(RegistryError, match=r"declares name = 'widget-a' but is registered as 'widget-b'"):
        reg.register("widget-b")(Widget)
    assert "widget-b" not in reg
    assert reg.register("widget-a")(Widget) is Widget  # the name it declares is fine


def test_a_named_registry_takes_classes_only():
    with pytest.raises(RegistryError, match="registered as a class"):
        Registry("widget", named=True).register("w")(lambda: None)


def test_builtin_generators_and_exporters_carry_their_registered_names():
    for registry in (GENERATORS, EXPORTERS):
        for name in registry.names():
            assert registry.get(name).name == name
    assert {"coco", "yolo", "fiftyone"} <= set(EXPORTERS.names())


# -- the Generator base ------------------------------------------------------------------------------------
class _Plain(Generator):
    """Only what a generator must write: from_config and generate (batch sizes seen are recorded)."""

    def __init__(self):
        self.batches = []

    @classmethod
    def from_config(cls, config, *, device="cpu"):
        return cls()

    def generate(self, image_rgb, record):
        return Instances.empty(*image_rgb.shape[:2])

    def generate_batch(self, images_rgb, records):
        self.batches.append(len(images_rgb))
        return super().generate_batch(images_rgb, records)


def test_the_base_declares_what_the_engine_uses_with_defaults():
    generator = _Plain()
    assert (generator.config, generator.batch_size, generator.feature_cache, generator.uses_feature_cache) == (
        None, 1, None, False)
    assert generator.class_names() is None and generator.provenance() == {"generator": ""}
    assert _Plain.preflight(None) is None and _Plain.Config() is not None  # NoConfig: no settings
    assert GENERATORS.get("zip").uses_feature_cache is True


def test_label_images_is_the_one_way_the_batch_size_reaches_the_generator(tmp_path):
    make_image_folder(tmp_path, 5, size=(16, 12))
    records = [ImageRecord(p.name, str(p)) for p in sorted(tmp_path.iterdir())]
    generator = _Plain()
    rows = label_images(generator, records, ImagesConfig(), batch_size=2, overlap=False)
    assert generator.batch_size == 2 and generator.batches == [2, 2, 1]
    assert [r["status"] for r in rows] == ["ok"] * 5


@pytest.mark.parametrize("uses", [False, True])
def test_the_worker_gives_a_cache_only_to_generators_that_use_one(tmp_path, uses):
    generator = _Plain()
    generator.uses_feature_cache = uses
    worker._attach_feature_cache(generator, ExecutionConfig(cache_dir=str(tmp_path / "cache")))
    assert (generator.feature_cache is not None) is uses


# -- the Labeler protocol --------------------------------------------------------------------------------------
def test_the_labeler_protocol_checks_its_members():
    class Complete:
        name = "x"

        def label(self, image_rgb, instances):
            return instances

        def provenance(self):
            return {}

    class NoProvenance:
        name = "x"

        def label(self, image_rgb, instances):
            return instances

    assert isinstance(Complete(), Labeler) and not isinstance(NoProvenance(), Labeler)


def test_the_clip_labeler_is_a_labeler():
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from labelgen.labelers.clip import ClipLabeler
    from labelgen.labelers.config import LabelerConfig

    config = LabelerConfig(classes={"cat": [], "dog": []}, model="labelgen-tiny-vit", random_weights=True,
                           allow_download=False)
    assert isinstance(ClipLabeler.from_config(config), Labeler)


# -- the exporter registry -----------------------------------------------------------------------------------
def test_an_unknown_format_names_the_registered_ones():
    with pytest.raises(RegistryError, match=r"unknown exporter 'cocoo'; available: .*coco.* Did you mean 'coco'\?"):
        export("cocoo", None, ExportRequest())


def test_a_folder_format_without_out_is_refused_before_it_runs():
    with pytest.raises(ConfigError, match="--format yolo needs --out FOLDER"):
        export("yolo", None, ExportRequest())


# -- docs/plugins.md, run as written -----------------------------------------------------------------------------
def _guide_files(folder: Path) -> dict[str, list[str]]:
    """Write the guide's ``<!-- file: NAME -->`` blocks (concatenated per name) into ``folder``;
    return its ``<!-- command: NAME -->`` blocks as argument lists."""
    files, commands = {}, {}
    for kind, name, body in BLOCK.findall(GUIDE.read_text(encoding="utf-8")):
        if kind == "file":
            files[name] = files.get(name, "") + body + "\n"
        else:
            commands[name] = shlex.split(body)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return commands


def _shell(argv: list[str], folder: Path, **placeholders: Path) -> subprocess.CompletedProcess:
    """Run a guide command in ``folder``: ``labelgen``/``python`` are this interpreter, ``VAR=...``
    prefixes go to the environment, upper-case placeholders are replaced by paths."""
    env = {k: v for k, v in os.environ.items() if k != "LABELGEN_PLUGINS"}
    paths = [folder, REPO]
    while "=" in argv[0]:
        key, _, value = argv[0].partition("=")
        if key == "PYTHONPATH":
            paths.insert(0, folder / value)
        else:
            env[key] = value
        argv = argv[1:]
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    program = {"labelgen": [sys.executable, "-m", "labelgen.cli"], "python": [sys.executable]}[argv[0]]
    args = [str(placeholders.get(a, a)) for a in argv[1:]]
    return subprocess.run(program + args, capture_output=True, text=True, env=env, cwd=folder, timeout=300)


def test_the_plugin_guide_example_runs_through_the_cli(tmp_path):
    commands = _guide_files(tmp_path)
    assert set(commands) == {"run", "label", "export"}
    images, run_dir, csv_dir = tmp_path / "images", tmp_path / "run", tmp_path / "csv"
    make_image_folder(images, 5, size=(32, 24))

    done = _shell(commands["run"], tmp_path, IMAGES=images, RUN=run_dir)
    assert done.returncode == 0, done.stderr
    rows = list(RunStore(run_dir).iter_rows())
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
    counts = {r["image"]["image_id"]: len(r["instances"]["masks_rle"]) for r in rows}
    assert set(counts.values()) == {4}  # 2 x 2 tiles of noise: one instance each

    labelled = _shell(commands["label"], tmp_path, IMAGES=images)
    assert labelled.returncode == 0, labelled.stderr
    lines = labelled.stdout.splitlines()
    assert len(lines) == 5 and all(line.split()[1] == "ok" and len(line.split()) == 6 for line in lines)
    assert {word for line in lines for word in line.split()[2:]} <= {"dark", "bright"}

    exported = _shell(commands["export"], tmp_path, RUN=run_dir, CSV_DIR=csv_dir)
    assert exported.returncode == 0, exported.stderr
    report = json.loads(exported.stdout)
    assert report == {"format": "example-csv", "path": str(csv_dir / "instances.csv"), "images": 5, "instances": 20}
    with open(csv_dir / "instances.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 20 and {row["image_id"] for row in table} == set(counts)
    assert all(row["class"] == "object" and 0 < float(row["confidence"]) <= 1 for row in table)


def test_the_plugin_guide_names_are_listed_and_checked(tmp_path):
    _guide_files(tmp_path)
    listed = _shell(["labelgen", "exporters", "--plugin", "example_plugin"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["coco", "example-csv", "fiftyone", "yolo"]
    generators = _shell(["labelgen", "generators", "--plugin", "example_plugin"], tmp_path)
    assert "example-grid" in generators.stdout.split()
    unknown = _shell(["labelgen", "export", str(tmp_path), "--format", "example-csv", "--out", "x"], tmp_path)
    assert unknown.returncode == 2 and "unknown exporter 'example-csv'" in unknown.stderr  # without --plugin

