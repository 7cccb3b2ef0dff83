"""One bad input costs only itself: real odd files through `labelgen run`, end to end.

Every run is a real `labelgen run` subprocess with a generous timeout (a hang fails the test instead
of blocking the suite) and an address-space limit (code that reads a 6 GB file or /dev/zero fails
with MemoryError instead of taking the machine's memory).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from labelgen.store.status import run_status
from labelgen.store.run_store import RunStore
from labelgen.testing.images import make_image_folder

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes/fake-smoke.yaml")
BAD_NAME = b"bad\xff\xfename.jpg"  # not UTF-8
BAD_ID = os.fsdecode(BAD_NAME)  # "bad\udcff\udcfename.jpg"
GOOD = 6  # good images beside the bad entries: with shard_size=8 they share a shard


def _limit_memory() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = 4 << 30 if hard == resource.RLIM_INFINITY else min(4 << 30, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _labelgen(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "labelgen.cli", *args], capture_output=True, encoding="utf-8",
                          errors="backslashreplace", cwd=REPO, timeout=timeout, preexec_fn=_limit_memory)


def _run(images: Path, out: Path) -> subprocess.CompletedProcess:
    return _labelgen("run", RECIPE, "--plugin", "labelgen.testing", "--images", str(images), "--out", str(out),
                     "--set", "store.shard_size=8", "--no-progress")


def _ledger(out: Path) -> dict[str, str]:
    lines = (out / "failures.jsonl").read_text(encoding="utf-8").splitlines()
    return {entry["image_id"]: entry["reason"] for entry in map(json.loads, lines)}


def _rows(out: Path) -> dict[str, dict]:
    return {row["image"]["image_id"]: row for row in RunStore(out).iter_rows()}


def _assert_only_bad_entries_failed(out: Path, done: subprocess.CompletedProcess, good: list[str],
                                    expected: dict[str, str]) -> None:
    assert done.returncode == 0, done.stderr
    status = run_status(out)
    assert status["shards"]["done"] == status["shards"]["total"] and status["shards"]["failed"] == 0, status
    assert status["images"]["ok"] == len(good) and status["images"]["failed"] == len(expected), status
    assert _ledger(out) == expected
    rows = _rows(out)
    assert sorted(i for i, row in rows.items() if row["status"] == "ok") == sorted(good)
    for image_id, reason in expected.items():
        assert rows[image_id]["status"] == "failed" and rows[image_id]["failure"]["reason"] == reason


# -- item 8: odd entries in a folder and in a list file ------------------------------------------------
def _self_loop(folder: Path) -> dict[str, str]:
    os.symlink("loop.jpg", folder / "loop.jpg")  # ln -s loop.jpg loop.jpg
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "up")  # a folder loop: walked once, no entry
    make_image_folder(folder / "sub", 1, size=(24, 16), seed=9)
    return {"loop.jpg": "symlink_loop"}


def _fifo(folder: Path) -> dict[str, str]:
    os.mkfifo(folder / "fifo.jpg")
    return {"fifo.jpg": "not_a_regular_file"}


def _dangling(folder: Path) -> dict[str, str]:
    os.symlink("gone.jpg", folder / "dangling.jpg")
    return {"dangling.jpg": "missing"}


def _dev_zero(folder: Path) -> dict[str, str]:
    os.symlink("/dev/zero", folder / "x.jpg")
    return {"x.jpg": "not_a_regular_file"}


def _sparse(folder: Path) -> dict[str, str]:
    with open(folder / "huge.jpg", "wb") as handle:
        handle.truncate(6 << 30)  # sparse: costs no disk
    return {"huge.jpg": "too_large_file"}


@pytest.mark.parametrize("make_bad", [_self_loop, _fifo, _dangling, _dev_zero, _sparse])
def test_bad_entry_in_a_folder_is_a_ledger_entry_and_its_shard_commits(tmp_path, make_bad):
    images = tmp_path / "images"
    good = make_image_folder(images, GOOD, size=(24, 16))
    expected = make_bad(images)
    good += [f"sub/{path.name}" for path in (images / "sub").glob("*.png")]  # _self_loop's image in sub/
    _assert_only_bad_entries_failed(tmp_path / "run", _run(images, tmp_path / "run"), good, expected)


@pytest.mark.parametrize(
    ("line", "reason"),
    [("fifo.jpg", "not_a_regular_file"), ("/dev/zero", "not_a_regular_file"), ("gone.jpg", "missing")],
)
def test_bad_entry_in_a_list_file_is_a_ledger_entry_and_the_run_finishes(tmp_path, line, reason):
    images = tmp_path / "images"
    good = make_image_folder(images, GOOD, size=(24, 16))
    os.mkfifo(images / "fifo.jpg")
    listing = images / "list.txt"
    listing.write_text("\n".join([*good, line]) + "\n")
    _assert_only_bad_entries_failed(tmp_path / "run", _run(listing, tmp_path / "run"), good, {line: reason})


def test_list_file_with_a_non_utf8_line_labels_that_file_too(tmp_path):
    images = tmp_path / "images"
    good = make_image_folder(images, GOOD, size=(24, 16))
    shutil.copy(images / good[0], os.fsencode(images) + b"/" + BAD_NAME)
    listing = images / "list.txt"
    listing.write_bytes(b"\n".join([name.encode() for name in good] + [BAD_NAME]) + b"\n")
    _assert_only_bad_entries_failed(tmp_path / "run", _run(listing, tmp_path / "run"), [*good, BAD_ID], {})


# -- item 7: a non-UTF-8 file name, end to end ---------------------------------------------------------
@pytest.fixture(scope="module")
def odd_name_run(tmp_path_factory, coco128_images):
    """16 coco128 images (symlinks) in one folder, one of them under a name that is not UTF-8."""
    root = tmp_path_factory.mktemp("odd-name")
    images = root / "images"
    images.mkdir()
    names = sorted(os.listdir(coco128_images))[:15]
    for name in names:
        os.symlink(coco128_images / name, images / name)
    shutil.copy(coco128_images / names[0], os.fsencode(images) + b"/" + BAD_NAME)
    done = _run(images, root / "run")
    return root, done, [*names, BAD_ID]


def test_non_utf8_file_name_is_labelled_and_its_shard_commits(odd_name_run):
    root, done, ids = odd_name_run
    _assert_only_bad_entries_failed(root / "run", done, ids, {})
    assert run_status(root / "run")["shards"]["total"] == 2
    row = _rows(root / "run")[BAD_ID]
    assert os.fsencode(row["image"]["uri"]) == os.fsencode(root / "images") + b"/" + BAD_NAME
    assert row["image"]["width"] == 640 and len(row["instances"]["masks_rle"]) > 0
    again = _run(root / "images", root / "run")  # the resume finds every shard done
    assert again.returncode == 0 and "0 shards run, 2 already done" in again.stderr


def test_non_utf8_file_name_exports_to_coco(odd_name_run):
    root, done, ids = odd_name_run
    assert done.returncode == 0, done.stderr
    exported = _labelgen("export", str(root / "run"), "--format", "coco", "--out", str(root / "coco"))
    assert exported.returncode == 0, exported.stderr
    coco = json.loads((root / "coco" / "annotations.json").read_text(encoding="utf-8"))
    assert sorted(image["file_name"] for image in coco["images"]) == sorted(ids)


def test_non_utf8_file_name_exports_to_yolo_under_the_same_bytes(odd_name_run):
    root, done, _ = odd_name_run
    assert done.returncode == 0, done.stderr
    exported = _labelgen("export", str(root / "run"), "--format", "yolo", "--out", str(root / "yolo"))
    assert exported.returncode == 0, exported.stderr
    link = os.fsencode(root / "yolo" / "images" / "train") + b"/" + BAD_NAME
    assert os.readlink(link) == os.fsencode(root / "images") + b"/" + BAD_NAME
    assert os.path.isfile(os.fsencode(root / "yolo" / "labels" / "train") + b"/bad\xff\xfename.txt")


# -- item 13: an empty image folder ----------------------------------------------------------------------
def test_empty_image_folder_is_a_clear_error_and_no_run(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "notes.txt").write_text("not an image")
    done = _run(images, tmp_path / "run")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("labelgen: error: no images found in folder") and str(images) in done.stderr
    assert not (tmp_path / "run").exists()  # nothing is written: the corrected command starts afresh


def test_an_unexpected_decode_error_fails_that_image_only(tmp_path, monkeypatch):
    """Whatever escapes the decoder (a MemoryError, a bug) is a failed row, not a lost shard."""
    from labelgen.engine import pipeline
    from labelgen.config import ImagesConfig
    from labelgen.structures.instances import ImageRecord
    from labelgen.testing import FakeConfig, FakeGenerator

    names = make_image_folder(tmp_path, 3, size=(24, 16))
    real = pipeline.read_image_rgb

    def flaky(uri, **options):
        if uri.endswith(names[1]):
            raise MemoryError("simulated")
        return real(uri, **options)

    monkeypatch.setattr(pipeline, "read_image_rgb", flaky)
    records = [ImageRecord(name, str(tmp_path / name)) for name in names]
    rows = pipeline.label_images(FakeGenerator(FakeConfig()), records, ImagesConfig())
    assert [row["status"] for row in rows] == ["ok", "failed", "ok"]
    assert rows[1]["failure"]["reason"] == "unreadable" and "MemoryError: simulated" in rows[1]["failure"]["message"]


def test_non_utf8_file_name_is_skipped_by_fiftyone_export_not_fatal(odd_name_run, dataset_name, caplog):
    """BSON strings must be UTF-8: the one image FiftyOne cannot hold is named and counted; the rest export."""
    from labelgen.exports.fiftyone import export_fiftyone
    from labelgen.exports.source import open_export_source

    root, done, ids = odd_name_run
    assert done.returncode == 0, done.stderr
    report = export_fiftyone(open_export_source(root / "run"), dataset_name)
    assert report.skipped_unencodable == 1 and report.images == len(ids) - 1
    assert ascii(BAD_ID) in caplog.text and "not UTF-8" in caplog.text
