"""``bench/bench_gpu.py`` is run only when a GPU is lent, on a short device budget: its logic is dry-run here on
the CPU with the tiny recipe, so that a lent GPU's minutes are not lost to a bug in the script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("segment_anything")

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_dry_run_on_cpu_prints_and_writes_every_row(tmp_path, coco128_images):
    out = tmp_path / "gpu-results.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--device", "cpu",
                           "--recipes", "zip-tiny-random", "--batch-sizes", "1", "2", "--compile", "off",
                           "--images", "2", "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["recipe"], r["compile"], r["batch_size"]) for r in rows] == [("zip-tiny-random", "off", 1),
                                                                            ("zip-tiny-random", "off", 2)]
    for row in rows:
        assert row["images_per_second"] > 0 and row["tflop_per_image"] > 0 and 0 < row["fraction_of_peak"] < 10
    assert proc.stdout.count("| zip-tiny-random | off |") == 2


def test_bench_gpu_skips_what_is_over_its_budget_and_says_so(tmp_path, coco128_images):
    out = tmp_path / "gpu-results.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--device", "cpu",
                           "--recipes", "zip-tiny-random", "--batch-sizes", "1", "--compile", "off",
                           "--images", "1", "--budget-s", "0", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text()) == []
    assert "skipped (over --budget-s 0): zip-tiny-random compile off batch 1" in proc.stdout
