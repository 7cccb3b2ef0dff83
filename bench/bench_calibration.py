"""Calibration on coco128 with the noisy-oracle generator: does the reported 95% interval cover the
precision the held-out labels turn out to have?

coco128's YOLO-seg ground truth is corrupted once by ``labelgen.testing.noisy.corrupt`` (dropped,
perturbed, relabelled objects and false positives, noisy scores; seeded per image). A label is correct
when the generator kept it as is (``noise == "kept"``: same class, mask IoU >= 0.5 with its object);
the objects missed per image are its ground-truth objects without a correct label. Per split (random,
seeded): 40 images are the review sample (verdicts from that truth), the other 88 the run; calibrate
on the sample (``fit_calibrator``), estimate the run's precision curve (``estimate_curve``, 200
replicates), take the threshold reaching ``--target``, and compare with the realised precision of the
88 images' labels kept at that threshold. Also: ECE of the raw confidence vs ``p_correct`` on the 88.

Rerun:  .venv/bin/python bench/bench_calibration.py --splits 100 --method logistic
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COCO128 = Path(os.environ.get("LABELGEN_COCO128", REPO.parent / "shared" / "assets" / "data" / "coco128-seg"))


def noisy_images(seed: int = 0, columns=("confidence",)) -> list[dict]:
    """Per coco128 image: scores (n, k), classes, correct (n,), missed objects."""
    from labelgen.exports.importers import import_yolo
    from labelgen.testing.noisy import NoisyConfig, corrupt, image_rng

    dataset = import_yolo(COCO128, split="train2017")
    config = NoisyConfig(labels_dir=str(COCO128 / "labels" / "train2017"), seed=seed)
    out = []
    for row in dataset:
        if row.instances is None:
            continue
        pred = corrupt(row.instances, len(dataset.class_names), config, image_rng(seed, row.image.image_id))
        correct = np.array([k == "kept" for k in pred.attributes.get("noise", ())], bool)
        scores = np.column_stack([pred.scores[c].astype(np.float64) for c in columns]) if len(pred) else \
            np.zeros((0, len(columns)))
        out.append({"scores": scores, "classes": np.asarray(pred.class_ids, np.int64) if len(pred) else
                    np.zeros(0, np.int64), "correct": correct, "missed": len(row.instances) - int(correct.sum())})
    return out


def one_split(images: list[dict], rng: np.random.Generator, *, sample_size: int = 40, target: float = 0.9,
              method: str = "logistic", columns=("confidence",), replicates: int = 200, seed: int = 0) -> dict:
    from labelgen.review import calibration as cal

    order = rng.permutation(len(images))
    sampled, held = [images[i] for i in order[:sample_size]], [images[i] for i in order[sample_size:]]
    sample = cal.Sample(np.concatenate([im["scores"] for im in sampled]),
                        np.concatenate([im["correct"] for im in sampled]).astype(float),
                        np.concatenate([im["classes"] for im in sampled]),
                        np.concatenate([np.full(len(im["correct"]), i) for i, im in enumerate(sampled)]),
                        np.array([im["missed"] for im in sampled], float))
    fit = cal.fit_calibrator(sample.scores, sample.y, sample.classes, method=method, columns=columns)
    scores = np.concatenate([im["scores"] for im in held])
    classes = np.concatenate([im["classes"] for im in held])
    correct = np.concatenate([im["correct"] for im in held])
    q = np.round(np.clip(scores, 0, 1) * cal.GRID).astype(np.int64)
    keys, counts = np.unique(np.column_stack([classes, q]), axis=0, return_counts=True)
    run = cal.RunSummary(keys[:, 1:] / cal.GRID, keys[:, 0], counts, len(held))
    curve = cal.estimate_curve(sample, run, fit, replicates=replicates, seed=seed)
    point = cal.threshold_for(curve, target)
    p_held = fit.predict(q / cal.GRID, classes)
    result = {"ece_raw": cal.ece(np.clip(scores[:, 0], 0, 1), correct.astype(float)),
              "ece_calibrated": cal.ece(p_held, correct.astype(float)), "point": point}
    if point is not None:
        kept = p_held >= point["threshold"]
        realised = float(correct[kept].mean())
        missed = sum(im["missed"] for im in held)
        result.update(realised=realised, covered=point["precision_low"] <= realised <= point["precision_high"],
                      realised_recall=float(correct[kept].sum() / (correct.sum() + missed)))
        result["recall_covered"] = point["recall_low"] <= result["realised_recall"] <= point["recall_high"]
    return result


def experiment(splits: int = 100, *, target: float = 0.9, method: str = "logistic", columns=("confidence",),
               replicates: int = 200, seed: int = 0) -> dict:
    images = noisy_images(seed, columns)
    results = [one_split(images, np.random.default_rng(1000 + s), target=target, method=method, columns=columns,
                         replicates=replicates, seed=s) for s in range(splits)]
    reached = [r for r in results if r["point"] is not None]
    return {
        "images": len(images), "labels": int(sum(len(im["correct"]) for im in images)),
        "correct_fraction": float(np.mean(np.concatenate([im["correct"] for im in images]))),
        "splits": splits, "target": target, "method": method, "columns": list(columns), "replicates": replicates,
        "splits_reaching_target": len(reached),
        "coverage": float(np.mean([r["covered"] for r in reached])) if reached else None,
        "recall_coverage": float(np.mean([r["recall_covered"] for r in reached])) if reached else None,
        "mean_estimated_precision": float(np.mean([r["point"]["precision"] for r in reached])) if reached else None,
        "mean_realised_precision": float(np.mean([r["realised"] for r in reached])) if reached else None,
        "mean_interval_width": float(np.mean([r["point"]["precision_high"] - r["point"]["precision_low"]
                                              for r in reached])) if reached else None,
        "mean_kept_labels": float(np.mean([r["point"]["kept"] for r in reached])) if reached else None,
        "ece_raw_mean": float(np.mean([r["ece_raw"] for r in results])),
        "ece_calibrated_mean": float(np.mean([r["ece_calibrated"] for r in results])),
        "ece_calibrated_lower_fraction": float(np.mean([r["ece_calibrated"] < r["ece_raw"] for r in results])),
        "first_split": {k: v for k, v in results[0].items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--method", default="logistic", choices=["logistic", "isotonic"])
    parser.add_argument("--columns", default="confidence")
    parser.add_argument("--replicates", type=int, default=200)
    args = parser.parse_args(argv)
    result = experiment(args.splits, target=args.target, method=args.method,
                        columns=tuple(args.columns.split(",")), replicates=args.replicates)
    print(json.dumps(result, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
