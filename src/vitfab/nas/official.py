"""The supernets the AutoFormer authors released, loaded as they are.

Format: a torch pickle with the state dict under ``model`` (other keys: optimizer,
lr_scheduler, epoch, args), read with ``weights_only=True``. Keys: ``cls_token``, ``pos_embed``
[1, 197, E_max], ``patch_embed_super.proj.*``, per block ``attn.qkv.*`` [3 E_max, E_max],
``attn.proj.*``, ``attn_layer_norm.*``, ``ffn_layer_norm.*``, ``fc1.*``, ``fc2.*``,
``attn.rel_pos_embed_{k,v}.embeddings_table_{v,h}`` [2 * 14 + 2, 64], then ``norm.*``, ``head.*``.

Released settings, reproduced: pre-norm blocks; LayerNorm eps 1e-5; exact GELU; global average
pooling of the patch tokens after the final norm (the class token stays in the sequence but is
not pooled); relative position with max distance 14 (row 0 of the tables for pairs with the class
token; vertical + horizontal tables summed; added to the logits as scale * q . r_k and to the
output as attn . r_v); "change_qkv": of the first 3 x heads x 64 qkv rows, rows 0, 3, 6, ... are
q, rows 1, 4, ... k, rows 2, 5, ... v, while the qkv bias is the plain first 3 x heads x 64
entries (so its q/k/v blocks move with the sampled head count); scale 64 ** -0.5.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from ..data.transforms import Preprocess
from ..errors import CheckpointError
from ..models.arch import SearchSpace, load_arch
from ..models.factory import default_class_names
from ..models.meta import ModelMeta
from ..models.supernet import SUPERNET_NAME, Supernet

CONFIGS = Path(__file__).parent / "configs"
PUBLISHED = {"T": CONFIGS / "AutoFormer-T.yaml", "S": CONFIGS / "AutoFormer-S.yaml", "B": CONFIGS / "AutoFormer-B.yaml"}
MAX_REL, LN_EPS = 14, 1e-5
_RENAMES = (("patch_embed_super.proj.", "patch_embed."), (".attn_layer_norm.", ".norm1."),
            (".ffn_layer_norm.", ".norm2."), (".attn.rel_pos_embed_k.embeddings_table_v", ".attn.rel_k_v"),
            (".attn.rel_pos_embed_k.embeddings_table_h", ".attn.rel_k_h"),
            (".attn.rel_pos_embed_v.embeddings_table_v", ".attn.rel_v_v"),
            (".attn.rel_pos_embed_v.embeddings_table_h", ".attn.rel_v_h"))


def published_arch(name: str):
    """The published AutoFormer-T/S/B subnet (``"T"``, ``"S"``, ``"B"``)."""
    return load_arch(PUBLISHED[name.upper()[-1]])


def official_space(space: str | Path) -> SearchSpace:
    if str(space) in ("tiny", "small", "base"):  # the released configs (base allows 8 heads)
        sp = SearchSpace.load(PUBLISHED[{"tiny": "T", "small": "S", "base": "B"}[str(space)]])
        return dataclasses.replace(sp, name=str(space))
    return SearchSpace.load(space)


def official_to_vitfab(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for a, b in _RENAMES:
            key = key.replace(a, b)
        out[key] = value
    return out


def load_official_autoformer(path: str | Path, space: str | Path = "tiny") -> Supernet:
    """A released AutoFormer supernet checkpoint -> a vitfab ``Supernet`` (eval mode) with the
    authors' settings; subnets, extraction, ToMe and the precision modes work on it as on any."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:  # the authors' files carry their argparse options; that class is a plain attribute bag
        torch.serialization.add_safe_globals([argparse.Namespace])
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {str(exc).splitlines()[0]}") \
            from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "head.weight" not in state:
        raise CheckpointError(f"{path} is not an AutoFormer checkpoint (no 'model' state dict with head.weight)")
    sp = official_space(space)
    net = Supernet(sp, int(state["head.weight"].shape[0]), drop_path_rate=0.0, global_pool="avg",
                   rel_pos=MAX_REL, qkv_layout="interleaved", ln_eps=LN_EPS)
    converted = official_to_vitfab(state)
    own = net.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    wrong = sorted(k for k in set(own) & set(converted) if own[k].shape != converted[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise CheckpointError(f"{path} does not match the '{sp.name}' supernet ({detail}); is --space right?")
    net.load_state_dict(converted)
    classes = default_class_names(net.num_classes)
    net.vitfab_meta = ModelMeta(
        name=SUPERNET_NAME,
        kwargs=net.meta_kwargs(),
        classes=classes, preprocess=Preprocess(img_size=sp.img_size, crop_pct=0.875),
        extra={"source": str(path)},
    )
    return net.eval()
