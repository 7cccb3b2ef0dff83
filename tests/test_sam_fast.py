"""labelgen's fast SAM image encoder (SDPA with the relative-position bias as an additive mask) against
segment_anything's reference attention: same weights, same embeddings within float rounding."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

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
