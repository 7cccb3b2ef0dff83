"""``generator.fidelity: release``: stages 1-3 as the authors' release computes them (issue 17).

Each divergence the issue lists is pinned against an independent statement of the release's rule,
written here from its description (``docs/method.md``, "Fidelity"), never by calling the code under
test twice: the boundary resize (torchvision's truncation), torch ``nearest`` sampling of the
activation mask, the ``Counter.most_common`` cut, k-means (stopping rule, distances, empty clusters,
labels before the last update), token normalisation, the positional-embedding write, and QuickGELU
in every model built for OpenAI weights.
"""
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from labelgen.generators.zip.boundary import resize_for_boundary, resized_size  # noqa: E402
from labelgen.generators.zip.config import DiscoveryConfig, SemanticConfig, ZipConfig  # noqa: E402
from labelgen.generators.zip.discovery import activation_mask, discover_instances, release_image_map  # noqa: E402
from labelgen.generators.zip.kmeans import kmeans, kmeans_release, release_init_indices  # noqa: E402


# -- stage 2: the boundary input size ------------------------------------------------------------------
@pytest.mark.parametrize("image_hw, short_side, max_long, release_hw, fast_hw", [
    ((480, 640), 2048, 4096, (2048, 2730), (2048, 2731)),  # the case: int(2048 * 640 / 480) = 2730
    ((640, 427), 2048, 4096, (3069, 2048), (3070, 2048)),  # portrait: int(2048 * 640 / 427) = 3069
    ((480, 640), 320, 640, (320, 426), (320, 427)),
    ((100, 1000), 2048, 4096, (409, 4096), (410, 4096)),  # over the cap: int(4096 * 2048 / 20480) = 409
    ((512, 512), 2048, 4096, (2048, 2048), (2048, 2048)),
])
def test_release_resize_truncates_like_torchvision(image_hw, short_side, max_long, release_hw, fast_hw):
    height, width = image_hw
    assert resized_size(height, width, short_side, max_long, "release") == release_hw
    assert resized_size(height, width, short_side, max_long, "fast") == fast_hw
    short, long = min(image_hw), max(image_hw)
    new_long = int(short_side * long / short)  # torchvision's _compute_resized_output_size, restated
    new_short = short_side if new_long <= max_long else int(max_long * short_side / new_long)
    new_long = min(new_long, max_long)
    assert release_hw == ((new_short, new_long) if height <= width else (new_long, new_short))


def test_release_resize_matches_torchvision_resize():
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    expected = transforms.Resize(37, interpolation=transforms.InterpolationMode.BICUBIC)(Image.fromarray(image))
    tensor, resize = resize_for_boundary(image, 37, 4096, "release")
    assert (resize.resized_width, resize.resized_height) == expected.size == (49, 37)
    pixels = torch.from_numpy(np.asarray(expected, np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073))[:, None, None]
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711))[:, None, None]
    assert torch.equal(tensor[0], (pixels - mean) / std)


# -- stage 3: the activation mask ----------------------------------------------------------------------
def _release_mask(class_map, image_hw, grid_hw, ratio=0.7):
    """The release's steps, in torch: bilinear to the image, numpy mean there, torch nearest to the grid."""
    image_map = F.interpolate(torch.from_numpy(class_map)[None, None], image_hw, mode="bilinear")[0, 0].numpy()
    threshold = np.mean(image_map) * ratio
    grid = F.interpolate(torch.from_numpy(image_map)[None, None], grid_hw, mode="nearest")[0, 0].numpy()
    return np.asarray(grid) > np.asarray(threshold), image_map


@pytest.mark.parametrize("image_hw, grid_hw", [((480, 640), (128, 170)), ((427, 640), (128, 191)),
                                               ((640, 361), (181, 102)), ((100, 33), (50, 66))])
def test_release_activation_mask_is_the_releases(image_hw, grid_hw):
    class_map = np.random.default_rng(sum(image_hw)).random((32, 32), dtype=np.float32)
    expected, image_map = _release_mask(class_map, image_hw, grid_hw)
    got = activation_mask(class_map, *image_hw, *grid_hw, 0.7, "release", image_map=image_map)
    assert np.array_equal(got, expected)
    # without torch's own map: numpy's float32 bilinear, within ~1e-6 of torch's
    np.testing.assert_allclose(release_image_map(class_map, *image_hw), image_map, rtol=0, atol=5e-6)


