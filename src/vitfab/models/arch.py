"""``ArchConfig`` and ``SearchSpace``: AutoFormer's genes and the spaces they are drawn from.

One ``ArchConfig`` (embed dim, depth, per-block heads and MLP ratio) is used by the supernet's
sampling, the evolutionary search, extraction, the YAML files (AutoFormer's ``RETRAIN`` shape)
and the reports. Heads have a fixed width (64 in AutoFormer), so a block's attention width is
heads x 64, independent of the embed dim.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import VitfabError
from ..files import write_text_atomic
from .embed import embed_counts


class SpaceError(VitfabError):
    """A search space or architecture that does not fit."""


@dataclass(frozen=True)
class ArchConfig:
    embed_dim: int
    depth: int
    num_heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        object.__setattr__(self, "mlp_ratio", tuple(float(r) for r in self.mlp_ratio))
        if len(self.num_heads) != self.depth or len(self.mlp_ratio) != self.depth:
            raise SpaceError(f"an architecture of depth {self.depth} needs {self.depth} heads and MLP ratios, "
                             f"got {len(self.num_heads)} and {len(self.mlp_ratio)}")

    def mlp_hidden(self, i: int) -> int:
        return int(self.embed_dim * self.mlp_ratio[i])

    def to_dict(self) -> dict[str, Any]:
        """AutoFormer's ``RETRAIN`` shape."""
        return {"EMBED_DIM": self.embed_dim, "DEPTH": self.depth, "NUM_HEADS": list(self.num_heads),
                "MLP_RATIO": list(self.mlp_ratio)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchConfig":
        d = {k.upper(): v for k, v in d.items()}
        try:
            depth = int(d["DEPTH"])
            heads, mlp = d["NUM_HEADS"], d["MLP_RATIO"]
            heads = [heads] * depth if isinstance(heads, (int, float)) else heads
            mlp = [mlp] * depth if isinstance(mlp, (int, float)) else mlp
            return cls(int(d["EMBED_DIM"]), depth, tuple(heads), tuple(mlp))
        except (KeyError, TypeError, ValueError) as exc:
            raise SpaceError(f"not an architecture (needs EMBED_DIM, DEPTH, NUM_HEADS, MLP_RATIO): {exc}") from None

    def short(self) -> str:
        return f"E{self.embed_dim}-D{self.depth}-H{'.'.join(map(str, self.num_heads))}-M{'.'.join(f'{r:g}' for r in self.mlp_ratio)}"


def load_arch(path: str | Path) -> ArchConfig:
    """An architecture from a YAML file: a ``RETRAIN`` section or the bare fields."""
    data = _read_yaml(path)
    return ArchConfig.from_dict(data.get("RETRAIN", data))


def save_arch(arch: ArchConfig, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    write_text_atomic(path, yaml.safe_dump({"RETRAIN": arch.to_dict(), **(extra or {})}, sort_keys=False))


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"YAML file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path} does not hold a mapping")
    return data


@dataclass(frozen=True)
class SearchSpace:
    """Choices per gene plus the supernet that holds them all (AutoFormer's ``SUPERNET``)."""

    embed_dim: tuple[int, ...]
    depth: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]
    super_embed_dim: int
    super_depth: int
    super_num_heads: int
    super_mlp_ratio: float
    head_dim: int = 64
    img_size: int = 224
    patch_size: int = 16
    name: str = "custom"
    retrain: ArchConfig | None = field(default=None, compare=False)

    def __post_init__(self):
        for attr in ("embed_dim", "depth", "num_heads"):
            object.__setattr__(self, attr, tuple(sorted(int(v) for v in getattr(self, attr))))
        object.__setattr__(self, "mlp_ratio", tuple(sorted(float(v) for v in self.mlp_ratio)))
        problems = []
        if not all((self.embed_dim, self.depth, self.num_heads, self.mlp_ratio)):
            problems.append("every gene needs at least one choice")
        elif max(self.embed_dim) > self.super_embed_dim:
            problems.append(f"embed {max(self.embed_dim)} > supernet {self.super_embed_dim}")
        elif max(self.depth) > self.super_depth:
            problems.append(f"depth {max(self.depth)} > supernet {self.super_depth}")
        elif max(self.num_heads) > self.super_num_heads:
            problems.append(f"heads {max(self.num_heads)} > supernet {self.super_num_heads}")
        elif max(self.mlp_ratio) > self.super_mlp_ratio:
            problems.append(f"mlp ratio {max(self.mlp_ratio)} > supernet {self.super_mlp_ratio}")
        if self.img_size % self.patch_size:
            problems.append(f"image size {self.img_size} is not a multiple of patch size {self.patch_size}")
        if problems:
            raise SpaceError(f"search space {self.name}: " + "; ".join(problems))

    # ------------------------------------------------------------------ the standard spaces
    @classmethod
    def named(cls, name: str, img_size: int | None = None, patch_size: int | None = None) -> "SearchSpace":
        spec = SPACES.get(name)
        if spec is None:
            raise SpaceError(f"unknown search space '{name}' (choose {', '.join(SPACES)} or a YAML file)")
        space = cls(**spec, name=name)
        return space.resized(img_size, patch_size)

    def resized(self, img_size: int | None = None, patch_size: int | None = None) -> "SearchSpace":
        return replace(self, img_size=img_size or self.img_size, patch_size=patch_size or self.patch_size)

    @classmethod
    def load(cls, spec: str | Path, img_size: int | None = None, patch_size: int | None = None) -> "SearchSpace":
        """``tiny`` / ``small`` / ``base`` or a YAML file with ``SUPERNET`` and ``SEARCH_SPACE``."""
        if str(spec) in SPACES or (not Path(spec).exists() and Path(spec).suffix not in (".yaml", ".yml")):
            return cls.named(str(spec), img_size, patch_size)
        data = _read_yaml(spec)
        try:
            sup, ss = data["SUPERNET"], data["SEARCH_SPACE"]
            space = cls(
                embed_dim=tuple(ss["EMBED_DIM"]), depth=tuple(ss["DEPTH"]), num_heads=tuple(ss["NUM_HEADS"]),
                mlp_ratio=tuple(ss["MLP_RATIO"]), super_embed_dim=int(sup["EMBED_DIM"]),
                super_depth=int(sup["DEPTH"]), super_num_heads=int(sup["NUM_HEADS"]),
                super_mlp_ratio=float(sup["MLP_RATIO"]), head_dim=int(data.get("HEAD_DIM", 64)),
                img_size=int(data.get("IMG_SIZE", 224)), patch_size=int(data.get("PATCH_SIZE", 16)),
                name=str(data.get("NAME", Path(spec).stem)),
                retrain=ArchConfig.from_dict(data["RETRAIN"]) if "RETRAIN" in data else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SpaceError(f"{spec}: needs SUPERNET and SEARCH_SPACE with EMBED_DIM, DEPTH, NUM_HEADS, "
                             f"MLP_RATIO ({type(exc).__name__}: {exc})") from None
        return space.resized(img_size, patch_size)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "SUPERNET": {"EMBED_DIM": self.super_embed_dim, "DEPTH": self.super_depth,
                         "NUM_HEADS": self.super_num_heads, "MLP_RATIO": self.super_mlp_ratio},
            "SEARCH_SPACE": {"EMBED_DIM": list(self.embed_dim), "DEPTH": list(self.depth),
                             "NUM_HEADS": list(self.num_heads), "MLP_RATIO": list(self.mlp_ratio)},
            "HEAD_DIM": self.head_dim, "IMG_SIZE": self.img_size, "PATCH_SIZE": self.patch_size, "NAME": self.name,
        }
        if self.retrain is not None:
            d["RETRAIN"] = self.retrain.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpace":
        sup, ss = d["SUPERNET"], d["SEARCH_SPACE"]
        return cls(tuple(ss["EMBED_DIM"]), tuple(ss["DEPTH"]), tuple(ss["NUM_HEADS"]), tuple(ss["MLP_RATIO"]),
                   sup["EMBED_DIM"], sup["DEPTH"], sup["NUM_HEADS"], sup["MLP_RATIO"], d.get("HEAD_DIM", 64),
                   d.get("IMG_SIZE", 224), d.get("PATCH_SIZE", 16), d.get("NAME", "custom"),
                   ArchConfig.from_dict(d["RETRAIN"]) if d.get("RETRAIN") else None)

    # ------------------------------------------------------------------ architectures
    def fits(self, arch: ArchConfig) -> str | None:
        """Why ``arch`` cannot be sliced out of this supernet, or None where it can."""
        if arch.embed_dim > self.super_embed_dim:
            return f"embed {arch.embed_dim} > supernet {self.super_embed_dim}"
        if arch.depth > self.super_depth:
            return f"depth {arch.depth} > supernet {self.super_depth}"
        if max(arch.num_heads) > self.super_num_heads:
            return f"{max(arch.num_heads)} heads > supernet {self.super_num_heads}"
        if max(arch.mlp_ratio) > self.super_mlp_ratio:
            return f"mlp ratio {max(arch.mlp_ratio)} > supernet {self.super_mlp_ratio}"
        return None

    def in_space(self, arch: ArchConfig) -> bool:
        return (arch.embed_dim in self.embed_dim and arch.depth in self.depth
                and all(h in self.num_heads for h in arch.num_heads)
                and all(r in self.mlp_ratio for r in arch.mlp_ratio))

    def largest(self) -> ArchConfig:
        d = max(self.depth)
        return ArchConfig(max(self.embed_dim), d, (max(self.num_heads),) * d, (max(self.mlp_ratio),) * d)

    def smallest(self) -> ArchConfig:
        d = min(self.depth)
        return ArchConfig(min(self.embed_dim), d, (min(self.num_heads),) * d, (min(self.mlp_ratio),) * d)

    def sample(self, rng: random.Random) -> ArchConfig:
        """Uniform over every gene (AutoFormer's sampling)."""
        d = rng.choice(self.depth)
        return ArchConfig(rng.choice(self.embed_dim), d, tuple(rng.choice(self.num_heads) for _ in range(d)),
                          tuple(rng.choice(self.mlp_ratio) for _ in range(d)))


