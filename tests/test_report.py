"""`labelgen report`: statistics against counts computed independently from the rows, failures,
a self-contained and escaped page, a seeded contact sheet, placeholders, and the page in chromium."""
import collections
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import COCO128, REPO, make_recipe
from labelgen.review import report
from labelgen.cli import main
from labelgen.errors import ValidationError
from labelgen.structures.instances import Instances
from labelgen.review.report import build_report, report_stats
from labelgen.engine.runner import run
from labelgen.engine.sources import FolderSource
from labelgen.store.run_store import RunStore, seal
from labelgen.testing.images import make_corrupt_corpus

CHROMIUM = Path("/usr/bin/chromium")
CLASSES = ["<b>x</b>", "cat", "a&b"]
ODD_NAME = 'odd <i>&"q".png'


@pytest.fixture
def fake_run(tmp_path, image_dir):
    """10 labelled-or-failed images: one empty file, one generator error, one file name needing escapes."""
    shutil.copy(image_dir / "img_00000.png", image_dir / ODD_NAME)
    (image_dir / "empty.jpg").write_bytes(b"")
    root = tmp_path / "run"
    run(make_recipe(class_names=CLASSES, fail_image_ids=["img_00003.png"]), FolderSource(image_dir), root)
    return root


@pytest.fixture
def coco_run(tmp_path):
    """6 real coco128 images and one empty .jpg, labelled by the fake generator."""
    source = COCO128 / "images" / "train2017"
    if not source.is_dir():
        pytest.skip(f"coco128-seg not found at {COCO128} (set LABELGEN_COCO128)")
    folder = tmp_path / "coco"
    folder.mkdir()
    for path in sorted(source.glob("*.jpg"))[:6]:
        (folder / path.name).symlink_to(path)
    (folder / "broken.jpg").write_bytes(b"")
    root = tmp_path / "run"
    run(make_recipe(class_names=["person", "thing"]), FolderSource(folder), root)
    return root


def expected_from_rows(root, class_names):
    """The report's numbers, computed directly from the stored rows (dense masks, whole arrays)."""
    rows = list(RunStore(root).iter_rows())
    ok = [r for r in rows if r["status"] == "ok"]
    per_image = collections.Counter(len(r["instances"]["masks_rle"]) for r in ok)
    labels, scores, fractions = collections.Counter(), collections.defaultdict(list), []
    for row in ok:
        instances = Instances.from_dict(row["instances"])
        ids = instances.class_ids if instances.class_ids is not None else []
        labels.update(class_names[i] for i in ids)
        if instances.class_ids is None:
            labels[report.AGNOSTIC] += len(instances)
        for name, column in instances.scores.items():
            scores[name].extend(column.tolist())
        fractions.extend((instances.masks().sum(axis=(1, 2)) / (instances.height * instances.width)).tolist())
    return {
        "rows": rows, "ok": ok, "per_image": dict(per_image), "labels": labels, "scores": scores,
        "fractions": np.asarray(fractions),
        "failures": collections.Counter(r["failure"]["reason"] for r in rows if r["status"] == "failed"),
    }