def test_release_samples_cell_corners_not_centres():
    # a map whose image-sized version is a column ramp: cell i of the grid reads pixel floor(i * W / w)
    width, cells = 640, 170
    image_map = np.tile(np.arange(width, dtype=np.float32), (8, 1))
    torch_cols = F.interpolate(torch.from_numpy(image_map)[None, None], (4, cells), mode="nearest")[0, 0, 0]
    corner = np.floor(np.arange(cells) * (width / cells)).astype(int)
    centre = ((2 * np.arange(cells) + 1) * width) // (2 * cells)
    assert np.array_equal(torch_cols.numpy().astype(int), corner)
    assert (corner != centre).sum() > 100  # the two rules differ on most cells
    threshold_col = 300
    ramp = np.zeros((4, 4), np.float32)  # any class map: only image_map matters here
    mask = activation_mask(ramp, 8, width, 4, cells, 1.0, "release", image_map=image_map)
    assert np.array_equal(mask[0], corner > image_map.mean())  # ratio 1: map > mean, sampled at corners
    assert threshold_col  # (the ramp's mean is 319.5)


# -- stage 3: the most_common cut ----------------------------------------------------------------------
def _release_visits(labels, activated, k):
    """The release's loop header, restated: Counter of (labels + 1) * A, most_common(k), 0 skipped."""
    counter = Counter(((labels + 1) * activated).ravel().tolist())
    return [value - 1 for value, _ in counter.most_common(k) if value != 0]


def _grid_with_every_cluster_activated(k=4):
    labels = np.zeros((12, 12), np.int64)
    for cluster in range(k):  # k blocks of 3 rows, each a compact fragment
        labels[3 * cluster:3 * cluster + 3] = cluster
    activated = np.zeros_like(labels, bool)
    activated[0:3, :] = True  # cluster 0: 36 activated cells
    activated[3:6, :10] = True  # cluster 1: 30
    activated[6:9, :9] = True  # cluster 2: 27
    activated[9:12, :8] = True  # cluster 3: 24, the least activated; 0 entry: 3+9+16 = 27 non-activated cells
    return labels, activated


def test_most_common_cut_drops_the_least_activated_cluster():
    labels, activated = _grid_with_every_cluster_activated()
    assert _release_visits(labels, activated, 4) == [0, 1, 2]  # the 0 entry (27) takes the fourth place
    faithful = discover_instances(labels, activated, DiscoveryConfig(min_cells=1, max_box_to_area=10.0), 4)
    visit_all = discover_instances(labels, activated, DiscoveryConfig(min_cells=1, max_box_to_area=10.0,
                                                                      cluster_visits="all"), 4)
    assert sorted(c for inst in faithful for c in inst.cluster_ids) == [0, 1, 2]
    assert sorted(c for inst in visit_all for c in inst.cluster_ids) == [0, 1, 2, 3]


def test_most_common_ties_follow_first_occurrence():
    labels = np.array([[0, 0, 1, 1], [2, 2, 3, 3], [0, 1, 2, 3]])
    activated = np.array([[True] * 4, [True] * 4, [False] * 4])
    # every cluster has 2 activated cells, the 0 entry 4: of the tied clusters, the last one seen is cut
    assert _release_visits(labels, activated, 4) == [0, 1, 2]
    config = DiscoveryConfig(min_cells=1, min_activated_fraction=0.0)
    found = discover_instances(labels, activated, config, 4)
    assert sorted(c for inst in found for c in inst.cluster_ids) == [0, 1, 2]
    every = discover_instances(labels, activated, DiscoveryConfig(min_cells=1, min_activated_fraction=0.0,
                                                                  cluster_visits="all"), 4)
    assert sorted(c for inst in every for c in inst.cluster_ids) == [0, 1, 2, 3]


