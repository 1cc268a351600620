"""AutoFormer's weight-entangled supernet (Chen et al., ICCV 2021).

Every subnet uses the leading slice of each shared weight: patch and position embeddings up to
the sampled embed dim; the first h heads of q, k and v (fixed head width, so the qkv width is
h x 64) and the matching columns of the output projection; the first embed x mlp_ratio hidden
units of fc1/fc2; LayerNorm over the sampled width; the first ``depth`` blocks. The embed dim
is shared by all blocks; heads and MLP ratio are chosen per block. ``set_arch`` picks the
subnet the next forward passes run.

Options that reproduce the released AutoFormer supernets (see ``nas.official``): relative
position (``rel_pos`` = max relative distance, tables per block for k and v), ``qkv_layout=
"interleaved"`` (the authors' "change_qkv" rows q0, k0, v0, q1, ... with the bias sliced as a
plain prefix), LayerNorm eps 1e-5 and average pooling of the patch tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from .arch import ArchConfig, SearchSpace, SpaceError
from .embed import check_embed, pre_embed, stem_channels
from .factory import create_model
from .relpos import grid_positions, relative_attention
from .subnet import subnet_kwargs

LN_EPS = 1e-6  # as timm's ViTs
SUPERNET_NAME = "vitfab_supernet"  # the model name in a supernet checkpoint's meta


QKV_LAYOUTS = ("blocked", "interleaved")


class SuperAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, rel_pos: int = 0, qkv_layout: str = "blocked"):
        super().__init__()
        self.num_heads, self.head_dim, self.rel_pos, self.qkv_layout = num_heads, head_dim, rel_pos, qkv_layout
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        if rel_pos:
            rows = 2 * rel_pos + 2
            self.rel_k_v, self.rel_k_h, self.rel_v_v, self.rel_v_h = (
                nn.Parameter(torch.zeros(rows, head_dim)) for _ in range(4))

    def qkv_slice(self, embed: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampled qkv weight and bias, rows ordered q (head-major), k, v as timm's Attention reads them.

        blocked: the first ``heads`` heads of each of q, k and v. interleaved (AutoFormer's change_qkv):
        of the first 3 x heads x 64 rows, every third row from 0, 1 and 2 gives q, k and v, while the
        bias is the plain first 3 x heads x 64 entries.
        """
        hd, h_max, a = self.head_dim, self.num_heads, heads * self.head_dim
        if self.qkv_layout == "interleaved":
            rows = self.qkv.weight[: 3 * a, :embed]
            w = torch.cat([rows[0::3], rows[1::3], rows[2::3]])
            return w, self.qkv.bias[: 3 * a]
        w = self.qkv.weight.view(3, h_max, hd, -1)[:, :heads, :, :embed].reshape(3 * a, embed)
        b = self.qkv.bias.view(3, h_max, hd)[:, :heads].reshape(3 * a)
        return w, b

    def rel_tables(self):
        return ((self.rel_k_v, self.rel_k_h), (self.rel_v_v, self.rel_v_h))

    def forward(self, x: torch.Tensor, heads: int, size: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, metric: bool = False):
        """The sampled attention. ``size`` (B, N, 1) adds log(size) of each key to the logits (ToMe's
        proportional attention), ``positions`` (B, N, 2) replace the patch grid of relative position
        after merges; with ``metric=True`` returns (output, keys averaged over heads)."""
        B, N, e = x.shape
        w, b = self.qkv_slice(e, heads)
        q, k, v = F.linear(x, w, b).reshape(B, N, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None if size is None else size.log().to(q.dtype)[:, None, None, :, 0]
        if self.rel_pos:
            if positions is None:
                positions = grid_positions(N, 1, x.device)
            out = relative_attention(q, k, v, self.rel_tables(), positions, 1, self.rel_pos, self.head_dim ** -0.5,
                                     bias)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(B, N, heads * self.head_dim)
        out = F.linear(out, self.proj.weight[:e, : heads * self.head_dim], self.proj.bias[:e])
        return (out, k.mean(dim=1)) if metric else out


class SuperBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, head_dim: int, drop_path: float,
                 rel_pos: int = 0, qkv_layout: str = "blocked", ln_eps: float = LN_EPS):
        super().__init__()
        self.ln_eps = ln_eps
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = SuperAttention(dim, num_heads, head_dim, rel_pos, qkv_layout)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def norm(self, ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        e = x.shape[-1]
        return F.layer_norm(x, (e,), ln.weight[:e], ln.bias[:e], self.ln_eps)

    def mlp(self, x: torch.Tensor, hidden: int) -> torch.Tensor:
        """The second half of the block without its residual: norm2, fc1, GELU, fc2."""
        e = x.shape[-1]
        y = F.gelu(F.linear(self.norm(self.norm2, x), self.fc1.weight[:hidden, :e], self.fc1.bias[:hidden]))
        return F.linear(y, self.fc2.weight[:e, :hidden], self.fc2.bias[:e])

    def forward(self, x: torch.Tensor, heads: int, hidden: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm(self.norm1, x), heads))
        return x + self.drop_path(self.mlp(x, hidden))


