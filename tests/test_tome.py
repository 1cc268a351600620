"""vitfab.tome: parity at r=0 on every supported variant, the matching by hand, schedules,
token counts, training through merges, errors."""

import json

import pytest
import timm
import torch
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from vitfab import tome
from vitfab.models import create_model
from vitfab.runtimes import load_model
from vitfab.models.checkpoint import save_checkpoint
from vitfab.tome import Schedule, ScheduleError, ToMeError, bipartite_soft_matching, merge_source, merge_wavg

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=5)


def _vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(**(SMALL | kw)).eval()


def _head_dim_16():
    m = _vit()
    for blk in m.blocks:  # attention width 3 x 16 = 48 != embed 64
        blk.attn = Attention(64, num_heads=3, attn_head_dim=16, qkv_bias=True)
    return m.eval()


def _unfused():
    m = _vit(qk_norm=True)
    for blk in m.blocks:
        blk.attn.fused_attn = False
    return m


def _distilled():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=3,
                             num_classes=5).eval()


VARIANTS = {
    "plain": lambda: _vit(),
    "layerscale": lambda: _vit(init_values=0.1),
    "qk_norm": lambda: _vit(qk_norm=True),
    "scale_norm": lambda: _vit(scale_attn_norm=True),
    "unfused": _unfused,
    "attn_head_dim": _head_dim_16,
    "registers": lambda: _vit(reg_tokens=4),
    "avgpool_no_cls": lambda: _vit(class_token=False, global_pool="avg"),
    "distilled": _distilled,
}


@pytest.fixture(scope="module")
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_r0_matches_unpatched(name, x):
    model = VARIANTS[name]()
    with torch.no_grad():
        ref = model(x)
        for prop_attn in (False, True):
            tome.apply(model, 0, prop_attn=prop_attn)
            assert torch.allclose(model(x), ref, atol=1e-5, rtol=0)
        tome.apply(model, 4)  # merging changes the answer ...
        merged = model(x)
        assert merged.shape == ref.shape and not torch.allclose(merged, ref, atol=1e-5)
        assert model._tome.tokens[-1] < model.patch_embed.num_patches + model.num_prefix_tokens
        tome.remove(model)  # ... and removing restores the model exactly
        assert type(model) in (VisionTransformer, type(_distilled())) and type(model.blocks[0]) is Block
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("name", ["plain", "registers", "distilled", "avgpool_no_cls"])
def test_prefix_tokens_never_merge(name, x):
    model = tome.apply(VARIANTS[name](), 8, trace_source=True)
    with torch.no_grad():
        model(x)
    p = model.num_prefix_tokens
    src = model._tome.source  # (B, N_out, N_in)
    assert torch.equal(src[:, :p, :p], torch.eye(p).expand(3, p, p))  # prefix tokens stay alone, in front
    assert src[:, p:, :p].sum() == 0
    assert torch.equal(src.sum(dim=1), torch.ones(3, src.shape[2]))  # every input token is in one group
    assert torch.equal(src.sum(dim=2, keepdim=True), model._tome.size)  # size = patches in the group


def test_fused_and_unfused_agree_with_merging(x):
    fused = tome.apply(_vit(), 5)
    unfused = tome.apply(_vit(), 5)
    for blk in unfused.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad():
        a, b = fused(x), unfused(x)
    assert fused._tome.tokens == unfused._tome.tokens
    assert torch.allclose(a, b, atol=1e-5)


def test_proportional_attention_is_log_size_bias():
    """Attention over a merged token of size s equals attention over s identical copies of it."""
    torch.manual_seed(1)
    attn = tome.patch.ToMeAttention.__new__(tome.patch.ToMeAttention)
    Attention.__init__(attn, 8, num_heads=2)
    attn.eval()
    tokens = torch.randn(1, 3, 8)
    size = torch.tensor([[[1.0], [3.0], [1.0]]])
    expanded = torch.cat([tokens[:, :1], tokens[:, 1:2].expand(1, 3, 8), tokens[:, 2:]], dim=1)
    with torch.no_grad():
        out, _ = attn(tokens, size=size)
        ref, _ = attn(expanded)
    assert torch.allclose(out[:, 0], ref[:, 0], atol=1e-6)
    assert torch.allclose(out[:, 2], ref[:, 4], atol=1e-6)


