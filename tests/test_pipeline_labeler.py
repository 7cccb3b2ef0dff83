"""A recipe's `labeler:` section names the instances of any generator during the run."""
import json

import numpy as np

from conftest import make_recipe, needs_models
from labelgen.engine.runner import run
from labelgen.engine.sources import FolderSource
from labelgen.store.run_store import RunStore

LABELER = ["labeler.model=labelgen-tiny-vit", "labeler.random_weights=true", "labeler.allow_download=false",
           "labeler.classes={cat: [cat, kitten], dog: [], person: [person, pedestrian]}"]


@needs_models
def test_labeler_names_fake_instances_and_is_recorded(tmp_path, image_dir):
    recipe = make_recipe(*LABELER)
    assert recipe.class_names() == ("cat", "dog", "person")
    run(recipe, FolderSource(image_dir), tmp_path / "run")
    store = RunStore(tmp_path / "run")
    assert store.manifest()["class_names"] == ["cat", "dog", "person"]
    rows = list(store.iter_rows())
    assert rows and all(r["status"] == "ok" for r in rows)
    for row in rows:
        inst = row["instances"]
        n = len(inst["masks_rle"])
        assert len(inst["class_ids"]) == n and all(0 <= c < 3 for c in inst["class_ids"])
        assert len(inst["scores"]["clip_label_prob"]) == n and "confidence" in inst["scores"]
        assert np.all(np.array(inst["scores"]["clip_label_margin"]) >= 0)
    done = json.loads((tmp_path / "run" / "shards" / "000000.done.json").read_text())
    assert done["provenance"]["labeler"]["weights"] == "RANDOM"


def test_labeler_is_part_of_the_run_identity(tmp_path, image_dir):
    run(make_recipe(), FolderSource(image_dir), tmp_path / "run")
    import pytest

    from labelgen.errors import ConfigMismatchError

    with pytest.raises(ConfigMismatchError, match="labeler"):
        run(make_recipe(*LABELER), FolderSource(image_dir), tmp_path / "run")
