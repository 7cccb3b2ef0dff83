"""Stage 2 of the Zip method: layer3 boundary features of a CLIP ResNet and k-means.

Models are built from configs with random weights; the fast tests use the tiny
``labelgen-tiny-rn`` config (a ModifiedResNet of width 8: layer3 has 8 * 16 = 128 channels).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

open_clip = pytest.importorskip("open_clip")

import labelgen  # noqa: E402
from labelgen.errors import GeneratorError, ValidationError  # noqa: E402
from labelgen.generators.zip.boundary import (  # noqa: E402
    BoundaryStage,
    Layer3Trunk,
    layer3_features,
    resize_for_boundary,
    truncate_to_layer3,
)
from labelgen.generators.zip.config import BoundaryConfig  # noqa: E402
from labelgen.generators.zip.discovery import class_map_to_grid  # noqa: E402
from labelgen.generators.zip.kmeans import even_init_indices, kmeans, semantic_init_indices  # noqa: E402

TINY = "labelgen-tiny-rn"
TINY_CHANNELS = 8 * 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: OpenMP hand-offs on the shared 2-core machine cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_clip():
    open_clip.add_model_config(Path(labelgen.__file__).parent / "model_configs" / f"{TINY}.json")
    torch.manual_seed(0)
    return open_clip.create_model(TINY, pretrained=None).eval()


@pytest.fixture
def guarded_clip(tiny_clip):
    """The tiny model with hooks that fail the test when layer4 or attnpool runs."""

    def forbid(module, *_):
        raise AssertionError(f"{type(module).__name__} after layer3 must never run")

    visual = tiny_clip.visual
    handles = [visual.layer4.register_forward_pre_hook(forbid), visual.attnpool.register_forward_pre_hook(forbid)]
    yield tiny_clip
    for handle in handles:
        handle.remove()


def test_guard_hooks_fire(guarded_clip):
    with pytest.raises(AssertionError, match="never run"), torch.no_grad():
        guarded_clip.visual(torch.zeros(1, 3, 64, 64))


def checker_image(height: int, width: int) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = ((rows // 16 + cols // 16) % 2) * 200
    image[..., 1] = (cols * 255 // max(width - 1, 1)).astype(np.uint8)
    image[height // 4: height // 2, width // 3: width // 2] = (250, 30, 30)
    return image


# ---- k-means ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k, expected", [
    (10, 4, [0, 3, 6, 9]),
    (6, 3, [0, 2, 5]),  # 2.5 rounds half to even
    (5, 5, [0, 1, 2, 3, 4]),
    (3, 5, [0, 1, 2]),  # k clamped to n
    (1, 1, [0]),
    (100, 1, [0]),
    (21760, 20, [round(21759 * i / 19) for i in range(20)]),
])
def test_even_init_indices(n, k, expected):
    indices = even_init_indices(n, k)
    assert indices.dtype == np.int64
    assert indices.tolist() == expected


def test_kmeans_separates_blobs():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [50.0, 0.0, 10.0], [0.0, 60.0, -20.0]])
    truth = torch.arange(3).repeat_interleave(40)
    points = centres[truth] + torch.randn(120, 3, generator=generator)
    # raster order groups the blobs, so the even seeds (0, 60, 119) fall one per blob
    labels, centroids, iterations = kmeans(points, 3, max_iterations=100, tolerance=1e-5)
    assert labels.dtype == torch.int64 and labels.shape == (120,)
    assert centroids.shape == (3, 3) and 1 <= iterations < 100
    assert torch.equal(labels, truth)
    torch.testing.assert_close(centroids, centres, rtol=0, atol=0.5)
    # shuffled points with one explicit seed per blob: the same partition, ids follow the seeds
    order = torch.randperm(120, generator=generator)
    seeds = torch.stack([torch.nonzero(truth[order] == blob)[0, 0] for blob in (2, 0, 1)])
    labels, _, _ = kmeans(points[order], 3, 100, 1e-5, init_indices=seeds)
    cluster_of_blob = torch.tensor([1, 2, 0])  # blob 2 seeds cluster 0, blob 0 cluster 1, blob 1 cluster 2
    assert torch.equal(labels, cluster_of_blob[truth[order]])


def test_kmeans_empty_cluster_keeps_its_centroid():
    features = torch.tensor([[0.0], [0.0], [10.0], [10.0], [10.0]])
    # both seeds sit on 0.0: ties go to cluster 0, cluster 1 is empty after the first assignment
    labels, centroids, iterations = kmeans(features, 2, max_iterations=1, tolerance=0.0, init_indices=[0, 1])
    assert iterations == 1
    assert centroids[:, 0].tolist() == [6.0, 0.0]
    assert labels.tolist() == [1, 1, 0, 0, 0]


def test_kmeans_is_deterministic():
    features = torch.randn(600, 16, generator=torch.Generator().manual_seed(1)) * 5
    first = kmeans(features, 8, 100, 1e-5)
    second = kmeans(features.clone(), 8, 100, 1e-5)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2] == second[2]


def test_kmeans_fewer_points_than_clusters():
    features = torch.tensor([[0.0, 1.0], [5.0, 5.0], [9.0, 0.0]])
    labels, centroids, _ = kmeans(features, 5, 10, 1e-5)
    assert labels.tolist() == [0, 1, 2]
    assert torch.equal(centroids, features)


def test_kmeans_respects_max_iterations_and_tolerance():
    features = torch.randn(400, 8, generator=torch.Generator().manual_seed(2))
    _, _, free = kmeans(features, 10, 100, 0.0)
    assert free > 2
    assert kmeans(features, 10, 2, 0.0)[2] == 2
    assert kmeans(features, 10, 100, 1e9)[2] == 1  # relative stop: any move below 1e9 * |old|


@pytest.mark.parametrize("features, k, iterations, init", [
    (torch.zeros(4), 2, 5, None),
    (torch.zeros(4, 2, dtype=torch.int64), 2, 5, None),
    (torch.zeros(4, 2), 0, 5, None),
    (torch.zeros(4, 2), 2, 0, None),
    (torch.zeros(4, 2), 2, 5, [0]),
    (torch.zeros(4, 2), 2, 5, [0, 4]),
    (torch.zeros(4, 2), 2, 5, torch.tensor([0.0, 1.0])),
], ids=["1-D", "integer features", "k=0", "no iterations", "short init", "init out of range", "float init"])
def test_kmeans_rejects_bad_input(features, k, iterations, init):
    with pytest.raises(ValidationError):
        kmeans(features, k, iterations, 1e-5, init)


def test_semantic_init_known_map():
    activation = np.array([[0, 0, 0, 0, 0, 0, 0, 5, 9, 7]], dtype=float)
    # hot (> mean 2.1) sorted: 8, 9, 7 -> 2 seeds evenly along it: 8, 7; the other 2 evenly over the rest
    assert semantic_init_indices(activation, 4).tolist() == [0, 7, 8, 9]


def test_semantic_init_is_deterministic_and_in_range():
    activation = np.random.default_rng(3).random((12, 17))
    first = semantic_init_indices(activation, 20)
    assert np.array_equal(first, semantic_init_indices(activation.copy(), 20))
    assert first.dtype == np.int64 and first.shape == (20,)
    assert len(set(first.tolist())) == 20 and first.min() >= 0 and first.max() < 12 * 17
    assert int(np.argmax(activation)) in first.tolist()
    assert semantic_init_indices(activation, 500).tolist() == list(range(12 * 17))
    np.testing.assert_array_equal(semantic_init_indices(np.ones((4, 5)), 6), even_init_indices(20, 6))


# ---- resize and layer3 -------------------------------------------------------------------------


@pytest.mark.parametrize("image_hw, short_side, max_long_side, expected_hw", [
    ((480, 640), 256, 4096, (256, 341)),
    ((640, 480), 256, 4096, (341, 256)),
    ((480, 640), 2048, 4096, (2048, 2731)),
    ((480, 640), 256, 300, (225, 300)),  # long side capped: scale 300 / 640
    ((100, 1000), 64, 320, (32, 320)),
])
def test_resize_for_boundary_sizes(image_hw, short_side, max_long_side, expected_hw):
    image = np.zeros((*image_hw, 3), dtype=np.uint8)
    tensor, resize = resize_for_boundary(image, short_side, max_long_side)
    assert tensor.shape == (1, 3, *expected_hw) and tensor.dtype == torch.float32
    assert (resize.image_height, resize.image_width) == image_hw
    assert (resize.resized_height, resize.resized_width) == expected_hw


def test_resize_for_boundary_normalises_with_clip_statistics():
    tensor, _ = resize_for_boundary(np.full((40, 60, 3), 128, dtype=np.uint8), 32, 64)
    mean = torch.tensor(open_clip.constants.OPENAI_DATASET_MEAN)
    std = torch.tensor(open_clip.constants.OPENAI_DATASET_STD)
    expected = ((128 / 255 - mean) / std)[:, None, None].expand(3, 32, 48)
    torch.testing.assert_close(tensor[0], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("image", [
    np.zeros((40, 60, 3), dtype=np.float32), np.zeros((40, 60), dtype=np.uint8), np.zeros((8, 8, 3), np.uint8),
], ids=["float", "gray", "too small"])
def test_resize_for_boundary_rejects_bad_images(image):
    with pytest.raises(ValidationError):
        resize_for_boundary(image, 8 if image.shape[0] == 8 else 32, 64)


@pytest.mark.parametrize("input_hw, grid_hw", [((64, 96), (4, 6)), ((70, 100), (4, 6)), ((48, 33), (3, 2))])
def test_layer3_features_stride_16(guarded_clip, input_hw, grid_hw):
    images = torch.randn(2, 3, *input_hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = layer3_features(guarded_clip.visual, images)
    assert features.shape == (2, TINY_CHANNELS, *grid_hw)


def test_truncate_to_layer3_shares_parameters_and_drops_layer4(tiny_clip):
    visual = tiny_clip.visual
    trunk = truncate_to_layer3(visual)
    assert isinstance(trunk, Layer3Trunk) and truncate_to_layer3(trunk) is trunk
    trunk_ids = {id(p) for p in trunk.parameters()}
    assert all(id(p) in trunk_ids for p in visual.layer3.parameters())
    assert not any(id(p) in trunk_ids for p in visual.layer4.parameters())
    assert not any(id(p) in trunk_ids for p in visual.attnpool.parameters())
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = visual.layer3(visual.layer2(visual.layer1(visual.stem(images))))
        torch.testing.assert_close(trunk(images), expected, rtol=0, atol=0)


def test_truncate_to_layer3_rejects_other_towers():
    with pytest.raises(GeneratorError, match="ModifiedResNet"):
        truncate_to_layer3(torch.nn.Linear(3, 3))


# ---- the stage end to end ----------------------------------------------------------------------


@pytest.fixture
def coco_image(coco128_images):
    path = coco128_images / "000000000009.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_boundary_stage_on_a_real_image(guarded_clip, coco_image):
    config = BoundaryConfig(short_side=256, num_clusters=20)
    stage = BoundaryStage(guarded_clip, config, device="cpu")
    first = stage(coco_image)
    height, width = coco_image.shape[:2]
    resized = (256, round(256 * max(height, width) / min(height, width)))
    if height > width:
        resized = resized[::-1]
    grid_hw = tuple(math.ceil(side / 2) // 8 for side in resized)
    assert (first.grid_height, first.grid_width) == grid_hw
    assert first.features_shape == (1, TINY_CHANNELS, *grid_hw)
    assert first.labels.shape == grid_hw and first.labels.dtype == np.int32
    assert first.labels.min() >= 0 and first.labels.max() < 20 and first.num_clusters == 20
    assert 1 <= first.iterations <= config.max_iterations
    second = stage(coco_image)
    assert np.array_equal(first.labels, second.labels) and first.iterations == second.iterations


def test_boundary_stage_bf16_and_semantic_init(guarded_clip):
    image = checker_image(96, 160)
    config = BoundaryConfig(short_side=64, max_long_side=256, num_clusters=6, init="semantic")
    stage = BoundaryStage(guarded_clip, config, precision="bf16")
    with pytest.raises(GeneratorError, match="activation_map"):
        stage(image)
    activation = np.zeros((32, 32))
    activation[8:16, 10:16] = 1.0
    result = stage(image, activation_map=activation)
    assert result.labels.shape == (4, 6) and result.features_shape[1] == TINY_CHANNELS
    assert set(np.unique(result.labels)) <= set(range(6))
    assert np.array_equal(result.labels, stage(image, activation_map=activation).labels)


def test_boundary_stage_small_grid_clamps_k(guarded_clip):
    result = BoundaryStage(guarded_clip, BoundaryConfig(short_side=32, max_long_side=32))(checker_image(40, 40))
    assert result.labels.shape == (2, 2) and result.num_clusters == 4


def test_boundary_stage_rejects_bad_precision(tiny_clip):
    with pytest.raises(GeneratorError, match="precision"):
        BoundaryStage(tiny_clip, BoundaryConfig(), precision="fp8")


@pytest.mark.parametrize("map_hw, image_hw, grid_hw", [((32, 32), (480, 640), (30, 40)), ((32, 32), (427, 640), (26, 40))])
def test_class_map_to_grid_matches_torch_bilinear_then_nearest(map_hw, image_hw, grid_hw):
    """The numpy resampling equals torch's bilinear (align_corners=False) + nearest-exact."""
    class_map = np.random.default_rng(4).random(map_hw)
    upsampled = F.interpolate(torch.from_numpy(class_map)[None, None], size=image_hw, mode="bilinear",
                              align_corners=False)
    expected = F.interpolate(upsampled, size=grid_hw, mode="nearest-exact")[0, 0].numpy()
    np.testing.assert_allclose(class_map_to_grid(class_map, *image_hw, *grid_hw), expected, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_rn50x64_layer3_is_2048_channels_at_stride_16():
    torch.manual_seed(0)
    model = open_clip.create_model("RN50x64", pretrained=None)
    trunk = truncate_to_layer3(model.visual).eval()
    del model  # layer4, attnpool and the text tower go with it
    images, resize = resize_for_boundary(checker_image(240, 360), 320, 4096)
    assert (resize.resized_height, resize.resized_width) == (320, 480)
    with torch.no_grad():
        features = layer3_features(trunk, images)
    assert features.shape == (1, 2048, 20, 30)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-5), ("bf16", 0.1)])
