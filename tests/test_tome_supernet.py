"""ToMe inside the supernet's blocks: the same logits as ToMe on the extracted subnet with the
same schedule (list and macs= target, class-token and average pooling, relative position), the
schedule re-resolved per sampled subnet, and remove restoring the plain supernet."""

import random

import pytest
import torch

from vitfab import tome
from vitfab.models.arch import SearchSpace
from vitfab.models.supernet import Supernet

SCHEDULES = ([4, 3, 2, 2, 1, 0, 3], "macs=0.6", 2, (3, -1))


def _net(seed=0, **kw):
    torch.manual_seed(seed)
    net = Supernet(SearchSpace.named("tiny", img_size=32, patch_size=8), 5, **kw).eval()
    with torch.no_grad():  # spread the weights so that matching has clear winners
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def _archs(net, n, seed=0):
    rng = random.Random(seed)
    return [net.space.sample(rng) for _ in range(n)]


@pytest.mark.parametrize("kw", [dict(), dict(global_pool="avg"), dict(global_pool="avg", rel_pos=3),
                                dict(rel_pos=3, qkv_layout="interleaved")], ids=["token", "avg", "avg-relpos",
                                                                                   "token-relpos-interleaved"])
def test_tome_in_superblock_matches_the_extracted_subnet(kw):
    net = _net(**kw)
    x = torch.randn(3, 3, 32, 32)
    tome.apply_supernet(net)
    for arch in _archs(net, 3):
        net.set_arch(arch)
        sub = net.subnet_model(arch).eval()
        for spec in SCHEDULES:
            tome.apply_supernet(net, spec)
            tome.apply(sub, spec)
            with torch.no_grad():
                got, want = net(x), sub(x)
            assert net._tome.r == sub._tome.r, (arch.short(), spec)
            assert net._tome.tokens == sub._tome.tokens and any(net._tome.r)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_supernet_schedule_follows_the_sampled_subnet_and_remove_restores():
    net = _net(global_pool="avg")
    x = torch.randn(2, 3, 32, 32)
    small, large = net.space.smallest(), net.space.largest()
    net.set_arch(large)
    with torch.no_grad():
        plain = net(x)
    tome.apply_supernet(net, 0)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain)  # r = 0 merges nothing: the plain supernet
    tome.apply_supernet(net, "macs=0.5")
    depths = []
    for arch in (small, large):
        net.set_arch(arch)
        with torch.no_grad():
            net(x)
        depths.append(len(net._tome.r))
        assert net._tome.r == tome.resolve_schedule(net.subnet_model(arch), "macs=0.5")[1]
    assert depths == [small.depth, large.depth]
    with torch.no_grad():
        merged = net(x)
    assert not torch.allclose(merged, plain)
    tome.remove_supernet(net)
    assert type(net) is Supernet and not tome.is_supernet_patched(net)
    assert all(type(b).__name__ == "SuperBlock" for b in net.blocks)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain)


def test_supernet_patch_refuses_what_it_cannot_merge():
    net = _net()
    with pytest.raises(tome.ToMeError, match="patches a vitfab Supernet"):
        tome.apply_supernet(torch.nn.Linear(2, 2))
    with pytest.raises(tome.ToMeError, match="unknown ToMe partition"):
        tome.apply_supernet(net, 2, partition="nope")
    with pytest.raises(tome.ScheduleError, match="cannot be reached"):
        tome.apply_supernet(net, "macs=0.01")
    assert type(net) is Supernet  # a refused patch leaves the supernet as it was
