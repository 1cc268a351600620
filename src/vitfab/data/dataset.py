"""A torch ``Dataset`` over a file list (a :class:`Split` subset or a folder scan)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import Dataset

from ..runtime import seeded_draws
from .images import load_image


class ImageListDataset(Dataset):
    """``(image_tensor, class_index)`` for ``(relative_path, class_index)`` samples under ``root``.

    The samples come from a scan (a :class:`Split` is one) that has already refused images above
    the run's ``--max-image-pixels``, so they are read without a limit of their own.
    """

    def __init__(self, root: str | Path, samples: Sequence[tuple[str, int]], transform: Callable):
        self.root = Path(root)
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        """``key``: an index, or ``(index, seed)``: the transform's random draws then come from
        ``seed`` alone (``ShareSampler(sample_seed=...)``), and the caller's random state is kept."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        path, y = self.samples[i]
        image = load_image(self.root / path, max_pixels=None)
        if seed is None:
            return self.transform(image), y
        with seeded_draws(seed):
            return self.transform(image), y

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.samples]

