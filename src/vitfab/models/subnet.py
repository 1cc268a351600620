"""``vitfab_subnet``: a timm ``VisionTransformer`` whose blocks differ in heads and MLP width.

Registered with timm, so an extracted AutoFormer subnet is built, saved and loaded like any
other timm model (``create_model("vitfab_subnet", embed_dim=..., depth=..., num_heads=[...],
mlp_ratio=[...])``). Heads have a fixed width (``head_dim``, 64), as in AutoFormer.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

from timm.layers import LayerNorm, Mlp
from timm.layers.attention import Attention
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from .arch import ArchConfig
from .embed import embed_layer
from .relpos import RelPosAttention


def _per_block(value, depth: int, what: str) -> list:
    values = list(value) if isinstance(value, Sequence) else [value] * depth
    if len(values) != depth:
        raise ValueError(f"{what}: {len(values)} values for depth {depth}")
    return values


@register_model
def vitfab_subnet(pretrained: bool = False, embed_dim: int = 192, depth: int = 12, num_heads=3, mlp_ratio=4.0,
                  head_dim: int = 64, rel_pos: int = 0, ln_eps: float | None = None, embed: str = "patch",
                  stem: list[int] | None = None, pretrained_cfg=None,
                  pretrained_cfg_overlay=None, cache_dir=None, **kwargs) -> VisionTransformer:
    if pretrained:
        raise ValueError("vitfab_subnet has no hub weights; extract one from a supernet (vitfab nas extract)")
    heads = [int(h) for h in _per_block(num_heads, depth, "num_heads")]
    ratios = [float(r) for r in _per_block(mlp_ratio, depth, "mlp_ratio")]
    kwargs.setdefault("qkv_bias", True)
    if ln_eps is not None:
        kwargs["norm_layer"] = partial(LayerNorm, eps=ln_eps)
    layer = embed_layer(embed, stem)
    if layer is not None:  # a small-data embedding (models.embed; it checks the patch size)
        kwargs["embed_layer"] = layer
    if kwargs.get("global_pool") == "avg":
        kwargs.setdefault("fc_norm", False)  # final norm before pooling, as the supernet does
    # built with one head (any embed dim divides by it), then each block gets its own attention and MLP
    model = VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=1, mlp_ratio=max(ratios), **kwargs)
    for blk, h, r in zip(model.blocks, heads, ratios):
        drops = dict(attn_drop=kwargs.get("attn_drop_rate", 0.0), proj_drop=kwargs.get("proj_drop_rate", 0.0))
        if rel_pos:  # AutoFormer's relative position (max distance rel_pos)
            blk.attn = RelPosAttention(embed_dim, h, attn_head_dim=head_dim, qkv_bias=kwargs["qkv_bias"],
                                       max_rel=rel_pos, num_prefix=model.num_prefix_tokens, **drops)
        else:
            blk.attn = Attention(embed_dim, num_heads=h, attn_head_dim=head_dim, qkv_bias=kwargs["qkv_bias"], **drops)
        blk.mlp = Mlp(embed_dim, int(embed_dim * r), drop=kwargs.get("proj_drop_rate", 0.0))
    model.init_weights()
    model.pretrained_cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic"}
    return model


def subnet_kwargs(arch: ArchConfig, head_dim: int = 64) -> dict:
    """``create_model("vitfab_subnet", **subnet_kwargs(arch))``."""
    return {"embed_dim": arch.embed_dim, "depth": arch.depth, "num_heads": list(arch.num_heads),
            "mlp_ratio": list(arch.mlp_ratio), "head_dim": head_dim}
