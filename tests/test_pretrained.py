"""The pretrained path: weight selection from a larger ViT, supernets started from trained ones
(the authors' format or vitfab's), and what each start gives after the same short training."""

import argparse

import pytest
import torch

from vitfab.errors import VitfabError
from vitfab.models import create_model, save_checkpoint
from vitfab.models.arch import ArchConfig
from vitfab.models.selection import evenly, select_into, select_weights
from vitfab.nas import SupernetConfig, build_supernet, load_official_autoformer
from vitfab.train import TrainConfig, train

from test_cli import assert_one_line_error, run_cli
from test_official import SPACE, official_state

X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0) | kw
    return create_model("vitfab_subnet", classes=list("abcde"), img_size=32, patch_size=8, **args).eval()


def test_evenly_spaced_indices():
    assert evenly(12, 12).tolist() == list(range(12))
    assert evenly(12, 4).tolist() == [0, 4, 7, 11]
    assert evenly(5, 1).tolist() == [0]
    with pytest.raises(VitfabError):
        evenly(4, 5)


def test_selection_of_the_same_shape_reproduces_the_source():
    src, dst = vit(0), vit(1)
    assert (src(X) - dst(X)).abs().max() > 1e-3
    sel = select_into(src, dst)
    assert sel.kept == [] and sel.blocks == [0, 1, 2, 3]
    with torch.no_grad():
        assert torch.equal(src(X), dst(X))


def test_selection_shrinks_every_dimension_consistently():
    """Embedding channels by one index set, heads whole, MLP units and layers evenly spaced."""
    src = vit(0, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0)
    dst = vit(1, embed_dim=96, depth=3, num_heads=[1, 2, 1], mlp_ratio=2.0)
    sd = select_weights(src, dst).state_dict
    e, s = evenly(192, 96), src.state_dict()
    assert torch.equal(sd["cls_token"], s["cls_token"][..., e])
    assert torch.equal(sd["blocks.1.norm1.weight"], s["blocks.2.norm1.weight"][e])  # depth 6 -> 3: blocks 0, 2, 5
    q = s["blocks.5.attn.qkv.weight"].view(3, 3, 64, 192)
    assert torch.equal(sd["blocks.2.attn.qkv.weight"].view(3, 1, 64, 96), q[:, [0]][..., e])
    heads = evenly(3, 2)
    assert torch.equal(sd["blocks.1.attn.proj.weight"].view(96, 2, 64), s["blocks.2.attn.proj.weight"][e].view(96, 3, 64)[:, heads])
    assert torch.equal(sd["blocks.0.mlp.fc2.weight"], s["blocks.0.mlp.fc2.weight"][e][:, evenly(768, 192)])
    with pytest.raises(VitfabError, match="exceeds"):
        select_weights(dst, src)


@pytest.mark.parametrize("extra", ["identity", "repeat"])
def test_blocks_beyond_the_source_depth(extra):
    """identity: the deeper model starts as the source; repeat: its extra blocks copy the last one."""
    src, dst = vit(0), vit(1, depth=6)
    sel = select_into(src, dst, extra)
    assert sel.blocks == [0, 1, 2, 3, extra, extra]
    with torch.no_grad():
        same = torch.allclose(src(X), dst(X), atol=1e-6)
    assert same == (extra == "identity")
    if extra == "repeat":
        assert torch.equal(dst.state_dict()["blocks.5.mlp.fc1.weight"], src.state_dict()["blocks.3.mlp.fc1.weight"])


