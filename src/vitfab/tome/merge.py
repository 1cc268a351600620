"""Token Merging (Bolya et al., ICLR 2023) as pure tensor functions; nothing here knows timm.

Tokens are (batch, tokens, channels). The first ``protected`` tokens (class, distillation,
register tokens) never take part in matching and stay in front, in order. The others are split
alternately into sets A (even positions) and B (odd positions); each A token is joined by an
edge to its most similar B token (cosine similarity of the matching ``metric``, e.g. the
attention keys averaged over heads); the ``r`` A tokens with the strongest edges are merged into
their B partners. Merges are written with sums only (scatter-add of size-weighted values, then
a division), which every runtime can express.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def clip_r(r: int, num_tokens: int, protected: int = 0) -> int:
    """At most half of the mergeable tokens can go in one layer (|A| = ceil(n/2) >= n // 2)."""
    return max(0, min(int(r), (num_tokens - protected) // 2))


@dataclass
class Matching:
    """The outcome of bipartite soft matching in one layer: which A tokens survive (``unm_idx``),
    which are merged (``src_idx``) and where they go (``dst_idx``, an index into B)."""

    protected: int
    unm_idx: torch.Tensor  # (B, n_a - r, 1)
    src_idx: torch.Tensor  # (B, r, 1)
    dst_idx: torch.Tensor  # (B, r, 1)

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Sum each merged A token into its B partner: (B, N, C) -> (B, N - r, C)."""
        if self.r == 0:
            return x
        p = self.protected
        prefix, a, b = x[:, :p], x[:, p::2], x[:, p + 1::2]
        c = x.shape[-1]
        unm = a.gather(1, self.unm_idx.expand(-1, -1, c))
        src = a.gather(1, self.src_idx.expand(-1, -1, c))
        dst = b.scatter_add(1, self.dst_idx.expand(-1, -1, c), src)
        return torch.cat([prefix, unm, dst], dim=1)


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0) -> Matching:
    """Match tokens by ``metric`` (B, N, C); ``r`` is clipped to half of the mergeable tokens.

    The matching itself carries no gradient (it is a discrete choice); gradients flow through
    the merge of the token values.
    """
    n = metric.shape[1]
    r = clip_r(r, n, protected)
    if r == 0:  # nothing merges (merge() returns its input)
        idx = torch.arange((n - protected + 1) // 2, device=metric.device)[None, :, None].expand(metric.shape[0], -1, -1)
        empty = idx[:, :0]
        return Matching(protected, idx, empty, empty)
    with torch.no_grad():
        m = metric[:, protected:].float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = m[:, ::2], m[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # cosine similarity, (B, n_a, n_b)
        node_max, node_idx = scores.max(dim=-1)  # each A token's best B partner
        order = node_max.argsort(dim=-1, descending=True)[..., None]
        src_idx = order[:, :r]
        unm_idx = order[:, r:].sort(dim=1).values  # survivors keep their original order
        dst_idx = node_idx[..., None].gather(1, src_idx)
    return Matching(protected, unm_idx, src_idx, dst_idx)


def merge_wavg(matching: Matching, x: torch.Tensor, size: torch.Tensor | None = None):
    """Size-weighted average merge: returns the merged tokens and their new sizes (B, N', 1).

    ``size`` counts the input patches inside each token (None: all ones); it is kept in fp32 so
    that counts stay exact when ``x`` is fp16/bf16.
    """
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
    total = matching.merge(x.float() * size)  # fp32: size x value would overflow fp16
    size = matching.merge(size)
    return (total / size).to(x.dtype), size


def merge_source(matching: Matching, source: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Which input tokens each token holds: (B, N, N_in) 0/1 rows, merged by sums (groups are
    disjoint, so sums stay 0/1). ``source=None`` starts from the identity."""
    if source is None:
        n = x.shape[1]
        source = torch.eye(n, device=x.device, dtype=x.dtype)[None].expand(x.shape[0], n, n)
    return matching.merge(source)
