"""Review queue vs random order on coco128 with perturbed ground truth (errors known).

    python bench/bench_review_queue.py [--seeds 10] [--k 20]

Ground truth: coco128-seg YOLO labels (``LABELGEN_COCO128``, default ../shared/assets/data/coco128-seg),
perturbed per image by ``labelgen.testing.perturbed`` (dropped, relabelled, shifted objects, false positives,
noisy confidence). Errors found in the first K images = the sum of the known errors of those images; random
order finds K * (mean errors per image) in expectation (exact, no sampling needed). No calibration: the raw
confidence is ``p``.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from labelgen.exports.importers import import_yolo
from labelgen.exports.source import open_export_source
from labelgen.review.queue import queue_source
from labelgen.testing.perturbed import write_perturbed_run

COCO128 = Path(os.environ.get("LABELGEN_COCO128", Path(__file__).resolve().parents[2] / "shared" / "assets" / "data"
                              / "coco128-seg"))


def measure(seed: int, k: int, diversity: float, folder: Path) -> dict:
    run, errors = write_perturbed_run(import_yolo(COCO128, split="train2017"), folder / f"run{seed}", seed=seed)
    source = open_export_source(run)
    queue = queue_source(source, diversity=diversity)
    found = sum(errors.get(q.image_id, 0) for q in queue[:k])
    plain = sum(errors.get(q.image_id, 0) for q in queue_source(source, diversity=0.0)[:k])
    labels = sorted(((len(row.instances or ()), row.image.image_id) for row in source), key=lambda t: -t[0])
    most_labels = sum(errors.get(i, 0) for _, i in labels[:k])
    random = k * np.mean(list(errors.values()))
    best = sum(sorted(errors.values(), reverse=True)[:k])
    return {"seed": seed, "queue": found, "random": random, "oracle": best, "ratio": found / random,
            "no_diversity": plain, "most_labels": most_labels}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--diversity", type=float, default=0.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(seed, args.k, args.diversity, Path(tmp)) for seed in range(args.seeds)]
    for r in results:
        print(f"seed {r['seed']}: queue {r['queue']} errors in the first {args.k} images, random {r['random']:.1f},"
              f" best possible {r['oracle']}, ratio {r['ratio']:.2f}; without diversity {r['no_diversity']},"
              f" most labels first {r['most_labels']}")
    ratios = np.array([r["ratio"] for r in results])
    print(f"ratio queue/random over {len(results)} seeds: mean {ratios.mean():.2f}, min {ratios.min():.2f};"
          f" mean errors found: queue {np.mean([r['queue'] for r in results]):.1f}, without diversity"
          f" {np.mean([r['no_diversity'] for r in results]):.1f}, most labels first"
          f" {np.mean([r['most_labels'] for r in results]):.1f}, random {np.mean([r['random'] for r in results]):.1f},"
          f" best possible {np.mean([r['oracle'] for r in results]):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
