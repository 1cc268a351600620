"""Per-block ToMe schedules (issue 20): the greedy allocation, the gene's operators, the probe."""

from __future__ import annotations

import copy
import random

import pytest
import timm
import torch

from vitfab import tome
from vitfab.evaluate.runner import CachedBatches
from vitfab.measure import count_macs
from vitfab.optimize.schedule_search import schedule_loss, search_schedules
from vitfab.tome import ScheduleError, block_macs
from vitfab.tome.allocate import (budget_macs, clipped, crossover_schedule, fits_clip, greedy_allocation,
                                  mutate_schedule, probed_cost, schedule_macs, within)
from vitfab.tome.patch import num_input_tokens


@pytest.fixture(scope="module")
def deit():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, num_classes=4).eval()  # 65 tokens


def _shape(model):
    return len(model.blocks), num_input_tokens(model), model.num_prefix_tokens, lambda f: block_macs(model, f)


@pytest.mark.parametrize("target", [0.75, 0.5, 0.35])
def test_greedy_allocation_meets_its_macs_target_on_the_layer_shapes(deit, target):
    depth, n, prot, macs_of = _shape(deit)
    rng = random.Random(1)
    weights = [rng.uniform(0.1, 2.0) for _ in range(depth)]
    r = greedy_allocation(depth, n, prot, macs_of, target, lambda i, v: weights[i] * v)
    assert fits_clip(r, n, prot) and clipped(r, n, prot) == r
    assert schedule_macs(r, n, prot, macs_of) <= budget_macs(depth, n, prot, macs_of, target)
    full = count_macs(deit)  # the model counts what the layer shapes said (the head aside)
    assert count_macs(tome.apply(deit, r)) <= (target + 0.01) * full
    tome.remove(deit)


def test_greedy_allocation_follows_the_costs(deit):
    depth, n, prot, macs_of = _shape(deit)
    cheap_late = greedy_allocation(depth, n, prot, macs_of, 0.6, lambda i, v: v * (10.0 if i < depth // 2 else 0.1))
    cheap_early = greedy_allocation(depth, n, prot, macs_of, 0.6, lambda i, v: v * (0.1 if i < depth // 2 else 10.0))
    half = depth // 2
    assert sum(cheap_late[half:]) > sum(cheap_late[:half]) and sum(cheap_early[:half]) > sum(cheap_early[half:])


def test_unreachable_target_is_refused(deit):
    depth, n, prot, macs_of = _shape(deit)
    with pytest.raises(ScheduleError, match="cannot be reached"):
        greedy_allocation(depth, n, prot, macs_of, 0.01, lambda i, v: v)


def test_mutation_and_crossover_keep_the_clip_and_the_target(deit):
    depth, n, prot, macs_of = _shape(deit)
    budget = budget_macs(depth, n, prot, macs_of, 0.5)
    rng = random.Random(0)
    a = greedy_allocation(depth, n, prot, macs_of, 0.5, lambda i, v: v * (100.0 if i < depth // 2 else 0.1))
    b = greedy_allocation(depth, n, prot, macs_of, 0.5, lambda i, v: v)
    assert a != b
    children = 0
    for _ in range(200):
        m = mutate_schedule(rng.choice((a, b)), rng, n, prot, macs_of, budget, rng.choice((1, 2, 4, 8)))
        c = crossover_schedule(a, b, rng, n, prot, macs_of, budget)
        for child in (m, c):
            if child is not None:
                children += 1
                assert len(child) == depth and within(child, n, prot, macs_of, budget), child
    assert children > 300
    with pytest.raises(ScheduleError):
        crossover_schedule(a, a[:-1], rng, n, prot, macs_of, budget)


def test_clip_check_against_the_tokens_left():
    assert fits_clip([32, 16, 8], 65, 1) and not fits_clip([32, 17], 65, 1)  # 33 left after block 0: cap 16
    assert clipped([32, 32, 32], 65, 1) == [32, 16, 8] and not fits_clip([-1], 65, 1)


def test_probed_cost_interpolates_and_never_falls():
    cost = probed_cost([4, 8], [[0.2, 0.6], [0.3, 0.1]])
    assert cost(0, 0) == 0 and cost(0, 2) == pytest.approx(0.1) and cost(0, 6) == pytest.approx(0.4)
    assert cost(0, 12) == pytest.approx(1.0)  # extended with the last slope
    assert cost(1, 8) == pytest.approx(0.3) and cost(1, 4) == pytest.approx(0.3)  # a fall counts as free
    with pytest.raises(ScheduleError):
        probed_cost([8, 4], [[0.1, 0.2]])


def test_search_finds_schedules_within_each_target_and_scores_them():
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8, depth=4, num_classes=4).eval()
    batches = CachedBatches([(torch.randn(8, 3, 64, 64), torch.randint(0, 4, (8,))) for _ in range(2)])
    probe = search_schedules("m", deit, ["macs=0.75", "macs=0.5"], batches, torch.device("cpu"), seconds=None)
    depth, n, prot, macs_of = _shape(deit)
    strongest = tome.apply(copy.deepcopy(deit), "macs=0.5")._tome.r[0]  # the probe's levels: its r and twice it
    assert probe.levels == [strongest, 2 * strongest] and len(probe.added) == depth
    assert all(len(a) == 2 for a in probe.added)
    net = tome.apply(copy.deepcopy(deit), 0)
    for s, goal in zip(probe.schedules, (0.75, 0.5)):
        assert within(s.r_per_layer, n, prot, macs_of, budget_macs(depth, n, prot, macs_of, goal))
        constant = clipped(tome.apply(copy.deepcopy(deit), f"macs={goal}")._tome.r, n, prot)
        assert schedule_macs(s.r_per_layer, n, prot, macs_of) <= schedule_macs(constant, n, prot, macs_of) + 1e-6
        assert s.loss <= s.greedy_loss + 1e-9  # the refinement keeps the best it scored, the greedy one included
        assert s.loss == pytest.approx(schedule_loss(net, s.r_per_layer, batches, torch.device("cpu")), abs=1e-5)
        assert tome.Schedule.parse(s.spec).per_layer(depth) == s.r_per_layer  # travels as a plain list schedule
        assert s.name == f"searched macs={goal:g}"
    assert not tome.is_patched(deit)  # the caller's model is left as it was
    assert search_schedules("m", deit, ["macs=0.5"], batches, torch.device("cpu"), seconds=0.0) is None  # no time
