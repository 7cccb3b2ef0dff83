"""Blocked attention (``labelgen.models.blocked_attention``): the CPU bf16/fp16 kernel of SAM's encoder and of
CLIP Surgery. It must compute the reference function (``softmax(scale q kᵀ + bias) v``) for every blocking of
queries and batch entries, with and without SAM's decomposed relative-position bias."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from labelgen.models.blocked_attention import blocked_attention, blocked_for, use_blocked_attention  # noqa: E402


def _reference(q, k, v, scale, rel_h=None, rel_w=None):
    """The definition in float64, the bias built whole."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = scale * q @ k.transpose(1, 2)
    if rel_h is not None:
        bias = rel_h.double()[:, :, :, None] + rel_w.double()[:, :, None, :]
        scores = scores + bias.reshape(scores.shape)
    return scores.softmax(-1) @ v


def _inputs(batch, height, width, dim, dtype, seed=0, rel=True):
    g = torch.Generator().manual_seed(seed)
    length = height * width
    q, k, v = (torch.randn(batch, length, dim, generator=g).to(dtype) for _ in range(3))
    rel_h = torch.randn(batch, length, height, generator=g).to(dtype) if rel else None
    rel_w = torch.randn(batch, length, width, generator=g).to(dtype) if rel else None
    return q, k, v, rel_h, rel_w


@pytest.mark.parametrize("batch, height, width, dim, block_bytes", [
    (3, 5, 7, 8, 1 << 30),      # one block for everything
    (3, 5, 7, 8, 35 * 4 * 2),   # two query rows per block, one batch entry
    (5, 4, 4, 16, 16 * 4 * 16 * 2),  # whole rows, two batch entries per block, a ragged last group
    (2, 9, 3, 4, 1),            # one query row per block (the floor)
])
@pytest.mark.parametrize("rel", [True, False])
def test_fp32_equals_the_definition_for_every_blocking(batch, height, width, dim, block_bytes, rel):
    q, k, v, rel_h, rel_w = _inputs(batch, height, width, dim, torch.float32, rel=rel)
    scale = dim ** -0.5
    got = blocked_attention(q, k, v, scale=scale, rel_h=rel_h, rel_w=rel_w, block_bytes=block_bytes)
    expected = _reference(q, k, v, scale, rel_h, rel_w)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got.double() - expected).abs().max().item() < 1e-5


def test_values_may_have_another_width():
    q, k, _, rel_h, rel_w = _inputs(2, 3, 4, 8, torch.float32)
    v = torch.randn(2, 12, 5, generator=torch.Generator().manual_seed(9))
    got = blocked_attention(q, k, v, scale=0.3, rel_h=rel_h, rel_w=rel_w, block_bytes=64)
    assert got.shape == (2, 12, 5)
    assert (got.double() - _reference(q, k, v, 0.3, rel_h, rel_w)).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_stays_within_the_unfused_references_rounding(dtype):
    """In bf16 / fp16 the error against float64 is of the order of the unfused reference's in the same dtype."""
    q, k, v, rel_h, rel_w = _inputs(4, 14, 14, 64, dtype, seed=1)
    scale = 64 ** -0.5
    exact = _reference(q, k, v, scale, rel_h, rel_w)
    got = blocked_attention(q, k, v, scale=scale, rel_h=rel_h, rel_w=rel_w, block_bytes=1 << 16)
    scores = (torch.bmm(q, k.transpose(1, 2)) * scale).view(4, 196, 14, 14)
    scores = (scores + rel_h[..., None] + rel_w[:, :, None, :]).view(4, 196, 196)
    unfused = torch.bmm(scores.softmax(-1), v)  # all in ``dtype``: segment_anything's arithmetic
    reference_error = (unfused.double() - exact).abs().max().item()
    error = (got.double() - exact).abs().max().item()
    assert got.dtype == dtype
    assert error <= 2 * reference_error + 1e-3, (error, reference_error)


