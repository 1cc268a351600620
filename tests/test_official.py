"""Released AutoFormer supernets: a checkpoint in the authors' layout (random weights) must give
the logits of an independent implementation of their forward pass, through the vitfab supernet,
the extracted standalone model, a save/load round trip and ToMe at r=0."""

import argparse

import pytest
import torch
import torch.nn.functional as F
import yaml

from vitfab import tome
from vitfab.errors import CheckpointError
from vitfab.measure import count_macs, count_params
from vitfab.models import create_model
from vitfab.runtimes import load_model
from vitfab.models.arch import ArchConfig
from vitfab.models.weights import load_weights
from vitfab.nas import extract_subnet, load_official_autoformer, published_arch
from vitfab.nas.extract import extract_to

from test_cli import run_cli

# a small space in the released shape: 32 px with 2 px patches = a 16 x 16 grid, so offsets up
# to 15 exercise the clip at 14
SPACE = {"SUPERNET": {"EMBED_DIM": 128, "DEPTH": 3, "NUM_HEADS": 2, "MLP_RATIO": 4.0},
         "SEARCH_SPACE": {"EMBED_DIM": [64, 128], "DEPTH": [2, 3], "NUM_HEADS": [1, 2], "MLP_RATIO": [3.0, 4.0]},
         "IMG_SIZE": 32, "PATCH_SIZE": 2}
M = 14  # max relative distance of the released models


