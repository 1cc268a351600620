"""2D relative-position attention as AutoFormer uses it (from iRPE), for standalone models.

Per head-dim lookup tables for vertical and horizontal offsets between key and query patches
(clipped to +-max_rel and shifted by max_rel + 1; row 0 is reserved for every pair that involves
a class token) are summed and enter twice: ``q . r_k`` is added to the attention logits (scaled
like them) and ``attn . r_v`` to the output. Written per offset bucket rather than per token
pair: ``q @ table^T`` gathered by bucket for the logits, the attention scattered into buckets
and multiplied by the table for the output — the same sums with O(N x buckets) memory.

Token positions are an input: the patch grid by default; after token merging (ToMe) the
size-weighted mean coordinates of the merged patches, whose fractional offsets interpolate
linearly between neighbouring table rows (integer offsets reproduce the plain lookup).
"""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from timm.layers.attention import Attention
from torch import nn


def grid_positions(num_tokens: int, num_prefix: int, device=None) -> torch.Tensor:
    """(1, N, 2) row/column of each token on the square patch grid; prefix tokens get (0, 0)."""
    n = num_tokens - num_prefix
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"relative-position attention needs a square patch grid, got {n} patches")
    idx = torch.arange(n, device=device)
    pos = torch.stack([idx // side, idx % side], dim=-1).float()
    return torch.cat([torch.zeros(num_prefix, 2, device=device), pos])[None]


def relative_buckets(positions: torch.Tensor, num_prefix: int, max_rel: int, axis: int):
    """(lower table row, upper row, weight of the upper row) per token pair, each (B', N, N)."""
    p, m = num_prefix, max_rel
    pos = positions[..., axis]
    off = pos[:, None, p:] - pos[:, p:, None]  # key minus query, (B', Nq, Nk)
    idx = off.clamp(-m, m) + (m + 1)
    idx = nn.functional.pad(idx, (p, 0, p, 0), value=0.0)  # pairs with a prefix token: row 0
    lo = idx.floor()
    w = idx - lo
    lo = lo.long()
    return lo, (lo + 1).clamp(max=2 * m + 1), w


def relative_attention(q, k, v, tables, positions, num_prefix: int, max_rel: int, scale: float, bias=None,
                       dropout=None):
    """Softmax attention with relative position. ``tables``: ((k_vertical, k_horizontal),
    (v_vertical, v_horizontal)), each (rows, head_dim); q, k, v: (B, H, N, d). Returns (B, H, N, d)."""
    B, H, N, _ = q.shape
    q = q * scale
    attn = q @ k.transpose(-2, -1)
    shape = (B, H, N, N)
    gathered = []
    for axis in (0, 1):
        lo, hi, w = relative_buckets(positions.to(q.device), num_prefix, max_rel, axis)
        lo, hi, w = lo[:, None].expand(shape), hi[:, None].expand(shape), w[:, None].to(q.dtype)
        qt = q @ tables[0][axis].t()  # (B, H, N, rows)
        attn = attn + (1 - w) * qt.gather(-1, lo) + w * qt.gather(-1, hi)
        gathered.append((lo, hi, w))
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if dropout is not None:
        attn = dropout(attn)
    out = attn @ v
    for axis, (lo, hi, w) in enumerate(gathered):
        tv = tables[1][axis]
        rows = torch.zeros(B, H, N, tv.shape[0], dtype=attn.dtype, device=attn.device)
        rows = rows.scatter_add(-1, lo, attn * (1 - w)).scatter_add(-1, hi, attn * w)
        out = out + rows @ tv
    return out


class RelPosAttention(Attention):
    """timm ``Attention`` + AutoFormer's relative position; standard q/k/v row layout.

    Called with ``metric=True`` it returns (output, keys averaged over heads), ToMe's matching
    metric; ``positions`` (B, N, 2) replace the patch grid after merges.
    """

    def __init__(self, dim: int, num_heads: int, attn_head_dim: int = 64, qkv_bias: bool = True, max_rel: int = 14,
                 num_prefix: int = 1, **kwargs):
        super().__init__(dim, num_heads=num_heads, attn_head_dim=attn_head_dim, qkv_bias=qkv_bias, **kwargs)
        self.max_rel, self.num_prefix = max_rel, num_prefix
        rows = 2 * max_rel + 2
        self.rel_k_v = nn.Parameter(torch.zeros(rows, self.head_dim))  # [k or v] x [vertical or horizontal]
        self.rel_k_h = nn.Parameter(torch.zeros(rows, self.head_dim))
        self.rel_v_v = nn.Parameter(torch.zeros(rows, self.head_dim))
        self.rel_v_h = nn.Parameter(torch.zeros(rows, self.head_dim))
        for t in (self.rel_k_v, self.rel_k_h, self.rel_v_v, self.rel_v_h):
            trunc_normal_(t, std=0.02)

    def forward(self, x, attn_mask=None, is_causal=False, size=None, metric=False, positions=None):
        B, N, _ = x.shape
        if is_causal:
            raise ValueError("relative-position attention is not causal")
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if positions is None:
            positions = grid_positions(N, self.num_prefix, x.device)
        bias = attn_mask
        if size is not None:  # ToMe's proportional attention
            log_size = size.log().to(q.dtype)[:, None, None, :, 0]
            bias = log_size if bias is None else bias + log_size
        tables = ((self.rel_k_v, self.rel_k_h), (self.rel_v_v, self.rel_v_h))
        out = relative_attention(q, k, v, tables, positions, self.num_prefix, self.max_rel, self.scale, bias,
                                 self.attn_drop)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.proj_drop(self.proj(self.norm(out)))
        return (out, k.mean(dim=1)) if metric else out