# --------------------------------------------------------------------------- the matching by hand
def test_bipartite_matching_hand_checked_patches_rule():
    """The ``patches`` rule: prefix token P set aside, then patches t0..t5: A = t0, t2, t4; B = t1, t3, t5.

    Unit-vector metrics with cos(t0, t3) = 1.0, cos(t2, t1) = 0.8, cos(t4, t5) = 0.6 and every
    other A-B pair orthogonal; P equals t0 but is protected. With r = 2 exactly t0 -> t3 and
    t2 -> t1 merge; t4 survives.
    """
    e = torch.eye(4)
    metric = torch.stack([e[0], e[0], 0.8 * e[1] + 0.6 * e[2], e[1], e[0], e[3], 0.8 * e[2] + 0.6 * e[3]])[None]
    #                      P     t0    t1                       t2    t3    t4    t5
    a = metric[0, 1::2]
    b = metric[0, 2::2]
    assert torch.allclose(a @ b.T, torch.tensor([[0.0, 1.0, 0.0], [0.8, 0.0, 0.0], [0.0, 0.0, 0.6]]))
    m = bipartite_soft_matching(metric, r=2, protected=1, partition="patches")
    assert m.r == 2
    assert sorted(m.src_idx[0, :, 0].tolist()) == [0, 1]  # A tokens t0 and t2 merge
    assert m.unm_idx[0, :, 0].tolist() == [2]  # t4 survives
    # values: t0 = 1, t2 = 10, t4 = 100 on A; t1 = 2, t3 = 20, t5 = 200 on B; P = 7
    x = torch.tensor([7.0, 1, 2, 10, 20, 100, 200])[None, :, None]
    size = torch.tensor([1.0, 1, 1, 3, 1, 1, 1])[None, :, None]  # t2 already holds 3 patches
    merged, new_size = merge_wavg(m, x, size)
    # order: [P, survivors of A, B]; B: t1 <- t2, t3 <- t0, t5 alone
    assert new_size[0, :, 0].tolist() == [1, 1, 4, 2, 1]
    assert torch.allclose(merged[0, :, 0], torch.tensor([7.0, 100, (2 + 3 * 10) / 4, (20 + 1) / 2, 200]))
    src = merge_source(m, None, x)
    assert src[0, 3].tolist() == [0, 1, 0, 0, 1, 0, 0]  # the token at t3 now holds t0 and t3


def test_reference_rule_one_class_token_by_hand():
    """The reference rule alternates over the whole sequence: with a class token C at 0 and t_i at
    i + 1, A = C, t1, t3, t5 and B = t0, t2, t4. C equals t0 (the strongest edge of all) but never
    merges. Edges: t1 -> t4 (cos 1), t3 -> t0 (0.8), t5 -> t2 (0.6), other A-B pairs orthogonal.
    With r = 2, t1 -> t4 and t3 -> t0 merge; C and t5 survive."""
    e = torch.eye(6)
    metric = torch.stack([e[0], e[0], e[1], 0.6 * e[2] + 0.8 * e[4], 0.8 * e[0] + 0.6 * e[3], e[1], e[2]])[None]
    #                     C     t0    t1    t2                        t3                        t4    t5
    a, b = metric[0, 0::2], metric[0, 1::2]
    assert torch.allclose(a @ b.T, torch.tensor([[1.0, 0, 0], [0, 0, 1], [0.8, 0, 0], [0, 0.6, 0]]))
    m = bipartite_soft_matching(metric, r=2, protected=1)  # partition="reference" is the default
    assert m.partition == "reference" and m.r == 2
    assert sorted(zip(m.src_idx[0, :, 0].tolist(), m.dst_idx[0, :, 0].tolist())) == [(1, 2), (2, 0)]
    assert m.unm_idx[0, :, 0].tolist() == [0, 3]  # C and t5 survive
    # values: C = 7; t0..t5 = 1, 2, 10, 20, 100, 200; t3 already holds 3 patches
    x = torch.tensor([7.0, 1, 2, 10, 20, 100, 200])[None, :, None]
    size = torch.tensor([1.0, 1, 1, 1, 3, 1, 1])[None, :, None]
    merged, new_size = merge_wavg(m, x, size)
    # order: [C, A survivors (t5), B in order (t0 <- t3, t2, t4 <- t1)]
    assert new_size[0, :, 0].tolist() == [1, 1, 4, 1, 2]
    assert torch.allclose(merged[0, :, 0], torch.tensor([7.0, 200, (1 + 3 * 20) / 4, 10, (100 + 2) / 2]))
    src = merge_source(m, None, x)  # which input positions each output token holds
    assert src[0, 2].tolist() == [0, 1, 0, 0, 1, 0, 0] and src[0, 4].tolist() == [0, 0, 1, 0, 0, 1, 0]


