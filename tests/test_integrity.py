"""Committed data is verified: damaged files are named, moved aside and redone; nothing that verifies is lost.

Each case damages one committed file of a finished run the way a bad disk or a careless edit would,
then checks what `status`, `status --verify`, `run` (resume), `filter` and `export` do with it.
"""
import gzip
import json
import shutil
from pathlib import Path

import pytest

from labelgen.cli import main
from labelgen.errors import CorruptRunError
from labelgen.store.run_store import RunStore

REPO = Path(__file__).resolve().parents[1]


def _run_args(images, out):
    return ["run", str(REPO / "recipes/fake-smoke.yaml"), "--plugin", "labelgen.testing", "--images", str(images),
            "--out", str(out), "--set", "store.shard_size=3", "--no-progress"]


def _cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _rows(root):
    """Every row of every shard named by the plan, read raw (no verification)."""
    rows = []
    for line in (root / "plan.jsonl").read_text().splitlines()[1:]:
        index = json.loads(line)["index"]
        with gzip.open(root / "shards" / f"{index:06d}.jsonl.gz", "rt") as handle:
            rows.extend(json.loads(row) for row in handle)
    return rows


@pytest.fixture
def finished(tmp_path, image_dir, capsys):
    """A finished 4-shard run (10 images, 3 per shard) and its rows."""
    out = tmp_path / "run"
    code, _, err = _cli(_run_args(image_dir, out), capsys)
    assert code == 0, err
    return out, _rows(out)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_bit_flip_in_a_shard_is_named_moved_aside_and_redone(finished, image_dir, capsys, caplog, tmp_path):
    out, reference = finished
    shard = out / "shards" / "000001.jsonl.gz"
    _flip_byte(shard, len(shard.read_bytes()) // 2)
    damaged = shard.read_bytes()

    code, stdout, _ = _cli(["status", out, "--verify"], capsys)
    assert code == 1 and "CORRUPT" in stdout and "000001.jsonl.gz" in stdout and "1 CORRUPT" in stdout

    # readers never hand out a damaged shard: a warning naming it, no zlib traceback
    code, stdout, err = _cli(["filter", out, "--min-confidence", "0"], capsys)
    assert code == 0 and "Traceback" not in err
    caplog.clear()
    code, _, err = _cli(["export", out, "--format", "coco", "--out", tmp_path / "coco"], capsys)
    assert code == 0 and "Traceback" not in err
    named = [r.getMessage() for r in caplog.records if "000001.jsonl.gz does not match" in r.getMessage()]
    assert len(named) == 1, caplog.text
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert len(coco["images"]) == 10 - 3  # the three images of the damaged shard are not exported

    caplog.clear()
    code, _, err = _cli(_run_args(image_dir, out), capsys)
    assert code == 0 and "1 shards run, 3 already done" in err and "did not verify" in err
    assert "shard 000001 does not verify" in caplog.text and "moved to" in caplog.text
    moved = list((out / "corrupt").glob("000001-*"))
    assert len(moved) == 1 and (moved[0] / "000001.jsonl.gz").read_bytes() == damaged
    assert json.loads((moved[0] / "why.json").read_text())["shard"] == 1
    assert _rows(out) == reference
    code, stdout, _ = _cli(["status", out, "--verify"], capsys)
    assert code == 0 and "all verify" in stdout


def test_edited_done_record_is_caught_without_rehashing(finished, image_dir, capsys):
    out, reference = finished
    done_path = out / "shards" / "000002.done.json"
    done = json.loads(done_path.read_text())
    done["instances"] += 1  # counts edited by hand: the record no longer matches its checksum
    done_path.write_text(json.dumps(done, indent=1))

    code, stdout, _ = _cli(["status", out], capsys)
    assert code == 1 and "000002.done.json does not match its own checksum" in stdout
    status = json.loads(_cli(["status", out, "--json"], capsys)[1])
    assert status["instances"] == sum(len(r["instances"]["masks_rle"]) for r in reference) - 9  # 3 images x 3

    code, _, err = _cli(_run_args(image_dir, out), capsys)
    assert code == 0 and "1 shards run, 3 already done" in err
    assert _rows(out) == reference
    assert json.loads(done_path.read_text())["instances"] == done["instances"] - 1


def test_edited_failure_reason_in_a_done_record_is_caught(finished, capsys):
    out, _ = finished
    done_path = out / "shards" / "000000.done.json"
    done = json.loads(done_path.read_text())
    done["failures"] = [{"image_id": "x.jpg", "uri": "/x.jpg", "reason": "truncated", "message": "edited"}]
    done_path.write_text(json.dumps(done))
    code, stdout, _ = _cli(["status", out], capsys)
    assert code == 1 and "000000.done.json" in stdout


@pytest.mark.parametrize("damage", ["truncate_at_line", "flip_uri", "flip_id", "append_line"])
def test_damaged_plan_is_refused_by_name_and_nothing_is_changed(finished, image_dir, capsys, damage):
    out, reference = finished
    plan = out / "plan.jsonl"
    lines = plan.read_text().splitlines(keepends=True)
    if damage == "truncate_at_line":
        plan.write_text("".join(lines[:-1]))  # drops the last shard's images silently, before checksums
    elif damage == "flip_uri":
        plan.write_text(lines[0] + lines[1].replace("/images/", "/imagez/", 1) + "".join(lines[2:]))
    elif damage == "flip_id":
        plan.write_text(lines[0] + lines[1].replace('["', '["x', 1) + "".join(lines[2:]))
    else:
        plan.write_text("".join(lines) + lines[-1])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}

    for args in (["status", out], ["status", out, "--verify"], _run_args(image_dir, out),
                 ["export", out, "--format", "coco", "--out", out.parent / "coco"]):
        code, stdout, err = _cli(args, capsys)
        assert code == 2, (args, stdout, err)
        assert err.startswith("labelgen: error:") and "plan.jsonl" in err and "Traceback" not in err
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


