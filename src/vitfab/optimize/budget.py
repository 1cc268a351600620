"""``--budget-minutes``: how the joint optimiser fits its stages into a wall-clock budget.

Each stage has a weight. When a stage starts it gets its weight's share of what is left, so a
stage that ran long leaves less to the later ones and one that ran short leaves more. Training
stages turn their share into epochs from a measured training speed (a few timed steps on the
real model and batch size); the search turns it into generations. Every cut below the scale's
nominal setting is recorded, and the report lists them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..runtime import autocast

@dataclass
class Budget:
    seconds: float | None  # None: no limit
    weights: dict[str, float] = field(default_factory=dict)  # every stage's share, in pipeline order
    spent: float = 0.0  # seconds used by finished stages (kept across a resume)
    done: list[str] = field(default_factory=list)
    cuts: list[str] = field(default_factory=list)

    def share(self, stage: str) -> float | None:
        """The seconds ``stage`` may use now: its weight's part of what is left."""
        if self.seconds is None:
            return None
        left = [s for s in self.weights if s not in self.done]
        weights = sum(self.weights[s] for s in left) or 1.0
        return max(self.seconds - self.spent, 0.0) * self.weights[stage] / weights

    def finish(self, stage: str, seconds: float) -> None:
        if stage not in self.done:
            self.done.append(stage)
            self.spent += seconds

    def epochs(self, stage: str, nominal: int, epoch_seconds: float, parts: int = 1) -> int:
        """Epochs (at least 1, at most ``nominal``) for each of ``parts`` runs sharing the stage."""
        share = self.share(stage)
        if share is None:
            return nominal
        return self.fit(stage, share / parts, nominal, epoch_seconds,
                        f"{share:.0f} s of the budget{f' for {parts} runs' if parts > 1 else ''}")[0]

    def fit(self, what: str, seconds: float | None, nominal: int, epoch_seconds: float, why: str = "",
            fraction: bool = False) -> tuple[int, float]:
        """(epochs, share of an epoch) that fit ``seconds`` at ``epoch_seconds`` each: at most
        ``nominal`` epochs, at least one -- or, with ``fraction``, a part of one (fewer steps)."""
        if seconds is None:
            return nominal, 1.0
        fit = seconds / max(epoch_seconds, 1e-6)
        n = max(1, min(nominal, int(fit)))
        part = min(1.0, max(0.05, fit)) if fraction and fit < 1 else 1.0
        why = why or f"{seconds:.0f} s of the budget"
        if part < 1:
            self.cut(f"{what}: {part:.2f} of 1 epoch (about {epoch_seconds:.0f} s per epoch, {why})")
        elif n < nominal:
            self.cut(f"{what}: {n} of {nominal} epochs (about {epoch_seconds:.0f} s per epoch, {why})")
        return n, part

    def cut(self, text: str) -> None:
        if text not in self.cuts:
            self.cuts.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "spent": self.spent, "done": self.done, "cuts": self.cuts}

    @classmethod
    def from_dict(cls, d: dict[str, Any], weights: dict[str, float]) -> "Budget":
        return cls(d.get("seconds"), dict(weights), d.get("spent", 0.0), list(d.get("done", [])),
                   list(d.get("cuts", [])))


def probe_train_speed(model: torch.nn.Module, batch_size: int, img_size: int, device: torch.device, amp: str,
                      steps: int = 3) -> float:
    """Training images per second of ``model`` (forward + backward, no optimizer step, so the
    weights stay as they are): the median of ``steps`` timed steps after one warm-up step, so one
    step slowed by another process on a shared machine does not set the plan."""
    model = model.to(device).train()
    num_classes = model.num_classes
    gen = torch.Generator().manual_seed(0)  # the probe leaves the global RNG alone
    x = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device)
    y = torch.randint(0, max(num_classes, 1), (batch_size,), generator=gen).to(device)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(device, amp):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return batch_size / max(sorted(times)[len(times) // 2], 1e-9)


def epoch_seconds(train_images: int, val_images: int, train_img_per_s: float) -> float:
    """One epoch: training plus a validation pass (about 3x faster per image than training)."""
    return train_images / train_img_per_s + val_images / (3 * train_img_per_s) + 1.0


def search_size(share: float | None, candidate_seconds: float, population: int, generations: int,
                budget: Budget) -> tuple[int, int]:
    """Population and generations that fit the share: generations go first, the population
    shrinks only below 3 generations (never under 4 candidates)."""
    if share is None:
        return population, generations
    fit = max(1, int(share // max(candidate_seconds, 1e-6)))
    if population * generations <= fit:
        return population, generations
    gens = max(1, min(generations, fit // population))
    pop = population
    if gens < 3:
        gens = min(generations, 3)
        pop = max(4, min(population, math.ceil(fit / gens)))
    budget.cut(f"search: population {pop} x {gens} generations (nominal {population} x {generations}; about "
               f"{candidate_seconds:.2f} s per candidate, {share:.0f} s of the budget)")
    return pop, gens
