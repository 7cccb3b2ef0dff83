import importlib.util
import contextlib
import os
from pathlib import Path

import pytest

import labelgen.testing  # noqa: F401  registers the fake generator
from labelgen.config import apply_overrides, recipe_from_dict
from labelgen.testing import fake_recipe_dict
from labelgen.testing.images import make_image_folder

REPO = Path(__file__).resolve().parents[1]
COCO128 = Path(os.environ.get("LABELGEN_COCO128", REPO.parent / "shared" / "assets" / "data" / "coco128-seg"))
# the `models` extra (pyproject.toml); a core install (`pip install -e ".[dev]"`) skips what needs it
MODEL_LIBRARIES = ("torch", "open_clip", "segment_anything")
needs_models = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in MODEL_LIBRARIES),
                                  reason="needs the `models` extra (torch, open_clip, segment-anything)")


def make_recipe(*overrides, **generator):
    return recipe_from_dict(apply_overrides(fake_recipe_dict(**generator), list(overrides)))


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    make_image_folder(folder, 10, size=(32, 24))
    return folder


@pytest.fixture(scope="session")
def coco128_images():
    folder = COCO128 / "images" / "train2017"
    if not folder.is_dir():
        pytest.skip(f"coco128-seg not found at {COCO128} (set LABELGEN_COCO128)")
    return folder


@pytest.fixture
def no_cuda(monkeypatch):
    """torch sees no CUDA device, whatever this machine has (for the tests of that error)."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(scope="session")
def fiftyone_db(tmp_path_factory):
    """FiftyOne on its real embedded MongoDB, in a private database folder for this test session.

    Returns the imported ``fiftyone`` module. The environment is set before the first import
    (FiftyOne reads its config then), so import fiftyone only through this fixture in tests.
    """
    folder = tmp_path_factory.mktemp("fiftyone-db")
    os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(folder))
    os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"  # the wheel's mongod 6.0 is the oldest supported
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    os.environ["FIFTYONE_DEFAULT_DATASET_DIR"] = str(folder / "datasets")
    fo = pytest.importorskip("fiftyone")
    return fo


@pytest.fixture
def dataset_name(fiftyone_db):
    """A unique FiftyOne dataset name; the dataset is deleted after the test."""
    import uuid

    name = f"labelgen-test-{uuid.uuid4().hex[:10]}"
    yield name
    if fiftyone_db.dataset_exists(name):
        fiftyone_db.delete_dataset(name)


@contextlib.contextmanager
def plugin_imported(name):
    """Import the plugin module ``name`` (it registers generators) for a while; afterwards the registry,
    the loaded plugins and the module cache are as before, so other tests (the ``labelgen generators``
    listing) never see what it registered."""
    import importlib
    import sys

    from labelgen.generators import registry as generators

    saved = dict(generators.GENERATORS._items), set(generators._LOADED), name in sys.modules
    try:
        yield importlib.import_module(name)
    finally:
        generators.GENERATORS._items.clear()
        generators.GENERATORS._items.update(saved[0])
        generators._LOADED.clear()
        generators._LOADED.update(saved[1])
        if not saved[2]:
            sys.modules.pop(name, None)


def assert_fiftyone_export_keeps_scores(fiftyone_db, dataset_name, run_dir, column):
    """Export ``run_dir`` to FiftyOne (the real MongoDB) and check every detection keeps ``column`` and
    ``confidence`` exactly as the run stored them."""
    import numpy as np

    from labelgen.cli import main
    from labelgen.exports.fiftyone import FIELD
    from labelgen.store.run_store import RunStore
    from labelgen.structures.instances import Instances

    assert main(["export", str(run_dir), "--format", "fiftyone", "--dataset", dataset_name]) == 0
    dataset = fiftyone_db.load_dataset(dataset_name)
    rows = {r["image"]["image_id"]: Instances.from_dict(r["instances"]) for r in RunStore(run_dir).iter_rows()}
    assert len(dataset) == len(rows)
    for sample in dataset:
        instances = rows[sample["labelgen_image_id"]]
        detections = sample[FIELD].detections
        assert len(detections) == len(instances)
        for i, detection in enumerate(detections):
            assert np.float32(detection[column]) == instances.scores[column][i]
            assert np.float32(detection.confidence) == instances.scores["confidence"][i]


def kill_9_after_first_shard(cmd, out, *, env=None, timeout=180.0):
    """Start ``cmd`` (a ``labelgen run`` into ``out``) in its own session, ``kill -9`` the whole group as soon
    as one shard is committed, and return how many were committed then. Asserts the run was really cut short
    (killed by the signal) and that a shard was committed before."""
    import signal
    import subprocess
    import sys
    import time

    env = env or {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "labelgen.cli", *cmd] if cmd[0] == "run" else cmd
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    committed = lambda: len(list((Path(out) / "shards").glob("*.done.json")))  # noqa: E731
    deadline = time.monotonic() + timeout
    try:
        while committed() < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = committed()
    assert done >= 1, "no shard committed before the kill"
    return done