def test_flipped_fingerprint_in_run_json_is_corruption_not_different_settings(finished, image_dir, capsys):
    out, _ = finished
    manifest = json.loads((out / "run.json").read_text())
    manifest["fingerprint"] = manifest["fingerprint"][:-1] + ("0" if manifest["fingerprint"][-1] != "0" else "1")
    (out / "run.json").write_text(json.dumps(manifest, indent=1))
    code, _, err = _cli(_run_args(image_dir, out), capsys)
    assert code == 2 and "run.json does not match its own checksum" in err
    assert "different settings" not in err


def test_corrupt_config_yaml_with_changed_settings_is_one_error_line(finished, image_dir, capsys):
    out, _ = finished
    (out / "config.yaml").write_text("generator: [unclosed\n")
    code, _, err = _cli(_run_args(image_dir, out) + ["--set", "generator.instances_per_image=2"], capsys)
    assert code == 2 and err.startswith("labelgen: error:") and "config.yaml" in err and "Traceback" not in err


def test_killed_extend_is_finished_or_rolled_back(finished, image_dir, capsys, caplog):
    """--extend writes plan.jsonl.next, then run.json, then renames: a kill between the steps is repaired."""
    out, _ = finished
    store = RunStore(out)
    old_plan, old_manifest = (out / "plan.jsonl").read_bytes(), (out / "run.json").read_bytes()
    for name in ("new1.png", "new2.png"):
        shutil.copy(image_dir / sorted(p.name for p in image_dir.iterdir())[0], image_dir / name)
    code, _, err = _cli(_run_args(image_dir, out) + ["--extend"], capsys)
    assert code == 0 and "planned 2 new images" in err
    new_plan = (out / "plan.jsonl").read_bytes()

    # killed after run.json named the longer plan, before the rename: readers use .next; run finishes it
    (out / "plan.jsonl").write_bytes(old_plan)
    (out / "plan.jsonl.next").write_bytes(new_plan)
    assert sum(len(s.images) for s in store.iter_plan()) == 12
    assert _cli(_run_args(image_dir, out), capsys)[0] == 0
    assert (out / "plan.jsonl").read_bytes() == new_plan and not (out / "plan.jsonl.next").exists()

    # killed before run.json changed: the old plan stands and the stray longer one is dropped
    (out / "run.json").write_bytes(old_manifest)
    (out / "plan.jsonl").write_bytes(old_plan)
    (out / "plan.jsonl.next").write_bytes(new_plan)
    assert sum(len(s.images) for s in store.iter_plan()) == 10
    code, _, err = _cli(_run_args(image_dir, out), capsys)
    assert code == 0 and not (out / "plan.jsonl.next").exists()
    assert "2 images in the source are not in this run's plan" in caplog.text and "--extend" in caplog.text
    assert (out / "run.json").read_bytes() == old_manifest


def test_missing_shard_output_is_named_and_redone(finished, image_dir, capsys):
    out, reference = finished
    (out / "shards" / "000003.jsonl.gz").unlink()
    code, stdout, _ = _cli(["status", out], capsys)
    assert code == 1 and "000003.jsonl.gz is missing" in stdout
    assert _cli(_run_args(image_dir, out), capsys)[0] == 0
    assert _rows(out) == reference


def test_read_rows_never_returns_rows_of_a_damaged_shard(finished):
    out, _ = finished
    store = RunStore(out)
    shard = next(iter(store.iter_plan()))
    done = store.done_record(shard)
    _flip_byte(out / "shards" / "000000.jsonl.gz", 20)
    assert store.done_record(shard) is not None  # the cheap check (size) cannot see a flipped bit
    with pytest.raises(CorruptRunError, match="000000.jsonl.gz does not match the sha256"):
        store.read_rows(shard, done)
    problems = []
    rows = list(store.iter_rows(on_corrupt=lambda s, problem: problems.append(s.index)))
    assert problems == [0] and len(rows) == 7


def test_garbled_config_yaml_is_refused_even_with_the_same_settings(finished, image_dir, capsys):
    out, _ = finished
    (out / "config.yaml").write_text((out / "config.yaml").read_text() + "# edited\n")
    code, _, err = _cli(_run_args(image_dir, out), capsys)
    assert code == 2 and "config.yaml does not match the sha256 recorded in run.json" in err


def test_damaged_filtered_copy_is_named_not_exported(finished, capsys, tmp_path):
    out, _ = finished
    assert _cli(["filter", out, "--min-confidence", "0", "--save", "keep"], capsys)[0] == 0
    listing = json.loads((out / "filtered" / "keep" / "checksums.json").read_text())
    assert "000000.jsonl.gz" in listing["files"] and "summary.json" in listing["files"]
    _flip_byte(out / "filtered" / "keep" / "000002.jsonl.gz", 30)
    code, _, err = _cli(["export", out, "--filtered", "keep", "--format", "coco", "--out", tmp_path / "c"], capsys)
    assert code == 2 and "000002.jsonl.gz does not match its sha256 in checksums.json" in err
