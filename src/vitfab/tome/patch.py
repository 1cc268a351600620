"""ToMe for timm ``VisionTransformer``s: patch in place, change the schedule, remove.

Every function here changes the model it is given, in place, and returns it; none copies.

The patch swaps classes, never weights: each ``Block`` becomes a ``ToMeBlock`` (merging between
attention and MLP), each ``Attention`` a ``ToMeAttention`` (returns the keys averaged over heads
as the matching metric; proportional attention adds log(size) of each key to the logits through
the additive mask of ``scaled_dot_product_attention``, so fused kernels stay in use), and the
model a subclass of its own class that resets the merge state per forward pass and pools with
size weights. ``state_dict`` is untouched, so checkpoints load either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ..errors import VitfabError
from ..models.relpos import RelPosAttention, grid_positions
from .merge import DEFAULT_PARTITION, PARTITIONS, bipartite_soft_matching, clip_r, merge_source, merge_wavg
from .schedule import RECORDED, BlockShape, Schedule, ScheduleSpec, flow_macs, resolve_target


LEGACY_PARTITION = "patches"  # what a checkpoint without tome.partition was made with


class ToMeError(VitfabError):
    """A model or block that token merging does not know how to patch."""


@dataclass
class ToMeState:
    """Shared by the model and its blocks; reset at the start of every forward pass."""

    schedule: Schedule
    r: list[int]
    prop_attn: bool = True
    trace_source: bool = False
    protected: int = 1
    partition: str = DEFAULT_PARTITION  # how tokens split into sets A and B (merge.PARTITIONS)
    size: torch.Tensor | None = None  # (B, N, 1) patches per token
    source: torch.Tensor | None = None  # (B, N, N_in) which input tokens each token holds
    positions: torch.Tensor | None = None  # (B, N, 2) mean patch coordinates (relative-position models)
    tokens: list[int] = field(default_factory=list)  # tokens leaving each block (last pass)

    def reset(self) -> None:
        self.size, self.source, self.positions, self.tokens = None, None, None, []


# --------------------------------------------------------------------------- the merge step
def merge_step(state: ToMeState, x: torch.Tensor, metric: torch.Tensor | None, r: int,
               relative: bool) -> torch.Tensor:
    """A block's merge between attention and MLP: ``r`` (already clipped) tokens of ``x`` merged by
    bipartite soft matching on ``metric``; sizes, sources and (``relative``) mean patch coordinates
    in ``state`` follow. Returns the merged tokens; records the count leaving the block."""
    if r > 0:
        matching = bipartite_soft_matching(metric, r, state.protected, state.partition)
        if state.trace_source:
            state.source = merge_source(matching, state.source, x)
        if relative:  # a merged token sits at the size-weighted mean of its patches' coordinates
            pos = state.positions
            if pos is None:
                pos = grid_positions(x.shape[1], state.protected, x.device).expand(x.shape[0], -1, -1)
            state.positions, _ = merge_wavg(matching, pos, state.size)
        x, state.size = merge_wavg(matching, x, state.size)
    state.tokens.append(x.shape[1])
    return x


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor, start: int) -> torch.Tensor:
    """Average pooling of merged tokens from index ``start`` on: each weighted by the patches it holds."""
    w = size[:, start:].to(x.dtype)
    return (x[:, start:] * w).sum(dim=1) / w.sum(dim=1)


def check_partition(partition: str) -> None:
    if partition not in PARTITIONS:
        raise ToMeError(f"unknown ToMe partition '{partition}' (choose {', '.join(PARTITIONS)})")


# --------------------------------------------------------------------------- patched modules
class ToMeAttention(Attention):
    """timm's ``Attention`` plus an additive log(size) bias; returns (output, matching metric:
    the keys averaged over heads, or None when ``metric=False``)."""

    def forward(self, x, attn_mask=None, is_causal=False, size=None, metric=True):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:
            bias = torch.zeros_like(bias, dtype=q.dtype).masked_fill(~bias, float("-inf"))
        if size is not None:  # proportional attention
            log_size = size.log().to(q.dtype)[:, None, None, :, 0]  # (B, 1, 1, N)
            bias = log_size if bias is None else bias + log_size
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            if is_causal:
                raise ToMeError("causal attention is not supported by the ToMe attention")
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj_drop(self.proj(x))
        return x, (k.mean(dim=1) if metric else None)


class ToMeBlock(Block):
    """timm's pre-norm ``Block`` with bipartite soft matching between attention and MLP."""

    def forward(self, x, attn_mask=None, is_causal=False):
        state: ToMeState = self._tome
        size = state.size if state.prop_attn else None
        r = clip_r(state.r[self._tome_index], x.shape[1], state.protected)
        relative = isinstance(self.attn, RelPosAttention)
        extra = {"positions": state.positions} if relative else {}
        res = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, size=size, metric=r > 0, **extra)
        y, metric = res if (r > 0 or not relative) else (res, None)
        x = x + self.drop_path1(self.ls1(y))
        del y  # free before the MLP, as timm's one-expression forward does
        if r > 0 and (attn_mask is not None or is_causal):
            raise ToMeError("an attention mask cannot follow the tokens that ToMe merges; use r=0")
        x = merge_step(state, x, metric, r, relative)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class ToMeModelMixin:
    """Put in front of the model's own class: reset per pass, size-weighted pooling."""

    def forward_features(self, x, *args, **kwargs):
        if getattr(self, "grad_checkpointing", False) and self.training and any(self._tome.r):
            raise ToMeError("gradient checkpointing re-runs blocks after the merge state moved on; "
                            "turn it off to train with token merging")
        self._tome.reset()
        return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(self, *args, **kwargs):
        raise ToMeError("forward_intermediates returns token grids, which merged tokens no longer form")

    def vitfab_checkpoint_meta(self) -> dict[str, Any]:
        """What a checkpoint of this model records beside its weights (``models.checkpoint``)."""
        return {"tome": tome_info(self)}

    def pool(self, x, pool_type=None):
        pool_type = self.global_pool if pool_type is None else pool_type
        size = self._tome.size
        if size is None or pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        avg = size_weighted_mean(x, size, start)
        return avg if pool_type == "avg" else 0.5 * (avg + x[:, start:].amax(dim=1))


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        name = f"ToMe{cls.__name__}"
        new = type(name, (ToMeModelMixin, cls), {"_tome_base": cls, "__module__": __name__, "__qualname__": name})
        globals()[name] = new  # so that pickle / torch.save of a patched model find the class
        _PATCHED_CLASSES[cls] = new
    return _PATCHED_CLASSES[cls]


