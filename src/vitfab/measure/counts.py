"""Parameters and multiply-accumulates, counted by running the model.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2, the ViT papers'
convention) on a real forward pass, so anything that changes the work done at run time (token
merging, a smaller subnet) shows up as counted, not as estimated. torch's counter knows the CUDA
attention kernels but not the CPU flash kernel that ``scaled_dot_product_attention`` picks on
CPUs; vitfab registers that one (and the other fused variants torch may dispatch to), otherwise
DeiT-B would read 16.85 G instead of 17.6 G.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def count_params(model: nn.Module) -> int:
    """Parameters, shared tensors counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def attention_flops(query_shape, key_shape, value_shape) -> int:
    """q @ k^T and attn @ v: 2 * (B*H * Lq * Lk * (Dk + Dv)) FLOPs; any leading batch dims."""
    *batch, lq, dk = query_shape
    lk = key_shape[-2]
    dv = value_shape[-1]
    bh = 1
    for b in batch:
        bh *= b
    return 2 * bh * lq * lk * (dk + dv)


def _sdpa_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Any]:
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable")
    return {getattr(aten, n): _sdpa_formula for n in names if hasattr(aten, n)}


def count_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``inputs`` (multiply and add counted separately)."""
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    with torch.inference_mode(), counter:
        model(inputs)
    return int(counter.get_total_flops())


def count_macs(
    model: nn.Module,
    img_size: int | tuple[int, int] | None = None,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    inputs: torch.Tensor | None = None,
) -> int:
    """Multiply-accumulates per image of one forward pass (FLOPs / 2 / batch).

    Count on the float model: int8-quantised Linear layers do the same multiply-accumulates but
    are invisible to the counter, so ``measure`` counts before quantising.
    """
    if inputs is None:
        size = img_size if img_size is not None else input_size(model)
        h, w = (size, size) if isinstance(size, int) else size
        dev = device if device is not None else next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        gen = torch.Generator().manual_seed(0)  # counts do not depend on the values; the global RNG stays put
        inputs = torch.randn(batch_size, 3, h, w, generator=gen).to(dev, dtype)
    was_training = model.training
    model.eval()
    try:
        flops = count_flops(model, inputs)
    finally:
        model.train(was_training)
    return flops // 2 // inputs.shape[0]


def input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model was built for (timm's patch_embed.img_size)."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        meta = getattr(model, "vitfab_meta", None)
        if meta is not None:
            s = meta.preprocess.img_size
            return (s, s)
        raise ValueError("cannot tell the model's input size; pass img_size")
    return tuple(size)