# -- stage 2: k-means ----------------------------------------------------------------------------------
def _release_kmeans(features, k, max_iterations=100):
    """The release's loop, restated from its description (not labelgen's code)."""
    seeds = torch.unique(torch.round(torch.linspace(0, features.shape[0] - 1, k))).long()
    centroids = features[seeds]
    for iteration in range(max_iterations):
        labels = torch.argmin(torch.cdist(features, centroids, p=2), dim=1)
        old = centroids.clone()
        for j in range(k):
            members = features[labels == j]
            centroids[j] = members.mean(dim=0) if len(members) > 0 else old[j]
        if torch.allclose(centroids, old, rtol=1e-5):
            break
    return labels, centroids, iteration + 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_release_kmeans_gives_the_releases_assignment_and_iterations(seed):
    generator = torch.Generator().manual_seed(seed)
    # raw layer3-like vectors: large norms, a few blobs (the paper's grid is 128 x 170 = 21760 points)
    centres = torch.randn(6, 32, generator=generator) * 4 + 20
    features = (centres[torch.randint(0, 6, (1500,), generator=generator)]
                + torch.randn(1500, 32, generator=generator) * 3).contiguous()
    expected_labels, expected_centroids, expected_iterations = _release_kmeans(features.clone(), 20)
    labels, centroids, iterations = kmeans_release(features.clone(), 20, 100, 1e-5)
    assert iterations == expected_iterations
    assert torch.equal(labels, expected_labels) and torch.equal(centroids, expected_centroids)


def test_release_kmeans_returns_the_labels_before_the_last_update():
    features = torch.tensor([[0.0], [1.0], [9.0], [10.0], [4.9]])
    labels, centroids, iterations = kmeans_release(features, 2, max_iterations=1, tolerance=1e-5)
    # one iteration from seeds 0 and 4 (4.9): 1.0 -> 0, 9.0 / 10.0 -> 1; the labels are that assignment
    assert labels.tolist() == [0, 0, 1, 1, 1] and iterations == 1
    assert centroids[:, 0].tolist() == pytest.approx([0.5, (9.0 + 10.0 + 4.9) / 3])


def test_release_kmeans_stops_with_the_default_atol():
    # a centroid coordinate of 0 moving by 5e-9: allclose(rtol=1e-5) with atol=1e-8 stops, atol=0 would not
    features = torch.tensor([[0.0, 1.0], [1e-8, 1.0], [100.0, 5.0]], dtype=torch.float64)
    _, _, release_iterations = kmeans_release(features, 2, 100, 1e-5, torch.tensor([0, 2]))
    _, _, fast_iterations = kmeans(features, 2, 100, 1e-5, torch.tensor([0, 2]))
    assert release_iterations == 1 and fast_iterations == 2


def test_release_kmeans_keeps_an_empty_clusters_centroid():
    features = torch.tensor([[0.0], [0.1], [0.2], [50.0]])
    labels, centroids, _ = kmeans_release(features, 3, 5, 1e-5, torch.tensor([0, 1, 3]))
    assert set(labels.tolist()) <= {0, 1, 2}
    seeds = torch.tensor([[0.0], [0.1], [50.0]])
    assert torch.equal(_release_kmeans_from(features, seeds)[1], centroids)


def _release_kmeans_from(features, seeds):
    centroids = seeds.clone()
    for _ in range(5):
        labels = torch.argmin(torch.cdist(features, centroids, p=2), dim=1)
        old = centroids.clone()
        for j in range(len(centroids)):
            members = features[labels == j]
            centroids[j] = members.mean(dim=0) if len(members) > 0 else old[j]
        if torch.allclose(centroids, old, rtol=1e-5):
            break
    return labels, centroids


def test_release_seeds_are_float32_linspace_positions():
    for cells in (21760, 16320, 123_457):
        expected = torch.unique(torch.round(torch.linspace(0, cells - 1, 20))).long().numpy()
        assert np.array_equal(release_init_indices(cells, 20), expected)


