"""Issue 11 hardening of exports and the generic atomic writer (real symlinks, real processes, real limits).

* planted symlinks at the temp names of an export or of ``atomic_file`` never make labelgen write outside;
* a killed COCO export's temp parts are removed by the next export;
* two YOLO exports into one ``--out`` cannot interleave: the second is refused at once, naming the holder;
* a COCO export that hits the file size limit (``RLIMIT_FSIZE``) is one ``labelgen: error:`` line, exit 2;
* exporting or filtering a run with pending / failed shards warns and records it;
* ``filter --save`` prints its counts; a per-class threshold on a class-agnostic run is an error.
"""
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from conftest import REPO, make_recipe
from labelgen.atomic import remove_stale_temps, write_json_atomic
from labelgen.cli import main
from labelgen.exports.coco import export_coco
from labelgen.exports.fiftyone import MaskWriter
from labelgen.exports.source import open_export_source
from labelgen.exports.yolo import export_yolo
from labelgen.structures.instances import Instances
from labelgen.engine.runner import run
from labelgen.engine.sources import FolderSource
from labelgen.store.run_store import RunStore

PRECIOUS = "precious data outside the export folder\n"


@pytest.fixture
def fake_run(tmp_path, image_dir):
    """A complete fake run of 10 images in 3 shards (4, 4, 2), class-agnostic."""
    root = tmp_path / "run"
    run(make_recipe(), FolderSource(image_dir), root)
    return root


@pytest.fixture
def partial_run(fake_run):
    """``fake_run`` with shard 1 failed (error record, no done record) and shard 2 pending."""
    store = RunStore(fake_run)
    store.shard_done(1).unlink()
    store.record_shard_error(1, {"error": "RuntimeError", "message": "boom"})
    store.shard_done(2).unlink()
    return fake_run


def _outside(tmp_path, name):
    target = tmp_path / "outside" / name
    target.parent.mkdir(exist_ok=True)
    target.write_text(PRECIOUS)
    return target


def _plant(folder, name, target):
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(target, folder / name)


# -- item 2: planted symlinks ---------------------------------------------------------------------
@pytest.mark.parametrize("names", [("annotations.json.tmp-{pid}", "export_report.json.tmp-{pid}"),  # truncated today
                                   ("annotations.json.images.tmp-{pid}", "annotations.json.anns.tmp-{pid}")])
def test_symlinks_at_coco_temp_names_never_write_outside(tmp_path, fake_run, names):
    out, pid = tmp_path / "coco", os.getpid()
    victims = {}
    for name in (n.format(pid=pid) for n in names):
        victims[name] = _outside(tmp_path, name)
        _plant(out, name, victims[name])
    report = export_coco(open_export_source(fake_run), out)
    for victim in victims.values():
        assert victim.read_text() == PRECIOUS
    assert not (out / "annotations.json").is_symlink() and report.images == 10
    coco = COCO(str(out / "annotations.json"))
    assert len(coco.getImgIds()) == 10 and len(coco.getAnnIds()) == report.annotations
    assert json.loads((out / "export_report.json").read_text())["images"] == 10


def test_symlinks_at_yolo_temp_names_never_write_outside(tmp_path, fake_run):
    out, pid = tmp_path / "yolo", os.getpid()
    victims = {}
    for name in (f"data.yaml.tmp-{pid}", f"export_report.json.tmp-{pid}"):
        victims[name] = _outside(tmp_path, name)
        _plant(out, name, victims[name])
    outside_dir = tmp_path / "outside-dir"
    (outside_dir / "keep").mkdir(parents=True)
    (outside_dir / "keep" / "file.txt").write_text(PRECIOUS)
    for kind in ("labels", "confidence", "images"):  # staging and swap names of every folder
        _plant(out / kind, f".train.staging-{pid}", outside_dir)
        _plant(out / kind, f".train.old-{pid}", outside_dir)
    report = export_yolo(open_export_source(fake_run), out)
    for victim in victims.values():
        assert victim.read_text() == PRECIOUS
    assert (outside_dir / "keep" / "file.txt").read_text() == PRECIOUS
    assert sorted(os.listdir(outside_dir)) == ["keep"]
    assert report.label_files == 10 and len(list((out / "labels" / "train").rglob("*.txt"))) == 10
    assert "nc" in (out / "data.yaml").read_text() and not (out / "data.yaml").is_symlink()


