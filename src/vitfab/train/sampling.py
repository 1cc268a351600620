"""What a training epoch sees: the seeded, rank-shared order of the training images (optionally
class-balanced, optionally a fraction of an epoch), and the LR schedule over its steps."""

from __future__ import annotations

import math
from typing import Sequence

import torch

BALANCE_MODES = ("auto", "none", "sampler", "weights")
SELECT_METRICS = ("auto", "top1", "macro_f1", "balanced_accuracy")


class ShareSampler(torch.utils.data.Sampler):
    """One seeded permutation per epoch, cut into global batches; under ``torchrun`` rank r takes
    the r-th share of each (the incomplete last batch is then dropped). Averaged over ranks, the
    gradients equal one process's on the global batch, so N processes train like one.

    With ``sample_seed`` it yields ``(image, seed)`` keys instead of image indices: the seed of
    the draw at position p of the epoch's order, from which ``ImageListDataset`` draws that
    image's augmentation. An image's augmentation then depends on the epoch and its place in the
    order alone, not on how many processes (or data-loading workers) share the epoch."""

    def __init__(self, n: int, global_batch: int, rank: int, world: int, generator: torch.Generator,
                 drop_last: bool = True, weights: torch.Tensor | None = None, count: int | None = None,
                 sample_seed: int | None = None):
        """``weights`` (one per image): draw ``count`` images (default n) with replacement in
        proportion to them (class-balanced sampling) instead of a permutation; ``count`` < n
        without weights: the first ``count`` of the permutation (a fraction of an epoch)."""
        self.generator, self.weights, self.sample_seed = generator, weights, sample_seed
        self.n = n if count is None else max(1, min(count, n) if weights is None else count)
        self.population = n
        self.local_batch = max(1, global_batch // world)
        self.global_batch = self.local_batch * world
        self.rank, self.world, self.drop_last = rank, world, drop_last or world > 1

    def order(self) -> list[int]:
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=self.generator).tolist()
        return torch.randperm(self.population, generator=self.generator)[: self.n].tolist()

    def __iter__(self):
        # drawn when iteration starts, after the DataLoader took its base seed from the same
        # generator: one process sees exactly what DataLoader(shuffle=True, generator=g) gives
        perm = self.order()
        stop = self.n - self.global_batch + 1 if self.drop_last else self.n
        for start in range(0, max(stop, 0), self.global_batch):
            share = start + self.rank * self.local_batch
            for position in range(share, min(share + self.local_batch, len(perm))):
                if self.sample_seed is None:
                    yield perm[position]
                else:
                    yield perm[position], (self.sample_seed * 1_000_003 + position) % 2**62

    def __len__(self) -> int:
        full, tail = divmod(self.n, self.global_batch)
        if self.drop_last:
            return full * self.local_batch
        return full * self.local_batch + tail  # one process (world 1) keeps the tail


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def warmup_cosine(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float):
    """LR factor per optimizer step: linear warm-up, then cosine from ``base_lr`` to ``min_lr``."""
    floor = min_lr / base_lr

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


def balanced_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-image sampling weights 1 / (images of its class): every class is drawn equally often in
    expectation."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).double()
    return (1.0 / counts)[y]


def class_loss_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Cross-entropy weights n / (K x images of the class): each class contributes equally to the loss."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).float()
    return len(y) / (num_classes * counts)