def arch_params(arch: ArchConfig, num_classes: int, img_size: int, patch_size: int, head_dim: int = 64,
                in_chans: int = 3, embed: str = "patch", stem: list[int] | None = None) -> int:
    """Parameters of the standalone model of ``arch`` (its embedding, class token, learned
    position embedding, qkv with bias, LayerNorms, class-token head)."""
    e = arch.embed_dim
    n = (img_size // patch_size) ** 2 + 1
    total = embed_counts(embed, e, img_size, patch_size, stem, in_chans)[0] + e + n * e  # embedding, cls, pos
    for h, hid in zip(arch.num_heads, (arch.mlp_hidden(i) for i in range(arch.depth))):
        a = h * head_dim
        total += 2 * e + (e * 3 * a + 3 * a) + (a * e + e)  # norm1, qkv, proj
        total += 2 * e + (e * hid + hid) + (hid * e + e)  # norm2, fc1, fc2
    return total + 2 * e + e * num_classes + num_classes  # final norm, head


def arch_macs(arch: ArchConfig, img_size: int, patch_size: int, head_dim: int = 64, num_classes: int = 0,
              in_chans: int = 3, embed: str = "patch", stem: list[int] | None = None) -> int:
    """Multiply-accumulates per image, by the same convention as ``measure.count_macs``."""
    e = arch.embed_dim
    n = (img_size // patch_size) ** 2 + 1
    total = embed_counts(embed, e, img_size, patch_size, stem, in_chans)[1]
    for h, hid in zip(arch.num_heads, (arch.mlp_hidden(i) for i in range(arch.depth))):
        a = h * head_dim
        total += n * e * 3 * a + 2 * n * n * a + n * a * e + 2 * n * e * hid
    return total + e * num_classes


SPACES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=(192, 216, 240), depth=(12, 13, 14), num_heads=(3, 4), mlp_ratio=(3.5, 4.0),
                 super_embed_dim=256, super_depth=14, super_num_heads=4, super_mlp_ratio=4.0),
    "small": dict(embed_dim=(320, 384, 448), depth=(12, 13, 14), num_heads=(5, 6, 7), mlp_ratio=(3.0, 3.5, 4.0),
                  super_embed_dim=448, super_depth=14, super_num_heads=7, super_mlp_ratio=4.0),
    "base": dict(embed_dim=(528, 576, 624), depth=(14, 15, 16), num_heads=(9, 10), mlp_ratio=(3.0, 3.5, 4.0),
                 super_embed_dim=640, super_depth=16, super_num_heads=10, super_mlp_ratio=4.0),
}