# --------------------------------------------------------------------------- public API
def is_patched(model: torch.nn.Module) -> bool:
    return isinstance(model, ToMeModelMixin)


def _check(model: torch.nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise ToMeError(f"ToMe patches timm VisionTransformer models, not {type(model).__name__}")
    if getattr(model, "attn_pool", None) is not None:
        raise ToMeError(f"ToMe does not support the attention-pool head (global_pool='{model.global_pool}')")
    for i, blk in enumerate(model.blocks):
        if type(blk) not in (Block, ToMeBlock):
            raise ToMeError(f"ToMe does not know block type {type(blk).__module__}.{type(blk).__name__} "
                            f"(block {i}); it patches timm's pre-norm Block only")
        if type(blk.attn) not in (Attention, ToMeAttention, RelPosAttention):
            raise ToMeError(f"ToMe does not know attention type {type(blk.attn).__module__}."
                            f"{type(blk.attn).__name__} (block {i}); it patches timm's Attention only")


def block_macs(model: VisionTransformer, flow: list[tuple[int, int]]) -> float:
    """MACs of patch embedding + blocks when block i attends over flow[i][0] tokens and runs its
    MLP on flow[i][1]; from the layer shapes (for turning a MACs target into a schedule). The
    head and the merges themselves are left out: ``macs=F`` is a fraction of this total, which
    is within a fraction of a percent of what ``measure.count_macs`` counts for a ViT."""
    proj = model.patch_embed.proj
    shapes = [BlockShape(blk.attn.qkv.in_features, blk.attn.attn_dim, blk.attn.proj.out_features,
                         blk.mlp.fc1.in_features * blk.mlp.fc1.out_features
                         + blk.mlp.fc2.in_features * blk.mlp.fc2.out_features, blk.attn.gate is not None)
              for blk in model.blocks]
    return flow_macs(float(model.patch_embed.num_patches * proj.weight.numel()), shapes, flow)


def num_input_tokens(model: VisionTransformer) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens


def resolve_schedule(model: VisionTransformer, r: ScheduleSpec) -> tuple[Schedule, list[int]]:
    schedule = Schedule.parse(r)
    depth = len(model.blocks)
    if schedule.needs_model:
        per_layer = resolve_target(schedule, depth, num_input_tokens(model), model.num_prefix_tokens,
                                   lambda flow: block_macs(model, flow))
    else:
        per_layer = schedule.per_layer(depth)
    return schedule, per_layer


def apply(model: VisionTransformer, r: ScheduleSpec = 0, prop_attn: bool = True, trace_source: bool = False,
          partition: str | None = None) -> VisionTransformer:
    """Patch ``model`` in place (no copy) for token merging with schedule ``r``; returns it.

    ``partition``: ``reference`` (the paper's A/B split over the whole sequence) or ``patches``
    (alternation over the patch tokens only: checkpoints fine-tuned before vitfab adopted the
    reference rule); None keeps the rule of a patched model and is ``reference`` otherwise.
    Calling it again on a patched model changes the schedule and options.
    """
    _check(model)
    if partition is None:
        partition = model._tome.partition if is_patched(model) else DEFAULT_PARTITION
    check_partition(partition)
    schedule, per_layer = resolve_schedule(model, r)
    if is_patched(model):
        state = model._tome
        state.schedule, state.r, state.prop_attn, state.trace_source = schedule, per_layer, prop_attn, trace_source
        state.partition = partition
        state.reset()
        return model
    state = ToMeState(schedule, per_layer, prop_attn, trace_source, protected=model.num_prefix_tokens,
                      partition=partition)
    for i, blk in enumerate(model.blocks):
        blk.__class__ = ToMeBlock
        if type(blk.attn) is Attention:  # RelPosAttention takes size/metric/positions itself
            blk.attn.__class__ = ToMeAttention
        blk._tome, blk._tome_index = state, i
    model.__class__ = _patched_class(type(model))
    model._tome = state
    return model


def set_schedule(model: VisionTransformer, r: ScheduleSpec) -> None:
    """Change the schedule of a patched model in place (options unchanged)."""
    if not is_patched(model):
        raise ToMeError("the model is not patched for ToMe; call vitfab.tome.apply first")
    state = model._tome
    state.schedule, state.r = resolve_schedule(model, r)
    state.reset()


def remove(model: VisionTransformer) -> VisionTransformer:
    """Undo :func:`apply` in place: the original classes are back; weights were never touched."""
    if not is_patched(model):
        return model
    for blk in model.blocks:
        blk.__class__ = Block
        if type(blk.attn) is ToMeAttention:
            blk.attn.__class__ = Attention
        del blk._tome, blk._tome_index
    model.__class__ = type(model)._tome_base
    del model._tome
    return model


def tome_info(model: torch.nn.Module) -> dict[str, Any] | None:
    """The schedule of a patched model as recorded in checkpoints and reports; None if unpatched."""
    if not is_patched(model):
        return None
    s = model._tome
    return {"schedule": s.schedule.describe(), "spec": s.schedule.spec(), "r_per_layer": list(s.r),
            "prop_attn": s.prop_attn, "partition": s.partition}


def apply_spec(model: VisionTransformer, spec: str | None) -> VisionTransformer:
    """A command's ToMe setting (see ``parse_tome_spec``), in place: the schedule ``spec``; the
    stock model for None (merging removed, also from a model loaded with a recorded schedule);
    the model as it is for ``recorded``."""
    if spec == RECORDED:
        return model
    if spec is None:
        return remove(model)
    return apply(model, spec)


def apply_recorded(model: VisionTransformer, recorded: dict[str, Any] | None) -> VisionTransformer:
    """Re-apply a schedule as ``tome_info`` recorded it (in a checkpoint's metadata), in place;
    the model unchanged where nothing was recorded. A record without a partition was written
    before vitfab had the reference rule: its model was fine-tuned with ``patches``, and keeps it."""
    if recorded:
        apply(model, recorded.get("spec", list(recorded["r_per_layer"])), prop_attn=recorded.get("prop_attn", True),
              partition=recorded.get("partition", LEGACY_PARTITION))
    return model
