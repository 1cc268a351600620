"""Patch embeddings that help ViTs on small data, as timm ``embed_layer`` classes.

- ``conv``: a convolutional stem (Xiao et al., NeurIPS 2021, "Early Convolutions Help Transformers
  See Better"): log2(patch) stride-2 3x3 convolutions with BatchNorm and ReLU, then a 1x1
  convolution to the embed dim, in place of the single patch-sized stride-p convolution.
- ``spt``: shifted patch tokenisation (Lee et al., 2021, "Vision Transformer for Small-Size
  Datasets"): the image and four copies shifted by half a patch along the diagonals are stacked
  on the channels, cut into patches, each flattened patch layer-normalised and projected.

Both subclass timm's ``PatchEmbed`` (same grid, ``patch_size``, ``num_patches``, output layout),
so a model built with either is a plain timm ``VisionTransformer``: ToMe, precision modes, ONNX
and OpenVINO see the usual token sequence. Neither changes the token count. The layer whose
output channels are the embed dim is ``proj`` in all three, so a supernet slices its rows.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Format, PatchEmbed, nchw_to
from torch import nn

EMBEDS = ("patch", "conv", "spt")


def stem_channels(patch_size: int, embed_dim: int) -> list[int]:
    """The conv stem's widths: doubling up to half the embed dim at the last stride-2 stage
    (Xiao et al. end their stems at ~1/2 to 1/1 of the embed dim)."""
    k = int(math.log2(patch_size))
    return [max(8, embed_dim // 2 ** (k - i)) for i in range(k)]


def stem_widths(patch_size: int, embed_dim: int, stem: list[int] | None = None) -> list[int]:
    """The conv stem's widths: ``stem`` as given (one per stride-2 stage) or the default."""
    widths = list(stem) if stem else stem_channels(patch_size, embed_dim)
    if len(widths) != int(math.log2(patch_size)):
        raise ValueError(f"a patch of {patch_size} needs {int(math.log2(patch_size))} stem stages, got {len(widths)}")
    return widths


def check_embed(embed: str, patch_size: int) -> None:
    if embed not in EMBEDS:
        raise ValueError(f"embed must be one of {', '.join(EMBEDS)}, got '{embed}'")
    if embed == "conv" and (patch_size < 2 or patch_size & (patch_size - 1)):
        raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch_size}")
    if embed == "spt" and patch_size % 2:
        raise ValueError(f"shifted patches need an even patch size, got {patch_size}")


def conv_stem(widths: list[int], in_chans: int = 3) -> nn.Sequential:
    """Stride-2 3x3 convolutions with BatchNorm and ReLU, one per width."""
    layers, c = [], in_chans
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c = w
    return nn.Sequential(*layers)


def shift_stack(x: torch.Tensor, s: int) -> torch.Tensor:
    """``x`` and its four diagonal shifts by ``s`` pixels (zero filled), stacked on channels."""
    H, W = x.shape[-2:]
    pad = F.pad(x, (s, s, s, s))
    shifts = [pad[..., dy: dy + H, dx: dx + W] for dy, dx in ((0, 0), (0, 2 * s), (2 * s, 0), (2 * s, 2 * s))]
    return torch.cat([x] + shifts, dim=1)


class ShiftedPatchNorm(nn.Module):
    """The image and its four half-patch diagonal shifts on the channels, every p x p x 5C patch
    layer-normalised; the shape stays an image, (B, 5C, H, W), for a stride-p projection."""

    def __init__(self, patch_size: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(5 * in_chans * patch_size * patch_size, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = shift_stack(x, p // 2)
        B, C, H, W = x.shape
        t = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), -1)
        t = self.norm(t)
        return t.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def pre_embed(embed: str, patch_size: int, embed_dim: int, stem: list[int] | None = None,
              in_chans: int = 3) -> tuple[nn.Module, int, int]:
    """The part of an embedding before its projection to the embed dim, that projection's input
    channels and its kernel (= stride)."""
    check_embed(embed, patch_size)
    if embed == "conv":
        widths = stem_widths(patch_size, embed_dim, stem)
        return conv_stem(widths, in_chans), widths[-1], 1
    if embed == "spt":
        return ShiftedPatchNorm(patch_size, in_chans), 5 * in_chans, patch_size
    raise ValueError(f"'{embed}' has no part before the projection")


class PreEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with a module ``pre`` before ``proj`` (which maps to the embed dim):
    the same grid, token layout and attributes, so the model is a plain ``VisionTransformer``."""

    embed: str = ""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, stem=None, bias=True, **kwargs):
        p = patch_size if isinstance(patch_size, int) else patch_size[0]
        super().__init__(img_size=img_size, patch_size=p, in_chans=in_chans, embed_dim=embed_dim, bias=bias, **kwargs)
        self.pre, c, k = pre_embed(self.embed, p, embed_dim, stem, in_chans)
        self.proj = nn.Conv2d(c, embed_dim, k, k, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if self.strict_img_size and self.img_size is not None and (H, W) != tuple(self.img_size):
            raise ValueError(f"input {H}x{W} does not match the model's {self.img_size[0]}x{self.img_size[1]}")
        x = self.proj(self.pre(x))
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)


class ConvStemEmbed(PreEmbed):
    """``pre``: the stride-2 stages; ``proj``: the 1x1 convolution to the embed dim."""

    embed = "conv"


class ShiftedPatchEmbed(PreEmbed):
    """``pre``: shift, stack and normalise; ``proj``: a stride-p convolution over the 5 x C stacked
    channels (the same map as flatten-then-linear)."""

    embed = "spt"


def embed_counts(embed: str, embed_dim: int, img_size: int, patch_size: int, stem: list[int] | None = None,
                 in_chans: int = 3) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of the embedding up to and including its
    projection, by ``measure.count_macs``'s convention (convolutions counted; norms and ReLU not)."""
    e, p, g = embed_dim, patch_size, img_size // patch_size
    if embed == "patch":
        return in_chans * p * p * e + e, g * g * in_chans * p * p * e
    if embed == "spt":
        k = 5 * in_chans * p * p
        return 2 * k + k * e + e, g * g * k * e
    params, macs, c, size = 0, 0, in_chans, img_size
    for w in stem_widths(p, e, stem):
        size = (size + 1) // 2
        params += 9 * c * w + 2 * w
        macs += size * size * 9 * c * w
        c = w
    return params + c * e + e, macs + g * g * c * e


def embed_layer(embed: str, stem: list[int] | None = None):
    """The timm ``embed_layer`` for ``embed`` (None for "patch": timm's own ``PatchEmbed``)."""
    check_embed(embed, 2)
    if embed == "patch":
        return None
    return partial(ConvStemEmbed if embed == "conv" else ShiftedPatchEmbed, stem=stem)
