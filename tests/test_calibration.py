"""Calibration (labelgen.review.calibration, `labelgen calibrate`, --min-precision): fits on synthetic data
with known probabilities, per-class pooling, bootstrap coverage, the JSON and plot, selection, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from labelgen.cli import main
from labelgen.errors import ConfigError
from labelgen.exports.importers import ImportedDataset, box_to_rle, write_imported_run
from labelgen.review import calibration as cal
from labelgen.review.verdicts import ImageVerdicts, LabelVerdict, verdicts_path, write_verdicts
from labelgen.store.run_store import RunStore
from labelgen.structures.instances import ImageRecord, Instances
from labelgen.structures.rows import Row


def _synthetic(rng, images, truth=lambda s, c: s ** 2, classes=1):
    """Labels per image with uniform scores; correct with probability truth(score, class)."""
    s, y, c, im = [], [], [], []
    for i in range(images):
        k = int(rng.integers(1, 10))
        sc, cl = rng.uniform(0, 1, k), rng.integers(0, classes, k)
        s.append(sc)
        y.append(rng.uniform(size=k) < truth(sc, cl))
        c.append(cl)
        im.append(np.full(k, i))
    return (np.concatenate(s)[:, None], np.concatenate(y).astype(float), np.concatenate(c),
            np.concatenate(im))


def test_pav_is_monotone_and_pools_violators():
    kx, ky = cal.pav(np.array([1, 2, 3, 4]), np.array([1.0, 0.0, 1.0, 1.0]))
    assert ky.tolist() == [0.5, 1.0] and kx.tolist() == [1.5, 3.5]
    rng = np.random.default_rng(1)
    x = rng.uniform(size=500)
    _, ky = cal.pav(x, (rng.uniform(size=500) < x).astype(float))
    assert np.all(np.diff(ky) > 0)


@pytest.mark.parametrize("method", ["isotonic", "logistic"])
def test_fit_lowers_ece_on_held_out_data(method):
    rng = np.random.default_rng(0)
    s, y, c, _ = _synthetic(rng, 300)
    fit = cal.fit_calibrator(s, y, c, method=method)
    s2, y2, c2, _ = _synthetic(rng, 300)
    p = fit.predict(s2, c2)
    assert cal.ece(p, y2) < 0.05 < cal.ece(s2[:, 0], y2)  # raw score s is not P = s^2
    order = np.argsort(s2[:, 0])
    assert np.all(np.diff(p[order]) >= -1e-12)  # monotone in the score
    assert np.abs(p - s2[:, 0] ** 2).mean() < 0.05


def test_logistic_recovers_known_coefficients():
    rng = np.random.default_rng(2)
    s = rng.uniform(0.01, 0.99, (20000, 2))
    z = -0.5 + 2.0 * cal._logit(s[:, 0]) + 0.5 * cal._logit(s[:, 1])
    y = (rng.uniform(size=len(z)) < 1 / (1 + np.exp(-z))).astype(float)
    beta = cal.fit_logistic(s, y)
    assert np.allclose(beta, [-0.5, 2.0, 0.5], atol=0.1)
    with pytest.raises(ConfigError, match="one score column"):
        cal.fit_calibrator(s, y, np.zeros(len(y), int), method="isotonic", columns=("a", "b"))


def test_rare_classes_share_the_pooled_fit():
    rng = np.random.default_rng(3)
    truth = lambda s, c: np.where(c == 0, s ** 3, np.sqrt(s))  # noqa: E731
    s, y, c, _ = _synthetic(rng, 200, truth, classes=2)
    c = np.where((c == 1) & (np.arange(len(c)) % 20 != 0), 0, c)  # class 1 becomes rare
    y = np.where(c == 0, rng.uniform(size=len(c)) < s[:, 0] ** 3, y).astype(float)
    rare = int((c == 1).sum())
    assert rare < 50
    fit = cal.fit_calibrator(s, y, c, min_class_labels=50)
    assert list(fit.per_class) == [0]
    grid = np.linspace(0.05, 0.95, 10)[:, None]
    assert np.allclose(fit.predict(grid, np.ones(10, int)), cal._predict_one(fit.pooled, grid))
    assert not np.allclose(fit.predict(grid, np.zeros(10, int)), fit.predict(grid, np.ones(10, int)))
    fit_low = cal.fit_calibrator(s, y, c, min_class_labels=rare)
    assert sorted(fit_low.per_class) == [0, 1]


def _summary(s, c):
    q = np.round(s[:, 0] * cal.GRID).astype(int)
    keys, counts = np.unique(np.column_stack([c, q]), axis=0, return_counts=True)
    return keys[:, 1:] / cal.GRID, keys[:, 0], counts


def test_bootstrap_interval_covers_the_realised_precision():
    """100 seeded datasets: calibrate on 40 images, estimate on 88 others; the 95% interval at the
    threshold reaching 0.8 covers the realised precision of the labels kept >= 90% of the time."""
    covered, total = 0, 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        s, y, c, im = _synthetic(rng, 40)
        sample = cal.Sample(s, y, c, im, np.zeros(40))
        fit = cal.fit_calibrator(s, y, c, method="logistic")
        s2, y2, c2, _ = _synthetic(rng, 88)
        scores, classes, counts = _summary(s2, c2)
        run = cal.RunSummary(scores, classes, counts, 88)
        curve = cal.estimate_curve(sample, run, fit, replicates=100, seed=seed)
        point = cal.threshold_for(curve, 0.8)
        if point is None:
            continue
        kept = fit.predict(np.round(s2 * cal.GRID) / cal.GRID, c2) >= point["threshold"]
        assert kept.sum() == point["kept"]
        realised = y2[kept].mean()
        total += 1
        covered += point["precision_low"] <= realised <= point["precision_high"]
    assert total >= 90 and covered / total >= 0.9, (covered, total)


# -- a hand-built run -------------------------------------------------------------------------------
def _hand_built_run(tmp_path, images=60, seed=0):
    """Images with 1..8 box labels (3 classes); each label's hidden truth (attribute ``truth``) is drawn
    with P = confidence^2; the verdicts of the first 30 images are written as review sample ``s``."""
    rng = np.random.default_rng(seed)
    records, items = [], {}
    for i in range(images):
        record = ImageRecord(f"img{i:03d}.jpg", str(tmp_path / f"img{i:03d}.jpg"), 32, 32)
        k = int(rng.integers(1, 9))
        conf = rng.uniform(0, 1, k).astype(np.float32)
        truth = tuple(bool(t) for t in rng.uniform(size=k) < conf.astype(float) ** 2)
        boxes = np.array([[j, j, j + 10, j + 10] for j in range(k)], np.float32)
        inst = Instances(32, 32, tuple(box_to_rle(b, 32, 32) for b in boxes), boxes, {"confidence": conf},
                         rng.integers(0, 3, k).astype(np.int32), {"truth": truth})
        records.append(record)
        items[record.image_id] = Row(record, inst)
    spec = {"kind": "folder", "root": str(tmp_path), "import": {"format": "test"}}
    run = write_imported_run(ImportedDataset(("cat", "dog", "bird"), spec, tuple(records),
                                             lambda r: items[r.image_id]), tmp_path / "run")
    verdicts = []
    for record in records[:30]:
        inst = items[record.image_id].instances
        verdicts.append(ImageVerdicts(record.image_id, tuple(
            LabelVerdict(j, int(inst.class_ids[j]), "correct" if t else "false_positive")
            for j, t in enumerate(inst.attributes["truth"])), missed=int(rng.integers(0, 2))))
    path = verdicts_path(run, "s")
    path.parent.mkdir(parents=True)
    (path.parent / "summary.json").write_text("{}")
    write_verdicts(path, verdicts)
    return run, items


def test_calibrate_run_writes_json_and_plot_and_applies_on_the_fly(tmp_path):
    run, items = _hand_built_run(tmp_path)
    data = cal.calibrate_run(run, "s", replicates=50, target=0.7)
    json_path, png_path = cal.calibration_paths(run, "s")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(data))
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["sample"]["images"] == 30 and data["run"]["images"] == 60
    assert data["run"]["labels"] == sum(len(r.instances) for r in items.values())
    assert data["ece"]["calibrated"] < data["ece"]["raw"]
    assert len(data["curve"]) == len(cal.THRESHOLDS)
    for point in data["curve"]:
        if point["kept"]:
            assert 0 <= point["precision_low"] <= point["precision_high"] <= 1  # bias-corrected: need not hold the estimate
            assert point["recall_low"] <= point["recall_high"]
    recalls = [p["recall"] for p in data["curve"]]
    assert all(a >= b for a, b in zip(recalls, recalls[1:]))  # recall falls as the threshold rises
    loaded = cal.load_calibration(run, "s")
    row = items["img005.jpg"]
    p = loaded.p_correct(row.instances)
    assert p.dtype == np.float32 and len(p) == len(row.instances) and np.all((p >= 0) & (p <= 1))
    store = cal.CalibratedStore(RunStore(run), loaded)
    first = next(store.iter_rows())
    assert np.array_equal(first.instances.scores["p_correct"], loaded.p_correct(first.instances))
    with pytest.raises(ConfigError, match="no calibration"):
        cal.load_calibration(run, "other")


def test_min_precision_keeps_the_largest_set_reaching_the_target(tmp_path):
    run, items = _hand_built_run(tmp_path)
    cal.calibrate_run(run, "s", replicates=50)
    calibration = cal.load_calibration(run, "s")
    selection = calibration.select(0.7)
    curve = calibration.data["curve"]
    reaching = [p for p in curve if p["kept"] and p["precision"] >= 0.7]
    assert selection["kept_labels_estimated"] == max(p["kept"] for p in reaching)
    assert selection["precision_interval"][0] <= selection["precision_interval"][1]
    assert main(["filter", str(run), "--min-precision", "0.7", "--calibration", "s", "--save", "p70"]) == 0
    kept = [r for r in RunStore(run).iter_rows(copy=RunStore(run).copy_dir("filtered", "p70"))]
    p_kept = np.concatenate([r.instances.scores["p_correct"] for r in kept])
    assert len(p_kept) == selection["kept_labels_estimated"]
    assert np.all(p_kept >= selection["threshold"])
    p_all = np.concatenate([calibration.p_correct(r.instances) for r in items.values()])
    assert (p_all >= selection["threshold"]).sum() == len(p_kept)
    assert p_kept.mean() == pytest.approx(selection["estimated_precision"], abs=0.02)  # scores on a 1/1000 grid
    with pytest.raises(ConfigError, match="no threshold reaches"):
        calibration.select(1.0)


def test_cli_calibrate_and_export_min_precision(tmp_path, capsys):
    run, _ = _hand_built_run(tmp_path)
    assert main(["calibrate", str(run), "--reviewed", "s", "--bootstrap", "30", "--method", "isotonic"]) == 0
    out = capsys.readouterr().out
    assert "ECE raw" in out and (run / "calibration" / "s.json").is_file() and (run / "calibration" / "s.png").is_file()
    assert json.loads((run / "calibration" / "s.json").read_text())["method"] == "isotonic"
    export = tmp_path / "coco"
    assert main(["export", str(run), "--format", "coco", "--out", str(export), "--min-precision", "0.6",
                 "--calibration", "s"]) == 0
    report = json.loads((export / "export_report.json").read_text())
    target = report["precision_target"]
    assert target["target_precision"] == 0.6 and target["calibration"] == "s"
    assert report["annotations"] == target["kept_labels_estimated"]
    low, high = target["precision_interval"]
    assert 0 <= low <= high <= 1
    annotations = json.loads((export / "annotations.json").read_text())["annotations"]
    assert all(a["attributes"]["scores"]["p_correct"] >= target["threshold"] for a in annotations)
    capsys.readouterr()
    assert main(["export", str(run), "--format", "coco", "--out", str(export), "--min-precision", "0.6"]) == 2
    assert "needs --calibration" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "coco", "--out", str(export), "--min-precision", "0.6",
                 "--calibration", "s", "--set", "min_area=5"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert main(["calibrate", str(run), "--reviewed", "missing"]) == 2
    every = tmp_path / "coco_all"
    assert main(["export", str(run), "--format", "coco", "--out", str(every), "--calibration", "s"]) == 0
    annotations = json.loads((every / "annotations.json").read_text())["annotations"]
    assert len(annotations) == json.loads((run / "calibration" / "s.json").read_text())["run"]["labels"]
    assert all(0 <= a["attributes"]["scores"]["p_correct"] <= 1 and "confidence" in a["attributes"]["scores"]
               for a in annotations)


@pytest.mark.slow
def test_coco128_noisy_oracle_interval_covers_held_out_precision(coco128_images, noisy_plugin):
    """The issue's experiment (bench/bench_calibration.py): 40 reviewed images, 88 held out, 100 splits."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_calibration.py"
    spec = importlib.util.spec_from_file_location("bench_calibration", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.experiment(100, target=0.9, method="logistic")
    assert result["images"] == 128 and result["splits_reaching_target"] >= 90
    assert result["coverage"] >= 0.9
    assert result["ece_calibrated_mean"] < result["ece_raw_mean"]
    assert result["first_split"]["covered"]


@pytest.fixture
def noisy_plugin():
    """``labelgen.testing.noisy`` registered for one test; the registry and loaded plugins are restored."""
    from conftest import plugin_imported

    with plugin_imported("labelgen.testing.noisy") as module:
        yield module


@pytest.mark.slow
def test_whole_loop_through_the_cli(tmp_path, coco128_images, noisy_plugin, fiftyone_db, dataset_name, capsys):
    """run (noisy-oracle on coco128) -> review --sample -> simulated verdicts -> pull -> calibrate ->
    export --min-precision; the exported labels' realised precision (from the generator's own record of
    what it corrupted) lies in the reported interval."""
    from conftest import COCO128
    from labelgen.testing.reviewer import simulate_review

    recipe = tmp_path / "noisy.yaml"
    recipe.write_text(f"generator: {{name: noisy-oracle, labels_dir: {json.dumps(str(COCO128 / 'labels' / 'train2017'))}}}\n"
                      "images: {compute_sha256: false}\nstore: {shard_size: 32}\n"
                      "execution: {workers: 1, device: cpu, batch_size: 4}\n", encoding="utf-8")
    run, gt = tmp_path / "run", tmp_path / "gt"
    assert main(["run", str(recipe), "--plugin", "labelgen.testing.noisy", "--images", str(coco128_images),
                 "--out", str(run), "--no-progress"]) == 0
    assert main(["import", str(COCO128), "--format", "yolo", "--split", "train2017", "--out", str(gt)]) == 0
    assert main(["review", str(run), "--sample", "40", "--seed", "1", "--dataset", dataset_name, "--no-app"]) == 0
    simulate_review(fiftyone_db, dataset_name, gt)
    assert main(["pull", str(run), "--dataset", dataset_name, "--name", "s40"]) == 0
    assert main(["calibrate", str(run), "--reviewed", "s40", "--target", "0.85"]) == 0
    data = json.loads((run / "calibration" / "s40.json").read_text())
    assert data["sample"]["images"] == 40 and data["ece"]["calibrated"] < data["ece"]["raw"]
    out = tmp_path / "coco"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "coco", "--out", str(out), "--min-precision", "0.85",
                 "--calibration", "s40"]) == 0
    target = json.loads((out / "export_report.json").read_text())["precision_target"]
    annotations = json.loads((out / "annotations.json").read_text())["annotations"]
    assert len(annotations) == target["kept_labels_estimated"] > 0
    realised = np.mean([a["attributes"]["instance"]["noise"] == "kept" for a in annotations])
    low, high = target["precision_interval"]
    assert low <= realised <= high, (realised, target)
