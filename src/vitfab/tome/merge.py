"""Token Merging (Bolya et al., ICLR 2023) as pure tensor functions; nothing here knows timm.

Tokens are (batch, tokens, channels); the first ``protected`` of them are prefix tokens (class,
distillation, register tokens), which never merge and are never merged into. Bipartite soft
matching splits the tokens alternately into sets A and B, joins each A token by an edge to its
most similar B token (cosine similarity of the matching ``metric``, e.g. the attention keys
averaged over heads) and merges the ``r`` A tokens with the strongest edges into their B
partners. Two rules for the split (``PARTITIONS``):

- ``reference`` (the ToMe paper's, the default): alternate over the whole sequence, prefix
  tokens included (a class token at 0 falls in A, a distillation token at 1 in B); prefix tokens
  in A get no edge, prefix tokens in B receive none. With no prefix token: plain alternation.
- ``patches`` (vitfab's first rule, kept for checkpoints fine-tuned with it): the prefix tokens
  are set aside and the alternation runs over the patch tokens only.

Either way the output holds the prefix tokens first, in their order, then the A tokens that
survived in their original order, then the B tokens (merged ones included) in theirs. A merge is
one gather of the surviving tokens and one scatter-add into the destinations, ops every runtime
can express (no ``scatter_reduce("mean")``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARTITIONS = ("reference", "patches")
DEFAULT_PARTITION = "reference"


def clip_r(r: int, num_tokens: int, protected: int = 0) -> int:
    """At most half of the mergeable tokens can go in one layer (either rule leaves at least
    (n - protected) // 2 mergeable A tokens)."""
    return max(0, min(int(r), (num_tokens - protected) // 2))


def prefix_split(protected: int) -> tuple[int, int]:
    """How many prefix tokens fall in A and in B under the reference rule (0, 2, 4, ... are A)."""
    return (protected + 1) // 2, protected // 2


@dataclass
class Matching:
    """The outcome of bipartite soft matching in one layer.

    In the terms of the paper, ``unm_idx`` are the A tokens that survive, ``src_idx`` the A tokens
    merged and ``dst_idx`` their B partners (indices into A and B, (B, k, 1) each). ``merge`` works
    from the rows they stand for in the flattened (batch x tokens, channels) tensors: ``keep``, the
    input row behind each output row; ``src``, the input row of each merged token; ``dst``, the
    output row it merges into; ``dst_in``, that row's input row. A merge is then one row gather
    (``index_select``) and one scatter-add of r rows: on CPUs several times faster than gathers
    along the token axis with indices expanded over the channels, and both export to ONNX.
    """

    protected: int
    unm_idx: torch.Tensor  # (B, n_a - r, 1)
    src_idx: torch.Tensor  # (B, r, 1)
    dst_idx: torch.Tensor  # (B, r, 1)
    partition: str = DEFAULT_PARTITION
    keep: torch.Tensor | None = None  # (B * (N - r),)
    src: torch.Tensor | None = None  # (B * r,)
    dst: torch.Tensor | None = None  # (B * r,)
    dst_in: torch.Tensor | None = None  # (B * r,)

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Sum each merged A token into its B partner: (B, N, C) -> (B, N - r, C)."""
        if self.r == 0:
            return x
        c = x.shape[-1]
        flat = x.reshape(-1, c)
        out = flat.index_select(0, self.keep)
        out.scatter_add_(0, self.dst[:, None].expand(-1, c), flat.index_select(0, self.src))
        return out.view(x.shape[0], -1, c)


def _rows(pos: torch.Tensor, n: int, offsets: torch.Tensor) -> torch.Tensor:
    """(B, k) token positions in sequences of n tokens -> rows of the flattened (B * n) tensor
    (``offsets``: 0, 1, ..., B - 1 as a column)."""
    return (pos + n * offsets).reshape(-1)


def _no_merge(metric: torch.Tensor, protected: int, partition: str) -> Matching:
    n = metric.shape[1] - (protected if partition == "patches" else 0)
    idx = torch.arange((n + 1) // 2, device=metric.device)[None, :, None].expand(metric.shape[0], -1, -1)
    empty = idx[:, :0]
    return Matching(protected, idx, empty, empty, partition)


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 0,
                            partition: str = DEFAULT_PARTITION) -> Matching:
    """Match tokens by ``metric`` (B, N, C); ``r`` is clipped to half of the mergeable tokens.

    The matching itself carries no gradient (it is a discrete choice); gradients flow through
    the merge of the token values.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"unknown ToMe partition '{partition}' (choose {', '.join(PARTITIONS)})")
    n, p = metric.shape[1], protected
    r = clip_r(r, n, p)
    if r == 0:  # nothing merges (merge() returns its input)
        return _no_merge(metric, p, partition)
    # token positions: A = start, start + 2, ...; B = start + 1, ...; the first pa of A and pb of B
    # are prefix tokens, which take no part in the edges (the reference rule's -inf scores)
    start, (pa, pb) = (p, (0, 0)) if partition == "patches" else (0, prefix_split(p))
    with torch.no_grad():
        m = metric[:, start:].float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = m[:, ::2], m[:, 1::2]
        n_a, n_b = a.shape[1], b.shape[1]
        scores = a[:, pa:] @ b[:, pb:].transpose(-1, -2)  # cosine similarity of the mergeable tokens
        order = scores.amax(dim=-1).argsort(dim=-1, descending=True)  # A tokens by their strongest edge
        merged = order[:, :r]
        src_idx = (merged + pa)[..., None]
        survivors = order[:, r:].sort(dim=1).values + pa  # survivors keep their original order
        # each merged token's best B partner (the max of its row, taken for the r rows only)
        best = scores.gather(1, merged[..., None].expand(-1, -1, scores.shape[2])).max(dim=-1).indices
        dst_idx = (best + pb)[..., None]
        batch, device = m.shape[0], m.device
        prefix = torch.arange(p, device=device).expand(batch, -1)
        unm_idx = torch.cat([prefix[:, :pa], survivors], dim=1)[..., None]
        # rows of the flattened tensors: output = prefix tokens, A survivors, the B tokens after pb
        keep = torch.cat([prefix, start + 2 * survivors,
                          (start + 1 + 2 * torch.arange(pb, n_b, device=device)).expand(batch, -1)], dim=1)
        dst = p + (n_a - r - pa) + (dst_idx[..., 0] - pb)
        offsets = torch.arange(batch, device=device)[:, None]
        rows = (_rows(keep, n, offsets), _rows(start + 2 * src_idx[..., 0], n, offsets),
                _rows(dst, keep.shape[1], offsets), _rows(keep.gather(1, dst), n, offsets))
    return Matching(p, unm_idx, src_idx, dst_idx, partition, *rows)


def merge_wavg(matching: Matching, x: torch.Tensor, size: torch.Tensor | None = None):
    """Size-weighted average merge: returns the merged tokens and their new sizes (B, N', 1).

    ``size`` counts the input patches inside each token (None: all ones), in fp32 so that counts
    stay exact. Each destination becomes b + sum_i s_i / S (a_i - b) with S its new size -- the
    weighted mean, computed for the r merged tokens only (in fp32), so the other tokens pass
    through untouched and no value is ever multiplied by a size (no fp16 overflow).
    """
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
    if matching.r == 0:
        return x, size
    new_size = matching.merge(size)
    c = x.shape[-1]
    flat, flat_size = x.reshape(-1, c), size.reshape(-1, 1)
    a = flat.index_select(0, matching.src).float()
    b = flat.index_select(0, matching.dst_in).float()
    w = flat_size.index_select(0, matching.src) / new_size.reshape(-1, 1).index_select(0, matching.dst)
    out = flat.index_select(0, matching.keep)
    out.scatter_add_(0, matching.dst[:, None].expand(-1, c), (w * (a - b)).to(x.dtype))
    return out.view(x.shape[0], -1, c), new_size


def merge_source(matching: Matching, source: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Which input tokens each token holds: (B, N, N_in) 0/1 rows, merged by sums (groups are
    disjoint, so sums stay 0/1). ``source=None`` starts from the identity."""
    if source is None:
        n = x.shape[1]
        source = torch.eye(n, device=x.device, dtype=x.dtype)[None].expand(x.shape[0], n, n)
    return matching.merge(source)
