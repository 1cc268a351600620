"""AutoFormer: spaces, slicing, extraction parity, supernet training (one process, DDP, resume),
the evolutionary search under limits."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml

from vitfab import tome
from vitfab.measure import count_macs, count_params
from vitfab.models import create_model, save_checkpoint
from vitfab.runtimes import load_model
from vitfab.models.arch import ArchConfig, SearchSpace, SpaceError, arch_macs, arch_params, load_arch, save_arch
from vitfab.models.supernet import Supernet
from vitfab.models.weights import read_state_dict
from vitfab.nas import (
    EvolutionarySearch,
    Limits,
    SearchConfig,
    SupernetConfig,
    build_supernet,
    crossover,
    extract_subnet,
    load_supernet,
    mutate,
    pareto_front,
    resume_supernet,
    train_supernet,
)
from vitfab.nas.search import Candidate
from vitfab.precision import prepare_model

from conftest import REPO
from test_cli import assert_one_line_error, run_cli

AUTOFORMER_T = ArchConfig(192, 13, (3,) * 10 + (4, 3, 3), (3.5, 3.5, 3.0, 3.5, 3.0, 3.0, 4, 4, 3.5, 4, 3.5, 4, 3.5))


def _supernet(space="tiny", classes=5, seed=0):
    torch.manual_seed(seed)
    return Supernet(SearchSpace.named(space, img_size=32, patch_size=8), classes).eval()


def _meta(net, classes):
    from vitfab.data.transforms import Preprocess
    from vitfab.models.meta import ModelMeta

    net.vitfab_meta = ModelMeta("vitfab_supernet", {}, classes, Preprocess(img_size=32, crop_pct=1.0))
    return net


# --------------------------------------------------------------------------- spaces and counts
def test_spaces_and_yaml_round_trip(tmp_path):
    for name, emb in (("tiny", (192, 216, 240)), ("small", (320, 384, 448)), ("base", (528, 576, 624))):
        s = SearchSpace.named(name)
        assert s.embed_dim == emb and s.largest().embed_dim == max(emb) and s.smallest().depth == min(s.depth)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SearchSpace.named("small", img_size=64, patch_size=8).to_dict()))
    loaded = SearchSpace.load(path)
    assert loaded == SearchSpace.named("small", img_size=64, patch_size=8) and loaded.img_size == 64
    save_arch(AUTOFORMER_T, tmp_path / "a.yaml")
    assert load_arch(tmp_path / "a.yaml") == AUTOFORMER_T
    with pytest.raises(SpaceError, match="unknown search space"):
        SearchSpace.load("huge")
    with pytest.raises(SpaceError, match="heads 12 > supernet 4"):
        SearchSpace((192,), (12,), (12,), (4.0,), 256, 14, 4, 4.0)
    with pytest.raises(SpaceError, match="needs 2 heads"):
        ArchConfig(64, 2, (1,), (4.0, 4.0))


def test_published_autoformer_t_counts():
    """Depth 13, embed 192: 5.7-5.9M params and about 1.3 GMACs at 224 px, measured."""
    model = create_model("vitfab_subnet", num_classes=1000, embed_dim=192, depth=13,
                         num_heads=list(AUTOFORMER_T.num_heads), mlp_ratio=list(AUTOFORMER_T.mlp_ratio))
    params, macs = count_params(model), count_macs(model)
    assert 5.7e6 <= params <= 5.9e6 and 1.2e9 <= macs <= 1.35e9
    assert (params, macs) == (arch_params(AUTOFORMER_T, 1000, 224, 16), arch_macs(AUTOFORMER_T, 224, 16, num_classes=1000))


@pytest.mark.parametrize("space", ["tiny", "small", "base"])
def test_slicing_counts_and_parity_per_space(space):
    net = _supernet(space)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rng = random.Random(1)
    sp = net.space
    for arch in (sp.largest(), sp.smallest(), sp.sample(rng)):
        model = _extract(net, arch)
        assert count_params(model) == arch_params(arch, 5, 32, 8)
        assert count_macs(model) == arch_macs(arch, 32, 8, num_classes=5)
        net.set_arch(arch)
        with torch.no_grad():
            assert torch.allclose(model(x), net(x), atol=1e-5)


def _extract(net, arch, classes=None):
    _meta(net, classes or [str(i) for i in range(net.num_classes)])
    return extract_subnet(net, arch)


def test_extracted_subnet_is_a_plain_timm_vit_that_composes(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    net = _supernet()
    arch = net.space.sample(random.Random(3))
    model = _extract(net, arch)
    x = torch.randn(3, 3, 32, 32)
    net.set_arch(arch)
    with torch.no_grad():
        ref = net(x)
    assert isinstance(model, VisionTransformer)
    assert [b.attn.num_heads for b in model.blocks] == list(arch.num_heads)
    assert [b.mlp.fc1.out_features for b in model.blocks] == [arch.mlp_hidden(i) for i in range(arch.depth)]
    loaded = load_model(save_checkpoint(tmp_path / "sub", model))  # through vitfab's checkpoint loader
    with torch.no_grad():
        assert torch.allclose(loaded(x), ref, atol=1e-5)
        tome.apply(loaded, 0)
        assert torch.allclose(loaded(x), ref, atol=1e-5)
        tome.apply(loaded, 2)
        assert torch.isfinite(loaded(x)).all() and loaded._tome.tokens[-1] < 17
        assert torch.isfinite(prepare_model(loaded, "int8", "cpu")(x)).all()


@pytest.mark.parametrize("embed", ["conv", "spt"])
def test_small_data_embeddings_extract_with_parity_and_counts(embed, tmp_path):
    """A conv-stem or shifted-patch supernet: every extracted subnet (stem BatchNorm statistics
    included) reproduces the supernet's logits, through a checkpoint and with ToMe at r=0; the
    analytic counts the search uses equal the measured ones."""
    torch.manual_seed(0)
    net = Supernet(SearchSpace.named("tiny", img_size=32, patch_size=8), 5, embed=embed)
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 32, 32) * 2 + 1)  # running statistics away from their initial values
    net.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for arch in (net.space.largest(), net.space.smallest(), net.space.sample(random.Random(1))):
        model = load_model(save_checkpoint(tmp_path / arch.short()[:40], _extract(net, arch)))
        assert type(model.patch_embed).__name__ == {"conv": "ConvStemEmbed", "spt": "ShiftedPatchEmbed"}[embed]
        kw = {"embed": embed, "stem": net.stem}
        assert count_params(model) == arch_params(arch, 5, 32, 8, **kw)
        assert count_macs(model) == arch_macs(arch, 32, 8, num_classes=5, **kw)
        assert count_macs(model) > arch_macs(arch, 32, 8, num_classes=5)  # the embedding is not a patch conv
        net.set_arch(arch)
        with torch.no_grad():
            ref = net(x)
            assert torch.allclose(model(x), ref, atol=1e-5)
            assert torch.allclose(tome.apply(model, 0)(x), ref, atol=1e-5)


def test_subnet_that_does_not_fit_is_refused():
    net = _supernet()
    with pytest.raises(SpaceError, match="embed 512 > supernet 256"):
        net.set_arch(ArchConfig(512, 12, (3,) * 12, (4.0,) * 12))


def test_init_from_a_trained_baseline_reproduces_it(tmp_path):
    """A DeiT-Tiny-shaped model (embed 192, 3 heads of 64, MLP 4, depth 12) copied into the tiny
    supernet: the supernet with that subnet set gives the model's logits."""
    base = create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, classes=list("abcde"))
    ck = save_checkpoint(tmp_path / "base", base)
    cfg = SupernetConfig(data="unused", img_size=32, patch_size=8, init_from=str(ck), drop_path=0.0)
    net = build_supernet(cfg, list("abcde")).eval()
    net.set_arch(ArchConfig(192, 12, (3,) * 12, (4.0,) * 12))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), base.eval()(x), atol=1e-5)


