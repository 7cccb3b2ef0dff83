"""Review round trip: export to FiftyOne, review the way the App does (tags, edits, added labels),
pull into RUN_DIR/reviewed/NAME, export that. And the App itself, in headless Chromium."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, make_recipe
from labelgen.errors import ConfigError, ExportError
from labelgen.exports.fiftyone import FIELD, export_fiftyone
from labelgen.exports.source import open_export_source
from labelgen.postprocess.filter_config import FilterConfig
from labelgen.postprocess.filter_store import save_filtered
from labelgen.structures.masks import rles_to_masks
from labelgen.review.review import pull_review
from labelgen.engine.runner import run
from labelgen.engine.sources import FolderSource
from labelgen.store.run_store import RunStore
from labelgen.testing import write_synthetic_run

CLASSES = ["cat", "dog", "bird"]  # the fake generator's band i gets class i % 3
CHROMIUM = Path("/usr/bin/chromium")
DATASETS_RECORD = Path("fiftyone") / "datasets.json"  # in the run directory: where a run was reviewed



@pytest.fixture
def exported(tmp_path, image_dir, dataset_name, fiftyone_db):
    """A fake run (10 images x 3 labels) exported; returns (run_dir, dataset, samples by image id)."""
    root = tmp_path / "run"
    run(make_recipe(class_names=CLASSES), FolderSource(image_dir), root)
    export_fiftyone(open_export_source(root), dataset_name)
    dataset = fiftyone_db.load_dataset(dataset_name)
    return root, dataset, {s["labelgen_image_id"]: s for s in dataset}


def reviewed_items(root, name="reviewed"):
    return {item.image.image_id: item.instances for item in open_export_source(root, reviewed=name)}


def test_review_round_trip_rejects_edits_and_additions(exported, fiftyone_db):
    fo = fiftyone_db
    root, dataset, samples = exported
    original = {item.image.image_id: item.instances for item in open_export_source(root)}
    # what a reviewer does in the App, through the same API
    samples["img_00000.png"][FIELD].detections[1].tags.append("rejected")
    samples["img_00001.png"].tags.append("rejected")
    samples["img_00002.png"].tags.append("approved")
    samples["img_00003.png"][FIELD].detections[0].label = "bird"
    box = samples["img_00004.png"][FIELD].detections[2]
    x, y, w, h = box.bounding_box
    box.bounding_box = [x, y, w / 2, h / 2]
    drawn = np.zeros((6, 8), dtype=bool)
    drawn[1:4, 2:7] = True
    samples["img_00005.png"][FIELD].detections += [
        fo.Detection(label="dog", bounding_box=[0.25, 0.25, 0.5, 0.5]),
        fo.Detection(label="cat", bounding_box=[0.0, 0.0, 8 / 32, 6 / 24], mask=drawn)]
    del samples["img_00006.png"][FIELD].detections[0]
    samples["img_00007.png"][FIELD].detections[1].tags.append("approved")
    samples["img_00007.png"][FIELD].detections[2].tags += ["approved", "rejected"]
    for sample in samples.values():
        sample.save()

    report = pull_review(root, dataset.name)
    assert (report.images, report.shards, report.images_approved, report.images_rejected) == (10, 3, 1, 1)
    assert (report.rejected, report.edited, report.added, report.approved) == (1 + 3 + 1 + 1, 2, 2, 3 + 1)
    assert report.untouched == 30 - 6 - 2 - 4
    items = reviewed_items(root)
    assert list(items) == sorted(original)  # every image, plan order
    assert _same(items["img_00000.png"], original["img_00000.png"], [0, 2])
    assert len(items["img_00001.png"]) == 0  # the image stays, without labels
    assert list(items["img_00002.png"].attributes["review"]) == ["approved"] * 3
    edited = items["img_00003.png"]
    assert edited.class_ids.tolist() == [2, 1, 2] and edited.attributes["review"][0] == "edited"
    _check_clipped_box(items["img_00004.png"], original["img_00004.png"], [x, y, w / 2, h / 2])
    _check_added(items["img_00005.png"], original["img_00005.png"], drawn)
    assert _same(items["img_00006.png"], original["img_00006.png"], [1, 2])
    assert list(items["img_00007.png"].attributes["review"]) == [None, "approved"]
    for image_id in ("img_00008.png", "img_00009.png"):
        assert _same(items[image_id], original[image_id], [0, 1, 2])
    rows = {r["image"]["image_id"]: r for r in _rows(root / "reviewed" / "reviewed")}
    assert rows["img_00001.png"]["rejected"] == [{"index": i, "reason": "image_rejected_in_review"} for i in range(3)]
    assert rows["img_00006.png"]["rejected"] == [{"index": 0, "reason": "deleted_in_review"}]
    assert rows["img_00005.png"]["source_indices"] == [0, 1, 2, None, None]
    assert (root / "reviewed" / "reviewed" / "review.yaml").is_file()
    _export_coco_if_available(root, tmp_path=root.parent, expected=30 - 6 + 2)


def _same(reviewed, original, indices):
    """The reviewed instances are exactly ``original[indices]`` (review column aside)."""
    expected = original[np.asarray(indices, dtype=np.int64)]
    got = reviewed.to_dict()
    got["attributes"].pop("review")
    return got == expected.to_dict()


def _check_clipped_box(reviewed, original, box_xywh):
    x, y, w, h = box_xywh
    new_box = [x * 32, y * 24, (x + w) * 32, (y + h) * 24]
    assert reviewed.boxes_xyxy[2].tolist() == pytest.approx(new_box, abs=1e-4)
    assert reviewed.attributes["review"] == (None, None, "edited")
    old_mask = rles_to_masks(original.masks_rle[2:], 24, 32)[0]
    c0, r0, c1, r1 = int(np.floor(new_box[0])), int(np.floor(new_box[1])), int(np.ceil(new_box[2])), \
        int(np.ceil(new_box[3]))
    expected = np.zeros_like(old_mask)
    expected[r0:r1, c0:c1] = old_mask[r0:r1, c0:c1]
    assert np.array_equal(rles_to_masks(reviewed.masks_rle[2:], 24, 32)[0], expected)


def _check_added(reviewed, original, drawn):
    assert len(reviewed) == 5 and reviewed.class_ids.tolist()[3:] == [1, 0]
    assert reviewed.attributes["review"][3:] == ("added", "added")
    assert reviewed.scores["confidence"][3:].tolist() == [1.0, 1.0]
    masks = rles_to_masks(reviewed.masks_rle[3:], 24, 32)
    filled = np.zeros((24, 32), dtype=bool)
    filled[6:18, 8:24] = True
    assert np.array_equal(masks[0], filled) and reviewed.boxes_xyxy[3].tolist() == [8, 6, 24, 18]
    placed = np.zeros((24, 32), dtype=bool)
    placed[:6, :8] = drawn
    assert np.array_equal(masks[1], placed)
    assert _same(reviewed[[0, 1, 2]], original, [0, 1, 2])


def _rows(folder):
    from labelgen.atomic import read_jsonl_gz

    for path in sorted(Path(folder).glob("*.jsonl.gz")):
        yield from read_jsonl_gz(path)


def _export_coco_if_available(root, tmp_path, expected):
    if importlib.util.find_spec("labelgen.exports.coco") is None:
        return  # the COCO exporter is not written yet
    from labelgen.exports.coco import export_coco

    out = tmp_path / "coco"
    export_coco(open_export_source(root, reviewed="reviewed"), out)
    coco = json.loads((out / "annotations.json").read_text())
    assert len(coco["annotations"]) == expected and len(coco["images"]) == 10
    assert sum(a["attributes"]["instance"].get("review") == "added" for a in coco["annotations"]) == 2


def test_reviewed_copy_exports_back_to_fiftyone(exported, fiftyone_db):
    root, dataset, samples = exported
    samples["img_00002.png"][FIELD].detections.append(fiftyone_db.Detection(label="cat", bounding_box=[0, 0, .5, .5]))
    samples["img_00002.png"].save()
    pull_review(root, dataset.name, name="round1")
    report = export_fiftyone(open_export_source(root, reviewed="round1"), dataset.name)
    assert report.samples_updated == 10 and report.labels == 31
    sample = dataset.match(fiftyone_db.ViewField("labelgen_image_id") == "img_00002.png").first()
    assert [d["labelgen_index"] for d in sample[FIELD].detections] == [0, 1, 2, None]
    assert sample[FIELD].detections[3]["review"] == "added"
    report = pull_review(root, dataset.name, name="round2")  # a review of a reviewed copy keeps its additions
    assert report.added == 0 and report.untouched == 31
    assert reviewed_items(root, "round2")["img_00002.png"].attributes["review"][3] == "added"


def test_unknown_class_names_the_sample(exported):
    root, dataset, samples = exported
    samples["img_00003.png"][FIELD].detections[0].label = "zebra"
    samples["img_00003.png"].save()
    with pytest.raises(ExportError, match=r"img_00003\.png.*'zebra' is not a class"):
        pull_review(root, dataset.name)
    assert not (root / "reviewed" / "reviewed").exists()


def test_review_of_a_filtered_copy_keeps_the_filter_rejections(tmp_path, dataset_name, fiftyone_db):
    root = tmp_path / "run"
    write_synthetic_run(root, images=4, per_image=9, width=48, height=40, shard_size=4, class_names=("a", "b"))
    save_filtered(RunStore(root), FilterConfig(nms_ios=0.8, nms_iou=0.5), "dedup", ["a", "b"])
    export_fiftyone(open_export_source(root, filtered="dedup"), dataset_name)
    sample = fiftyone_db.load_dataset(dataset_name).first()
    rejected_index = sample[FIELD].detections[0]["labelgen_index"]
    sample[FIELD].detections[0].tags.append("rejected")
    sample.save()
    pull_review(root, dataset_name)
    filtered = {r["image"]["image_id"]: r for r in _rows(root / "filtered" / "dedup")}
    for row in _rows(root / "reviewed" / "reviewed"):
        expected = filtered[row["image"]["image_id"]]["rejected"]
        if row["image"]["image_id"] == sample["labelgen_image_id"]:
            expected = sorted(expected + [{"index": rejected_index, "reason": "rejected_in_review"}],
                              key=lambda r: r["index"])
        assert row["rejected"] == expected
        assert len(row["source_indices"]) == len(row["instances"]["masks_rle"])


# -- the App in a browser -----------------------------------------------------------------------
APP_SCRIPT = """
import sys
from pathlib import Path
from labelgen.review.review import launch_review  # exports again (an update in place), then fo.launch_app(remote=True)
review = launch_review(sys.argv[1], sys.argv[2], port=int(sys.argv[3]), address="127.0.0.1", wait=False)
Path(sys.argv[4]).write_text(review.url)
review.session.wait(-1)  # until killed: a closed browser tab must not stop the server between the two visits
"""


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_http(url, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the App did not answer {url} within {seconds} s")


def _wait_for_text(path, seconds):
    deadline = time.monotonic() + seconds
    while not (path.is_file() and path.read_text()):
        assert time.monotonic() < deadline, f"launch_review did not return within {seconds} s"
        time.sleep(0.5)
    return path.read_text()


def _chromium(url, profile, *extra):
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
               "--window-size=1400,900", "--virtual-time-budget=15000", *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_app_renders_the_exported_samples_in_headless_chromium(exported, tmp_path):
    from PIL import Image

    root, dataset, _ = exported
    port, url_file = _free_port(), tmp_path / "url.txt"
    artifacts = Path(os.environ.get("LABELGEN_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    app = subprocess.Popen([sys.executable, "-c", APP_SCRIPT, str(root), dataset.name, str(port), str(url_file)],
                           cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_http(f"http://127.0.0.1:{port}/", 120)
        url = _wait_for_text(url_file, 60)
        assert url == f"http://127.0.0.1:{port}/datasets/{dataset.name}"
        shot = artifacts / "fiftyone_app.png"
        _chromium(url, tmp_path / "profile1", f"--screenshot={shot}")
        dom = _chromium(url, tmp_path / "profile2", "--dump-dom").stdout
        (artifacts / "fiftyone_app.html").write_text(dom)
        assert dataset.name in dom and "labelgen_suppressed" in dom  # the dataset and its label fields
        assert dom.count('data-cy="looker"') == len(dataset), "expected one grid thumbnail per sample"
        with Image.open(shot) as image:
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 200, "the screenshot is (nearly) blank"
    finally:
        os.killpg(app.pid, signal.SIGTERM)  # the App script and the server it started
        try:
            app.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)
            app.wait()


# -- which dataset `pull` reads when it is given none -------------------------------------------------
@pytest.fixture
def other_dataset(fiftyone_db):
    name = f"labelgen-test-{uuid.uuid4().hex[:10]}"
    yield name
    if fiftyone_db.dataset_exists(name):
        fiftyone_db.delete_dataset(name)


def _fake_run(tmp_path, image_dir):
    root = tmp_path / "run"
    run(make_recipe(class_names=CLASSES), FolderSource(image_dir), root)
    return root


def _cli(*argv):
    from labelgen.cli import main

    return main([str(a) for a in argv])


def test_pull_without_dataset_reads_the_dataset_the_run_was_reviewed_in(tmp_path, image_dir, dataset_name, capsys):
    root = _fake_run(tmp_path, image_dir)
    export_fiftyone(open_export_source(root), dataset_name)  # what `labelgen review RUN --dataset NAME` does
    record = json.loads((root / DATASETS_RECORD).read_text())
    assert record["datasets"] == [dataset_name] and record["run_id"] == RunStore(root).manifest()["run_id"]
    assert _cli("pull", root) == 0  # no --dataset: not labelgen-RUN_ID, which does not exist
    assert f"FiftyOne dataset {dataset_name!r}" in capsys.readouterr().err
    assert json.loads((root / "reviewed" / "reviewed" / "summary.json").read_text())["dataset"] == dataset_name


def test_pull_without_dataset_lists_the_runs_datasets_when_there_are_several(tmp_path, image_dir, dataset_name,
                                                                           other_dataset, capsys):
    root = _fake_run(tmp_path, image_dir)
    for name in (dataset_name, other_dataset):
        export_fiftyone(open_export_source(root), name)
    with pytest.raises(ConfigError, match=rf"in 2 FiftyOne datasets: '{dataset_name}', '{other_dataset}'.*--dataset"):
        pull_review(root)
    assert _cli("pull", root) == 2
    err = capsys.readouterr().err
    assert err.startswith("labelgen: error:") and dataset_name in err and other_dataset in err
    assert not (root / "reviewed").exists()
    assert pull_review(root, other_dataset).dataset == other_dataset  # naming one works


def test_pull_finds_a_dataset_exported_before_datasets_were_recorded(tmp_path, image_dir, dataset_name,
                                                                     other_dataset, fiftyone_db):
    root = _fake_run(tmp_path, image_dir)
    export_fiftyone(open_export_source(root), dataset_name)
    (root / DATASETS_RECORD).unlink()
    elsewhere = _fake_run(tmp_path / "b", image_dir)  # another run's dataset is not this run's
    export_fiftyone(open_export_source(elsewhere), other_dataset)
    assert pull_review(root).dataset == dataset_name


def test_pull_of_a_missing_dataset_names_the_runs_datasets(tmp_path, image_dir, dataset_name):
    root = _fake_run(tmp_path, image_dir)
    with pytest.raises(ExportError, match=r"no FiftyOne dataset holds run .*labelgen review"):
        pull_review(root)
    export_fiftyone(open_export_source(root), dataset_name)
    with pytest.raises(ExportError, match=rf"no FiftyOne dataset 'typo'; this run's datasets: '{dataset_name}'"):
        pull_review(root, "typo")


# -- `labelgen review`: what it prints, how long it serves, where it listens --------------------------
def _open_and_close_a_tab(port, dataset):
    """What a browser tab of the App does: subscribe to the server's events as an App, take the first
    event, then go away (the server then tells the session that its last tab closed)."""
    import http.client

    body = json.dumps({"initializer": {"dataset": dataset}, "events": ["state_update"],
                       "subscription": uuid.uuid4().hex})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/events", body=body, headers={"Content-Type": "application/json",
                                                        "Accept": "text/event-stream"})
    response = conn.getresponse()
    assert response.status == 200, response.status
    assert response.fp.readline()  # the first event line: the server counts this tab as an App
    conn.sock.shutdown(socket.SHUT_RDWR)  # the tab is closed: the connection goes away at once
    response.close()
    conn.close()


def _read_lines(stream, lines):
    for line in stream:
        lines.append(line.rstrip("\n"))


@pytest.mark.slow
def test_review_prints_once_url_last_serves_until_ctrl_c_on_loopback(exported, tmp_path):
    from test_network_binding import listening_sockets, not_on_loopback, session_processes

    root, dataset, _ = exported
    port, lines = _free_port(), []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = subprocess.Popen([sys.executable, "-m", "labelgen.cli", "review", str(root), "--dataset", dataset.name,
                            "--port", str(port)], cwd=REPO, env=env, start_new_session=True, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = threading.Thread(target=_read_lines, args=(cli.stdout, lines), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}/datasets/{dataset.name}"
    try:
        deadline = time.monotonic() + 180
        while not any(url in line for line in lines):
            assert cli.poll() is None and time.monotonic() < deadline, "\n".join(lines)
            time.sleep(0.2)
        before_url = [line for line in lines[:next(i for i, line in enumerate(lines) if url in line)] if line.strip()]
        assert len(before_url) == len(set(before_url)), "lines printed twice:\n" + "\n".join(lines)
        _wait_for_http(f"http://127.0.0.1:{port}/", 60)
        sockets = listening_sockets(session_processes(cli.pid))  # the App server (and mongod, if it started one)
        assert any(s[3] == port for s in sockets), sockets
        assert not not_on_loopback(sockets), f"reachable from the network: {not_on_loopback(sockets)}"

        _open_and_close_a_tab(port, dataset.name)  # FiftyOne's own wait() returns ~3 s after this
        deadline = time.monotonic() + 15
        while cli.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cli.poll() is None, "review stopped serving when the last tab closed:\n" + "\n".join(lines)
        _wait_for_http(f"http://127.0.0.1:{port}/", 30)

        os.killpg(cli.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert cli.wait(timeout=60) == 0, "\n".join(lines)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        reader.join(timeout=10)
    text = [line for line in lines if line.strip()]
    assert len(text) == len(set(text)), "lines printed twice:\n" + "\n".join(lines)
    at = next(i for i, line in enumerate(text) if url in line)
    assert text[at].strip() == url  # the URL on a line of its own ...
    assert [line.split(".")[0] for line in text[at + 1:]] == ["labelgen: App stopped"]  # ... the last until Ctrl-C
    assert any("until Ctrl-C" in line for line in text[:at])
    assert any(f"labelgen pull {root} --dataset {dataset.name}" in line for line in text[:at])