def test_fast_stage_runs_channels_last_and_matches_the_nchw_trunk(coco_image, precision, atol):
    """``fidelity: fast`` runs the trunk channels-last; its features equal the NCHW trunk's within float
    rounding (bf16: within bf16 rounding), the k-means view of them is free, and ``release`` stays NCHW in
    fp32 (the release's layout and precision; in bf16 it runs channels-last too)."""
    open_clip.add_model_config(Path(labelgen.__file__).parent / "model_configs" / f"{TINY}.json")
    torch.manual_seed(0)
    fast_model = open_clip.create_model(TINY, pretrained=None).eval()
    torch.manual_seed(0)
    nchw_model = open_clip.create_model(TINY, pretrained=None).eval()
    config = BoundaryConfig(short_side=256, num_clusters=20)
    fast = BoundaryStage(fast_model, config, precision=precision, fidelity="fast")
    release = BoundaryStage(nchw_model, config, precision=precision, fidelity="release")
    assert fast.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert release.memory_format == (torch.contiguous_format if precision == "fp32" else torch.channels_last)
    assert release.trunk.conv1.weight.is_contiguous(memory_format=release.memory_format)
    features = fast.encode_batch([coco_image])[0]
    assert features.is_contiguous(memory_format=torch.channels_last) and features.dtype == torch.float32
    images, _ = resize_for_boundary(coco_image, 256, config.max_long_side, "fast")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        expected = layer3_features(nchw_model.visual, images).float()
    assert features.shape == expected.shape
    assert float((features - expected).abs().max()) <= atol * max(1.0, float(expected.abs().max()))
    # the host copy (the feature cache's) clusters exactly like the live channels-last tensor
    live = fast.cluster(features, *coco_image.shape[:2])
    host = fast.cluster(np.ascontiguousarray(features.numpy()), *coco_image.shape[:2])
    assert np.array_equal(live.labels, host.labels) and live.iterations == host.iterations