def test_supernet_init_by_selection_reproduces_a_source_of_its_largest_shape(tmp_path):
    """A DeiT-Tiny-shaped source, depth 12, into the tiny space (largest: embed 240, 4 heads,
    depth 14) would shrink nothing if it were that wide; here the source IS the largest shape at
    depth 12: the supernet's largest subnet reproduces it (two identity blocks on top)."""
    src = vit(0, embed_dim=240, depth=12, num_heads=4, mlp_ratio=4.0)
    ck = save_checkpoint(tmp_path / "src", src)
    net = build_supernet(SupernetConfig(data="unused", img_size=32, patch_size=8, supernet_init=str(ck),
                                        drop_path=0.0), list("abcde")).eval()
    assert "weight selection" in net.vitfab_meta.extra["init"]
    net.set_arch(net.space.largest())
    with torch.no_grad():
        assert torch.allclose(net(X), src(X), atol=1e-5)


def test_supernet_weights_round_trip_from_the_authors_format(tmp_path):
    root = tmp_path
    (root / "space.yaml").write_text(__import__("yaml").safe_dump(SPACE))
    torch.save({"model": official_state(classes=5), "epoch": 1, "args": argparse.Namespace(change_qkv=True)},
               root / "supernet.pth")
    ref = load_official_autoformer(root / "supernet.pth", root / "space.yaml")
    cfg = SupernetConfig(data="unused", space=str(root / "space.yaml"), img_size=32, patch_size=2,
                         supernet_weights=str(root / "supernet.pth"), drop_path=0.0)
    net = build_supernet(cfg, list("abcde")).eval()
    assert net.rel_pos == 14 and net.global_pool == "avg" and net.qkv_layout == "interleaved"
    arch = ArchConfig(64, 2, (1, 2), (3.0, 4.0))
    net.set_arch(arch), ref.set_arch(arch)
    with torch.no_grad():
        assert torch.allclose(net(X), ref(X), atol=1e-5)
    # at another size and class count: position embedding resampled, head re-initialised, blocks kept
    other = build_supernet(SupernetConfig(data="unused", space=str(root / "space.yaml"), img_size=16, patch_size=2,
                                          supernet_weights=str(root / "supernet.pth")), list("abc"))
    assert other.pos_embed.shape[1] == 65 and other.head.weight.shape[0] == 3
    assert torch.equal(other.blocks[1].fc1.weight, ref.blocks[1].fc1.weight)
    # and back: the vitfab checkpoint of a trained supernet starts another one
    from vitfab.models.checkpoint import save_checkpoint as save

    ck = save(tmp_path / "vitfab-supernet", net)
    again = build_supernet(SupernetConfig(data="unused", space=str(root / "space.yaml"), img_size=32, patch_size=2,
                                          supernet_weights=str(ck), drop_path=0.0), list("abcde")).eval()
    again.set_arch(arch)
    with torch.no_grad():
        assert torch.allclose(again(X), ref(X), atol=1e-5)


