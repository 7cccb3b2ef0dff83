"""The run store: init, plan, commit protocol, resume decisions, identity checks, lock."""
import errno
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import make_recipe
from labelgen.errors import ConfigMismatchError, RunLockedError, RunStoreError, StoreWriteError
from labelgen.engine.runner import run
from labelgen.engine.sources import FolderSource
from labelgen.store.run_store import RunStore


def _rows(store):
    return list(store.iter_rows())


def test_first_run_writes_self_describing_directory(tmp_path, image_dir):
    recipe = make_recipe()
    result = run(recipe, FolderSource(image_dir), tmp_path / "run")
    store = RunStore(tmp_path / "run")
    manifest = store.manifest()
    assert manifest["fingerprint"] == recipe.fingerprint()
    assert manifest["versions"]["numpy"] and manifest["versions"]["python"]
    assert manifest["source"]["kind"] == "folder"
    assert store.stored_config()["store"]["shard_size"] == 4
    assert [len(s.images) for s in store.iter_plan()] == [4, 4, 2]
    assert result.shards_done == 3 and result.shards_skipped == 0
    rows = _rows(store)
    assert [r["image"]["image_id"] for r in rows] == sorted(p.name for p in image_dir.iterdir())
    assert all(r["status"] == "ok" and r["image"]["width"] == 32 and len(r["image"]["sha256"]) == 64 for r in rows)
    done = json.loads((store.shards_dir / "000000.done.json").read_text())
    assert done["images"] == 4 and done["fingerprint"] == recipe.fingerprint() and done["provenance"]["test_only"]


def test_rerun_skips_done_shards_and_output_is_byte_identical(tmp_path, image_dir):
    recipe = make_recipe()
    run(recipe, FolderSource(image_dir), tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "shards").glob("*.jsonl.gz")}
    again = run(recipe, FolderSource(image_dir), tmp_path / "run")
    assert again.shards_done == 0 and again.shards_skipped == 3
    run(recipe, FolderSource(image_dir), tmp_path / "other")
    other = {p.name: p.read_bytes() for p in (tmp_path / "other" / "shards").glob("*.jsonl.gz")}
    assert before == other  # deterministic, no timestamps in outputs


