"""The oracle check of docs/oracle-check.md as a sweep: the zip pipeline with ground-truth stand-ins for CLIP
and SAM (``labelgen.testing.oracle``) on all of coco128, scored with pycocotools (segm), one row per setting.

Each row is the test recipe of ``tests/test_oracle_pipeline.py`` with the discovery fixes on or off and the
smallest instance (``min_cells`` at the 2048-px reference short side) changed; everything else, including the
real k-means and the real discovery code, is the test's. About 10 s a row on 2 cores.

Rerun:
  .venv/bin/python bench/bench_oracle.py --min-cells 25 16 9 4 1
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def run_row(folder: Path, *, fixes: bool, min_cells: int) -> dict[str, float]:
    from test_oracle_pipeline import ALL_FIXES, COCO128, IMAGES, RECIPE, _cli, _cocoeval_segm

    recipe_text = RECIPE.format(gt_root=json.dumps(str(COCO128)), fixes=ALL_FIXES if fixes else "",
                                nms_ios=0.9 if fixes else 1.0)
    line = "    min_cells: 25 "
    assert recipe_text.count(line) == 1, "the test recipe's min_cells line moved"
    recipe_text = recipe_text.replace(line, f"    min_cells: {min_cells} ")
    folder.mkdir(parents=True)
    recipe = folder / "zip-oracle.yaml"
    recipe.write_text(recipe_text, encoding="utf-8")
    run_dir = folder / "run"
    _cli("run", recipe, "--plugin", "labelgen.testing.oracle", "--images", IMAGES, "--out", run_dir, "--no-progress")
    _cli("filter", run_dir, "--min-confidence", "0.05", "--save", "oracle")
    _cli("export", run_dir, "--filtered", "oracle", "--format", "coco", "--out", folder / "pred")
    return _cocoeval_segm(ground_truth(folder.parent), folder / "pred" / "annotations.json")


def ground_truth(root: Path) -> Path:
    """coco128's ground truth through ``labelgen import`` and ``export`` (once per sweep)."""
    from test_oracle_pipeline import COCO128, _cli

    path = root / "gt" / "annotations.json"
    if not path.is_file():
        _cli("import", COCO128, "--format", "yolo", "--split", "train2017", "--out", root / "gt-run")
        _cli("export", root / "gt-run", "--format", "coco", "--out", root / "gt")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-cells", nargs="+", type=int, default=[25, 16, 9, 4, 1])
    args = parser.parse_args()
    import labelgen.testing.oracle  # noqa: F401  (registers zip-oracle)

    print("| fixes | min_cells @2048 | AP | AP50 | AP75 | AP_small | AP_medium | AP_large |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for min_cells in args.min_cells:
            for fixes in (False, True):
                stats = run_row(Path(tmp) / f"row-{min_cells}-{int(fixes)}", fixes=fixes, min_cells=min_cells)
                cells = " | ".join(f"{stats[name]:.3f}" for name in ("AP", "AP50", "AP75", "AP_small", "AP_medium",
                                                                     "AP_large"))
                print(f"| {'all five' if fixes else 'none'} | {min_cells} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
