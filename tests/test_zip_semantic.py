"""Stage 1 of Zip (CLIP Surgery activation maps, gating) on tiny random-weight models."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from labelgen.errors import ConfigError, GeneratorError, ValidationError  # noqa: E402
from labelgen.generators.zip.config import SemanticConfig  # noqa: E402
from labelgen.models.presets import MODEL_CONFIG_DIR, register_model_configs  # noqa: E402
from labelgen.models.prompts import PROMPT_TEMPLATES  # noqa: E402
from labelgen.generators.zip.semantic import (  # noqa: E402
    SemanticStage,
    TextEmbeddingCache,
    activation_maps,
    class_probabilities,
    gate_classes,
    positional_embedding_for_grid,
    preprocess_square,
    surgery_forward,
    text_embeddings,
)

TINY = "labelgen-tiny-vit"
SAMPLE_IMAGE = "000000000009.jpg"


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): the tiny ViT CLIP, random weights with non-trivial biases and norms."""
    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None).eval()
    with torch.no_grad():
        for name, param in model.visual.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                param.add_(0.1 * torch.randn_like(param))
    return model, open_clip.get_tokenizer(TINY)


@pytest.fixture
def sample_image(coco128_images):
    from PIL import Image

    path = coco128_images / SAMPLE_IMAGE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return np.asarray(Image.open(path).convert("RGB"))


def images_224(batch=2, seed=1):
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- prompts
def test_prompt_templates():
    assert len(PROMPT_TEMPLATES) == 85
    assert len(set(PROMPT_TEMPLATES)) == 85
    assert all(t.count("{}") == 1 for t in PROMPT_TEMPLATES)
    assert PROMPT_TEMPLATES[0] == "a bad photo of a {}."
    assert PROMPT_TEMPLATES[79] == "a tattoo of the {}."
    assert PROMPT_TEMPLATES[80:] == (
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
    )


def test_register_model_configs_is_idempotent():
    from open_clip.factory import _MODEL_CONFIG_PATHS

    assert register_model_configs() == register_model_configs() == MODEL_CONFIG_DIR
    assert TINY in open_clip.list_models()
    assert sum(1 for p in _MODEL_CONFIG_PATHS if p == MODEL_CONFIG_DIR) == 1


