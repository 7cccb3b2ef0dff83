"""labelgen's fast SAM image encoder (SDPA with the relative-position bias as an additive mask) against
segment_anything's reference attention: same weights, same embeddings within float rounding."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from labelgen.models.loading import native_bf16_cpu_flag  # noqa: E402
from labelgen.models.sam import build_sam  # noqa: E402
from labelgen.models.sam_fast import (decomposed_rel_pos_bias, restore_reference_attention,  # noqa: E402
                                      use_fast_attention)


def _randomise_rel_pos(encoder, seed=0):
    """SAM initialises the relative-position tables to zero; random ones exercise the bias path."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "rel_pos" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def _embeddings(model_type, size, seed=0):
    torch.manual_seed(seed)
    encoder = build_sam(model_type, None).image_encoder
    _randomise_rel_pos(encoder, seed)
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.inference_mode():
        reference = encoder(pixels)
        changed = use_fast_attention(encoder)
        fast = encoder(pixels)
        restored = restore_reference_attention(encoder)
        again = encoder(pixels)
    return reference, fast, again, changed, restored


def test_bias_mask_matches_segment_anythings_decomposed_rel_pos():
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    g = torch.Generator().manual_seed(3)
    height, width, channels, batch = 5, 7, 8, 2
    q = torch.randn(batch, height * width, channels, generator=g)
    rel_h, rel_w = torch.randn(2 * height - 1, channels, generator=g), torch.randn(2 * width - 1, channels, generator=g)
    zeros = torch.zeros(batch, height * width, height * width)
    expected = add_decomposed_rel_pos(zeros, q, rel_h, rel_w, (height, width), (height, width))
    assert torch.allclose(decomposed_rel_pos_bias(q, rel_h, rel_w, (height, width)), expected, atol=1e-6)


def test_tiny_sam_encoder_fast_equals_reference():
    reference, fast, again, changed, restored = _embeddings("tiny", 128)
    assert changed == restored == 2  # both blocks of the tiny encoder
    assert (fast - reference).abs().max().item() < 1e-4
    assert torch.equal(again, reference)  # the reference forward is back, bit for bit


@pytest.mark.slow
def test_vit_b_encoder_fast_equals_reference_on_the_real_architecture():
    reference, fast, _, changed, _ = _embeddings("vit_b", 1024)
    assert changed == 12
    scale = reference.abs().max().item()
    assert (fast - reference).abs().max().item() < 1e-4 * max(scale, 1.0)


def _coco_image(coco128_images, name="000000000009.jpg"):
    from labelgen.engine.decode import read_image_rgb
    from labelgen.structures.instances import ImageRecord

    image, info = read_image_rgb(str(coco128_images / name))
    return image, ImageRecord(name, name, info["width"], info["height"])


@pytest.mark.parametrize("recipe, key", [("recipes/zip-tiny-random.yaml", "generator.sam.attention"),
                                         ("recipes/sam-auto-tiny-random.yaml", "generator.attention")])
def test_sdpa_attention_gives_the_reference_labels(recipe, key, coco128_images):
    from labelgen.config import load_recipe
    from labelgen.generators import GENERATORS

    image, record = _coco_image(coco128_images)
    outputs = []
    for attention in ("reference", "sdpa"):
        loaded = load_recipe(recipe, [f"{key}={attention}"])
        gen = GENERATORS.get(loaded.generator.name).from_config(loaded.generator.params)
        outputs.append(gen.generate(image, record))
    reference, fast = outputs
    assert len(reference) == len(fast) > 0
    from pycocotools import mask as mask_utils

    from labelgen.structures.masks import rle_to_pycocotools

    ious = mask_utils.iou([rle_to_pycocotools(r) for r in fast.masks_rle],
                          [rle_to_pycocotools(r) for r in reference.masks_rle], [0] * len(reference))
    assert np.diag(np.asarray(ious).reshape(len(fast), len(reference))).min() > 0.99
    np.testing.assert_allclose(fast.scores["confidence"], reference.scores["confidence"], atol=1e-3)


def test_the_attention_path_is_part_of_the_sam_cache_key():
    from labelgen.config import load_recipe
    from labelgen.generators import GENERATORS

    keys = []
    for attention in ("reference", "sdpa"):
        loaded = load_recipe("recipes/zip-tiny-random.yaml", [f"generator.sam.attention={attention}"])
        gen = GENERATORS.get(loaded.generator.name).from_config(loaded.generator.params)
        keys.append(gen.cache_keys(np.zeros((8, 8, 3), np.uint8))["sam_embedding"])
    assert keys[0] != keys[1] and "attention" not in keys[0]  # reference keys are the ones of earlier caches


def _bf16_errors(model_type, size):
    """Largest differences from the fp32 encoder of the reference attention and of ``attention: fast`` (on a CPU
    in bf16: blocked attention, the bias added from its two factors), both under bf16 autocast."""
    torch.manual_seed(0)
    encoder = build_sam(model_type, None).image_encoder.eval()
    _randomise_rel_pos(encoder)
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        exact = encoder(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference = encoder(pixels).float()
            changed = use_fast_attention(encoder, kernel="fast")
            fast = encoder(pixels).float()
        restore_reference_attention(encoder)
    return (fast - exact).abs().max().item(), (reference - exact).abs().max().item(), changed


@pytest.mark.parametrize("model_type, size, blocks", [
    ("tiny", 128, 2),
    # the real architecture; emulated bf16 (no native CPU support) would make it ~10x slower
    pytest.param("vit_b", 1024, 12, marks=[pytest.mark.slow, pytest.mark.skipif(
        not native_bf16_cpu_flag(), reason="this CPU has no native bf16 (emulated: ~10x slower)")]),
])
def test_fast_kernel_in_bf16_is_as_close_to_fp32_as_the_reference_in_bf16(model_type, size, blocks):
    fast_error, reference_error, changed = _bf16_errors(model_type, size)
    assert changed == blocks
    assert 0 < fast_error <= 1.5 * reference_error + 1e-3, (fast_error, reference_error)