def assert_stats_match_rows(stats, expected):
    instances = sum(len(r["instances"]["masks_rle"]) for r in expected["ok"])
    assert stats["images"] == {"rows": len(expected["rows"]), "ok": len(expected["ok"]),
                               "failed": len(expected["rows"]) - len(expected["ok"])}
    assert stats["instances"] == instances == stats["status"]["instances"] > 0
    assert stats["instances_per_image"] == expected["per_image"]
    assert sum(stats["instances_per_image"].values()) == len(expected["ok"])
    assert {k: v for k, v in stats["labels_per_class"].items() if v} == dict(expected["labels"])
    assert sum(stats["labels_per_class"].values()) == instances
    assert set(stats["scores"]) == set(expected["scores"])
    for name, values in expected["scores"].items():
        column = stats["scores"][name]
        counts, _ = np.histogram(np.clip(values, 0, 1), bins=report.SCORE_BINS, range=(0, 1))
        assert column["counts"] == counts.tolist() and sum(column["counts"]) == column["count"] == instances
        assert column["min"] == pytest.approx(min(values)) and column["max"] == pytest.approx(max(values))
    fractions = expected["fractions"]
    areas = stats["mask_area_fraction"]
    counts, _ = np.histogram(np.clip(fractions[fractions > 0], 1e-6, 1), bins=report.AREA_EDGES)
    assert areas["counts"] == counts.tolist() and areas["empty"] == int((fractions == 0).sum())
    assert sum(areas["counts"]) + areas["empty"] == instances
    assert stats["failures_by_reason"] == dict(expected["failures"]) == stats["status"]["failures_by_reason"]
    done = stats["throughput"]
    assert [s["shard"] for s in done] == sorted(s["shard"] for s in done)
    assert sum(s["images"] for s in done) == len(expected["rows"])
    assert all(s["images_per_second"] > 0 for s in done)


def test_fake_run_stats_equal_counts_from_the_rows(fake_run):
    stats = report_stats(fake_run)
    assert_stats_match_rows(stats, expected_from_rows(fake_run, CLASSES))
    assert stats["failures_by_reason"] == {"empty_file": 1, "generator_error": 1}
    assert list(stats["labels_per_class"]) == CLASSES  # vocabulary order, zero counts kept
    assert stats["run"]["class_names"] == CLASSES and stats["run"]["generator"] == "fake"


def test_coco128_stats_equal_counts_from_the_rows(coco_run):
    stats = report_stats(coco_run)
    assert_stats_match_rows(stats, expected_from_rows(coco_run, ["person", "thing"]))
    assert stats["images"]["ok"] == 6 and stats["failures_by_reason"] == {"empty_file": 1}
    page = build_report(coco_run).read_text()
    assert page.count('src="data:image/jpeg;base64,') == 6  # every sampled real image drawn, none a placeholder
    assert 'class="placeholder"' not in page


def test_corrupt_corpus_failures_by_reason_and_one_class_agnostic_bar(tmp_path):
    expected = make_corrupt_corpus(tmp_path / "corpus")
    run(make_recipe(), FolderSource(tmp_path / "corpus"), tmp_path / "run")
    stats = report_stats(tmp_path / "run")
    assert stats["failures_by_reason"] == dict(collections.Counter(r for r in expected.values() if r))
    assert list(stats["labels_per_class"]) == [report.AGNOSTIC]
    assert stats["labels_per_class"][report.AGNOSTIC] == stats["instances"]
    assert_stats_match_rows(stats, expected_from_rows(tmp_path / "run", None))


def test_page_is_self_contained_and_escapes_run_strings(fake_run):
    page = build_report(fake_run).read_text(encoding="utf-8")
    assert (fake_run / "report.html").is_file()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert "@import" not in page and "url(" not in page
    assert page.count('src="data:image/png;base64,') == 6  # the six plots
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "a&amp;b" in page and "a&b" not in page
    assert "odd &lt;i&gt;&amp;&quot;q&quot;.png" in page and "<i>" not in page


def test_contact_sheet_sample_is_seeded_and_reproducible(fake_run, tmp_path):
    ok_ids = {r["image"]["image_id"] for r in RunStore(fake_run).iter_rows() if r["status"] == "ok"}
    samples = [tuple(report_stats(fake_run, sample_images=3, seed=seed)["sample"]) for seed in range(8)]
    assert all(len(s) == 3 and set(s) <= ok_ids and len(set(s)) == 3 for s in samples)
    assert len(set(samples)) > 1, "different seeds should give different samples"
    assert report_stats(fake_run, sample_images=3, seed=5)["sample"] == list(samples[5])
    first = build_report(fake_run, tmp_path / "a.html", sample_images=3, seed=5).read_bytes()
    second = build_report(fake_run, tmp_path / "b.html", sample_images=3, seed=5).read_bytes()
    assert first == second  # no timestamps, deterministic plots and thumbnails
    assert first.count(b'<figure class="card">') == 3
    assert sorted(report_stats(fake_run, sample_images=100)["sample"]) == sorted(ok_ids)
    assert report_stats(fake_run, sample_images=0)["sample"] == []


