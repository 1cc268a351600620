"""Where to merge tokens, searched: a per-block ToMe schedule for each trained model and each
``macs=F`` target of the grid (issue 20).

1. Probe: on ``PROBE_IMAGES`` training images (the validation split stays the judge of the joint
   search), the cross-entropy added when block i alone merges r tokens, for two levels of r.
2. Allocate: ``tome.allocate.greedy_allocation`` spends each target's MACs (or the constant r's,
   where that r undershoots the target: the two then compete at equal MACs) on the blocks whose
   merges cost the least per MAC saved.
3. Refine: generations of the per-block r vector as a gene (mutation moves merged tokens between
   blocks, crossover mixes two schedules; every child within the clip and the target's MACs),
   scored by the loss of the whole schedule on the same images, as many as the stage's share of
   the budget allows.
The joint search then measures every searched schedule beside the fixed targets, in every
precision and runtime, like any other: validation accuracy and interleaved speed decide.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..evaluate.runner import CachedBatches, evenly_spaced, make_eval_loader
from ..tome import Schedule, apply, block_macs, set_schedule
from ..tome.allocate import (budget_macs, clipped, crossover_schedule, greedy_allocation, mutate_schedule, probed_cost,
                             schedule_macs, within)
from ..tome.patch import num_input_tokens

PROBE_IMAGES = 128  # training images the probe and the refinement score schedules on
CHILDREN = 4  # children per generation of the refinement (half mutations, half crossovers)
SEARCHED = "searched"  # how a searched schedule is named: "searched macs=0.35"


@dataclass
class SearchedSchedule:
    target: str  # the fixed target it was searched for, e.g. "macs=0.35"
    r_per_layer: list[int]
    greedy: list[int]  # the allocation before refinement
    loss: float  # on the probe images, the chosen schedule's
    greedy_loss: float
    fixed_loss: float  # the fixed target's constant-r schedule's, for comparison
    evaluated: int  # schedules scored in the refinement
    is_fixed: bool = False  # the search kept the fixed target's constant r (the joint search has it already)

    @property
    def name(self) -> str:
        return f"{SEARCHED} {self.target}"

    @property
    def spec(self) -> str:
        return Schedule.parse(self.r_per_layer).spec()


@dataclass
class ScheduleProbe:
    model: str  # label of the trained model
    levels: list[int]  # r probed in each block
    base_loss: float  # unmerged
    added: list[list[float]]  # added[i][k]: loss added by levels[k] tokens in block i alone
    schedules: list[SearchedSchedule] = field(default_factory=list)
    seconds: float = 0.0


def probe_batches(root, samples: Sequence[tuple[str, int]], preprocess, count: int = PROBE_IMAGES,
                  batch_size: int = 32) -> CachedBatches:
    """``count`` training images (``evenly_spaced``), at the evaluation transform, with their labels."""
    return CachedBatches(make_eval_loader(root, evenly_spaced(samples, count), preprocess, batch_size, workers=0))


@torch.inference_mode()
def schedule_loss(model: torch.nn.Module, r: Sequence[int] | None, batches: CachedBatches,
                  device: torch.device) -> float:
    """Mean cross-entropy over ``batches`` with the per-block schedule ``r`` (None: unmerged) set
    on a ToMe-patched ``model``."""
    set_schedule(model, list(r) if r is not None else 0)
    total, n = 0.0, 0
    for x, y in batches:
        logits = model(x.to(device)).float()
        total += F.cross_entropy(logits, torch.as_tensor(y).to(device), reduction="sum").item()
        n += len(y)
    return total / max(n, 1)


def probe_levels(model: torch.nn.Module, targets: Sequence[str]) -> list[int]:
    """r probed per block: the constant r of the strongest target, and twice it, within the clip."""
    strongest = min(targets, key=lambda t: Schedule.parse(t).target)
    merged = apply(copy.deepcopy(model), strongest)
    r = max(1, max(merged._tome.r))
    cap = (num_input_tokens(model) - model.num_prefix_tokens) // 2
    return sorted({min(r, cap), min(2 * r, cap)})


def search_schedules(label: str, model: torch.nn.Module, targets: Sequence[str], batches: CachedBatches,
                     device: torch.device, seconds: float | None = None, seed: int = 0) -> ScheduleProbe | None:
    """The probe, the greedy allocation to each ``macs=F`` target and the refinement within about
    ``seconds`` (None: two generations per target), for one fp32 model. Where the probe does not fit
    ``seconds`` at two levels it probes the strongest target's r alone; where not even that fits, None."""
    t0 = time.perf_counter()
    net = apply(copy.deepcopy(model).to(device).eval(), 0)
    depth, n_tok, prot = len(net.blocks), num_input_tokens(net), net.num_prefix_tokens

    def macs_of(flow):
        return block_macs(net, flow)

    levels = probe_levels(model, targets)
    base = schedule_loss(net, None, batches, device)
    one_eval = time.perf_counter() - t0

    def needs(n_levels: int) -> float:  # the probe and each target's greedy and constant-r scores
        return one_eval * (1 + depth * n_levels + 2 * len(targets))

    if seconds is not None and needs(len(levels)) > seconds:
        if needs(1) > seconds:
            return None
        levels = levels[:1]
    added = [[schedule_loss(net, [0] * i + [v] + [0] * (depth - i - 1), batches, device) - base for v in levels]
             for i in range(depth)]
    probe = ScheduleProbe(label, levels, base, added)
    cost = probed_cost(levels, added)
    left = None if seconds is None else seconds - (time.perf_counter() - t0)
    per_target = None if left is None else max(0, int(left / max(one_eval, 1e-3) / max(len(targets), 1)))
    full = schedule_macs([0] * depth, n_tok, prot, macs_of)
    for target in targets:
        fixed = clipped(apply(copy.deepcopy(model), target)._tome.r, n_tok, prot)
        # the constant r's own MACs where it undershoots the target: a searched schedule competes at equal MACs
        goal = min(Schedule.parse(target).target, schedule_macs(fixed, n_tok, prot, macs_of) / full)
        greedy = greedy_allocation(depth, n_tok, prot, macs_of, goal, cost)
        probe.schedules.append(_refine(net, target, greedy, fixed, batches, device, macs_of,
                                       budget_macs(depth, n_tok, prot, macs_of, goal),
                                       2 * CHILDREN if per_target is None else per_target, random.Random(seed)))
    probe.seconds = time.perf_counter() - t0
    return probe