# -- stage 1: token normalisation and the positional embedding -------------------------------------------
def test_token_normalisation_along_tokens_is_the_releases_axis():
    from labelgen.generators.zip.semantic import activation_maps, normalise_tokens

    tokens = torch.randn(1, 1 + 16, 8, generator=torch.Generator().manual_seed(3))
    text, redundant = torch.randn(2, 8), torch.randn(8)
    released = tokens / tokens.norm(dim=1, keepdim=True)  # image_features / image_features.norm(dim=1)
    similarity = released[:, 1:] @ (text - redundant).T
    low, high = similarity.min(1, keepdim=True)[0], similarity.max(1, keepdim=True)[0]
    expected = ((similarity - low) / (high - low)).transpose(1, 2).reshape(1, 2, 4, 4)
    got = activation_maps(normalise_tokens(tokens, "tokens")[:, 1:], text, redundant, normalise=False)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(activation_maps(tokens[:, 1:], text, redundant), expected, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_clip():
    from labelgen.models.loading import load_clip

    model, tokenizer, _ = load_clip("labelgen-tiny-vit", "openai", random_weights=True, allow_download=False,
                                    device=torch.device("cpu"))
    return model, tokenizer


def test_positional_embedding_mutate_writes_the_model_and_gives_the_same_tokens(tiny_clip):
    import copy

    from labelgen.generators.zip.semantic import SemanticStage

    model, tokenizer = tiny_clip
    image = np.random.default_rng(4).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    cached = SemanticStage(model, tokenizer, SemanticConfig(input_size=64))
    mutated_model = copy.deepcopy(model)
    native_rows = mutated_model.visual.positional_embedding.shape[0]
    mutated = SemanticStage(mutated_model, tokenizer, SemanticConfig(input_size=64, positional_embedding="mutate"))
    first, again = mutated.encode(image), mutated.encode(image)
    grid = 64 // model.visual.patch_size[0]
    assert mutated_model.visual.positional_embedding.shape[0] == 1 + grid * grid != native_rows
    assert model.visual.positional_embedding.shape[0] == native_rows  # the cached stage never writes
    np.testing.assert_array_equal(first, cached.encode(image))
    np.testing.assert_array_equal(again, first)


# -- QuickGELU for OpenAI weights ----------------------------------------------------------------------
def _activations(model):
    return {type(module).__name__ for module in model.modules() if "GELU" in type(module).__name__}


@pytest.mark.parametrize("name", ["labelgen-tiny-vit", "labelgen-tiny-rn"])
def test_openai_weights_build_quickgelu_and_others_gelu(name):
    from labelgen.models.loading import load_clip, uses_quick_gelu

    cpu = torch.device("cpu")
    openai, _, facts = load_clip(name, "openai", random_weights=True, allow_download=False, device=cpu)
    other, _, other_facts = load_clip(name, "laion2b_s34b_b88k", random_weights=True, allow_download=False, device=cpu)
    assert _activations(openai) == {"QuickGELU"} and facts["activation"] == "quick_gelu"
    assert _activations(other) == {"GELU"} and other_facts["activation"] == "model_config"
    assert uses_quick_gelu("ViT-B-16-quickgelu", "/weights/mine.pt") and not uses_quick_gelu("ViT-B-16", "dfn2b")


def test_every_model_the_zip_generator_and_labeler_build_for_openai_weights_uses_quickgelu(monkeypatch):
    from labelgen.generators.zip.generator import ZipGenerator
    from labelgen.labelers.clip import ClipLabeler
    from labelgen.labelers.config import LabelerConfig
    from labelgen.models import loading
    from labelgen.generators.zip.config import BoundaryConfig, SamConfig

    built = []
    real = loading.load_clip

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        built.append((args[0], args[1], result[0]))
        return result

    monkeypatch.setattr(loading, "load_clip", spy)
    config = ZipConfig(semantic=SemanticConfig(model="labelgen-tiny-vit", input_size=64),
                       boundary=BoundaryConfig(model="labelgen-tiny-rn", short_side=64, max_long_side=128),
                       sam=SamConfig(model_type="tiny"), random_weights=True, allow_download=False)
    ZipGenerator.from_config(config)
    ClipLabeler.from_config(LabelerConfig(classes={"cat": []}, model="labelgen-tiny-vit", input_size=64,
                                          random_weights=True, allow_download=False))
    assert [(name, tag) for name, tag, _ in built] == [("labelgen-tiny-vit", "openai"), ("labelgen-tiny-rn", "openai"),
                                                       ("labelgen-tiny-vit", "openai")]
    assert all(_activations(model) == {"QuickGELU"} for _, _, model in built)


@pytest.mark.slow
def test_the_paper_recipes_real_architectures_use_quickgelu():
    from labelgen.models.loading import load_clip

    for name in ("ViT-B-16", "RN50x64"):  # built one at a time, freed after
        model, _, _ = load_clip(name, "openai", random_weights=True, allow_download=False, device=torch.device("cpu"))
        assert _activations(model) == {"QuickGELU"}, name
        del model


# -- the generator: fidelity end to end ----------------------------------------------------------------
def test_zip_generator_runs_both_fidelities_and_keys_the_cache_by_the_resize_rule():
    from labelgen.config import load_recipe
    from labelgen.generators.zip.generator import ZipGenerator
    from labelgen.structures.instances import ImageRecord
    import dataclasses
    from pathlib import Path

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "zip-tiny-random.yaml")
    fast = recipe.generator.params
    assert fast.fidelity == "fast" and fast.discovery.cluster_visits == "all"
    release = dataclasses.replace(fast, fidelity="release",
                                  discovery=dataclasses.replace(fast.discovery, cluster_visits="most_common"))
    image = np.random.default_rng(5).integers(0, 255, (90, 130, 3), dtype=np.uint8)
    record = ImageRecord(image_id="a.png", uri="/nonexistent/a.png", height=90, width=130)
    outputs = {}
    for config in (fast, release):
        generator = ZipGenerator.from_config(config)
        outputs[config.fidelity] = generator.generate(image, record)
        assert generator.boundary.fidelity == config.fidelity
        keys = generator.cache_keys(image)
        assert keys["clip_layer3"]["resize_rule"] == ("truncate" if config.fidelity == "release" else "round")
    assert all((out.height, out.width) == (90, 130) for out in outputs.values())
    # 130 x 90 at a 256 short side: the release truncates 369.8 to 369, the fast rule rounds to 370
    assert resized_size(90, 130, 256, 512, "release") == (256, 369) and resized_size(90, 130, 256, 512) == (256, 370)
    assert ZipConfig().fidelity == "release" and DiscoveryConfig().cluster_visits == "most_common"


