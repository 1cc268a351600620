"""ToMe inside AutoFormer's weight-entangled supernet.

The sampled subnet merges tokens between the attention and the MLP of each block exactly as the
patched timm model of the extracted subnet does (``patch.py``: the same merge step, proportional
attention, size-weighted pooling, merged patch coordinates for relative position), so an
(architecture, schedule) pair can be scored on the supernet's shared weights before any subnet
is extracted. The schedule is kept as a ``Schedule`` and turned into r per block for whichever
architecture is set (``macs=F`` from the sampled layer shapes; once per architecture), so
``set_arch`` may change between passes.

As in ``patch.py`` the patch swaps classes in place (no copy) and never weights.
"""

from __future__ import annotations

import torch

from ..models.supernet import SuperBlock, Supernet
from .merge import DEFAULT_PARTITION, clip_r
from .patch import ToMeError, ToMeState, check_partition, merge_step, size_weighted_mean
from .schedule import BlockShape, Schedule, ScheduleSpec, flow_macs, resolve_target


class ToMeSuperBlock(SuperBlock):
    """``SuperBlock`` with the merge step between attention and MLP."""

    def forward(self, x: torch.Tensor, heads: int, hidden: int) -> torch.Tensor:
        state: ToMeState = self._tome
        r = clip_r(state.r[self._tome_index], x.shape[1], state.protected)
        size = state.size if state.prop_attn else None
        res = self.attn(self.norm(self.norm1, x), heads, size=size, positions=state.positions, metric=r > 0)
        y, metric = res if r > 0 else (res, None)
        x = x + self.drop_path(y)
        x = merge_step(state, x, metric, r, relative=bool(self.attn.rel_pos))
        return x + self.drop_path(self.mlp(x, hidden))


class ToMeSupernet(Supernet):
    """``Supernet`` that resolves its schedule for the sampled subnet and pools with size weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state: ToMeState = self._tome
        if self.arch not in self._tome_resolved:  # resolved once per subnet, not per batch
            self._tome_resolved[self.arch] = supernet_per_layer(self, state.schedule)
        state.r = self._tome_resolved[self.arch]
        state.reset()
        return super().forward(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        size = self._tome.size
        if size is None or self.global_pool == "token":
            return super().pool(x)
        return size_weighted_mean(x, size, 1)


def supernet_per_layer(net: Supernet, schedule: Schedule) -> list[int]:
    """r per block of the subnet ``net.arch`` (its depth; ``macs=F``/``keep=F`` from its shapes)."""
    a, hd = net.arch, net.space.head_dim
    if not schedule.needs_model:
        return schedule.per_layer(a.depth)
    patches = (net.space.img_size // net.space.patch_size) ** 2
    e = a.embed_dim
    shapes = [BlockShape(e, a.num_heads[i] * hd, e, 2 * e * a.mlp_hidden(i)) for i in range(a.depth)]
    embed = float(patches * net.patch_embed.weight[:e].numel())
    return resolve_target(schedule, a.depth, patches + 1, 1, lambda flow: flow_macs(embed, shapes, flow))


def is_supernet_patched(net: torch.nn.Module) -> bool:
    return isinstance(net, ToMeSupernet)


def apply_supernet(net: Supernet, r: ScheduleSpec = 0, prop_attn: bool = True,
                   partition: str = DEFAULT_PARTITION) -> Supernet:
    """Patch ``net`` in place for token merging with schedule ``r`` in whichever subnet is set;
    returns it. Calling it again changes the schedule and options."""
    if not isinstance(net, Supernet):
        raise ToMeError(f"apply_supernet patches a vitfab Supernet, not {type(net).__name__}")
    check_partition(partition)
    state = ToMeState(Schedule.parse(r), [], prop_attn, protected=1, partition=partition)
    resolved = {net.arch: supernet_per_layer(net, state.schedule)}  # an unreachable target fails here
    for i, blk in enumerate(net.blocks):
        blk.__class__ = ToMeSuperBlock
        blk._tome, blk._tome_index = state, i
    net.__class__ = ToMeSupernet
    net._tome, net._tome_resolved = state, resolved  # r per block of each subnet set so far
    return net


def remove_supernet(net: Supernet) -> Supernet:
    """Undo :func:`apply_supernet` in place."""
    if not is_supernet_patched(net):
        return net
    for blk in net.blocks:
        blk.__class__ = SuperBlock
        del blk._tome, blk._tome_index
    net.__class__ = Supernet
    del net._tome, net._tome_resolved
    return net