def test_reference_rule_class_and_distillation_tokens_by_hand():
    """C at 0 (in A) and D at 1 (in B); t_i at i + 2: A = C, t0, t2; B = D, t1, t3. t0 equals D,
    which receives nothing: t0 goes to its next-best partner t3 (cos 0.6); t2 -> t1 (0.8). r = 2."""
    e = torch.eye(6)
    metric = torch.stack([e[4], e[0], e[0], e[1], 0.8 * e[1] + 0.6 * e[2], 0.6 * e[0] + 0.8 * e[3]])[None]
    #                     C     D     t0    t1    t2                        t3
    m = bipartite_soft_matching(metric, r=2, protected=2)
    assert sorted(zip(m.src_idx[0, :, 0].tolist(), m.dst_idx[0, :, 0].tolist())) == [(1, 2), (2, 1)]
    x = torch.tensor([5.0, 6, 1, 2, 10, 20])[None, :, None]
    merged, new_size = merge_wavg(m, x)
    assert merged[0, :, 0].tolist() == [5.0, 6, (2 + 10) / 2, (20 + 1) / 2]  # [C, D, t1 <- t2, t3 <- t0]
    assert new_size[0, :, 0].tolist() == [1, 1, 2, 2]


def test_reference_rule_keeps_register_tokens_in_front():
    """Class + 4 register tokens (positions 0-4: A holds 0, 2, 4, B holds 1, 3): however similar
    the patches are to them, none of the five merges or is merged into, and they come out first,
    in order, unchanged."""
    torch.manual_seed(0)
    metric = torch.randn(2, 5 + 16, 8)
    metric[:, 5:] = metric[:, :1] + 1e-3 * torch.randn(2, 16, 8)  # every patch ~ the class token
    x = torch.randn(2, 21, 3)
    m = bipartite_soft_matching(metric, r=8, protected=5)
    merged, size = merge_wavg(m, x)
    assert m.r == 8 and merged.shape == (2, 13, 3)
    assert torch.equal(merged[:, :5], x[:, :5]) and torch.equal(size[:, :5], torch.ones(2, 5, 1))
    assert torch.equal(merge_source(m, None, x)[:, :5, :5], torch.eye(5).expand(2, 5, 5))
    assert size.sum().item() == 2 * 21


def test_the_rules_differ_only_with_an_odd_prefix(x):
    """The two A/B rules split the patches alike where the prefix count is even (none; class +
    distillation): identical logits. With one class token they differ."""
    for make, differ in ((lambda: _vit(), True), (lambda: _vit(class_token=False, global_pool="avg"), False),
                         (_distilled, False), (lambda: _vit(reg_tokens=3), False), (lambda: _vit(reg_tokens=4), True)):
        a, b = tome.apply(make(), 4, partition="reference"), tome.apply(make(), 4, partition="patches")
        with torch.no_grad():
            diff = (a(x) - b(x)).abs().max().item()
        assert (diff > 1e-4) == differ, (make, diff)