def test_one_start_only_and_clear_errors(tmp_path, capsys, synth_small):
    with pytest.raises(VitfabError, match="one start"):
        SupernetConfig(data="x", init_from="a", supernet_init="b").validate()
    code, _, err = run_cli(capsys, "nas", "train", "--data", str(synth_small), "--img-size", "32", "--patch-size", "8",
                           "--supernet-init", f"deit_small_patch16_224={tmp_path / 'missing.safetensors'}",
                           "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "weights file not found")
    code, _, err = run_cli(capsys, "nas", "train", "--data", str(synth_small), "--img-size", "32", "--patch-size", "8",
                           "--supernet-init", "deit_small_patch16_224", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, err, "could not fetch pretrained weights")  # offline: no hub
    assert not (tmp_path / "run").exists()


def _fit(init, data, out, epochs):
    cfg = TrainConfig(data=str(data), init_checkpoint=str(init), epochs=epochs, batch_size=16, lr=5e-4,
                      warmup_epochs=0.0, drop_path=0.0, seed=0, augment=False)
    return train(cfg, out=out, progress=False)


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    """5 classes x 40 noisy 32-px images: a bright bar in one of five places (a ViT learns it in
    a few epochs; from random weights one epoch is not enough)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("patterns") / "data"
    rng = np.random.default_rng(0)
    for k in range(5):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(40):
            arr = rng.normal(100, 40, (32, 32, 3))
            arr[6 * k: 6 * k + 6, :, :] += 90
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / f"c{k}" / f"{i}.png")
    return root


def test_a_selected_submodel_beats_a_random_start(tmp_path, patterns):
    """A small ViT trained here, then a narrower and shallower one selected from it, against the
    same shape from random weights: the same short fine-tune (seeded), and the selected start ends
    with the lower validation loss."""
    torch.manual_seed(0)
    big = create_model("vitfab_subnet", classes=None, num_classes=5, img_size=32, patch_size=8, embed_dim=128,
                       depth=4, num_heads=2, mlp_ratio=4.0)
    src_ck = save_checkpoint(tmp_path / "big-init", big)
    src = _fit(src_ck, patterns, tmp_path / "big", 6)
    from vitfab.runtimes import load_model

    trained = load_model(src.run.find_checkpoint("best"))
    small = dict(embed_dim=64, depth=2, num_heads=1, mlp_ratio=2.0)
    torch.manual_seed(1)
    rand = create_model("vitfab_subnet", classes=trained.vitfab_meta.classes, img_size=32, patch_size=8, **small)
    sel = create_model("vitfab_subnet", classes=trained.vitfab_meta.classes, img_size=32, patch_size=8, **small)
    select_into(trained, sel)
    runs = {name: _fit(save_checkpoint(tmp_path / f"{name}-init", m), patterns, tmp_path / name, 1)
            for name, m in (("random", rand), ("selected", sel))}
    assert src.best_val["val_top1"] > 0.6  # the source learnt the task
    loss = {k: r.best_val["val_loss"] for k, r in runs.items()}
    top1 = {k: r.best_val["val_top1"] for k, r in runs.items()}
    assert loss["selected"] < loss["random"] and top1["selected"] > top1["random"], (loss, top1)


def test_leading_selection_takes_the_first_indices():
    src = vit(0, embed_dim=192, depth=6, num_heads=3)
    dst = vit(1, embed_dim=96, depth=3, num_heads=2, mlp_ratio=2.0)
    sel = select_weights(src, dst, method="leading")
    s = src.state_dict()
    assert sel.blocks == [0, 1, 2]
    assert torch.equal(sel.state_dict["blocks.2.mlp.fc1.weight"], s["blocks.2.mlp.fc1.weight"][:192, :96])
    q = s["blocks.1.attn.qkv.weight"].view(3, 3, 64, 192)[:, :2, :, :96].reshape(384, 96)
    assert torch.equal(sel.state_dict["blocks.1.attn.qkv.weight"], q)


def test_full_scale_offline_says_so_and_trains_from_random_weights(capsys):
    """At --scale full every model first asks the hub for weights; offline the answer is one line
    and a random start (recorded in the plan, so a resumed run does not ask again)."""
    from types import SimpleNamespace

    from vitfab.optimize.config import JobConfig
    from vitfab.optimize.training_stages import hub_weights

    plans = {}
    ctx = SimpleNamespace(config=JobConfig(scale="full").resolved(),
                          plan=lambda key, make: plans.setdefault(key, make()))
    ok, start = hub_weights(ctx, "deit_tiny_patch16_224", "reference DeiT-Tiny")
    assert not ok and start.startswith("random weights (no hub weights: could not fetch")
    out = " ".join(capsys.readouterr().err.split())  # the console writes to stderr, wrapped
    assert "reference DeiT-Tiny: no pretrained weights" in out and "trained from random weights" in out
    assert plans == {"hub:deit_tiny_patch16_224": {"ok": False, "why": plans["hub:deit_tiny_patch16_224"]["why"]}}
    small = SimpleNamespace(config=JobConfig().resolved(), plan=None)
    assert hub_weights(small, "deit_tiny_patch16_224", "x") == (False, "random weights")
    assert JobConfig(scale="full").resolved().supernet_start() == "deit_small_patch16_224"
    assert JobConfig(scale="full", supernet_init="none").resolved().supernet_start() is None