@pytest.mark.parametrize("kwargs, message", [
    ({"sample_images": -1}, "sample_images must be an int >= 0"),
    ({"sample_images": 2.5}, "sample_images must be an int >= 0"),
    ({"seed": "1"}, "seed must be an int"),
])
def test_bad_arguments_are_validation_errors(fake_run, kwargs, message):
    with pytest.raises(ValidationError, match=message):
        build_report(fake_run, **kwargs)


def test_images_that_cannot_be_read_now_are_placeholders_with_the_reason(fake_run, image_dir):
    (image_dir / "img_00001.png").unlink()
    from PIL import Image

    Image.new("RGB", (10, 10)).save(image_dir / "img_00002.png")  # replaced by a different size
    page = build_report(fake_run, sample_images=100).read_text()
    assert page.count('class="placeholder"') == 2
    assert "<b>missing</b>" in page and "<b>size_changed</b>" in page and "img_00001.png" in page
    assert page.count('src="data:image/jpeg;base64,') == 8  # the other labelled images


def test_random_weights_in_any_shard_provenance_gives_a_warning(fake_run):
    assert "RANDOM WEIGHTS" not in build_report(fake_run).read_text()
    done_path = RunStore(fake_run).shard_done(1)
    done = json.loads(done_path.read_text())
    done["provenance"]["labeler"] = {"random_weights": True}
    done_path.write_text(json.dumps(seal(done)))  # as if committed so: a hand edit would not verify
    assert report_stats(fake_run)["status"]["random_weights"]
    assert "RANDOM WEIGHTS" in build_report(fake_run).read_text()


def test_cli_report_prints_the_path(fake_run, tmp_path, capsys):
    out = tmp_path / "out" / "r.html"
    assert main(["report", str(fake_run), "--out", str(out), "--sample", "2", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text().count('<figure class="card">') == 2


def _chromium(url, profile, *extra):
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
               "--window-size=1400,3000", *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_report_renders_in_headless_chromium(request, tmp_path):
    from PIL import Image

    root = request.getfixturevalue("coco_run" if (COCO128 / "images" / "train2017").is_dir() else "fake_run")
    page = build_report(root)
    artifacts = Path(os.environ.get("LABELGEN_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report.png"
    shot.unlink(missing_ok=True)
    _chromium(page.as_uri(), tmp_path / "profile1", f"--screenshot={shot}")
    dom = _chromium(page.as_uri(), tmp_path / "profile2", "--dump-dom").stdout
    shutil.copy(page, artifacts / "report.html")
    plots = re.findall(r'<img[^>]*src="data:image/png;base64,', dom)
    assert len(plots) == 6, "expected the six plot images in the rendered DOM"
    assert dom.count('<figure class="card">') >= 1
    with Image.open(shot) as image:
        assert image.size == (1400, 3000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "the screenshot is (nearly) blank"


def test_the_header_names_the_models_of_a_model_run(tmp_path, coco128_images):
    pytest.importorskip("segment_anything")
    from labelgen.cli import main

    folder = tmp_path / "two"
    folder.mkdir()
    for path in sorted(coco128_images.glob("*.jpg"))[:2]:
        (folder / path.name).symlink_to(path)
    assert main(["run", "recipes/sam-auto-tiny-random.yaml", "--images", str(folder), "--out", str(tmp_path / "r")]) == 0
    stats = report_stats(tmp_path / "r", sample_images=0)
    assert stats["run"]["models"] == ["sam: tiny"]
    page = build_report(tmp_path / "r", tmp_path / "r.html", sample_images=0).read_text()
    assert "<td>models</td><td>sam: tiny</td>" in page