def test_partition_is_recorded_and_old_checkpoints_keep_theirs(tmp_path, x):
    """A checkpoint records the rule; one written before the field existed loads with ``patches``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def tiny():
        return create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                            num_classes=5).eval()

    ref = tome.apply(tiny(), 4, partition="patches")
    folder = save_checkpoint(tmp_path / "ck", ref)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["tome"]["partition"] == "patches" and load_model(folder)._tome.partition == "patches"
    del meta["tome"]["partition"]  # as vitfab wrote it before the reference rule
    weights = folder / "model.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    save_file(tensors, str(weights), metadata={"vitfab": json.dumps(meta)})
    (folder / "meta.json").write_text(json.dumps(meta))
    old = load_model(folder)
    assert old._tome.partition == "patches"
    with torch.no_grad():
        assert torch.equal(old(x), ref(x))
    fresh = tome.apply(tiny(), 4)
    assert fresh._tome.partition == "reference" and tome.tome_info(fresh)["partition"] == "reference"
    tome.apply(old, 2)  # a new schedule on a patched model keeps its rule
    assert old._tome.partition == "patches"
    with pytest.raises(ToMeError, match="partition"):
        tome.apply(_vit(), 4, partition="halves")


def test_r_clipped_to_half():
    m = bipartite_soft_matching(torch.randn(2, 9, 4), r=100, protected=1)  # 8 mergeable
    assert m.r == 4


# --------------------------------------------------------------------------- schedules
def test_schedule_forms():
    assert Schedule.parse(8).per_layer(3) == [8, 8, 8]
    assert Schedule.parse("16:-1").per_layer(12)[0] == 32 and Schedule.parse("16:-1").per_layer(12)[-1] == 0
    lin = Schedule.parse((10, 0.5)).per_layer(5)
    assert lin[0] == 5 and lin[-1] == 15 and lin == sorted(lin)
    assert Schedule.parse("4/4/2").per_layer(5) == [4, 4, 2, 0, 0]
    assert Schedule.parse([1, 2]).describe() == "r=[1,2]"
    assert Schedule.parse((4, 4, 2)).per_layer(3) == [4, 4, 2]  # a longer tuple is a per-layer list
    for spec in (8, (16, -1), [4], [4, 2, 0], "keep=0.25", "macs=0.5"):
        s = Schedule.parse(spec)
        assert Schedule.parse(s.spec()) == s
    for bad in ("-1", "r", "keep=0", "macs=2", "16:-3", "tokens=0.5"):
        with pytest.raises(ScheduleError):
            Schedule.parse(bad)
    with pytest.raises(ScheduleError, match="model has 2"):
        Schedule.parse([1, 1, 1]).per_layer(2)


def test_token_counts_follow_schedule_and_clip():
    torch.manual_seed(0)
    model = tome.apply(timm.create_model("deit_small_patch16_224", depth=12).eval(), 16)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    # 197 tokens, 16 per layer; the last layer is clipped to half of the 20 remaining patches
    assert model._tome.tokens == [181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    assert tome.token_counts([16] * 12, 197, 1) == model._tome.tokens
    tome.set_schedule(model, [2, 0, 120])
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert model._tome.tokens[:3] == [195, 195, 98]  # 120 clipped to 194 // 2 = 97


def test_targets_resolve_against_the_model():
    from vitfab.measure import count_macs

    model = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8).eval()  # 65 tokens, 12 blocks
    full = count_macs(model)
    tome.apply(model, "macs=0.6")
    r = model._tome.r[0]
    assert count_macs(model) <= 0.62 * full  # measured MACs follow the analytic target
    tome.set_schedule(model, r - 1)
    assert count_macs(model) > 0.6 * full  # and r is the smallest that reaches it
    tome.apply(model, "keep=0.25")
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert abs(model._tome.tokens[-1] - 0.25 * 65) <= 4


# --------------------------------------------------------------------------- training, errors, checkpoints
def test_finetune_with_tome_improves_loss():
    torch.manual_seed(0)
    model = tome.apply(_vit(depth=2).train(), 4)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 5, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert model._tome.tokens == [13, 9]  # 17 -> 13 -> 9: merging was on throughout
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert losses[-1] < 0.5 * losses[0]


def test_unknown_block_or_model_is_refused():
    model = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, block_fn=
                              timm.models.vision_transformer.ResPostBlock)
    with pytest.raises(ToMeError, match="block type timm.models.vision_transformer.ResPostBlock"):
        tome.apply(model, 4)
    with pytest.raises(ToMeError, match="not Linear"):
        tome.apply(torch.nn.Linear(2, 2), 4)
    with pytest.raises(ToMeError, match="attention-pool"):
        tome.apply(_vit(global_pool="map"), 4)
    with pytest.raises(ToMeError, match="not patched"):
        tome.set_schedule(_vit(), 4)


def test_checkpoint_keeps_the_schedule(tmp_path, x):
    model = create_model("deit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, depth=2, embed_dim=64,
                         num_heads=2).eval()
    tome.apply(model, "3:-1")
    with torch.no_grad():
        ref = model(x)
    folder = save_checkpoint(tmp_path / "ck", model)
    assert json.loads((folder / "meta.json").read_text())["tome"]["r_per_layer"] == [6, 0]
    loaded = load_model(folder)
    assert tome.is_patched(loaded) and loaded._tome.r == [6, 0]
    with torch.no_grad():
        assert torch.allclose(loaded(x), ref, atol=1e-6)
    tome.remove(loaded)
    folder2 = save_checkpoint(tmp_path / "ck2", loaded)
    assert "tome" not in json.loads((folder2 / "meta.json").read_text())
    assert not tome.is_patched(load_model(folder2))


# --------------------------------------------------------------------------- command line
def test_visualize_command(capsys, tmp_path, synth_small):
    from PIL import Image

    from test_cli import run_cli

    model = create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                         classes=["a", "b"])
    ck = save_checkpoint(tmp_path / "ck", model)
    image = next((synth_small / "void").iterdir())
    out = tmp_path / "viz" / "merges.png"
    code, stdout, err = run_cli(capsys, "tome", "visualize", "--checkpoint", str(ck), "--image", str(image),
                                "--r", "3", "--out", str(out))
    assert code == 0, err
    assert "16 patches -> 10 tokens" in stdout  # 16 -> 13 -> 10 with r=3 in both blocks
    img = Image.open(out)
    assert img.size[0] > img.size[1] > 0  # image | groups side by side
    assert not tome.is_patched(model)


def test_groups_cover_every_patch():
    from vitfab.tome.visualize import patch_groups, render_groups
    import numpy as np

    model = create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                         classes=["a", "b"])
    groups, _ = patch_groups(model, torch.randn(1, 3, 32, 32), 4)
    assert groups.shape == (4, 4) and len(np.unique(groups)) == 16 - 8
    painted = render_groups(np.full((32, 32, 3), 100, np.uint8), groups)
    assert painted.shape == (32, 32, 3) and (painted == 255).any()  # borders drawn


def test_train_and_bench_with_tome(capsys, tmp_path, synth_small):
    from test_cli import run_cli

    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", str(synth_small), "--model", "deit_tiny_patch16_224",
                           "--img-size", "32", "--patch-size", "8", "--model-arg", "depth=2", "--model-arg",
                           "embed_dim=64", "--model-arg", "num_heads=2", "--epochs", "1", "--batch-size", "16",
                           "--tome-r", "4", "--amp", "off", "--out", str(out), "--no-progress")
    assert code == 0, err
    model = load_model(out)
    assert tome.is_patched(model) and model._tome.r == [4, 4]
    code, stdout, err = run_cli(capsys, "bench", "--checkpoint", str(out), "--tome-r", "none,0,2", "--repeats", "1",
                                "--min-repeat-seconds", "0.01", "--latency-runs", "2", "--no-energy", "--json",
                                "--no-progress")
    assert code == 0, err
    ms = json.loads(stdout)["measurements"]
    assert ms[0]["tome"] is None  # "none": the stock model, merging removed from the checkpoint
    assert [m["tome"]["r_per_layer"] for m in ms[1:]] == [[0, 0], [2, 2]]
    assert ms[0]["macs"] == ms[1]["macs"] > ms[2]["macs"] and ms[0]["accuracy"] is not None


def test_patched_model_pickles_and_copies(x, tmp_path):
    import copy
    import pickle

    model = tome.apply(_distilled(), 3)
    with torch.no_grad():
        ref = model(x)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert tome.is_patched(clone) and clone._tome is not model._tome
        assert clone.blocks[0]._tome is clone._tome  # blocks share the copy's state
        with torch.no_grad():
            assert torch.equal(clone(x), ref)


def test_gradient_checkpointing_is_refused(x):
    model = tome.apply(_vit().train(), 2)
    model.set_grad_checkpointing(True)
    with pytest.raises(ToMeError, match="gradient checkpointing"):
        model(x)


def test_fp16_merge_of_large_values_stays_finite():
    x = torch.full((1, 5, 2), 30000.0).half()  # sizes x values would exceed fp16's 65504
    m = bipartite_soft_matching(torch.randn(1, 5, 4), r=2, protected=1)
    merged, size = merge_wavg(m, x, torch.tensor([[[1.0], [3.0], [5.0], [2.0], [4.0]]]))
    assert merged.dtype == torch.float16 and torch.isfinite(merged).all()
    assert torch.allclose(merged.float(), torch.full_like(merged.float(), 30000.0))


@pytest.mark.parametrize("mode", ["bf16", "fp16", "int8"])
def test_tome_composes_with_precision_modes(mode, x):
    from vitfab.precision import prepare_model

    model = tome.apply(_vit(init_values=0.1), 4)
    with torch.no_grad():
        ref = model(x)
        out = prepare_model(model, mode, "cpu")(x)
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 2 / 3