# ----------------------------------------------------------------- surgery vs. by hand
def _attention_by_hand(block, h, v_only):
    """Multi-head attention of ln_1 output ``h`` (B, T, W) from explicit q/k/v matrices."""
    width = h.shape[-1]
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    q = h @ w[:width].T + b[:width]
    k = h @ w[width:2 * width].T + b[width:2 * width]
    v = h @ w[2 * width:].T + b[2 * width:]
    if v_only:
        q, k = v, v
    heads = block.attn.num_heads
    head_dim = width // heads
    outs = []
    for i in range(heads):
        cols = slice(i * head_dim, (i + 1) * head_dim)
        weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        outs.append(weights @ v[..., cols])
    return torch.cat(outs, dim=-1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def _surgery_by_hand(visual, images, depth, start):
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    blocks = list(visual.transformer.resblocks)
    for block in blocks[:len(blocks) - depth]:
        x = block(x)
    original = x
    new = x.clone() if start == "input" else torch.zeros_like(x)
    for block in blocks[len(blocks) - depth:]:
        h = block.ln_1(original)
        new = new + _attention_by_hand(block, h, v_only=True)
        original = original + _attention_by_hand(block, h, v_only=False)
        original = original + block.mlp(block.ln_2(original))
    out = torch.cat([original[:, :1], new[:, 1:]], dim=1)
    return visual.ln_post(out) @ visual.proj


@pytest.mark.parametrize("start", ["input", "zeros"])
@pytest.mark.parametrize("depth", [1, 2])
def test_surgery_matches_hand_computation(tiny, depth, start):
    visual = tiny[0].visual
    images = images_224()
    with torch.no_grad():
        got = surgery_forward(visual, images, depth, new_path_start=start)
        want = _surgery_by_hand(visual, images, depth, start)
    assert got.shape == (2, 197, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_surgery_default_start_is_the_release_behaviour(tiny):
    visual = tiny[0].visual
    with torch.no_grad():
        default = surgery_forward(visual, images_224(), 2)
        explicit = surgery_forward(visual, images_224(), 2, new_path_start="input")
        zeros = surgery_forward(visual, images_224(), 2, new_path_start="zeros")
    assert torch.equal(default, explicit)
    assert not torch.allclose(default[:, 1:], zeros[:, 1:])
    assert torch.equal(default[:, 0], zeros[:, 0])  # CLS comes from the original path either way


def test_depth_zero_is_the_unmodified_model(tiny):
    visual = tiny[0].visual
    images = images_224()
    with torch.no_grad():
        got = surgery_forward(visual, images, 0)
        want = visual(images)
    torch.testing.assert_close(got[:, 0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [1, 6, 8])
def test_cls_token_comes_from_the_original_path(tiny, depth):
    model = tiny[0]
    images = images_224()
    with torch.no_grad():
        cls = surgery_forward(model.visual, images, depth)[:, 0]
        want = model.encode_image(images, normalize=True)
    torch.testing.assert_close(torch.nn.functional.normalize(cls, dim=-1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, depth, error",
    [
        ((1, 3, 224, 200), 1, ValidationError),  # not square
        ((1, 3, 230, 230), 1, ValidationError),  # not a multiple of the patch
        ((1, 224, 224), 1, ValidationError),  # no batch axis
        ((1, 3, 224, 224), 9, ValidationError),  # deeper than the model
        ((1, 3, 224, 224), -1, ValidationError),
    ],
)
def test_surgery_rejects_bad_input(tiny, shape, depth, error):
    with pytest.raises(error):
        surgery_forward(tiny[0].visual, torch.zeros(shape), depth)


def test_surgery_rejects_non_vit():
    with pytest.raises(GeneratorError, match="VisionTransformer"):
        surgery_forward(torch.nn.Identity(), torch.zeros(1, 3, 224, 224), 0)


# ------------------------------------------------------------------ positional embedding
def test_positional_embedding_native_grid_and_no_mutation(tiny):
    visual = tiny[0].visual
    param = visual.positional_embedding
    before = param.detach().clone()
    native = positional_embedding_for_grid(visual, 14)
    big = positional_embedding_for_grid(visual, 32)
    with torch.inference_mode():
        surgery_forward(visual, torch.zeros(1, 3, 512, 512), 6)
    assert torch.equal(native, before)
    assert big.shape == (1 + 32 * 32, 64)
    assert torch.equal(big[0], before[0])  # CLS position kept
    assert visual.positional_embedding is param
    assert torch.equal(param, before)
    assert positional_embedding_for_grid(visual, 32) is big  # cached


class _FakeVisual(torch.nn.Module):
    def __init__(self, values):
        super().__init__()
        self.positional_embedding = torch.nn.Parameter(values)


def test_positional_embedding_interpolates_bilinearly():
    side, width = 3, 2
    ramp = torch.arange(side, dtype=torch.float32).repeat(side)  # value = column index, raster order
    patches = torch.stack([ramp, torch.full_like(ramp, 7.0)], dim=1)
    visual = _FakeVisual(torch.cat([torch.tensor([[-1.0, -2.0]]), patches]))
    out = positional_embedding_for_grid(visual, 6)
    grid = out[1:].reshape(6, 6, width)
    assert torch.equal(out[0], torch.tensor([-1.0, -2.0]))
    torch.testing.assert_close(grid[..., 1], torch.full((6, 6), 7.0))
    # align_corners=False: output column j samples input column (j + 0.5) / 2 - 0.5, clamped to [0, 2]
    expected = torch.tensor([(j + 0.5) / 2 - 0.5 for j in range(6)]).clamp(0, side - 1)
    torch.testing.assert_close(grid[2, :, 0], expected)
    assert torch.equal(grid[0, :, 0], grid[5, :, 0])  # rows are all the same


def test_positional_embedding_cache_follows_in_place_changes():
    visual = _FakeVisual(torch.zeros(1 + 4, 2))
    first = positional_embedding_for_grid(visual, 4)
    with torch.no_grad():
        visual.positional_embedding.fill_(1.0)
    second = positional_embedding_for_grid(visual, 4)
    assert torch.equal(first, torch.zeros(17, 2))
    assert torch.equal(second, torch.ones(17, 2))


# ----------------------------------------------------------------------- activation maps
def _basis(n, i):
    return torch.eye(n)[i]


def test_activation_maps_known_region():
    grid, dim = 4, 4
    features = _basis(dim, 1).repeat(1, grid * grid, 1)  # (1, 16, 4) all "class 1"
    region = [0, 1, 4, 5]  # top-left 2 x 2 cells, raster order
    features[0, region] = 5.0 * _basis(dim, 0)  # a longer vector: the scale must not matter
    text = torch.stack([_basis(dim, 0), _basis(dim, 1)])
    maps = activation_maps(features, text, torch.zeros(dim))
    want0 = torch.zeros(grid, grid)
    want0[:2, :2] = 1.0
    assert maps.shape == (1, 2, grid, grid) and maps.dtype == torch.float32
    assert torch.equal(maps[0, 0], want0)
    assert torch.equal(maps[0, 1], 1.0 - want0)


def test_activation_maps_subtract_the_redundant_embedding():
    features = torch.stack([_basis(3, 0)] * 2 + [_basis(3, 1)] * 2)[None]  # cells 0, 1 = e0; 2, 3 = e1
    text = ((_basis(3, 0) + _basis(3, 1)) / math.sqrt(2))[None]  # equally close to both without surgery
    with_redundant = activation_maps(features, text, _basis(3, 1))
    without = activation_maps(features, text, torch.zeros(3))
    assert torch.equal(with_redundant[0, 0], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(without, torch.zeros(1, 1, 2, 2))  # zero range: zeros, no NaN


def test_activation_maps_match_direct_formula():
    gen = torch.Generator().manual_seed(3)
    features, text, redundant = torch.randn(2, 9, 5, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(5, generator=gen)
    tokens = features / features.norm(dim=-1, keepdim=True)
    sim = (tokens @ (text - redundant).T).permute(0, 2, 1)  # (B, C, N)
    lo, hi = sim.min(dim=-1, keepdim=True).values, sim.max(dim=-1, keepdim=True).values
    want = ((sim - lo) / (hi - lo)).reshape(2, 3, 3, 3)
    torch.testing.assert_close(activation_maps(features, text, redundant), want)


def test_activation_maps_reject_non_square_token_count():
    with pytest.raises(ValidationError, match="square"):
        activation_maps(torch.zeros(1, 10, 4), torch.zeros(2, 4), torch.zeros(4))


def test_class_probabilities():
    cls = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    text = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    probs = class_probabilities(cls, text, 100.0)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    assert probs[0].argmax() == 0 and probs[1].argmax() == 1
    torch.testing.assert_close(class_probabilities(cls, text, 0.0), torch.full((2, 2), 0.5))


# ------------------------------------------------------------------------------ gating
@pytest.mark.parametrize(
    "probs, threshold, top_k, want",
    [
        ([0.1, 0.5, 0.2, 0.2], 0.15, 0, [1, 2, 3]),
        ([0.1, 0.5, 0.2, 0.2], 0.15, 2, [1, 2]),  # tie at 0.2: lower index first
        ([0.1, 0.5, 0.2, 0.2], 0.2, 0, [1, 2, 3]),  # threshold is inclusive
        ([0.1, 0.5, 0.2, 0.2], 0.0, 0, [1, 2, 3, 0]),
        ([0.1, 0.5, 0.2, 0.2], 0.6, 3, []),
        ([0.25, 0.25, 0.25, 0.25], 0.1, 3, [0, 1, 2]),
        ([0.3, 0.1, 0.6], 0.0, 1, [2]),
        ([1.0], 0.1, 3, [0]),
    ],
)
def test_gate_classes(probs, threshold, top_k, want):
    got = gate_classes(np.asarray(probs, dtype=np.float32), threshold, top_k)
    assert got.dtype == np.int64
    assert got.tolist() == want


@pytest.mark.parametrize("probs, top_k", [(np.zeros((2, 2)), 0), (np.zeros(3), -1), (np.zeros(3), 1.5)])
def test_gate_classes_rejects_bad_input(probs, top_k):
    with pytest.raises(ValidationError):
        gate_classes(probs, 0.1, top_k)


# --------------------------------------------------------------------------- text side
class _CountingModel:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def encode_text(self, tokens):
        self.calls += 1
        return self.model.encode_text(tokens)


def test_text_embedding_cache(tiny):
    model, tokenizer = tiny
    counting = _CountingModel(model)
    cache = TextEmbeddingCache(max_entries=2)
    text, redundant = cache.get("tiny", counting, tokenizer, ("cat", "dog"), "cpu")
    assert counting.calls == 1  # (2 names + '') x 85 = 255 prompts: one chunk
    again = cache.get("tiny", counting, tokenizer, ("cat", "dog"), "cpu")
    assert counting.calls == 1 and again[0] is text and again[1] is redundant
    other, _ = cache.get("tiny", counting, tokenizer, ("cat",), "cpu")
    assert counting.calls == 2 and len(cache) == 2
    assert text.shape == (2, 32) and redundant.shape == (32,) and text.dtype == torch.float32
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(redundant.norm(), torch.tensor(1.0))
    torch.testing.assert_close(other[0], text[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(redundant, text_embeddings(model, tokenizer, [""], "cpu")[0], atol=1e-6, rtol=1e-5)
    cache.get("tiny", counting, tokenizer, ("bird",), "cpu")
    assert len(cache) == 2  # bounded: least recently used dropped


def test_text_embeddings_ensemble_and_chunking(tiny):
    model, tokenizer = tiny
    templates = ("a {}.", "the {}.", "one {}.")
    got = text_embeddings(model, tokenizer, ["cat", "dog"], "cpu", templates=templates, chunk_size=4)
    with torch.no_grad():
        for row, name in zip(got, ["cat", "dog"]):
            each = model.encode_text(tokenizer([t.format(name) for t in templates]))
            mean = (each / each.norm(dim=-1, keepdim=True)).mean(dim=0)
            torch.testing.assert_close(row, mean / mean.norm(), atol=1e-6, rtol=1e-5)
    counting = _CountingModel(model)
    text_embeddings(counting, tokenizer, ["cat", "dog"], "cpu", templates=templates, chunk_size=4)
    assert counting.calls == 2  # 6 prompts in chunks of 4
    with pytest.raises(ValidationError):
        text_embeddings(model, tokenizer, [], "cpu")


# ----------------------------------------------------------------------------- stage
def test_preprocess_square():
    image = np.full((30, 50, 3), (255, 0, 128), dtype=np.uint8)
    mean, std = (0.5, 0.25, 0.5), (0.5, 0.5, 0.25)
    got = preprocess_square(image, 32, mean, std)
    assert got.shape == (1, 3, 32, 32) and got.dtype == torch.float32
    want = [(255 / 255 - 0.5) / 0.5, (0 - 0.25) / 0.5, (128 / 255 - 0.5) / 0.25]
    torch.testing.assert_close(got[0, :, 5, 7], torch.tensor(want))
    with pytest.raises(ValidationError):
        preprocess_square(image.astype(np.float32), 32, mean, std)
    with pytest.raises(ValidationError):
        preprocess_square(image[..., :2], 32, mean, std)


def _config(**overrides):
    return SemanticConfig(**{"model": TINY, "pretrained": "openai", "vocabulary": ("person", "dog", "cat"), **overrides})


def test_semantic_stage_end_to_end(tiny, sample_image):
    model, tokenizer = tiny
    stage = SemanticStage(model, tokenizer, _config(top_k=2, class_threshold=0.0))
    first, second = stage(sample_image), stage(sample_image)
    assert first.maps.shape == (3, 32, 32) and first.maps.dtype == np.float32
    assert first.class_probs.shape == (3,) and first.class_probs.dtype == np.float32
    assert first.class_probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert first.maps.min() == 0.0 and first.maps.max() == 1.0
    assert first.kept.tolist() == np.argsort(-first.class_probs, kind="stable")[:2].tolist()
    assert np.array_equal(first.maps, second.maps) and np.array_equal(first.class_probs, second.class_probs)
    assert len(stage.text_cache) == 1

    bf16 = SemanticStage(model, tokenizer, _config(top_k=2, class_threshold=0.0), precision="bf16",
                         text_cache=stage.text_cache)
    low = bf16(sample_image)
    assert low.maps.dtype == np.float32 and low.maps.shape == (3, 32, 32)
    assert np.abs(low.class_probs - first.class_probs).max() < 0.02
    assert np.abs(low.maps - first.maps).mean() < 0.02


def test_semantic_stage_generic_prompt(tiny, sample_image):
    stage = SemanticStage(*tiny, _config(vocabulary=(), input_size=224))
    result = stage(sample_image)
    assert stage.class_names == ("object",)
    assert result.maps.shape == (1, 14, 14)
    assert result.class_probs.tolist() == [1.0] and result.kept.tolist() == [0]


@pytest.mark.parametrize(
    "overrides, precision, match",
    [
        ({"surgery_depth": 9}, "fp32", "surgery_depth"),
        ({"input_size": 500}, "fp32", "input_size"),
        ({"class_threshold": 1.5}, "fp32", "class_threshold"),
        ({"top_k": -1}, "fp32", "top_k"),
        ({"vocabulary": (), "generic_prompt": ""}, "fp32", "generic_prompt"),
        ({}, "fp8", "precision"),
    ],
)
def test_semantic_stage_rejects_bad_config(tiny, overrides, precision, match):
    with pytest.raises(ConfigError, match=match):
        SemanticStage(*tiny, _config(**overrides), precision=precision)


@pytest.mark.slow
def test_real_vit_b_16_architecture_at_512(sample_image):
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    pixels = preprocess_square(sample_image, 512, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    with torch.inference_mode():
        tokens = surgery_forward(model.visual, pixels, 6)
    assert tokens.shape == (1, 1025, 512)
    stage = SemanticStage(model, open_clip.get_tokenizer("ViT-B-16"), SemanticConfig(vocabulary=("dog",)))
    result = stage(sample_image)
    assert result.maps.shape == (1, 32, 32) and result.class_probs.tolist() == pytest.approx([1.0])