# -- the method fixes (options, off as released) ---------------------------------------------------------
def test_box_margin_grows_grid_boxes_within_the_grid():
    from labelgen.generators.zip.discovery import grow_grid_boxes

    boxes = np.array([[2, 3, 5, 6], [0, 0, 9, 4]], np.float64)
    assert grow_grid_boxes(boxes, 1, 5, 9).tolist() == [[1, 2, 6, 5], [0, 0, 9, 5]]  # clipped to 9 x 5 cells
    assert grow_grid_boxes(boxes, 0, 5, 9).tolist() == boxes.tolist()


def _bridged_blocks():
    labels = np.zeros((6, 9), np.int64)
    labels[1:4, 1:4] = 1  # instance A
    labels[1:4, 5:8] = 1  # instance B, same cluster
    for cell in ((2, 4), (3, 4), (4, 5), (4, 6)):  # a diagonal ring of cluster 2: two thin pieces
        labels[cell] = 2
    activated = labels > 0
    return labels, activated


@pytest.mark.parametrize("connectivity, instances", [(4, 1), (8, 2)])
def test_thin_ring_pieces_do_not_bridge_two_instances_with_8_connectivity(connectivity, instances):
    labels, activated = _bridged_blocks()
    config = DiscoveryConfig(min_cells=1, cluster_visits="all", fragment_connectivity=connectivity)
    found = discover_instances(labels, activated, config)
    assert len(found) == instances
    if connectivity == 8:
        assert [inst.box_xyxy_grid for inst in found] == [(1, 1, 4, 4), (5, 1, 8, 4)]


def test_fragment_connectivity_must_be_4_or_8():
    from labelgen.checks import FieldValueError

    with pytest.raises(FieldValueError, match="fragment_connectivity"):
        DiscoveryConfig(fragment_connectivity=6)


@pytest.mark.parametrize("recover, expected", [(False, []), (True, [(16, (2, 2, 6, 6))])])
def test_small_interior_recovered_from_its_ring(recover, expected):
    labels = np.zeros((9, 9), np.int64)
    labels[3:5, 3:5] = 1  # a 2 x 2 interior (its ring is another cluster)
    found = discover_instances(labels, labels == 1, DiscoveryConfig(min_cells=9, cluster_visits="all",
                                                                    recover_small=recover))
    assert [(inst.area_cells, inst.box_xyxy_grid) for inst in found] == expected