def _refine(net, target: str, greedy: list[int], fixed: list[int], batches, device, macs_of, budget: float,
            evals: int, rng: random.Random) -> SearchedSchedule:
    """Generations of ``CHILDREN`` children of the best two schedules so far (the greedy one and
    the fixed target's constant r start the pool), until ``evals`` schedules are scored."""
    n_tok, prot = num_input_tokens(net), net.num_prefix_tokens
    scored = {tuple(greedy): schedule_loss(net, greedy, batches, device)}
    fixed_loss = schedule_loss(net, fixed, batches, device)
    if within(fixed, n_tok, prot, macs_of, budget):
        scored[tuple(fixed)] = fixed_loss
    done = 0
    while done < evals:
        parents = [list(r) for r, _ in sorted(scored.items(), key=lambda kv: kv[1])[:2]]
        children = []
        for k in range(CHILDREN):
            if k % 2 == 0 or len(parents) < 2:
                child = mutate_schedule(rng.choice(parents), rng, n_tok, prot, macs_of, budget, rng.choice((1, 2, 4)))
            else:
                child = crossover_schedule(parents[0], parents[1], rng, n_tok, prot, macs_of, budget)
            if child is not None and tuple(child) not in scored:
                children.append(child)
        if not children:
            break
        for child in children[: evals - done]:
            scored[tuple(child)] = schedule_loss(net, child, batches, device)
            done += 1
    best = min(scored, key=lambda r: (scored[r], r))
    return SearchedSchedule(target, list(best), list(greedy), scored[best], scored[tuple(greedy)], fixed_loss, done,
                            list(best) == list(fixed))


def probe_record(p: ScheduleProbe) -> dict[str, Any]:
    """What the run keeps of a probe (``joint/schedules.json`` and the joint stage's result)."""
    return {"model": p.model, "levels": p.levels, "base_loss": p.base_loss, "added": p.added, "seconds": p.seconds,
            "schedules": [{"name": s.name, "target": s.target, "r_per_layer": s.r_per_layer, "greedy": s.greedy,
                           "loss": s.loss, "greedy_loss": s.greedy_loss, "fixed_loss": s.fixed_loss,
                           "evaluated": s.evaluated, "is_fixed": s.is_fixed} for s in p.schedules]}