def official_state(classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    e, d, h, r = 128, 3, 2, 4.0
    n = (32 // 2) ** 2 + 1

    def t(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    sd = {"cls_token": t(1, 1, e, std=0.5), "pos_embed": t(1, n, e, std=0.5),
          "patch_embed_super.proj.weight": t(e, 3, 2, 2, std=0.3), "patch_embed_super.proj.bias": t(e),
          "norm.weight": 1 + t(e), "norm.bias": t(e), "head.weight": t(classes, e), "head.bias": t(classes)}
    for i in range(d):
        p = f"blocks.{i}."
        sd |= {p + "attn.qkv.weight": t(3 * h * 64, e, std=0.1), p + "attn.qkv.bias": t(3 * h * 64, std=0.1),
               p + "attn.proj.weight": t(e, h * 64), p + "attn.proj.bias": t(e),
               p + "attn_layer_norm.weight": 1 + t(e), p + "attn_layer_norm.bias": t(e),
               p + "ffn_layer_norm.weight": 1 + t(e), p + "ffn_layer_norm.bias": t(e),
               p + "fc1.weight": t(int(e * r), e), p + "fc1.bias": t(int(e * r)),
               p + "fc2.weight": t(e, int(e * r)), p + "fc2.bias": t(e)}
        for kv in "kv":
            for vh in "vh":
                sd[p + f"attn.rel_pos_embed_{kv}.embeddings_table_{vh}"] = t(2 * M + 2, 64, std=0.3)
    return sd


def reference_logits(sd, arch: ArchConfig, x):
    """The authors' forward pass, written out from their description (slow and direct)."""
    e, B = arch.embed_dim, x.shape[0]
    t = F.conv2d(x, sd["patch_embed_super.proj.weight"][:e], sd["patch_embed_super.proj.bias"][:e], stride=2)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"][..., :e].expand(B, -1, -1), t], 1) + sd["pos_embed"][..., :e]
    N = t.shape[1]
    side = int((N - 1) ** 0.5)
    idx = torch.arange(N - 1)
    rows, cols = idx // side, idx % side
    iv = F.pad((rows[None, :] - rows[:, None]).clamp(-M, M) + M + 1, (1, 0, 1, 0))  # [query, key]
    ih = F.pad((cols[None, :] - cols[:, None]).clamp(-M, M) + M + 1, (1, 0, 1, 0))

    def ln(y, name):
        return F.layer_norm(y, (e,), sd[name + ".weight"][:e], sd[name + ".bias"][:e], 1e-5)

    for i in range(arch.depth):
        p, h = f"blocks.{i}.", arch.num_heads[i]
        a = h * 64
        y = ln(t, p + "attn_layer_norm")
        w = sd[p + "attn.qkv.weight"][:, :e]
        w = torch.cat([w[j:3 * a:3] for j in range(3)])  # change_qkv: interleaved rows
        qkv = F.linear(y, w, sd[p + "attn.qkv.bias"][:3 * a]).reshape(B, N, 3, h, 64).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        s = (a // h) ** -0.5
        rk = sd[p + "attn.rel_pos_embed_k.embeddings_table_v"][iv] + sd[p + "attn.rel_pos_embed_k.embeddings_table_h"][ih]
        rv = sd[p + "attn.rel_pos_embed_v.embeddings_table_v"][iv] + sd[p + "attn.rel_pos_embed_v.embeddings_table_h"][ih]
        attn = (q @ k.transpose(-2, -1)) * s + torch.einsum("bhnd,nmd->bhnm", q, rk) * s
        attn = attn.softmax(-1)
        o = attn @ v + torch.einsum("bhnm,nmd->bhnd", attn, rv)
        o = o.transpose(1, 2).reshape(B, N, a)
        t = t + F.linear(o, sd[p + "attn.proj.weight"][:e, :a], sd[p + "attn.proj.bias"][:e])
        hid = int(e * arch.mlp_ratio[i])
        y = F.gelu(F.linear(ln(t, p + "ffn_layer_norm"), sd[p + "fc1.weight"][:hid, :e], sd[p + "fc1.bias"][:hid]))
        t = t + F.linear(y, sd[p + "fc2.weight"][:e, :hid], sd[p + "fc2.bias"][:e])
    t = ln(t, "norm")
    return F.linear(t[:, 1:].mean(1), sd["head.weight"][:, :e], sd["head.bias"])


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    sd = official_state()
    torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 499,
                "args": argparse.Namespace(change_qkv=True, relative_position=True, gp=True)},
               root / "supernet.pth")
    return root, sd


ARCHS = [ArchConfig(128, 3, (2, 2, 2), (4.0, 4.0, 4.0)),  # the whole supernet
         ArchConfig(64, 2, (1, 1), (3.0, 3.0)),  # one head: the bias blocks move
         ArchConfig(128, 3, (1, 2, 1), (3.0, 4.0, 3.0))]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.short())
def test_supernet_and_extracted_model_match_the_authors_forward(official, arch, tmp_path):
    root, sd = official
    net = load_official_autoformer(root / "supernet.pth", root / "space.yaml")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = reference_logits(sd, arch, x)
    net.set_arch(arch)
    with torch.no_grad():
        assert torch.allclose(net(x), ref, atol=1e-5)
        model = extract_subnet(net, arch)
        assert torch.allclose(model(x), ref, atol=1e-5)
        loaded = load_model(extract_to(net, arch, tmp_path / "sub"))
        assert torch.allclose(loaded(x), ref, atol=1e-5)
        tome.apply(loaded, 0)  # ToMe at r=0 on the relative-position model
        assert torch.allclose(loaded(x), ref, atol=1e-5)


def test_tome_on_relative_position_model(official):
    root, _ = official
    net = load_official_autoformer(root / "supernet.pth", root / "space.yaml")
    model = extract_subnet(net, ARCHS[0])
    x = torch.randn(2, 3, 32, 32)
    tome.apply(model, 40, trace_source=True)
    with torch.no_grad():
        out = model(x)
    st = model._tome
    assert torch.isfinite(out).all() and st.tokens == [217, 177, 137]
    # a merged token's position is the size-weighted mean of its patches' grid coordinates
    side = 16
    grid = torch.stack([torch.arange(256) // side, torch.arange(256) % side], -1).float()
    src = st.source[:, 1:, 1:]
    expected = (src @ grid) / src.sum(-1, keepdim=True)
    assert torch.allclose(st.positions[:, 1:], expected, atol=1e-4)
    assert (st.positions[:, 1:] != st.positions[:, 1:].round()).any()  # fractional offsets are in use


def test_finetune_at_another_resolution_keeps_relative_tables(official, tmp_path):
    root, _ = official
    net = load_official_autoformer(root / "supernet.pth", root / "space.yaml")
    arch = ARCHS[2]
    folder = extract_to(net, arch, tmp_path / "sub")
    src = load_model(folder)
    kwargs = {k: v for k, v in src.vitfab_meta.kwargs.items() if k not in ("img_size", "num_classes")}
    model = create_model("vitfab_subnet", img_size=16, classes=["ok", "void", "crack"], **kwargs)
    kept = load_weights(model, folder / "model.safetensors")
    assert model.pos_embed.shape[1] == (16 // 2) ** 2 + 1  # absolute embedding interpolated
    assert set(kept) == {"head.weight", "head.bias"}  # head replaced (3 classes instead of 10)
    assert torch.equal(model.blocks[1].attn.rel_k_h, src.blocks[1].attn.rel_k_h)  # tables kept
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 16, 16))).all()


def test_published_subnets_params_and_macs():
    """Paper: AutoFormer-T 5.7M / 1.3 G, -S 22.9M / 5.1 G, -B 54M / 11 G (224 px, 1000 classes)."""
    expect = {"T": (5.7e6, 1.3e9), "S": (22.9e6, 5.1e9), "B": (54e6, 11e9)}
    for name, (p_ref, m_ref) in expect.items():
        arch = published_arch(name)
        model = create_model("vitfab_subnet", num_classes=1000, global_pool="avg", rel_pos=M, ln_eps=1e-5,
                             embed_dim=arch.embed_dim, depth=arch.depth, num_heads=list(arch.num_heads),
                             mlp_ratio=list(arch.mlp_ratio))
        params, macs = count_params(model), count_macs(model)
        assert abs(params - p_ref) / p_ref < 0.04, (name, params)
        assert abs(macs - m_ref) / m_ref < 0.06, (name, macs)


def test_wrong_space_or_file_is_a_clear_error(official, tmp_path, capsys):
    root, _ = official
    with pytest.raises(CheckpointError, match="does not match the 'tiny' supernet"):
        load_official_autoformer(root / "supernet.pth", "tiny")
    (tmp_path / "x.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_official_autoformer(tmp_path / "x.pth")
    code, out, err = run_cli(capsys, "nas", "extract", "--official-checkpoint", str(root / "supernet.pth"), "--space",
                             str(root / "space.yaml"), "--subnet", str(tmp_path / "none.yaml"), "--out",
                             str(tmp_path / "o"))
    assert code == 2 and "YAML file not found" in err


def test_extract_cli_with_published_name(official, tmp_path, capsys):
    """The shipped AutoFormer-T YAML names a subnet the small test space cannot hold: refused."""
    root, _ = official
    code, _, err = run_cli(capsys, "nas", "extract", "--official-checkpoint", str(root / "supernet.pth"), "--space",
                           str(root / "space.yaml"), "--subnet", "AutoFormer-T", "--out", str(tmp_path / "o"))
    assert code == 2 and "does not fit the supernet" in err
    arch = ARCHS[1]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"RETRAIN": arch.to_dict()}))
    code, out, err = run_cli(capsys, "nas", "extract", "--official-checkpoint", str(root / "supernet.pth"), "--space",
                             str(root / "space.yaml"), "--subnet", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert load_model(tmp_path / "o").vitfab_meta.kwargs["rel_pos"] == M


def test_train_from_an_extracted_checkpoint_at_another_size(official, tmp_path, capsys, synth_small):
    root, _ = official
    net = load_official_autoformer(root / "supernet.pth", root / "space.yaml")
    folder = extract_to(net, ARCHS[1], tmp_path / "sub")
    code, _, err = run_cli(capsys, "train", "--data", str(synth_small), "--init-checkpoint", str(folder),
                           "--img-size", "16", "--epochs", "1", "--batch-size", "16", "--amp", "off",
                           "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 0, err
    model = load_model(tmp_path / "run")
    assert model.vitfab_meta.kwargs["rel_pos"] == M and model.vitfab_meta.kwargs["ln_eps"] == 1e-5
    assert model.pos_embed.shape[1] == (16 // 2) ** 2 + 1 and model.head.out_features == 7


def test_each_quirk_matters(official):
    """The parity above is not an accident: dropping a quirk changes the logits. (LayerNorm's eps
    1e-5 vs 1e-6 is reproduced too but moves these logits by less than 1e-4.)"""
    from vitfab.models.supernet import Supernet
    from vitfab.nas.official import official_space, official_to_vitfab

    root, sd = official
    arch = ARCHS[1]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = reference_logits(sd, arch, x)
    variants = {"blocked qkv rows": dict(qkv_layout="blocked", ln_eps=1e-5, global_pool="avg", rel_pos=M),
                "no relative position": dict(qkv_layout="interleaved", ln_eps=1e-5, global_pool="avg", rel_pos=0),
                "class-token pooling": dict(qkv_layout="interleaved", ln_eps=1e-5, global_pool="token", rel_pos=M)}
    for name, kw in variants.items():
        net = Supernet(official_space(root / "space.yaml"), 10, drop_path_rate=0.0, **kw).eval()
        net.load_state_dict(official_to_vitfab(sd), strict=kw["rel_pos"] > 0)
        net.set_arch(arch)
        with torch.no_grad():
            assert (net(x) - ref).abs().max() > 1e-4, name


def test_init_checkpoint_from_a_training_run(tmp_path, capsys, synth_small):
    """A checkpoint made by `vitfab train` (its kwargs carry drop_path_rate) fine-tunes too."""
    args = ["--data", str(synth_small), "--img-size", "32", "--patch-size", "8", "--model-arg", "depth=1",
            "--model-arg", "embed_dim=32", "--model-arg", "num_heads=2", "--epochs", "1", "--batch-size", "16",
            "--amp", "off", "--no-progress"]
    code, _, err = run_cli(capsys, "train", *args, "--out", str(tmp_path / "a"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--data", str(synth_small), "--init-checkpoint", str(tmp_path / "a"),
                           "--epochs", "1", "--batch-size", "16", "--amp", "off", "--out", str(tmp_path / "b"),
                           "--no-progress")
    assert code == 0, err
    model = load_model(tmp_path / "b")
    assert model.embed_dim == 32 and model.patch_embed.img_size[0] == 32  # size inherited too
    code, _, err = run_cli(capsys, "train", "--data", str(synth_small), "--init-checkpoint", str(tmp_path / "a"),
                           "--arch", str(tmp_path / "x.yaml"), "--no-progress")
    assert code == 2 and "brings its own architecture" in err
