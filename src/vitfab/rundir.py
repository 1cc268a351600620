"""``RunDir``: one run folder — config, split, metrics, checkpoints — with atomic writes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import VitfabError
from .files import existing_dir, read_json, write_json_atomic, write_text_atomic


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # --- layout -------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def split_path(self) -> Path:
        return self.root / "split.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def checkpoint(self, which: str) -> Path:
        """``best`` or ``last``: a folder with ``model.safetensors`` and ``meta.json``."""
        return self.root / "checkpoints" / which

    # --- creation and lookup ------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path | None, prefix: str = "run") -> "RunDir":
        """A new run folder; ``root=None`` picks ``runs/<prefix>-<timestamp>``."""
        if root is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            root = Path("runs") / f"{prefix}-{stamp}"
            n = 1
            while root.exists():
                n += 1
                root = Path("runs") / f"{prefix}-{stamp}-{n}"
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            raise VitfabError(
                f"run folder {root} already exists and is not empty "
                "(use --resume to continue it, or choose another --out)"
            )
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @classmethod
    def open(cls, root: str | Path) -> "RunDir":
        run = cls(Path(root))
        if not run.config_path.is_file():
            raise VitfabError(f"{root} is not a vitfab run folder (no config.json)")
        return run

    def find_checkpoint(self, which: str = "best") -> Path:
        found = existing_dir(self.checkpoint(which))
        if found is None:
            raise VitfabError(f"run folder {self.root} has no '{which}' checkpoint yet")
        return found

    # --- records ------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        return read_json(self.config_path)

    def write_config(self, config: dict[str, Any]) -> None:
        write_json_atomic(self.config_path, config)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
        return rows

    def truncate_metrics(self, after_epoch: int) -> None:
        """Keep epoch records up to ``after_epoch`` (a resumed run rewrites the rest)."""
        rows = [r for r in self.read_metrics() if r.get("epoch", -1) <= after_epoch]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
