"""Attention in cache-sized blocks: the fast kernel for bf16 / fp16 on CPUs.

``torch.nn.functional.scaled_dot_product_attention``'s CPU kernel runs at about a fifth of this
machine's bf16 matrix-product peak for the encoders' head size of 64 (``bench/bench_encoders.py``),
while a batched matrix product of the same operands runs near the peak. :func:`blocked_attention`
computes ``softmax(scale · q kᵀ + bias) v`` exactly (a full softmax over every key, no online
rescaling) one block of query rows at a time, sized so that the block's scores stay in the caches
(about 4 MiB), and adds the decomposed relative-position bias of SAM's encoder per block from its two
factors, so the ``(L, L)`` bias is never built. Measured on 2 cores in bf16: SAM ViT-B's global
attention (4,096 tokens, 12 heads) 305 → 153 ms; CLIP ViT-B/16 at 512 px (1,025 tokens) 20 → 9 ms.

Results are those of the unfused reference up to rounding: scores and probabilities are rounded to
the input dtype, as in segment_anything's own attention under bf16 autocast (the fused kernels keep
them in float32). :func:`use_blocked_attention` says when to use it: CPU tensors in bf16 or fp16;
everywhere else the fused kernels win (CUDA's flash / memory-efficient kernels; on CPU in fp32 the
fused kernel runs at ~80% of the fp32 peak).
"""
from __future__ import annotations

import torch

__all__ = ["blocked_attention", "blocked_for", "head_attention", "use_blocked_attention"]

BLOCK_BYTES = 4 << 20  # scores of one block: ~4 MiB stays in this machine's L2 + L3 share


def blocked_for(device_type: str, precision: str) -> bool:
    """True where :func:`blocked_attention` is the faster kernel: on ``cpu`` in ``bf16`` or ``fp16`` (the
    precision names of ``generator.precision``; the feature cache keys name the kernel by this rule)."""
    return device_type == "cpu" and precision in ("bf16", "fp16")


def use_blocked_attention(q: torch.Tensor) -> bool:
    """:func:`blocked_for` a tensor: CPU tensors in bf16 or fp16."""
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(q.dtype, "fp32")
    return blocked_for(q.device.type, precision)


def head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head ``softmax(q kᵀ / sqrt(d)) v`` on ``(B, heads, L, d)`` tensors (``q`` may have fewer tokens),
    ``(B, heads, L_q, d_v)`` out: :func:`blocked_attention` where :func:`use_blocked_attention`, else the
    fused ``scaled_dot_product_attention``."""
    if not use_blocked_attention(q):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    batch, heads, queries, head_dim = q.shape
    flat = [t.reshape(batch * heads, t.shape[2], t.shape[3]) for t in (q, k, v)]
    return blocked_attention(*flat, scale=head_dim ** -0.5).view(batch, heads, queries, v.shape[3])


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    rel_h: torch.Tensor | None = None,
    rel_w: torch.Tensor | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> torch.Tensor:
    """``softmax(scale · q kᵀ + bias) v`` per batch entry, one cache-sized block of queries at a time.

    Args:
        q: ``(N, L_q, d)`` queries (``N`` = batch · heads).
        k: ``(N, L, d)`` keys; ``L`` may differ from ``L_q`` (SAM 2's pooled queries).
        v: ``(N, L, d_v)`` values.
        scale: multiplies ``q kᵀ`` (``d ** -0.5`` for standard attention).
        rel_h, rel_w: optional decomposed relative-position terms ``(N, L_q, H)`` and ``(N, L_q, W)``
            with ``H · W == L`` (the keys' token grid, raster order): the bias of query ``i`` for key
            ``(a, b)`` is ``rel_h[n, i, a] + rel_w[n, i, b]`` (SAM's ``add_decomposed_rel_pos``).
        block_bytes: size of one block of scores.
    Returns:
        ``(N, L_q, d_v)`` in ``q``'s dtype. Autocast is off inside: everything runs in ``q``'s dtype.
    """
    if (q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]
            or v.shape[:2] != k.shape[:2]):
        raise ValueError(f"expected q (N, L_q, d), k (N, L, d) and v (N, L, d_v); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if (rel_h is None) != (rel_w is None):
        raise ValueError("give both rel_h and rel_w, or neither")
    batch, queries, _ = q.shape
    length = k.shape[1]
    if rel_h is not None and (rel_h.shape[:2] != (batch, queries) or rel_w.shape[:2] != (batch, queries)
                              or rel_h.shape[2] * rel_w.shape[2] != length):
        raise ValueError(f"rel_h, rel_w must be (N, L_q, H), (N, L_q, W) with H * W == L = {length}; got "
                         f"{tuple(rel_h.shape)}, {tuple(rel_w.shape)}")
    item = q.element_size()
    rows = max(1, min(queries, block_bytes // (length * item)))  # query rows per block
    group = max(1, min(batch, block_bytes // (rows * length * item)))  # batch entries per block
    dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        k, v = k.to(dtype), v.to(dtype)
        keys_t = k.transpose(1, 2)
        out = q.new_empty(batch, queries, v.shape[2])
        for start in range(0, batch, group):
            stop = min(batch, start + group)
            for row in range(0, queries, rows):
                end = min(queries, row + rows)
                scores = torch.bmm(q[start:stop, row:end], keys_t[start:stop]).mul_(scale)  # (g, r, L)
                if rel_h is not None:
                    grid = scores.view(stop - start, end - row, rel_h.shape[2], rel_w.shape[2])
                    grid.add_(rel_h[start:stop, row:end, :, None].to(dtype))
                    grid.add_(rel_w[start:stop, row:end, None, :].to(dtype))
                out[start:stop, row:end] = torch.bmm(torch.softmax(scores, dim=-1), v[start:stop])
    return out
