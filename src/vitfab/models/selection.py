"""Weight selection (Xu et al., ICLR 2024, "Initializing Models with Larger Ones"): a smaller ViT
starts from a subset of a pretrained larger one's weights.

For every dimension that shrinks, evenly spaced indices of the source's: embedding channels
(one index set for the whole residual stream: patch embedding, tokens, norms, every block's
inputs and outputs, the head), heads as whole units (a head keeps all its 64 channels in q, k,
v and the output projection), MLP hidden units. Layers: an evenly spaced subset when the source
is deeper. When the target is deeper than the source (AutoFormer-T's supernet has 14 blocks, DeiT
12), the first blocks take the source's in order and each extra block is, by ``extra``:

- ``identity``: the last source block's selected weights with its two residual branches' output
  projections (``attn.proj``, ``mlp.fc2``) zeroed, so the block starts as the identity and the
  deeper model computes what the source-depth one does (the default);
- ``repeat``: a copy of the last source block (a repeated neighbour).

The patch and position embeddings are then resized to the target's grid and patch (timm's rules,
``weights.fit_state_dict``); a classifier for another class count, and embedding parts the source
does not have (a convolutional stem), keep the target's initialisation. With the target's shape
equal to the source's every index set is the identity, so the target reproduces the source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.models.vision_transformer import VisionTransformer

from ..errors import VitfabError
from .weights import fit_state_dict

EXTRA_BLOCKS = ("identity", "repeat")
METHODS = ("uniform", "leading")  # evenly spaced indices (Xu et al.), or the first ones (the plain slice)


def evenly(n_source: int, n_target: int) -> torch.Tensor:
    """``n_target`` evenly spaced indices into ``range(n_source)``, first and last included."""
    if not 1 <= n_target <= n_source:
        raise VitfabError(f"weight selection cannot take {n_target} of {n_source}")
    if n_target == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.round(torch.linspace(0, n_source - 1, n_target)).long()


@dataclass
class Selection:
    """What was selected: the state dict for the target, and what kept its own initialisation."""

    state_dict: dict[str, torch.Tensor]
    kept: list[str] = field(default_factory=list)  # target keys left at their initial values
    blocks: list[int | str] = field(default_factory=list)  # per target block: its source block, or extra's kind

    def describe(self) -> str:
        src = ", ".join(str(b) for b in self.blocks)
        kept = f"; kept their initialisation: {_brief(self.kept)}" if self.kept else ""
        return f"blocks from source blocks [{src}]{kept}"


def _brief(keys: list[str]) -> str:
    groups = sorted({k.split(".")[0] if not k.startswith("patch_embed") else ".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(groups)


def _vit(model, what: str) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise VitfabError(f"weight selection needs timm Vision Transformers; the {what} is a {type(model).__name__}")
    return model


def _heads(blk) -> tuple[int, int]:
    return int(blk.attn.num_heads), int(blk.attn.head_dim)


def leading(n_source: int, n_target: int) -> torch.Tensor:
    """The first ``n_target`` indices (what copying a leading slice takes)."""
    if not 1 <= n_target <= n_source:
        raise VitfabError(f"weight selection cannot take {n_target} of {n_source}")
    return torch.arange(n_target)


def _select_block(src: dict, own: dict, sb, tb, i: int, j: int, e: torch.Tensor, pick, take) -> None:
    """Target block ``j`` from source block ``i``: embedding channels ``e``, whole heads and MLP
    units by ``pick``; ``take(key, tensor)`` stores each selected tensor."""
    (H_s, hd_s), (H_t, hd_t) = _heads(sb), _heads(tb)
    if hd_s != hd_t or H_t > H_s:
        raise VitfabError(f"weight selection: target block {j} has {H_t} heads of {hd_t}, source block {i} "
                          f"{H_s} of {hd_s} (heads are selected whole: the width must match, the count shrink)")
    M_s, M_t = sb.mlp.fc1.out_features, tb.mlp.fc1.out_features
    if M_t > M_s:
        raise VitfabError(f"weight selection: target block {j} has {M_t} MLP units, source block {i} {M_s}")
    E_s, E_t = sb.norm1.weight.shape[0], len(e)
    h, m_idx = pick(H_s, H_t), pick(M_s, M_t)
    ps, pt = f"blocks.{i}.", f"blocks.{j}."
    done = set()

    def put(key: str, value: torch.Tensor) -> None:
        take(pt + key, value)
        done.add(pt + key)

    for name in ("norm1", "norm2"):
        for p in ("weight", "bias"):
            put(f"{name}.{p}", src[ps + f"{name}.{p}"][e])
    put("attn.qkv.weight", src[ps + "attn.qkv.weight"].view(3, H_s, hd_s, E_s)[:, h][..., e].reshape(-1, E_t))
    if ps + "attn.qkv.bias" in src and pt + "attn.qkv.bias" in own:
        put("attn.qkv.bias", src[ps + "attn.qkv.bias"].view(3, H_s, hd_s)[:, h].reshape(-1))
    put("attn.proj.weight", src[ps + "attn.proj.weight"][e].view(E_t, H_s, hd_s)[:, h].reshape(E_t, H_t * hd_s))
    put("attn.proj.bias", src[ps + "attn.proj.bias"][e])
    put("mlp.fc1.weight", src[ps + "mlp.fc1.weight"][m_idx][:, e])
    put("mlp.fc1.bias", src[ps + "mlp.fc1.bias"][m_idx])
    put("mlp.fc2.weight", src[ps + "mlp.fc2.weight"][e][:, m_idx])
    put("mlp.fc2.bias", src[ps + "mlp.fc2.bias"][e])
    for key in own:  # relative-position tables (head width fixed) and anything else of one shape
        if key.startswith(pt) and key not in done:
            skey = ps + key[len(pt):]
            if skey in src and src[skey].shape == own[key].shape:
                take(key, src[skey])


def select_weights(source: torch.nn.Module, target: torch.nn.Module, extra: str = EXTRA_BLOCKS[0],
                   method: str = METHODS[0]) -> Selection:
    """The state dict that initialises ``target`` from ``source`` by weight selection (both timm
    ViTs with pre-norm blocks; the target no wider than the source in any dimension). ``method``
    ``leading`` takes the first channels, heads, units and layers instead of evenly spaced ones
    (the comparison Xu et al. make, and what a leading-slice copy amounts to)."""
    if extra not in EXTRA_BLOCKS:
        raise VitfabError(f"extra blocks must be one of {', '.join(EXTRA_BLOCKS)}, got '{extra}'")
    if method not in METHODS:
        raise VitfabError(f"selection method must be one of {', '.join(METHODS)}, got '{method}'")
    evenly_ = evenly if method == "uniform" else leading
    src_model, dst_model = _vit(source, "source"), _vit(target, "target")
    src, own = src_model.state_dict(), dst_model.state_dict()
    E_s, E_t = src_model.embed_dim, dst_model.embed_dim
    if E_t > E_s:
        raise VitfabError(f"weight selection shrinks: the target's embed dim {E_t} exceeds the source's {E_s}")
    e = evenly_(E_s, E_t)
    out: dict[str, torch.Tensor] = {}

    def take(key: str, value: torch.Tensor) -> None:
        out[key] = value.detach().clone().contiguous()

    # embedding, tokens, final norm, head: the embedding channels
    for key in ("cls_token", "reg_token", "pos_embed"):
        if key in src and key in own:
            take(key, src[key][..., e])
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        if key in src and key in own and src[key].dim() == own[key].dim() and src[key].shape[1:2] == own[key].shape[1:2]:
            take(key, src[key][e])
    for key in own:
        if key.startswith("patch_embed.") and not key.startswith("patch_embed.proj.") and key in src \
                and src[key].shape == own[key].shape:
            take(key, src[key])  # a stem both have, of one shape: taken whole
    for key in ("norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias"):
        if key in src and key in own:
            take(key, src[key][e])
    if "head.weight" in src and "head.weight" in own and src["head.weight"].shape[0] == own["head.weight"].shape[0]:
        take("head.weight", src["head.weight"][:, e])
        take("head.bias", src["head.bias"])

    # blocks
    D_s, D_t = len(src_model.blocks), len(dst_model.blocks)
    mapping: list[int | str] = (evenly_(D_s, D_t).tolist() if D_t <= D_s else list(range(D_s)) + [extra] * (D_t - D_s))
    for j, m in enumerate(mapping):
        i = m if isinstance(m, int) else D_s - 1
        _select_block(src, own, src_model.blocks[i], dst_model.blocks[j], i, j, e, evenly_, take)
        if m == "identity":
            for key in ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
                out[f"blocks.{j}.{key}"].zero_()

    out = fit_state_dict(out, dst_model, "weight selection")  # grid and patch size; drops another head
    wrong = [k for k in out if k in own and out[k].shape != own[k].shape]
    if wrong:
        raise VitfabError(f"weight selection: {', '.join(wrong[:3])} do not fit the target")
    full = dict(own)
    full.update({k: v for k, v in out.items() if k in own})
    kept = [k for k in own if k not in out and not k.endswith("num_batches_tracked")]
    return Selection(full, kept, mapping)


def select_into(source: torch.nn.Module, target: torch.nn.Module, extra: str = EXTRA_BLOCKS[0],
                method: str = METHODS[0]) -> Selection:
    """``select_weights`` loaded into ``target`` (in place)."""
    sel = select_weights(source, target, extra, method)
    target.load_state_dict(sel.state_dict)
    return sel


__all__ = ["EXTRA_BLOCKS", "METHODS", "Selection", "evenly", "leading", "select_into", "select_weights"]