def test_atomic_writer_never_follows_a_planted_temp_symlink(tmp_path):
    folder = tmp_path / "store"
    victim = _outside(tmp_path, "victim.json")
    _plant(folder, f"record.json.tmp-{os.getpid()}", victim)
    write_json_atomic(folder / "record.json", {"ok": 1}, "test record")
    assert victim.read_text() == PRECIOUS
    assert json.loads((folder / "record.json").read_text()) == {"ok": 1}
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name and not p.is_symlink()]


def test_remove_stale_temps_unlinks_files_and_links_only(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    victim = _outside(tmp_path, "victim.txt")
    (folder / "a.json.tmp-1").write_text("stale")
    _plant(folder, "b.json.tmp-2", victim)
    (folder / "c.tmp-3").mkdir()  # not a temp file: left alone, not counted
    (folder / "c.tmp-3" / "inner.txt").write_text("keep")
    assert remove_stale_temps(folder) == 2
    assert sorted(os.listdir(folder)) == ["c.tmp-3"] and (folder / "c.tmp-3" / "inner.txt").read_text() == "keep"
    assert victim.read_text() == PRECIOUS


def test_fiftyone_mask_files_never_follow_a_planted_temp_symlink(tmp_path):
    masks = np.zeros((1, 24, 32), bool)
    masks[0, 2:20, 3:30] = True
    instances = Instances.from_masks(masks, scores={"confidence": np.array([0.5], np.float32)})
    root = tmp_path / "masks"
    victim = _outside(tmp_path, "mask-victim.png")
    _plant(root / "img", f"0.png.tmp-{os.getpid()}", victim)
    detection = types.SimpleNamespace()
    MaskWriter(root, large_pixels=0).attach(detection, instances, 0, "img/0.png")
    assert victim.read_bytes() == PRECIOUS.encode()
    assert Path(detection.mask_path).read_bytes()[:4] == b"\x89PNG"


# -- item 6: killed exports, concurrent exports, incomplete runs ----------------------------------
_BLOCKING_EXPORT = textwrap.dedent("""
    # `labelgen export ...` that stops after its 3rd image until GO exists (or forever): a real export
    # process caught mid-way, holding whatever an export holds at that point.
    import os, sys, time
    from labelgen.exports import source
    ready, go = sys.argv[1], sys.argv[2]
    original = source.ExportSource.__iter__
    def paused(self):
        for number, item in enumerate(original(self)):
            yield item
            if number == 2:
                open(ready, "w").close()
                while not os.path.exists(go):
                    time.sleep(0.05)
    source.ExportSource.__iter__ = paused
    from labelgen.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def _start_paused_export(tmp_path, args):
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKING_EXPORT, str(ready), str(go), "export", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the export never reached its 3rd image: rc {proc.returncode}\n{out}\n{err}")
        time.sleep(0.05)
    return proc, go


def test_sigkilled_coco_export_leaves_parts_that_the_next_export_removes(tmp_path, fake_run):
    out = tmp_path / "coco"
    proc, _ = _start_paused_export(tmp_path, [str(fake_run), "--format", "coco", "--out", str(out)])
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert any(name.startswith("annotations.json.images") for name in leftovers), leftovers
    assert any(name.startswith("annotations.json.anns") for name in leftovers), leftovers
    report = export_coco(open_export_source(fake_run), out)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert report.stale_temps_removed == len(leftovers)
    assert json.loads((out / "export_report.json").read_text())["stale_temps_removed"] == len(leftovers)
    assert len(COCO(str(out / "annotations.json")).getImgIds()) == 10


def test_stale_parts_of_a_dead_writer_are_removed_and_foreign_files_kept(tmp_path, fake_run):
    out = tmp_path / "coco"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that has exited
    for name in (f"annotations.json.images.tmp-{dead}", f"annotations.json.anns.tmp-{dead}",
                 f"annotations.json.tmp-{dead}", f"export_report.json.tmp-{dead}"):
        (out / name).write_bytes(b"x" * 100_000)
    (out / "notes.tmp-1.txt").write_text("the user's file")  # not one of the export's temp names
    report = export_coco(open_export_source(fake_run), out)
    assert report.stale_temps_removed == 4
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json", "export_report.json", "notes.tmp-1.txt"]


def test_second_yolo_export_into_the_same_out_is_refused_naming_the_holder(tmp_path, fake_run, capsys):
    out = tmp_path / "yolo"
    args = [str(fake_run), "--format", "yolo", "--out", str(out)]
    first, go = _start_paused_export(tmp_path, args)
    try:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("labelgen: error:") and f"pid {first.pid}" in err and str(out) in err
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert json.loads(stdout)["label_files"] == 10
    labels = sorted(p.name for p in (out / "labels" / "train").rglob("*.txt"))
    assert len(labels) == 10 and len(list((out / "images" / "train").iterdir())) == 10
    assert not [p for kind in ("labels", "confidence", "images") for p in (out / kind).iterdir()
                if p.name.startswith(".")]
    assert main(["export", *args]) == 0  # the lock is released with the process


def _incomplete(report_path):
    return json.loads(Path(report_path).read_text())["incomplete"]


@pytest.mark.parametrize("fmt", ["coco", "yolo"])
def test_export_of_an_incomplete_run_warns_and_records_it(tmp_path, partial_run, fmt, caplog):
    out = tmp_path / fmt
    caplog.set_level(logging.WARNING)
    exporter = export_coco if fmt == "coco" else export_yolo
    report = exporter(open_export_source(partial_run), out)
    expected = {"pending_shards": 1, "failed_shards": 1, "images_not_exported": 6}
    assert report.incomplete == expected and _incomplete(out / "export_report.json") == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 pending" in warnings[0] and "1 failed" in warnings[0] and "6 images" in warnings[0]


def test_export_of_a_complete_run_records_no_gap(tmp_path, fake_run, caplog):
    caplog.set_level(logging.WARNING)
    report = export_coco(open_export_source(fake_run), tmp_path / "coco")
    assert report.incomplete is None and _incomplete(tmp_path / "coco" / "export_report.json") is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def _cli(*args, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "labelgen.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec_fn)


def test_filter_and_export_of_an_interrupted_run_print_one_warning_line(tmp_path, partial_run):
    for args in (["filter", str(partial_run)], ["export", str(partial_run), "--format", "coco", "--out",
                                                  str(tmp_path / "coco")]):
        proc = _cli(*args)
        assert proc.returncode == 0, proc.stderr
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
        assert len(warnings) == 1, proc.stderr
        assert "1 pending" in warnings[0] and "1 failed" in warnings[0] and "labelgen run" in warnings[0]


def test_filter_save_prints_counts_and_records_the_gap(tmp_path, partial_run, capsys):
    assert main(["filter", str(partial_run), "--save", "strict", "--min-confidence", "0.5"]) == 0
    out = capsys.readouterr().out.strip()
    summary = json.loads((partial_run / "filtered" / "strict" / "summary.json").read_text())
    kept, total = summary["total"]["kept"], summary["total"]["total"]
    assert len(out.splitlines()) == 1 and str(partial_run / "filtered" / "strict") in out
    assert f"{kept} of {total} labels kept" in out and "4 images" in out
    assert summary["incomplete"] == {"pending_shards": 1, "failed_shards": 1, "images_not_filtered": 6}


@pytest.mark.parametrize("command", [["filter"], ["filter", "--save", "x"], ["export", "--format", "coco"]])
def test_per_class_threshold_on_a_class_agnostic_run_is_an_error(tmp_path, fake_run, command, capsys):
    args = [command[0], str(fake_run), *command[1:], "--set", "min_confidence_per_class.0=0.9"]
    if command[0] == "export":
        args += ["--out", str(tmp_path / "coco")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("labelgen: error:") and "class-agnostic" in err and "min_confidence" in err
    assert not (fake_run / "filtered").exists() or not list((fake_run / "filtered").iterdir())
    assert not (tmp_path / "coco" / "annotations.json").exists()


# -- item 9: a full disk during a COCO export -----------------------------------------------------
def _file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill; kept across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_coco_export_hitting_the_file_size_limit_is_one_error_line(tmp_path, fake_run):
    out = tmp_path / "coco"
    export_coco(open_export_source(fake_run), out)
    before = (out / "annotations.json").read_bytes()
    assert len(before) > 4000
    proc = _cli("export", str(fake_run), "--format", "coco", "--out", str(out), preexec_fn=_file_size_limit(2000))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("labelgen: error:"), proc.stderr
    assert "file size limit" in errors[0] and "rerun" in errors[0]
    assert (out / "annotations.json").read_bytes() == before  # the previous export is intact
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