def _nms_generator(**discovery):
    import dataclasses

    from labelgen.generators.zip.config import SamConfig
    from labelgen.generators.zip.generator import ZipGenerator

    generator = ZipGenerator.__new__(ZipGenerator)
    generator.config = ZipConfig(discovery=dataclasses.replace(DiscoveryConfig(), **discovery),
                                 sam=SamConfig(nms_iou=0.7, nms_ios=0.9))
    return generator


def _instances(masks, classes, confidence, evidence):
    from labelgen.structures.instances import Instances
    from labelgen.structures.masks import masks_to_rles, rles_to_boxes_xyxy

    rles = masks_to_rles(np.asarray(masks))
    n = len(masks)
    scores = {"confidence": np.asarray(confidence, np.float32), "activated_fraction": np.asarray(evidence, np.float32)}
    return Instances(height=masks[0].shape[0], width=masks[0].shape[1], masks_rle=tuple(rles),
                     boxes_xyxy=rles_to_boxes_xyxy(rles), scores=scores, class_ids=np.asarray(classes, np.int32),
                     attributes={"semantic_class_id": [int(c) for c in classes]}, provenance={})


def _bowl_food_and_part():
    bowl, food, part = (np.zeros((20, 20), bool) for _ in range(3))
    bowl[2:18, 2:18] = True
    food[6:12, 6:12] = True  # inside the bowl, another class
    part[2:8, 2:18] = True  # a part of the bowl, same class
    return [bowl, food, part]


@pytest.mark.parametrize("containment, kept", [("all", [0]), ("same_class", [0, 1])])
def test_containment_nms_keeps_another_class_inside_and_removes_parts(containment, kept):
    instances = _instances(_bowl_food_and_part(), classes=[0, 1, 0], confidence=[0.9, 0.8, 0.7], evidence=[1, 1, 1])
    result = _nms_generator(nms_containment=containment)._suppress_duplicates(instances)
    assert result.class_ids.tolist() == [instances.class_ids[i] for i in kept]


@pytest.mark.parametrize("rule, kept_class", [("confidence", 0), ("evidence", 1)])
def test_duplicate_class_chosen_by_fragment_evidence(rule, kept_class):
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    instances = _instances([mask, mask], classes=[0, 1], confidence=[0.6, 0.5], evidence=[0.35, 0.9])
    result = _nms_generator(duplicate_class=rule)._suppress_duplicates(instances)
    assert result.class_ids.tolist() == [kept_class]


@pytest.mark.parametrize("num_points, dim, k, dtype", [
    (21760 // 8, 2560 // 8, 20, torch.float32),  # the paper's grid shape, scaled down
    (3000, 1280, 20, torch.float32),
    (997, 33, 7, torch.float64),
    (26, 5, 3, torch.float32),   # just above cdist's direct-kernel threshold
    (25, 5, 25, torch.float32),  # at it: the direct kernel
    (12, 3, 30, torch.float32),  # more centroids than rows: the product path again
])
def test_release_distances_are_cdists_bits(num_points, dim, k, dtype):
    from labelgen.generators.zip.kmeans import _ReleaseDistances
    generator = torch.Generator().manual_seed(num_points)
    features = (torch.randn(num_points, dim, generator=generator) * 5 + 30).to(dtype)
    distances = _ReleaseDistances(features)
    for step in range(3):  # the cached factor is reused across calls
        centroids = features[torch.randperm(num_points, generator=generator)[: min(k, num_points)]] + step
        assert torch.equal(distances(centroids), torch.cdist(features, centroids, p=2))


def test_release_kmeans_matches_the_release_at_a_larger_grid():
    generator = torch.Generator().manual_seed(7)
    centres = torch.randn(12, 256, generator=generator) * 3 + 10
    features = (centres[torch.randint(0, 12, (4000,), generator=generator)]
                + torch.randn(4000, 256, generator=generator) * 2).abs().contiguous()
    expected = _release_kmeans(features.clone(), 20)
    got = kmeans_release(features.clone(), 20, 100, 1e-5)
    assert got[2] == expected[2] and torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