def test_the_channels_last_copy_hands_each_old_weight_back(monkeypatch):
    """Re-laying the trunk out frees the NCHW copies into the C heap; each is handed back to the OS as soon as
    its convolution is converted (peak host memory: one layer's weights, not the trunk's), and a trunk already
    in the layout is not copied again."""
    from labelgen.models import loading

    calls = []
    monkeypatch.setattr(loading, "return_freed_host_memory", lambda: calls.append(1) or True)
    model = open_clip.create_model(TINY, pretrained=None).eval()  # NCHW, as built
    all_convolutions = [m for m in truncate_to_layer3(model.visual).modules() if isinstance(m, torch.nn.Conv2d)]
    # a 1x1 kernel's NCHW weight is channels-last already; the others need a copy
    convolutions = [c for c in all_convolutions if not c.weight.is_contiguous(memory_format=torch.channels_last)]
    stage = BoundaryStage(model, BoundaryConfig(), fidelity="fast")
    assert len(calls) == len(convolutions) > 3
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in all_convolutions)
    assert stage.trunk.conv1 is model.visual.conv1
    BoundaryStage(model, BoundaryConfig(), fidelity="fast")  # already channels-last: nothing to copy
    assert len(calls) == len(convolutions)
    BoundaryStage(model, BoundaryConfig(), fidelity="release")  # fp32 release: back to NCHW
    assert all(c.weight.is_contiguous() for c in convolutions) and len(calls) == 2 * len(convolutions)