class Supernet(nn.Module):
    def __init__(self, space: SearchSpace, num_classes: int, drop_path_rate: float = 0.1,
                 global_pool: str = "token", rel_pos: int = 0, qkv_layout: str = "blocked", ln_eps: float = LN_EPS,
                 embed: str = "patch", stem: list[int] | None = None):
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise SpaceError(f"global_pool must be token or avg, got {global_pool}")
        if qkv_layout not in QKV_LAYOUTS:
            raise SpaceError(f"qkv_layout must be one of {', '.join(QKV_LAYOUTS)}, got {qkv_layout}")
        self.space, self.num_classes, self.global_pool = space, num_classes, global_pool
        self.rel_pos, self.qkv_layout, self.ln_eps = rel_pos, qkv_layout, ln_eps
        E, p = space.super_embed_dim, space.patch_size
        n = (space.img_size // p) ** 2
        try:
            check_embed(embed, p)
        except ValueError as exc:
            raise SpaceError(str(exc)) from None
        self.embed, self.stem = embed, (list(stem) if stem else stem_channels(p, E)) if embed == "conv" else None
        if embed == "patch":  # the embedding is one patch-sized convolution, sliced to the sampled dim
            self.pre_embed, self.patch_embed = None, nn.Conv2d(3, E, p, p)
        else:  # a small-data embedding (models.embed): shared part, then a projection sliced like the above
            self.pre_embed, c, k = pre_embed(embed, p, E, self.stem)
            self.patch_embed = nn.Conv2d(c, E, k, k)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, E))
        dpr = torch.linspace(0, drop_path_rate, space.super_depth).tolist()
        self.blocks = nn.ModuleList(
            SuperBlock(E, space.super_num_heads, space.super_mlp_ratio, space.head_dim, dpr[i], rel_pos, qkv_layout,
                       ln_eps)
            for i in range(space.super_depth)
        )
        self.norm = nn.LayerNorm(E, eps=ln_eps)
        self.head = nn.Linear(E, num_classes)
        self._init_weights()
        self.arch = space.largest()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for name, p in self.named_parameters():
            if ".rel_" in name:
                trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_arch(self, arch: ArchConfig) -> None:
        why = self.space.fits(arch)
        if why:
            raise SpaceError(f"architecture {arch.short()} does not fit the supernet: {why}")
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.arch
        e = a.embed_dim
        if self.pre_embed is not None:
            x = self.pre_embed(x)
        x = F.conv2d(x, self.patch_embed.weight[:e], self.patch_embed.bias[:e], stride=self.patch_embed.stride)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token[..., :e].expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[..., :e]
        for i in range(a.depth):
            x = self.blocks[i](x, a.num_heads[i], a.mlp_hidden(i))
        x = F.layer_norm(x, (e,), self.norm.weight[:e], self.norm.bias[:e], self.ln_eps)
        return F.linear(self.pool(x), self.head.weight[:, :e], self.head.bias)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)

    def subnet_kwargs(self, arch: ArchConfig) -> dict:
        """``create_model("vitfab_subnet", **...)`` arguments of ``arch`` cut from this supernet."""
        kw = subnet_kwargs(arch, self.space.head_dim) | {"global_pool": self.global_pool}
        if self.rel_pos:
            kw["rel_pos"] = self.rel_pos
        if self.ln_eps != LN_EPS:
            kw["ln_eps"] = self.ln_eps
        if self.embed != "patch":
            kw["embed"] = self.embed
        if self.stem:
            kw["stem"] = list(self.stem)
        return kw

    def meta_kwargs(self) -> dict:
        """What rebuilds this supernet (``Supernet.from_kwargs``): recorded in its checkpoints."""
        kw = {"space": self.space.to_dict(), "num_classes": self.num_classes, "global_pool": self.global_pool}
        if self.rel_pos:
            kw |= {"rel_pos": self.rel_pos, "qkv_layout": self.qkv_layout}
        if self.ln_eps != LN_EPS:
            kw["ln_eps"] = self.ln_eps
        if self.embed != "patch":
            kw |= {"embed": self.embed, "stem": self.stem}
        return kw

    @classmethod
    def from_kwargs(cls, k: dict, drop_path_rate: float = 0.0, **overrides) -> "Supernet":
        """The supernet ``meta_kwargs`` describe (``overrides``: space, num_classes, ...)."""
        k = dict(k) | overrides
        space = k["space"] if isinstance(k["space"], SearchSpace) else SearchSpace.from_dict(k["space"])
        return cls(space, int(k["num_classes"]), drop_path_rate=drop_path_rate, global_pool=k.get("global_pool", "token"),
                   rel_pos=int(k.get("rel_pos", 0)), qkv_layout=k.get("qkv_layout", "blocked"),
                   ln_eps=float(k.get("ln_eps", LN_EPS)), embed=k.get("embed", "patch"), stem=k.get("stem"))

    def subnet_model(self, arch: ArchConfig, classes: list[str] | None = None):
        """The standalone timm model of ``arch`` (``vitfab_subnet``) with this supernet's weights."""
        model = create_model("vitfab_subnet", classes=classes, num_classes=None if classes else self.num_classes,
                             img_size=self.space.img_size, patch_size=self.space.patch_size,
                             **self.subnet_kwargs(arch))
        model.load_state_dict(self.subnet_state_dict(arch))
        return model

    def load_leading(self, state: dict[str, torch.Tensor]) -> int:
        """Copy a timm ViT's state dict (timm names; head width ``head_dim``) into the leading
        slices (the inverse of ``subnet_state_dict``); a head for another class count and a position
        embedding for another grid are skipped. Returns how many tensors were copied."""
        hd, own, copied = self.space.head_dim, self.state_dict(), 0
        renames = {"patch_embed.proj.": "patch_embed.", "patch_embed.pre.": "pre_embed.", "mlp.fc1.": "fc1.",
                   "mlp.fc2.": "fc2."}
        with torch.no_grad():
            for name, value in state.items():
                if name.startswith("head.") and value.shape[0] != own["head.weight"].shape[0]:
                    continue
                if name == "pos_embed" and value.shape[1] != own["pos_embed"].shape[1]:
                    continue
                mapped = name
                for a, b in renames.items():
                    mapped = mapped.replace(a, b)
                if mapped not in own:
                    continue
                target = own[mapped]
                if mapped.endswith("attn.qkv.weight"):  # (3*h*64, e) -> (3, H, 64, E) slices
                    h = value.shape[0] // (3 * hd)
                    target.view(3, -1, hd, target.shape[1])[:, :h, :, : value.shape[1]] = value.view(3, h, hd, -1)
                elif mapped.endswith("attn.qkv.bias"):
                    h = value.shape[0] // (3 * hd)
                    target.view(3, -1, hd)[:, :h] = value.view(3, h, hd)
                elif value.dim() != target.dim() or any(v > t for v, t in zip(value.shape, target.shape)):
                    raise SpaceError(f"{name} {tuple(value.shape)} does not fit the supernet's {tuple(target.shape)}")
                elif value.dim() == 0:
                    target.copy_(value)
                else:
                    target[tuple(slice(0, n) for n in value.shape)] = value
                copied += 1
        return copied

    def subnet_state_dict(self, arch: ArchConfig) -> dict[str, torch.Tensor]:
        """The weights of ``arch`` under the names of the standalone timm model (vitfab_subnet)."""
        why = self.space.fits(arch)
        if why:
            raise SpaceError(f"architecture {arch.short()} does not fit the supernet: {why}")
        e, sd = arch.embed_dim, {}
        sd["cls_token"] = self.cls_token[..., :e]
        sd["pos_embed"] = self.pos_embed[..., :e]
        sd["patch_embed.proj.weight"] = self.patch_embed.weight[:e]
        sd["patch_embed.proj.bias"] = self.patch_embed.bias[:e]
        if self.pre_embed is not None:  # shared whole (buffers too: the stem's BatchNorm statistics)
            sd |= {f"patch_embed.pre.{k}": v for k, v in self.pre_embed.state_dict().items()}
        for i in range(arch.depth):
            blk, h, hid, a = self.blocks[i], arch.num_heads[i], arch.mlp_hidden(i), arch.num_heads[i] * self.space.head_dim
            pre = f"blocks.{i}."
            w, b = blk.attn.qkv_slice(e, h)
            sd |= {
                pre + "norm1.weight": blk.norm1.weight[:e], pre + "norm1.bias": blk.norm1.bias[:e],
                pre + "attn.qkv.weight": w, pre + "attn.qkv.bias": b,
                pre + "attn.proj.weight": blk.attn.proj.weight[:e, :a], pre + "attn.proj.bias": blk.attn.proj.bias[:e],
                pre + "norm2.weight": blk.norm2.weight[:e], pre + "norm2.bias": blk.norm2.bias[:e],
                pre + "mlp.fc1.weight": blk.fc1.weight[:hid, :e], pre + "mlp.fc1.bias": blk.fc1.bias[:hid],
                pre + "mlp.fc2.weight": blk.fc2.weight[:e, :hid], pre + "mlp.fc2.bias": blk.fc2.bias[:e],
            }
            if self.rel_pos:  # head width is fixed, so the tables are taken whole
                sd |= {pre + f"attn.{n}": getattr(blk.attn, n) for n in ("rel_k_v", "rel_k_h", "rel_v_v", "rel_v_h")}
        sd["norm.weight"], sd["norm.bias"] = self.norm.weight[:e], self.norm.bias[:e]
        sd["head.weight"], sd["head.bias"] = self.head.weight[:, :e], self.head.bias
        return {k: v.detach().clone().contiguous() for k, v in sd.items()}
