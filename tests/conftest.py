"""Shared fixtures: tiny synthetic sets, tiny models, the real NEU dataset beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
NEU = REPO.parent / "shared" / "datasets" / "neu-surface-defects"

# a tiny ViT: fast enough to train for a few epochs in a test on 2 cores
TINY = dict(model="deit_tiny_patch16_224", img_size=32, patch_size=8, model_args={"depth": 2, "embed_dim": 64, "num_heads": 2})


@pytest.fixture(scope="session")
def neu() -> Path:
    assert NEU.is_dir(), f"the NEU dataset must lie at {NEU} (../shared beside the repository)"
    return NEU


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory) -> Path:
    """7 classes x 12 images of 32 px (read-only for tests)."""
    from vitfab.data.synth import SynthConfig, synthesize

    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, SynthConfig(n_per_class=12, img_size=32, seed=1))
    return out


def write_image(path: Path, mode: str = "RGB", size: int = 16, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = np.full((size, size, channels), value, dtype=np.uint8)
    if mode == "RGBA":
        arr[..., 3] = 255  # opaque
    arr = arr.squeeze()
    Image.fromarray(arr, mode=mode).save(path)
    return path


@pytest.fixture
def make_folder(tmp_path):
    """Build an ImageFolder: ``make_folder({'a': 3, 'b': 2})`` -> root with PNGs."""

    def make(spec: dict[str, int], root: Path | None = None, size: int = 16) -> Path:
        root = root or tmp_path / "data"
        rng = np.random.default_rng(0)
        for cls, n in spec.items():
            (root / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / cls / f"{cls}_{i}.png")
        return root

    return make
