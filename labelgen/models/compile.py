"""``execution.compile: true``: ``torch.compile`` the repeated blocks of a generator's encoders.

Whole encoders are not compiled: labelgen calls several of them block by block (CLIP Surgery's
two paths, SAM's batched trunk with a per-image neck), so the unit that every path calls is the
block. Compiling each block class instance in place (``nn.Module.compile``) covers all of them,
keeps the weights and the module tree as they are (the feature-cache keys, provenance and
checkpoints see no difference), and compiles once per distinct shape.

The first images of a run pay for compilation (about a minute per encoder on a GPU); it pays off on
long runs. A compiled block computes the same function up to float rounding (fused kernels sum in
another order); ``tests/test_gpu.py`` checks the masks on a GPU.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

log = logging.getLogger(__name__)

# The block classes of the encoders labelgen runs: segment_anything's ViT Block, open_clip's transformer
# ResidualAttentionBlock and ModifiedResNet Bottleneck, SAM 2's Hiera MultiScaleBlock, timm-style Block.
BLOCK_CLASS_NAMES = ("Block", "ResidualAttentionBlock", "Bottleneck", "MultiScaleBlock")
MAX_DEPTH = 3  # generator attributes -> stage objects -> their predictor/model attributes


def encoder_blocks(generator: Any) -> list[Any]:
    """The distinct block modules reachable from the generator's attributes (``nn.Module`` trees held by
    its stages, their predictors and models), in a stable order."""
    seen: set[int] = set()
    blocks = []
    for module in _modules(generator, MAX_DEPTH, set()):
        for child in module.modules():
            if type(child).__name__ in BLOCK_CLASS_NAMES and id(child) not in seen:
                seen.add(id(child))
                blocks.append(child)
    return blocks


def _modules(obj: Any, depth: int, visited: set[int]) -> Iterator[Any]:
    import torch

    if id(obj) in visited:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        yield obj
        return
    if depth == 0 or not hasattr(obj, "__dict__"):
        return
    for name, value in sorted(vars(obj).items()):
        if not name.startswith("__"):
            yield from _modules(value, depth - 1, visited)


def compile_encoders(generator: Any, *, mode: str | None = None) -> int:
    """``torch.compile`` every encoder block of ``generator`` in place; returns how many were compiled."""
    blocks = encoder_blocks(generator)
    for block in blocks:
        block.compile(mode=mode, dynamic=False)
    log.info("execution.compile: %d encoder blocks of %s compiled with torch.compile (first calls compile)",
             len(blocks), getattr(generator, "name", type(generator).__name__))
    return len(blocks)
