"""``ModelMeta``: what a model needs beside its weights to be rebuilt and used."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.transforms import Preprocess

FORMAT = "vitfab-checkpoint/1"


@dataclass
class ModelMeta:
    name: str
    kwargs: dict[str, Any]
    classes: list[str]
    preprocess: Preprocess
    extra: dict[str, Any] = field(default_factory=dict)  # epoch, metrics, run, ...

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": {"name": self.name, "kwargs": self.kwargs},
            "classes": list(self.classes),
            "preprocess": self.preprocess.to_dict(),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelMeta":
        known = {"format", "model", "classes", "preprocess"}
        return cls(
            name=d["model"]["name"],
            kwargs=dict(d["model"].get("kwargs", {})),
            classes=list(d["classes"]),
            preprocess=Preprocess.from_dict(d["preprocess"]),
            extra={k: v for k, v in d.items() if k not in known},
        )
