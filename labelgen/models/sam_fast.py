"""A faster SAM image encoder: the same weights and the same function, computed with fewer passes.

``segment_anything``'s ``Attention`` materialises the attention matrix, adds the decomposed
relative-position bias to it, softmaxes it and multiplies by V: four passes over a
``(B·heads, L, L)`` tensor (``L = 4096`` tokens in the global blocks of a 1024-px encoder).
:func:`use_fast_attention` swaps each block's attention forward for one call of
``torch.nn.functional.scaled_dot_product_attention`` with the bias given as an additive mask
(``rel_h[..., :, None] + rel_w[..., None, :]``, built from the *unscaled* queries as the reference
does), so the fused kernel (flash / memory-efficient on GPUs, the fused CPU kernel) runs scale,
bias, softmax and V in one pass. The encoder's convolutions (patch embedding, neck) are switched to
channels-last memory, which oneDNN and cuDNN run faster.

Results are the reference's up to float rounding (the kernels sum in another order):
``tests/test_sam_fast.py`` bounds the difference on the real ViT-B architecture with random weights,
and ``bench/bench_encoders.py`` prints it with the resulting masks' IoU. Nothing here changes weights:
``restore_reference_attention`` undoes the swap.
"""
from __future__ import annotations

import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FAST_FLAG = "_labelgen_fast_attention"
KERNEL_ATTR = "_labelgen_attention_kernel"
KERNELS = ("sdpa", "fast")


def use_fast_attention(image_encoder: "torch.nn.Module", *, channels_last: bool = True, kernel: str = "sdpa") -> int:
    """Make every ``segment_anything`` attention block of ``image_encoder`` run through a faster kernel.

    Args:
        image_encoder: ``Sam.image_encoder`` (``ImageEncoderViT``) or any module holding its blocks.
        channels_last: also store the encoder's 2-D convolution weights channels-last.
        kernel: ``"sdpa"``: always the fused SDPA call with the bias as a mask; ``"fast"``: per call, the
            faster of that and :func:`~labelgen.models.blocked_attention.blocked_attention` (the blocked
            kernel for CPU tensors in bf16 / fp16, the fused one elsewhere).
    Returns:
        The number of attention modules changed (0: nothing of segment_anything's layout found).
    """
    import torch
    from segment_anything.modeling.image_encoder import Attention

    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    changed = 0
    for module in image_encoder.modules():
        if isinstance(module, Attention):
            setattr(module, KERNEL_ATTR, kernel)
            if getattr(module, FAST_FLAG, False):
                continue
            module.forward = types.MethodType(_sdpa_forward, module)
            setattr(module, FAST_FLAG, True)
            changed += 1
        elif channels_last and isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.channels_last)
    return changed


def restore_reference_attention(image_encoder: "torch.nn.Module") -> int:
    """Undo :func:`use_fast_attention`: the class's own attention forward again and the convolution weights
    back in the default memory format. Returns the number of attention modules restored."""
    import torch

    restored = 0
    for module in image_encoder.modules():
        if getattr(module, FAST_FLAG, False):
            del module.forward
            setattr(module, FAST_FLAG, False)
            restored += 1
        elif isinstance(module, torch.nn.Conv2d):
            module.to(memory_format=torch.contiguous_format)
    return restored


def decomposed_rel_pos_bias(q: "torch.Tensor", rel_pos_h: "torch.Tensor", rel_pos_w: "torch.Tensor",
                            size_hw: tuple[int, int]) -> "torch.Tensor":
    """The decomposed relative-position bias of MViTv2 / SAM as an additive attention mask.

    Args:
        q: ``(N, H·W, C)`` unscaled queries (``N`` = batch · heads), raster order over the ``(H, W)`` grid.
        rel_pos_h, rel_pos_w: ``(2H-1, C)`` / ``(2W-1, C)`` learned tables.
        size_hw: ``(H, W)`` of the token grid (queries and keys share it in SAM's encoder).
    Returns:
        ``(N, H·W, H·W)`` bias, ``bias[n, (i, j), (k, l)] = q[n, (i, j)]·Rh[i, k] + q[n, (i, j)]·Rw[j, l]``.
    """
    height, width = size_hw
    rel_h, rel_w = decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, size_hw)
    batch = q.shape[0]
    bias = rel_h.view(batch, height, width, height, 1) + rel_w.view(batch, height, width, 1, width)
    return bias.reshape(batch, height * width, height * width)


def decomposed_rel_pos_terms(q: "torch.Tensor", rel_pos_h: "torch.Tensor", rel_pos_w: "torch.Tensor",
                             size_hw: tuple[int, int]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The bias's two factors: ``(N, H·W, H)`` row terms ``q[n, (i, j)]·Rh[i, k]`` and ``(N, H·W, W)``
    column terms ``q[n, (i, j)]·Rw[j, l]`` (arguments as :func:`decomposed_rel_pos_bias`)."""
    import torch
    from segment_anything.modeling.image_encoder import get_rel_pos

    height, width = size_hw
    table_h = get_rel_pos(height, height, rel_pos_h)  # (H, H, C): query row i, key row k
    table_w = get_rel_pos(width, width, rel_pos_w)  # (W, W, C)
    batch, _, channels = q.shape
    grid = q.reshape(batch, height, width, channels)
    rel_h = torch.einsum("nijc,ikc->nijk", grid, table_h)  # (N, H, W, H)
    rel_w = torch.einsum("nijc,jlc->nijl", grid, table_w)  # (N, H, W, W)
    return rel_h.reshape(batch, height * width, height), rel_w.reshape(batch, height * width, width)


def _sdpa_forward(self: "torch.nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    """``Attention.forward`` of segment_anything, through one fused attention call.

    ``x``: ``(B, H, W, dim)`` tokens of one window or of the whole grid; returns the same shape."""
    import torch.nn.functional as F

    from .blocked_attention import blocked_attention, use_blocked_attention

    batch, height, width, _ = x.shape
    tokens = height * width
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B, heads, L, head_dim)
    if getattr(self, KERNEL_ATTR, "sdpa") == "fast" and use_blocked_attention(q):
        flat = [t.reshape(batch * self.num_heads, tokens, -1) for t in (q, k, v)]
        rel = (decomposed_rel_pos_terms(flat[0], self.rel_pos_h, self.rel_pos_w, (height, width))
               if self.use_rel_pos else (None, None))
        out = blocked_attention(*flat, scale=self.scale, rel_h=rel[0], rel_w=rel[1])
        out = out.view(batch, self.num_heads, tokens, -1)
        return self.proj(out.permute(0, 2, 1, 3).reshape(batch, height, width, -1))
    mask = None
    if self.use_rel_pos:
        flat_q = q.reshape(batch * self.num_heads, tokens, -1)
        mask = decomposed_rel_pos_bias(flat_q, self.rel_pos_h, self.rel_pos_w, (height, width))
        mask = mask.reshape(batch, self.num_heads, tokens, tokens).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
    out = out.permute(0, 2, 1, 3).reshape(batch, height, width, -1)  # (B, H, W, heads·head_dim)
    return self.proj(out)
