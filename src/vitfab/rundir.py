"""``RunDir``: vitfab's folders on disk -- their layout, their kinds, atomic writes.

Kinds of folder (``kind_of``):
- ``train``: a training run (``vitfab train`` / ``vitfab nas train``): config.json, split.json,
  metrics.jsonl, checkpoints/best and checkpoints/last, eval/;
- ``main``: a main-job run (``vitfab run``): config.json, state.json, split.json, one folder per
  stage, chosen/, deploy/, report/, summary.json;
- ``checkpoint``: model.safetensors (metadata embedded) + meta.json;
- ``deploy``: an exported model (``vitfab export``): a checkpoint plus deploy.json, model.onnx,
  model.ts;
- ``onnx`` / ``weights``: a single .onnx or .safetensors file.
This module alone knows those names; everything else asks it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, VitfabError
from .files import existing_dir, read_json, write_json_atomic, write_text_atomic

WEIGHTS_FILE, META_FILE, TRAIN_STATE_FILE = "model.safetensors", "meta.json", "train_state.pt"
DEPLOY_FILE, ONNX_FILE, TORCHSCRIPT_FILE = "deploy.json", "model.onnx", "model.ts"
OPENVINO_FILE, TENSORRT_FILE = "model.xml", "model.plan"  # OpenVINO IR (beside it model.bin), TensorRT engine
INT8_SUFFIX = ".int8"  # a statically quantised artifact beside the fp32 one: model.int8.xml, model.int8.onnx
CONFIG_FILE, SPLIT_FILE, METRICS_FILE = "config.json", "split.json", "metrics.jsonl"
JOB_STATE_FILE, SUMMARY_FILE = "state.json", "summary.json"
LOCK_FILE = ".lock"  # the run folder's writer lock (``vitfab.lock``)
KINDS = ("train", "main", "checkpoint", "deploy", "onnx", "weights")


def kind_of(path: str | Path) -> str | None:
    """What ``path`` is (one of ``KINDS``), or None where it is none of them."""
    p = Path(path)
    if p.is_file():
        return {".onnx": "onnx", ".safetensors": "weights"}.get(p.suffix)
    if not p.is_dir():
        return None
    if (p / DEPLOY_FILE).is_file():
        return "deploy"
    if (p / CONFIG_FILE).is_file():
        if (p / JOB_STATE_FILE).is_file():
            return "main"
        if (p / "checkpoints").is_dir():
            return "train"
    if (p / WEIGHTS_FILE).is_file():
        return "checkpoint"
    return None


def resolve_weights(path: str | Path) -> Path:
    """A training run, main-job run (its chosen model), checkpoint or deploy folder, or a
    ``.safetensors`` file -> the weights file to read."""
    path = Path(path)
    kind = kind_of(path)
    if kind in ("weights", "onnx") or path.is_file():
        return path
    if kind == "train":
        run = RunDir(path)
        found = existing_dir(run.checkpoint("best")) or existing_dir(run.checkpoint("last"))
        if found is None:
            raise CheckpointError(f"run folder {path} has no checkpoint yet")
        return found / WEIGHTS_FILE
    if kind == "main":
        chosen = existing_dir(RunDir(path).chosen)
        if chosen is None:
            raise CheckpointError(f"main-job run {path} has not chosen a model yet (resume it with vitfab run --resume)")
        return chosen / WEIGHTS_FILE
    if kind in ("checkpoint", "deploy"):
        return path / WEIGHTS_FILE
    if path.is_dir():
        raise CheckpointError(f"{path} holds no {WEIGHTS_FILE}: not a vitfab checkpoint or run folder")
    found = existing_dir(path)  # a checkpoint folder caught mid-swap
    if found is not None:
        return resolve_weights(found)
    raise CheckpointError(f"checkpoint not found: {path}")


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # --- layout of every run -------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def split_path(self) -> Path:
        return self.root / SPLIT_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def checkpoint(self, which: str) -> Path:
        """``best`` or ``last``: a folder with ``model.safetensors`` and ``meta.json``."""
        return self.root / "checkpoints" / which

    # --- layout of a main-job run ----------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / JOB_STATE_FILE

    @property
    def summary_path(self) -> Path:
        return self.root / SUMMARY_FILE

    def stage_dir(self, stage: str) -> Path:
        """Where a stage of the main job writes (``baseline``, ``supernet``, ``search``, ...)."""
        return self.root / stage

    @property
    def chosen(self) -> Path:
        return self.root / "chosen"

    @property
    def deploy(self) -> Path:
        return self.root / "deploy"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def kind(self) -> str | None:
        return kind_of(self.root)

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
        if root.exists() and any(p.name != LOCK_FILE for p in root.iterdir()):
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

    def set_status(self, status: str) -> None:
        cfg = self.read_config()
        cfg["status"] = status
        self.write_config(cfg)

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
