"""``Split``: a seeded, stratified train/val/test split kept as file lists in the run folder."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import read_json, write_json_atomic
from ..options import option
from .images import ImageFolderIndex, max_pixels_option, skip_bad_option

SUBSETS = ("train", "val", "test")
IMBALANCED_ABOVE = 3.0  # classes are imbalanced when the largest has more than 3x the images of the smallest


@dataclass
class DataSettings:
    """How a run reads its images and splits them; shared by training runs and the main job."""

    seed: int = option(0, help="Seed of the split, the initial weights and every random stream.")
    val_fraction: float = option(0.15, help="Share of each class held out for validation.")
    test_fraction: float = option(0.15, help="Share of each class held out for the test.")
    max_per_class: int | None = option(None, help="Use at most N images per class (seeded).")
    skip_bad_images: bool = skip_bad_option()
    max_image_pixels: int = max_pixels_option()
    good_class: str | None = option(None, help="The classes whose images may pass, a comma list (default: a class "
                                               "named good/normal/ok); every other class is a defect.")

    def data_settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(DataSettings)}


@dataclass
class Split:
    """File lists (paths relative to ``root``) with class indices into ``classes``."""

    root: str
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    seed: int = 0
    fractions: dict[str, float] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def subset(self, name: str) -> list[tuple[str, int]]:
        if name == "all":
            return self.train + self.val + self.test
        if name not in SUBSETS:
            raise DataError(f"unknown split '{name}': choose one of {', '.join(SUBSETS)} or all")
        return getattr(self, name)

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each subset."""
        out = {}
        for name in SUBSETS:
            counts = {c: 0 for c in self.classes}
            for _, y in getattr(self, name):
                counts[self.classes[y]] += 1
            out[name] = counts
        return out

    def imbalance_ratio(self) -> float:
        """Largest over smallest class count over the whole dataset (1.0 = balanced)."""
        totals = np.zeros(len(self.classes), dtype=np.int64)
        for _, y in self.subset("all"):
            totals[y] += 1
        return float(totals.max() / max(totals.min(), 1))

    @property
    def imbalanced(self) -> bool:
        """The one definition every stage uses: largest class > ``IMBALANCED_ABOVE`` x the smallest."""
        return self.imbalance_ratio() > IMBALANCED_ABOVE

    def selection_metric(self) -> str:
        """What picks checkpoints and candidates on this data: macro-F1 when imbalanced, else top-1."""
        return "macro_f1" if self.imbalanced else "top1"

    def save(self, path: str | Path) -> None:
        data = asdict(self)
        for name in SUBSETS:
            data[name] = [[p, int(y)] for p, y in data[name]]
        data["skipped"] = [list(s) for s in self.skipped]
        write_json_atomic(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "Split":
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise DataError(f"split file not found: {path}") from None
        for name in SUBSETS:
            data[name] = [(p, int(y)) for p, y in data[name]]
        data["skipped"] = [tuple(s) for s in data.get("skipped", [])]
        return cls(**data)


def _class_rng(seed: int, class_name: str) -> np.random.Generator:
    # Seeded per class name, so adding a class does not reshuffle the others.
    digest = hashlib.sha256(f"{seed}:{class_name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def make_split(
    index: ImageFolderIndex,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    max_per_class: int | None = None,
) -> Split:
    """Stratified split: each class is shuffled with its own seeded generator and cut.

    Every class keeps at least one training image; a class with three or more images gets at
    least one validation and one test image when those fractions are non-zero.
    ``max_per_class`` first draws a seeded subset of each class (quick runs, tests).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"split fractions must leave images for training: val={val_fraction}, test={test_fraction}"
        )
    by_class: dict[int, list[str]] = {y: [] for y in range(len(index.classes))}
    for p, y in index.samples:
        by_class[y].append(p)
    train, val, test = [], [], []
    for y, paths in by_class.items():
        paths = sorted(paths)
        order = _class_rng(seed, index.classes[y]).permutation(len(paths))
        paths = [paths[i] for i in order]
        if max_per_class is not None:
            paths = paths[:max_per_class]
        n = len(paths)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        while n - n_test - n_val < 1 and (n_test or n_val):
            if n_test >= n_val and n_test:
                n_test -= 1
            else:
                n_val -= 1
        test += [(p, y) for p in paths[:n_test]]
        val += [(p, y) for p in paths[n_test : n_test + n_val]]
        train += [(p, y) for p in paths[n_test + n_val :]]
    return Split(
        root=str(Path(index.root).resolve()),
        classes=list(index.classes),
        train=sorted(train),
        val=sorted(val),
        test=sorted(test),
        seed=seed,
        fractions={"val": val_fraction, "test": test_fraction},
        skipped=list(index.skipped),
    )
