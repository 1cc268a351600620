import pickle

import pytest
import torch
from safetensors.torch import save_file

import vitfab
from vitfab.errors import CheckpointError, VitfabError
from vitfab.models import create_model, save_checkpoint
from vitfab.runtimes import load_model

ARCH = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


def _logits(model, seed=0, size=32):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, size, size))


def test_overrides_reach_timm():
    m = create_model("deit_tiny_patch16_224", num_classes=5, **ARCH)
    assert m.patch_embed.img_size == (32, 32) and m.patch_embed.patch_size == (8, 8)
    assert len(m.blocks) == 2 and m.embed_dim == 64 and m.num_classes == 5
    assert m.pos_embed.shape == (1, 1 + 16, 64)
    assert m.vitfab_meta.preprocess.img_size == 32
    assert isinstance(m, __import__("timm").models.vision_transformer.VisionTransformer)


def test_reference_baseline_is_deit_b16():
    m = create_model()  # the default is the reference baseline
    n = sum(p.numel() for p in m.parameters())
    assert m.vitfab_meta.name == "deit_base_patch16_224"
    assert abs(n - 86.6e6) / 86.6e6 < 0.005  # REFERENCE_NUMBERS.md: 86.6M
    assert len(m.vitfab_meta.classes) == 1000 and m.vitfab_meta.classes[0] == "n01440764"


def test_unknown_and_non_vit_models():
    with pytest.raises(VitfabError, match="unknown timm model.*deit_tiny_patch16_224"):
        create_model("deit_tinny_patch16_224")
    cnn = create_model("resnet18", num_classes=2, img_size=32)  # references: any timm classifier
    assert cnn.vitfab_meta.preprocess.img_size == 32 and "img_size" not in cnn.vitfab_meta.kwargs
    assert cnn.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    from vitfab import tome
    with pytest.raises(VitfabError, match="ToMe patches timm VisionTransformer models, not ResNet"):
        tome.apply(cnn, 4)


def test_checkpoint_roundtrip_reproduces_logits(tmp_path):
    m = create_model("deit_tiny_patch16_224", classes=["good", "void", "crack"], **ARCH)
    save_checkpoint(tmp_path / "ck", m, {"epoch": 4})
    for path in (tmp_path / "ck", tmp_path / "ck" / "model.safetensors"):
        m2 = vitfab.load_model(path)
        assert not m2.training
        assert torch.equal(_logits(m), _logits(m2))
        assert m2.vitfab_meta.classes == ["good", "void", "crack"]
        assert m2.vitfab_meta.extra["epoch"] == 4


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_wrapped"])
def test_local_weights_same_classes(tmp_path, fmt):
    src = create_model("deit_tiny_patch16_224", num_classes=4, **ARCH)
    sd = src.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"model": sd} if fmt == "pth_wrapped" else sd, path)
    m = create_model("deit_tiny_patch16_224", num_classes=4, weights=path, **ARCH)
    assert torch.equal(_logits(src), _logits(m))


def test_head_reinitialised_when_class_count_differs(tmp_path):
    src = create_model("deit_tiny_patch16_224", num_classes=1000, **ARCH)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    m = create_model("deit_tiny_patch16_224", num_classes=6, weights=tmp_path / "w.pt", **ARCH)
    assert m.head.weight.shape == (6, 64)
    assert torch.equal(m.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    # the features are those of the source model
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m.eval().forward_features(x), src.eval().forward_features(x))


def test_position_embedding_resized_to_new_image_size(tmp_path):
    src = create_model("deit_tiny_patch16_224", num_classes=3, **ARCH)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    arch = dict(ARCH, img_size=48)
    m = create_model("deit_tiny_patch16_224", num_classes=3, weights=tmp_path / "w.pt", **arch)
    assert m.pos_embed.shape == (1, 1 + 36, 64)
    assert torch.equal(m.pos_embed[:, :1], src.pos_embed[:, :1])  # class token position kept
    assert _logits(m, size=48).isfinite().all()


class Evil:
    def __reduce__(self):
        return (print, ("this would have run code",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    with pytest.raises(CheckpointError, match="refusing to load"):
        create_model("deit_tiny_patch16_224", num_classes=2, weights=path, **ARCH)


def test_weights_that_do_not_fit(tmp_path):
    src = create_model("deit_tiny_patch16_224", num_classes=2, **dict(ARCH, embed_dim=32))
    torch.save(src.state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        create_model("deit_tiny_patch16_224", num_classes=2, weights=tmp_path / "w.pt", **ARCH)
    with pytest.raises(CheckpointError, match="not found"):
        create_model("deit_tiny_patch16_224", weights=tmp_path / "missing.pt", **ARCH)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        create_model("deit_tiny_patch16_224", weights=tmp_path / "junk.safetensors", **ARCH)


def test_load_model_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing")
    plain = create_model("deit_tiny_patch16_224", num_classes=2, **ARCH)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="no vitfab metadata"):
        load_model(tmp_path / "plain.safetensors")


def test_pretrained_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="--weights"):
        create_model("deit_tiny_patch16_224", pretrained=True)
