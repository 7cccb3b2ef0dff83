"""Tests that need a CUDA GPU (marked ``gpu``; skipped without one). ``bench/bench_gpu.sh`` runs them.

* batched equals single on the GPU (the tiny random models, zip and sam-auto), within tolerance;
* a real out-of-memory back-off: a call sized past the GPU's memory is halved until it fits;
* two workers pinned to one GPU (``execution.devices: [cuda:0, cuda:0]``) both label on it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[1]


def _generator(recipe_path, *overrides):
    from labelgen.config import load_recipe
    from labelgen.generators import GENERATORS

    recipe = load_recipe(recipe_path, list(overrides))
    return GENERATORS.get(recipe.generator.name).from_config(recipe.generator.params, device="cuda")


def _images(coco128_images, count):
    from labelgen.engine.decode import read_image_rgb
    from labelgen.structures.instances import ImageRecord

    paths = sorted(coco128_images.glob("*.jpg"))[:count]
    images, records = [], []
    for path in paths:
        image, info = read_image_rgb(str(path))
        images.append(image)
        records.append(ImageRecord(path.name, str(path), info["width"], info["height"]))
    return images, records


def _mask_ious(a, b):
    from pycocotools import mask as mask_utils

    from labelgen.structures.masks import rle_to_pycocotools

    if not len(a) and not len(b):
        return np.ones(0)
    ious = np.asarray(mask_utils.iou([rle_to_pycocotools(r) for r in a.masks_rle],
                                     [rle_to_pycocotools(r) for r in b.masks_rle], [0] * len(b)))
    return ious.reshape(len(a), len(b)).max(axis=1)


@pytest.mark.parametrize("recipe", ["recipes/zip-tiny-random.yaml", "recipes/sam-auto-tiny-random.yaml"])
def test_batched_equals_single_on_the_gpu(recipe, coco128_images):
    gen = _generator(recipe)
    images, records = _images(coco128_images, 4)
    gen.batch_size = 4
    batched = [finish() for finish in gen.generate_batch(images, records)]
    single = [gen.generate_batch([image], [record])[0]() for image, record in zip(images, records)]
    for a, b in zip(batched, single):
        assert len(a) == len(b)
        if len(a):
            assert _mask_ious(a, b).min() > 0.98
            np.testing.assert_allclose(a.scores["confidence"], b.scores["confidence"], atol=2e-3)


def test_a_real_out_of_memory_is_backed_off():
    from labelgen.models.oom import AdaptiveBatcher

    free, _ = torch.cuda.mem_get_info()
    per_item = 1 << 28  # 256 MiB of float32 per item
    items = list(range(4 * max(1, int(free // per_item))))  # all at once needs ~4x the free memory

    def fill(batch):
        block = torch.ones((len(batch), per_item // 4), device="cuda")
        sums = block.sum(dim=1).tolist()
        del block
        return sums

    batcher = AdaptiveBatcher(len(items))
    results = batcher.run(fill, items)
    assert results == [float(per_item // 4)] * len(items)
    assert batcher.size < len(items)  # it really ran out of memory and halved


def test_two_workers_pinned_to_one_gpu(coco128_images, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(coco128_images.glob("*.jpg"))[:4]:
        (images / path.name).symlink_to(path)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "labelgen.cli", "run", "recipes/zip-tiny-random.yaml", "--images", str(images),
           "--out", str(out), "--set", "execution.workers=2", "--set", "execution.devices=[cuda:0, cuda:0]",
           "--set", "store.shard_size=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*.done.json"))]
    assert len(done) == 2
    assert {d["provenance"]["device"] for d in done} == {"cuda:0"}
