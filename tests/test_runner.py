"""Running recipes end to end in-process: failures recorded, parallel == serial, crashed shards."""
import json
import sys
from pathlib import Path

import pytest

from conftest import make_recipe
from labelgen.engine.runner import RunProgress, run
from labelgen.engine.sources import FolderSource
from labelgen.store.status import format_status, run_status
from labelgen.store.run_store import RunStore
from labelgen.testing.images import GOOD_IMAGE_SIZES, make_corrupt_corpus


def _rows(root):
    return list(RunStore(root).iter_rows())


def test_corrupt_corpus_every_bad_file_recorded_every_good_file_labelled(tmp_path):
    corpus = tmp_path / "corpus"
    expected = make_corrupt_corpus(corpus)
    result = run(make_recipe(), FolderSource(corpus), tmp_path / "run")
    rows = {r["image"]["image_id"]: r for r in _rows(tmp_path / "run")}
    assert set(rows) == set(expected)
    for image_id, reason in expected.items():
        row = rows[image_id]
        if reason is None:
            assert row["status"] == "ok", row
            assert (row["image"]["width"], row["image"]["height"]) == GOOD_IMAGE_SIZES[image_id]
            assert row["instances"]["height"] == row["image"]["height"]
        else:
            assert row["status"] == "failed" and row["failure"]["reason"] == reason, row
            assert image_id in row["failure"]["message"]
    bad = {k for k, v in expected.items() if v}
    ledger = [json.loads(line) for line in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()]
    assert {f["image_id"] for f in ledger} == bad and result.failures == len(bad)
    status = run_status(tmp_path / "run")
    assert status["images"]["failed"] == len(bad) and status["images"]["ok"] == len(expected) - len(bad)
    assert status["failures_by_reason"]["truncated"] == 1


def test_listed_file_that_is_gone_is_a_missing_failure(tmp_path, image_dir):
    from labelgen.engine.sources import ListFileSource

    listing = tmp_path / "list.txt"
    listing.write_text(f"{image_dir}/img_00000.png\n{image_dir}/gone.png\n")
    run(make_recipe(), ListFileSource(listing), tmp_path / "run")
    rows = {Path(r["image"]["image_id"]).name: r for r in _rows(tmp_path / "run")}
    assert rows["img_00000.png"]["status"] == "ok"
    assert rows["gone.png"]["status"] == "failed" and rows["gone.png"]["failure"]["reason"] == "missing"


def test_generator_exception_is_a_recorded_failure(tmp_path, image_dir):
    recipe = make_recipe(fail_image_ids=["img_00003.png"])
    run(recipe, FolderSource(image_dir), tmp_path / "run")
    rows = {r["image"]["image_id"]: r for r in _rows(tmp_path / "run")}
    assert rows["img_00003.png"]["status"] == "failed"
    assert rows["img_00003.png"]["failure"]["reason"] == "generator_error"
    assert "fake failure requested" in rows["img_00003.png"]["failure"]["message"]
    assert sum(r["status"] == "ok" for r in rows.values()) == 9


@pytest.mark.slow
def test_two_workers_give_the_same_outputs_as_one(tmp_path, image_dir):
    run(make_recipe(), FolderSource(image_dir), tmp_path / "serial")
    ticks = []
    progress = RunProgress(on_start=lambda total, done: ticks.append(("start", total, done)),
                           on_images=lambda n: ticks.append(n))
    result = run(make_recipe("execution.workers=2"), FolderSource(image_dir), tmp_path / "parallel",
                 progress=progress)
    assert result.shards_done == 3
    assert _rows(tmp_path / "parallel") == _rows(tmp_path / "serial")
    assert ticks[0] == ("start", 10, 0) and sum(t for t in ticks[1:]) == 10  # per-image progress from workers


def test_crashed_shard_is_recorded_reported_and_retried(tmp_path, image_dir, monkeypatch):
    import labelgen.engine.runner as runner

    real = runner.process_shard

    def crash_on_shard_1(root, shard, recipe, callback):
        if shard.index == 1:
            raise RuntimeError("simulated worker crash")
        return real(root, shard, recipe, callback)

    monkeypatch.setattr(runner, "process_shard", crash_on_shard_1)
    result = run(make_recipe(), FolderSource(image_dir), tmp_path / "run")
    assert result.shards_failed == [1] and result.shards_done == 2
    error = json.loads((tmp_path / "run" / "shards" / "000001.error.json").read_text())
    assert error["type"] == "RuntimeError" and "simulated" in error["message"]
    status = run_status(tmp_path / "run")
    assert status["shards"] == {"total": 3, "done": 2, "failed": 1, "corrupt": 0, "pending": 0, "failed_indices": [1]}
    assert "1 failed" in format_status(status)
    monkeypatch.undo()
    again = run(make_recipe(), FolderSource(image_dir), tmp_path / "run")
    assert again.shards_done == 1 and not (tmp_path / "run" / "shards" / "000001.error.json").exists()
    assert len(_rows(tmp_path / "run")) == 10


def test_status_counts_and_throughput(tmp_path, image_dir):
    run(make_recipe(), FolderSource(image_dir), tmp_path / "run")
    status = run_status(tmp_path / "run", verify=True)
    assert status["shards"]["done"] == 3 and status["images"] == {"planned": 10, "done": 10, "ok": 10, "failed": 0}
    assert status["instances"] == sum(len(r["instances"]["masks_rle"]) for r in _rows(tmp_path / "run"))
    assert status["throughput"]["images_per_worker_second"] > 0
    text = format_status(status)
    assert "3 done, 0 pending, 0 failed, of 3" in text and "10 labelled" in text


def test_ray_backend_without_ray_installed_writes_nothing(tmp_path, image_dir, monkeypatch):
    import importlib.util

    from labelgen.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"labelgen\[cluster\]"):
        run(make_recipe("execution.backend=ray"), FolderSource(image_dir), tmp_path / "run")
    assert not (tmp_path / "run").exists()