def test_autocast_does_not_change_the_dtype_inside():
    q, k, v, rel_h, rel_w = _inputs(2, 4, 4, 8, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = blocked_attention(q, k, v.float(), scale=0.35, rel_h=rel_h.float(), rel_w=rel_w.float())
    assert got.dtype == torch.bfloat16
    assert (got.double() - _reference(q, k, v, 0.35, rel_h, rel_w)).abs().max().item() < 5e-2


def test_bad_shapes_are_refused():
    q, k, v, rel_h, rel_w = _inputs(2, 3, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="rel_h and rel_w"):
        blocked_attention(q, k, v, scale=1.0, rel_h=rel_h)
    with pytest.raises(ValueError, match="H \\* W == L"):
        blocked_attention(q, k, v, scale=1.0, rel_h=rel_h[:, :, :2], rel_w=rel_w)
    with pytest.raises(ValueError, match="expected q"):
        blocked_attention(q, k[:, :5], v, scale=1.0)


def test_it_is_chosen_for_cpu_low_precision_only():
    assert use_blocked_attention(torch.zeros(1, dtype=torch.bfloat16))
    assert use_blocked_attention(torch.zeros(1, dtype=torch.float16))
    assert not use_blocked_attention(torch.zeros(1))
    assert not use_blocked_attention(torch.zeros(1, dtype=torch.float64))
    assert blocked_for("cpu", "bf16") and blocked_for("cpu", "fp16")
    assert not blocked_for("cpu", "fp32") and not blocked_for("cuda", "bf16")


# -- where it runs: CLIP Surgery's attention and SAM's encoder ---------------------------------------------------
def test_clip_surgery_attention_takes_the_blocked_kernel_in_bf16(monkeypatch):
    from labelgen.generators.zip import semantic
    from labelgen.models import blocked_attention as module

    calls = []
    original = module.blocked_attention
    monkeypatch.setattr(module, "blocked_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 17, 32, generator=g) for _ in range(3))
    exact = semantic._multi_head_attention(q, k, v, 4)  # fp32: SDPA
    assert not calls
    low = semantic._multi_head_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4)
    assert calls and low.dtype == torch.bfloat16 and low.shape == exact.shape
    assert (low.float() - exact).abs().max().item() < 3e-2


@pytest.mark.parametrize("recipe, kind, package", [("zip-tiny-random", "clip_surgery_tokens", "open_clip"),
                                                   ("zip-sam2-tiny-random", "sam_embedding", "sam2")])
def test_the_cache_key_names_the_blocked_kernel_on_cpu_in_bf16_only(recipe, kind, package):
    """CLIP Surgery's tokens and SAM 2's embedding change within rounding under the blocked kernel: the feature
    cache keeps them apart from the fused kernel's (fp32 and GPU keys stay those of earlier caches)."""
    pytest.importorskip(package)
    from labelgen.config import load_recipe
    from labelgen.generators import GENERATORS

    keys = {}
    for precision in ("fp32", "bf16"):
        loaded = load_recipe(f"recipes/{recipe}.yaml", [f"generator.precision={precision}"])
        gen = GENERATORS.get(loaded.generator.name).from_config(loaded.generator.params)
        keys[precision] = gen.cache_keys(np.zeros((8, 8, 3), np.uint8))[kind]
    assert "attention_kernel" not in keys["fp32"]
    assert keys["bf16"]["attention_kernel"] == "blocked"


@pytest.mark.parametrize("block_bytes", [1 << 30, 40])
def test_fewer_queries_than_keys(block_bytes):
    """SAM 2's pooled queries: L_q < L keys; with a bias over the keys' grid too."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 8, generator=g)
    k, v = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 6, generator=g)
    rel_h, rel_w = torch.randn(3, 4, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    for bias in ((None, None), (rel_h, rel_w)):
        got = blocked_attention(q, k, v, scale=0.4, rel_h=bias[0], rel_w=bias[1], block_bytes=block_bytes)
        assert got.shape == (3, 4, 6)
        assert (got.double() - _reference(q, k, v, 0.4, *bias)).abs().max().item() < 1e-5
