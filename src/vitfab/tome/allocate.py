"""Per-block ToMe schedules for a MACs target: where to merge, not only how much.

A schedule is the r of every block (``Schedule``'s list form). Merging early saves more MACs
(every later block runs on fewer tokens) but usually costs more accuracy; how much differs per
block. ``greedy_allocation`` spends a MACs target token by token on the block whose next merge
saves the most MACs per unit of estimated cost (``cost(i, r)``: the loss added by merging r
tokens in block i alone, measured by the caller). ``mutate_schedule`` and
``crossover_schedule`` are the genetic operators that refine a schedule: their children stay
within the half-per-layer clip (``fits_clip``) and within the MACs target (``within``), or
they are not returned. Nothing here runs a model: ``macs_of(flow)`` counts the layer shapes
(``patch.block_macs``).
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from .schedule import ScheduleError, token_flow

MacsOf = Callable[[list[tuple[int, int]]], float]
Cost = Callable[[int, int], float]  # (block, r) -> estimated loss added by merging r tokens there alone


def fits_clip(r: Sequence[int], num_tokens: int, protected: int) -> bool:
    """Whether every block merges at most half of the mergeable tokens that reach it."""
    n = num_tokens
    for v in r:
        if v < 0 or v > (n - protected) // 2:
            return False
        n -= v
    return True


def clipped(r: Sequence[int], num_tokens: int, protected: int) -> list[int]:
    """The r each block really merges once the clip applies (a constant r runs out of tokens late)."""
    out, n = [], num_tokens
    for v in r:
        v = max(0, min(int(v), (n - protected) // 2))
        out.append(v)
        n -= v
    return out


def schedule_macs(r: Sequence[int], num_tokens: int, protected: int, macs_of: MacsOf) -> float:
    return macs_of(token_flow(list(r), num_tokens, protected))


def budget_macs(depth: int, num_tokens: int, protected: int, macs_of: MacsOf, target: float) -> float:
    """The MACs a schedule may keep for ``macs=target``: that fraction of the unmerged model's."""
    return target * schedule_macs([0] * depth, num_tokens, protected, macs_of) + 1e-9


def within(r: Sequence[int], num_tokens: int, protected: int, macs_of: MacsOf, budget: float) -> bool:
    return fits_clip(r, num_tokens, protected) and schedule_macs(r, num_tokens, protected, macs_of) <= budget


def greedy_allocation(depth: int, num_tokens: int, protected: int, macs_of: MacsOf, target: float,
                      cost: Cost) -> list[int]:
    """The schedule that reaches ``macs=target`` one merged token at a time, each on the block with
    the most MACs saved per unit of added cost (a cost that does not rise counts as a tiny one);
    later blocks merging at their cap lose what the clip takes from them."""
    budget = budget_macs(depth, num_tokens, protected, macs_of, target)
    r = [0] * depth
    macs = schedule_macs(r, num_tokens, protected, macs_of)
    while macs > budget:
        best, best_ratio, best_macs = None, -1.0, macs
        for i in range(depth):  # later blocks at their cap give back what the clip takes from them
            child = clipped(r[:i] + [r[i] + 1] + r[i + 1:], num_tokens, protected)
            m = schedule_macs(child, num_tokens, protected, macs_of)
            if child[i] == r[i] or m >= macs:
                continue
            added = sum(cost(j, child[j]) - cost(j, r[j]) for j in range(depth) if child[j] != r[j])
            ratio = (macs - m) / max(added, 1e-9)
            if ratio > best_ratio:
                best, best_ratio, best_macs = child, ratio, m
        if best is None:
            raise ScheduleError(f"macs={target:g} cannot be reached by merging tokens in this model "
                                f"(the floor is the layers' fixed cost)")
        r, macs = best, best_macs
    return r


def mutate_schedule(r: Sequence[int], rng: random.Random, num_tokens: int, protected: int, macs_of: MacsOf,
                    budget: float, step: int = 1, tries: int = 50) -> list[int] | None:
    """Move ``step`` merged tokens from one block to another (then, where the move went over the
    MACs budget, more merged tokens in random blocks until within it); None where no try stays
    within the clip and the budget."""
    depth = len(r)
    for _ in range(tries):
        a, b = rng.sample(range(depth), 2) if depth > 1 else (0, 0)
        moved = min(step, r[a])
        if moved == 0:
            continue
        child = list(r)
        child[a] -= moved
        child[b] += moved
        if not fits_clip(child, num_tokens, protected):
            continue
        if schedule_macs(child, num_tokens, protected, macs_of) > budget:
            child = _repair(child, rng, num_tokens, protected, macs_of, budget)
        if child is not None and list(child) != list(r):
            return child
    return None


def crossover_schedule(a: Sequence[int], b: Sequence[int], rng: random.Random, num_tokens: int, protected: int,
                       macs_of: MacsOf, budget: float, tries: int = 50) -> list[int] | None:
    """Each block's r from one of two parents (repaired to the budget where the mix went over);
    None where no try stays within the clip and the budget."""
    if len(a) != len(b):
        raise ScheduleError(f"crossover of schedules of {len(a)} and {len(b)} blocks")
    for _ in range(tries):
        child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
        if not fits_clip(child, num_tokens, protected):
            continue
        child = _repair(child, rng, num_tokens, protected, macs_of, budget)
        if child is not None:
            return child
    return None


def _repair(r: list[int], rng: random.Random, num_tokens: int, protected: int, macs_of: MacsOf,
            budget: float) -> list[int] | None:
    """Merge one more token in random blocks until the schedule is within the budget (None: stuck)."""
    r = list(r)
    while schedule_macs(r, num_tokens, protected, macs_of) > budget:
        open_blocks = [i for i in range(len(r)) if fits_clip(r[:i] + [r[i] + 1] + r[i + 1:], num_tokens, protected)]
        if not open_blocks:
            return None
        r[rng.choice(open_blocks)] += 1
    return r


def probed_cost(levels: Sequence[int], added: Sequence[Sequence[float]]) -> Cost:
    """``cost(i, r)`` from a probe: ``added[i][k]`` is the loss added by merging ``levels[k]`` tokens in
    block i alone. Piecewise linear through (0, 0) and the probes, made non-decreasing (a merge
    that seemed to help counts as free, not as a gain) and extended with the last slope."""
    if not levels or any(len(row) != len(levels) for row in added):
        raise ScheduleError("a schedule probe needs one measured cost per block and level")
    xs = [0] + [int(v) for v in levels]
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise ScheduleError(f"probe levels must rise from 1: {list(levels)}")
    tables = []
    for row in added:
        ys, top = [0.0], 0.0
        for v in row:
            top = max(top, float(v))
            ys.append(top)
        tables.append(ys)

    def cost(i: int, r: int) -> float:
        ys = tables[i]
        k = next((k for k in range(1, len(xs)) if r <= xs[k]), len(xs) - 1)
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        return y0 + (y1 - y0) * (r - x0) / (x1 - x0)

    return cost