@pytest.mark.parametrize(
    "damage",
    [
        "delete_done",  # killed after the output rename, before the done record
        "truncate_output",  # output changed after commit: size no longer matches
        "corrupt_done",  # torn/garbled done record
        "foreign_done",  # done record of another plan entry
        "leftover_temp",  # killed while writing the temp file
    ],
)
def test_resume_redoes_exactly_the_damaged_shard(tmp_path, image_dir, damage):
    recipe = make_recipe()
    run(recipe, FolderSource(image_dir), tmp_path / "ref")
    reference = _rows(RunStore(tmp_path / "ref"))
    root = tmp_path / "run"
    run(recipe, FolderSource(image_dir), root)
    shards = root / "shards"
    if damage == "delete_done":
        (shards / "000001.done.json").unlink()
    elif damage == "truncate_output":
        data = (shards / "000001.jsonl.gz").read_bytes()
        (shards / "000001.jsonl.gz").write_bytes(data[: len(data) // 2])
    elif damage == "corrupt_done":
        (shards / "000001.done.json").write_text('{"format": "labelgen-sha')
    elif damage == "foreign_done":
        (shards / "000001.done.json").write_bytes((shards / "000000.done.json").read_bytes())
    elif damage == "leftover_temp":
        (shards / "000001.done.json").unlink()
        (shards / "000001.jsonl.gz").rename(shards / "000001.jsonl.gz.tmp-999")
    result = run(recipe, FolderSource(image_dir), root)
    assert result.shards_done == 1 and result.shards_skipped == 2
    assert _rows(RunStore(root)) == reference
    assert not list(shards.glob("*.tmp-*"))


def test_config_mismatch_is_refused_with_a_diff(tmp_path, image_dir):
    run(make_recipe(), FolderSource(image_dir), tmp_path / "run")
    with pytest.raises(ConfigMismatchError) as info:
        run(make_recipe("store.shard_size=5", instances_per_image=2), FolderSource(image_dir), tmp_path / "run")
    message = str(info.value)
    assert "store.shard_size: 4 -> 5" in message and "generator.instances_per_image: 3 -> 2" in message
    assert "--new-run" in message
    assert len(_rows(RunStore(tmp_path / "run"))) == 10  # nothing touched


def test_different_source_is_refused(tmp_path, image_dir):
    run(make_recipe(), FolderSource(image_dir), tmp_path / "run")
    other = tmp_path / "other_images"
    other.mkdir()
    with pytest.raises(ConfigMismatchError, match="source.root"):
        run(make_recipe(), FolderSource(other), tmp_path / "run")


def test_execution_settings_may_change_between_resumes(tmp_path, image_dir):
    run(make_recipe(), FolderSource(image_dir), tmp_path / "run")
    result = run(make_recipe("execution.workers=2"), FolderSource(image_dir), tmp_path / "run")
    assert result.shards_skipped == 3


def test_new_run_archives_the_old_one(tmp_path, image_dir):
    root = tmp_path / "run"
    run(make_recipe(), FolderSource(image_dir), root)
    old_id = RunStore(root).manifest()["run_id"]
    run(make_recipe(instances_per_image=1), FolderSource(image_dir), root, new_run=True)
    archived = root / "archive" / old_id
    assert (archived / "run.json").is_file() and len(list((archived / "shards").glob("*.done.json"))) == 3
    rows = _rows(RunStore(root))
    assert len(rows) == 10 and all(len(r["instances"]["masks_rle"]) <= 1 for r in rows)


def test_extend_adds_only_new_images_as_new_shards(tmp_path, image_dir):
    from labelgen.testing.images import make_image_folder

    root = tmp_path / "run"
    run(make_recipe(), FolderSource(image_dir), root)
    first_outputs = {p.name: p.read_bytes() for p in (root / "shards").glob("*.jsonl.gz")}
    make_image_folder(image_dir / "new", 5, size=(32, 24), seed=1)
    not_extended = run(make_recipe(), FolderSource(image_dir), root)
    assert not_extended.images_added == 0 and len(_rows(RunStore(root))) == 10
    result = run(make_recipe(), FolderSource(image_dir), root, extend=True)
    assert result.images_added == 5 and result.shards_done == 2
    store = RunStore(root)
    ids = [r["image"]["image_id"] for r in _rows(store)]
    assert len(ids) == len(set(ids)) == 15 and ids[-5:] == [f"new/img_{i:05d}.png" for i in range(5)]
    for name, data in first_outputs.items():
        assert (root / "shards" / name).read_bytes() == data


def _hold_lock(root, ready, release):
    store = RunStore(root)
    store.acquire_lock()
    ready.set()
    release.wait(30)
    store.release_lock()


def test_lock_refuses_a_second_process(tmp_path, image_dir):
    root = tmp_path / "run"
    root.mkdir()
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(root), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            run(make_recipe(), FolderSource(image_dir), root)
        assert not (root / "run.json").exists()
    finally:
        release.set()
        holder.join(30)
    run(make_recipe(), FolderSource(image_dir), root)  # free again once the holder is gone
    assert len(_rows(RunStore(root))) == 10


def test_write_failure_mid_run_keeps_committed_shards(tmp_path, image_dir, monkeypatch):
    import labelgen.atomic as atomic

    root = tmp_path / "run"
    recipe = make_recipe()
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("000002.jsonl.gz"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(StoreWriteError) as info:
        run(recipe, FolderSource(image_dir), root)
    assert "disk is full" in str(info.value) and "000002.jsonl.gz" in str(info.value)
    monkeypatch.undo()
    store = RunStore(root)
    assert store.plan_summary(recipe.fingerprint()).pending == [2]
    assert not list((root / "shards").glob("*.tmp-*"))
    result = run(recipe, FolderSource(image_dir), root)
    assert result.shards_done == 1 and len(_rows(store)) == 10


def test_real_file_size_limit_gives_clear_error_and_resume_works(tmp_path):
    """A real EFBIG from the kernel (RLIMIT_FSIZE) while writing shards, in a subprocess."""
    from labelgen.testing.images import make_image_folder

    image_dir = tmp_path / "big"
    make_image_folder(image_dir, 10, size=(320, 240))  # shard files ~2.8 kB, manifests < 2 kB
    root = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from conftest import make_recipe
        from labelgen.engine.runner import run
        from labelgen.engine.sources import FolderSource
        from labelgen.errors import StoreWriteError
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
        try:
            run(make_recipe(), FolderSource({str(image_dir)!r}), {str(root)!r})
        except StoreWriteError as exc:
            print("STORE_WRITE_ERROR", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "STORE_WRITE_ERROR" in out.stdout, out.stderr
    assert "file size limit" in out.stdout
    store = RunStore(root)
    done_before = [s.index for s in store.iter_plan() if store.done_record(s)]
    result = run(make_recipe(), FolderSource(image_dir), root)
    assert result.shards_done == 3 - len(done_before)
    assert len(_rows(store)) == 10


def test_out_that_cannot_be_a_folder_is_a_clear_error(tmp_path, image_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunStoreError, match="not a folder"):
        run(make_recipe(), FolderSource(image_dir), blocker)
    with pytest.raises(StoreWriteError, match="cannot write run directory"):
        run(make_recipe(), FolderSource(image_dir), blocker / "sub")


def test_committed_shards_without_manifest_are_never_overwritten(tmp_path, image_dir):
    root = tmp_path / "run"
    run(make_recipe(), FolderSource(image_dir), root)
    (root / "run.json").unlink()
    with pytest.raises(RunStoreError, match="refusing to overwrite"):
        run(make_recipe(), FolderSource(image_dir), root)
