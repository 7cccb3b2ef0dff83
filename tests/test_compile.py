"""``execution.compile``: which blocks get compiled, and a compiled encoder computing the same embedding."""
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")

from labelgen.config import load_recipe  # noqa: E402
from labelgen.generators import GENERATORS  # noqa: E402
from labelgen.models.compile import compile_encoders, encoder_blocks  # noqa: E402


def _zip_tiny():
    recipe = load_recipe("recipes/zip-tiny-random.yaml")
    return GENERATORS.get(recipe.generator.name).from_config(recipe.generator.params)


def test_every_encoder_block_of_zip_is_found_once():
    gen = _zip_tiny()
    blocks = encoder_blocks(gen)
    sam = gen.refiner.predictor.model.image_encoder.blocks
    clip_blocks = [m for m in gen.semantic.model.modules() if type(m).__name__ == "ResidualAttentionBlock"]
    bottlenecks = [m for m in gen.boundary.trunk.modules() if type(m).__name__ == "Bottleneck"]
    expected = {id(m) for m in [*sam, *clip_blocks, *bottlenecks]}
    assert len(sam) and len(clip_blocks) and len(bottlenecks)
    assert len(blocks) == len({id(b) for b in blocks}) == len(expected)
    assert {id(b) for b in blocks} == expected


def test_compile_is_an_execution_setting_outside_the_fingerprint():
    plain = load_recipe("recipes/zip-tiny-random.yaml")
    compiled = load_recipe("recipes/zip-tiny-random.yaml", ["execution.compile=true"])
    assert compiled.execution.compile is True and plain.execution.compile is False
    assert compiled.fingerprint() == plain.fingerprint()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_a_compiled_sam_encoder_gives_the_same_embedding():
    from labelgen.models.sam import build_sam

    torch.manual_seed(0)
    encoder = build_sam("tiny", None).image_encoder
    pixels = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        reference = encoder(pixels)

    class Holder:  # a generator-like object holding the encoder
        def __init__(self, model):
            self.model = model

    assert compile_encoders(Holder(encoder)) == len(encoder.blocks)
    with torch.inference_mode():
        compiled = encoder(pixels)
    assert (compiled - reference).abs().max().item() < 1e-4