# --------------------------------------------------------------------------- the data order
def test_share_sampler():
    from torch.utils.data import DataLoader

    from vitfab.train.loop import ShareSampler

    def order(loader):
        return [int(i) for batch in loader for i in batch]

    ds = list(range(23))
    old = order(DataLoader(ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)
    one = ShareSampler(23, 5, 0, 1, g, drop_last=False)
    assert order(DataLoader(ds, batch_size=5, sampler=one, generator=g)) == old and len(one) == 23
    shares = []
    for rank in (0, 1):  # two processes, global batch 10 of 5 + 5: 2 full batches, the tail dropped
        g = torch.Generator().manual_seed(3)
        s = ShareSampler(23, 10, rank, 2, g)
        shares.append(order(DataLoader(ds, batch_size=5, sampler=s, generator=g)))
        assert len(s) == 10 == len(shares[-1])
    g = torch.Generator().manual_seed(3)
    global_order = order(DataLoader(ds, batch_size=10, sampler=ShareSampler(23, 10, 0, 1, g, drop_last=True),
                                    generator=g))
    assert shares[0][:5] + shares[1][:5] + shares[0][5:] + shares[1][5:] == global_order


# --------------------------------------------------------------------------- genetic operators
def test_mutation_and_crossover_stay_in_space():
    sp = SearchSpace.named("tiny")
    rng = random.Random(0)
    cfg = SearchConfig()
    a, b = sp.sample(rng), sp.sample(rng)
    for _ in range(200):
        for child in (mutate(a, sp, rng, cfg), crossover(a, b, rng)):
            assert sp.in_space(child)
    always = SearchConfig(p_depth=1.0, p_embed=0.0, p_heads=0.0, p_mlp=0.0)
    short = ArchConfig(192, 12, (3,) * 12, (3.5,) * 12)
    deeper = [c for c in (mutate(short, sp, rng, always) for _ in range(50)) if c.depth > 12]
    assert deeper and all(c.num_heads[:12] == short.num_heads and c.embed_dim == 192 for c in deeper)


def test_pareto_front():
    def c(acc, g):
        return Candidate(ArchConfig(1, 1, (1,), (1.0,)), acc, 0, g)

    cands = [c(0.5, 1.0), c(0.6, 2.0), c(0.55, 3.0), c(0.7, 4.0), c(0.4, 0.5)]
    assert [(x.accuracy, x.gmacs) for x in pareto_front(cands, lambda x: x.gmacs)] == [
        (0.4, 0.5), (0.5, 1.0), (0.6, 2.0), (0.7, 4.0)]


# --------------------------------------------------------------------------- training and search
def _nas_cfg(data, **kw):
    base = dict(data=str(data), space="tiny", img_size=32, patch_size=8, epochs=2, batch_size=16, amp="off",
                drop_path=0.0, augment=False, workers=0, max_per_class=8, warmup_epochs=0.5)
    return SupernetConfig(**(base | kw))


def test_sandwich_training_runs_and_resume_is_exact(tmp_path, synth_small, monkeypatch):
    full = train_supernet(_nas_cfg(synth_small, sandwich=True, num_random=1), tmp_path / "full", progress=False)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in full.history)
    # the same run, interrupted after its first epoch, then resumed
    from vitfab.nas.train import SupernetTrainer

    real = SupernetTrainer.validate
    calls = {"n": 0}

    def crash_second_epoch(self, progress=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, progress)

    monkeypatch.setattr(SupernetTrainer, "validate", crash_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_supernet(_nas_cfg(synth_small, sandwich=True, num_random=1), tmp_path / "cut", progress=False)
    monkeypatch.setattr(SupernetTrainer, "validate", real)
    resumed = resume_supernet(tmp_path / "cut", progress=False)
    assert [r["epoch"] for r in resumed.history] == [0, 1]
    a = read_state_dict(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    b = read_state_dict(tmp_path / "cut" / "checkpoints" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path, synth_small):
    """torchrun with 2 processes (gloo, each half of every global batch) ends with the weights of
    one process training on the whole global batch."""
    # 42 training images (8 per class, 1 val + 1 test each): 3 global batches of 14, 7 per process
    args = ["nas", "train", "--data", str(synth_small), "--img-size", "32", "--patch-size", "8", "--epochs", "2",
            "--batch-size", "14", "--amp", "off", "--drop-path", "0", "--no-augment", "--workers", "0",
            "--max-per-class", "8", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "vitfab", *args, "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "vitfab", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = read_state_dict(tmp_path / "ddp" / "checkpoints" / "last" / "model.safetensors")
    b = read_state_dict(tmp_path / "one" / "checkpoints" / "last" / "model.safetensors")
    init = build_supernet(_nas_cfg(synth_small), [str(i) for i in range(7)]).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    # only the order of float sums differs (all-reduce vs one batch), amplified a little by Adam
    # over 6 steps; a wrong share of the batches shows up as ~3e-3
    assert worst < 1e-4, worst


@pytest.fixture(scope="module")
def trained_supernet(tmp_path_factory, synth_small):
    out = tmp_path_factory.mktemp("sn") / "sn"
    train_supernet(_nas_cfg(synth_small, epochs=1), out, progress=False)
    return out


def _search(run, out, limits, generations=3, **kw):
    from vitfab.data.split import Split
    from vitfab.evaluate.runner import make_eval_loader
    from vitfab.rundir import RunDir

    net = load_supernet(run)
    split = Split.load(RunDir.open(run).split_path)
    loader = make_eval_loader(split.root, split.val, net.vitfab_meta.preprocess)
    cfg = SearchConfig(population=8, generations=generations, parents=3, mutations=3, crossovers=3, **kw)
    return EvolutionarySearch(net, loader, torch.device("cpu"), limits, cfg, out, progress=False)


def test_search_respects_every_limit(trained_supernet, tmp_path):
    limits = Limits(max_params=7.0e6, min_params=5.5e6, max_gmacs=0.12, max_latency_ms=1e4)
    result = _search(trained_supernet, tmp_path / "s", limits).run()
    assert result.evaluated >= 8
    search = _search(trained_supernet, tmp_path / "s", limits)
    for c in result.ranked:
        assert 5.5e6 <= c.params <= 7.0e6 and c.gmacs <= 0.12
        assert search.space.in_space(c.arch)
    best = yaml.safe_load((tmp_path / "s" / "best.yaml").read_text())
    assert ArchConfig.from_dict(best["RETRAIN"]) == result.best.arch
    # a latency limit below anything measurable: nothing qualifies, one clear error
    from vitfab.errors import VitfabError

    with pytest.raises(VitfabError, match="no architecture of the space meets"):
        _search(trained_supernet, tmp_path / "none", Limits(max_latency_ms=1e-6)).run()


def test_search_resumes_to_the_same_result(trained_supernet, tmp_path, monkeypatch):
    limits = Limits(max_params=8e6)
    full = _search(trained_supernet, tmp_path / "full", limits).run()
    cut = _search(trained_supernet, tmp_path / "cut", limits)
    real = EvolutionarySearch.save_state

    def stop_after_first(self):
        real(self)
        if self.generation == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(EvolutionarySearch, "save_state", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    monkeypatch.setattr(EvolutionarySearch, "save_state", real)
    resumed = _search(trained_supernet, tmp_path / "cut", limits).run()
    assert [c.arch for c in resumed.ranked] == [c.arch for c in full.ranked]
    with pytest.raises(Exception, match="other settings"):
        _search(trained_supernet, tmp_path / "cut", limits, generations=5).run()


def test_nas_cli_end_to_end(capsys, trained_supernet, tmp_path):
    code, out, err = run_cli(capsys, "nas", "search", "--supernet", str(trained_supernet), "--max-params", "7",
                             "--population", "6", "--generations", "2", "--parents", "2", "--mutations", "2",
                             "--crossovers", "2", "--out", str(tmp_path / "s"), "--json", "--no-progress")
    assert code == 0, err
    best = json.loads(out)["best"]
    assert best["params"] <= 7e6
    code, out, err = run_cli(capsys, "nas", "extract", "--supernet", str(trained_supernet), "--subnet",
                             str(tmp_path / "s" / "best.yaml"), "--out", str(tmp_path / "sub"))
    assert code == 0, err
    assert f"{best['params'] / 1e6:.2f}M params" in out
    model = load_model(tmp_path / "sub")
    assert model.vitfab_meta.name == "vitfab_subnet" and len(model.blocks) == best["arch"]["DEPTH"]


@pytest.mark.parametrize("argv,pattern", [
    (["nas", "train", "--data", "/tmp", "--space", "huge"], "unknown search space 'huge'"),
    (["nas", "search", "--supernet", "/nonexistent"], "not a vitfab run folder"),
    (["nas", "extract", "--supernet", "/nonexistent", "--subnet", "/nonexistent.yaml", "--out", "/tmp/x"],
     "not found"),
])
def test_nas_errors(capsys, argv, pattern):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, pattern)
