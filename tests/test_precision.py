"""vitfab.precision: each mode reproduces fp32, the NaN guard, and auto's choice."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from vitfab.models import create_model
from vitfab.precision import (
    Precision,
    PrecisionError,
    PrecisionTrial,
    candidate_precisions,
    check_finite,
    choose_precision,
    parse_precision,
    prepare_model,
    unsupported_reason,
)
from vitfab.measure import select_precision

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_model("deit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, depth=2, embed_dim=64,
                        num_heads=2).eval()


@pytest.fixture(scope="module")
def batch():
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_parse_and_support():
    assert parse_precision("BF16") is Precision.BF16
    assert parse_precision("auto") == "auto"
    with pytest.raises(PrecisionError, match="unknown precision 'fp8'"):
        parse_precision("fp8")
    with pytest.raises(PrecisionError, match="unknown precision 'auto'"):
        parse_precision("auto", allow_auto=False)
    assert "CPUs" in unsupported_reason(Precision.INT8, torch.device("cuda"))
    modes = candidate_precisions(CPU)
    assert modes[0] is Precision.FP32 and {Precision.BF16, Precision.FP16} <= set(modes)


@pytest.mark.parametrize("mode,atol", [("fp32", 0.0), ("bf16", 0.15), ("fp16", 0.02), ("int8", 0.15)])
def test_modes_reproduce_fp32_logits(tiny, batch, mode, atol):
    ref = tiny(batch)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    m = prepare_model(tiny, mode, CPU)
    with torch.inference_mode():
        out = m(batch)
    assert isinstance(m, VisionTransformer) and m.vitfab_precision == mode
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.allclose(out, ref, atol=atol, rtol=0), (out - ref).abs().max()
    # the caller's model is untouched
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert tiny.head.weight.dtype == torch.float32


def test_half_modes_keep_norms_in_fp32(tiny):
    m = prepare_model(tiny, "fp16", CPU)
    assert m.blocks[0].attn.qkv.weight.dtype == torch.float16
    assert m.blocks[0].norm1.weight.dtype == torch.float32 and m.norm.weight.dtype == torch.float32
    a = prepare_model(tiny, "bf16", CPU, method="autocast")
    assert a.blocks[0].attn.qkv.weight.dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(a(x), tiny(x), atol=0.15)


def test_int8_quantises_every_linear(tiny):
    m = prepare_model(tiny, "int8", CPU)
    assert not any(type(mod) is torch.nn.Linear for mod in m.modules())
    assert sum(type(mod).__module__.startswith("torch.ao") and type(mod).__name__ == "Linear"
               for mod in m.modules()) == sum(
        isinstance(mod, torch.nn.Linear) for mod in tiny.modules())


def _overflowing(tiny):
    """A model whose logits exceed fp16's range (65504) but are fine in fp32 and bf16."""
    m = create_model("deit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, depth=2, embed_dim=64,
                     num_heads=2).eval()
    m.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        m.head.weight.mul_(1e6)
    return m


def test_nan_guard_rejects_overflowing_fp16(tiny, batch):
    m = _overflowing(tiny)
    with torch.inference_mode():
        assert torch.isfinite(m(batch)).all()
        with pytest.raises(PrecisionError, match="fp16 gives non-finite logits .* use fp32 or bf16"):
            check_finite(prepare_model(m, "fp16", CPU)(batch), "fp16")
        check_finite(prepare_model(m, "bf16", CPU)(batch), "bf16")


def test_choose_precision_rule():
    trials = [
        PrecisionTrial("fp32", accuracy=0.90, img_per_s=100),
        PrecisionTrial("bf16", accuracy=0.895, img_per_s=180),
        PrecisionTrial("int8", accuracy=0.80, img_per_s=300),  # fastest but too inaccurate
        PrecisionTrial("fp16", error="fp16 gives non-finite logits"),
    ]
    choice = choose_precision(trials, tolerance=0.01)
    assert choice.precision is Precision.BF16
    verdict = {t.precision: t.accepted for t in choice.trials}
    assert verdict == {"fp32": True, "bf16": True, "int8": False, "fp16": False}
    assert "points below fp32" in choice.trials[2].reason
    assert choose_precision(trials, tolerance=0.2).precision is Precision.INT8
    with pytest.raises(PrecisionError, match="fp32"):
        choose_precision(trials[1:])


def _loader(model, n=32):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, 32, 32, generator=g)
    with torch.inference_mode():
        y = model(x).argmax(1)  # labels = fp32's answers: fp32 scores 100 %
    return DataLoader(TensorDataset(x, y), batch_size=16)


def test_select_precision_measures_and_picks_fastest_accepted(tiny):
    choice = select_precision(tiny, _loader(tiny), CPU, tolerance=0.05, repeats=2, min_repeat_seconds=0.05,
                              progress=False)
    by = {t.precision: t for t in choice.trials}
    assert set(by) == {p.value for p in candidate_precisions(CPU)}
    assert by["fp32"].accuracy == 1.0 and by["fp32"].accepted
    assert all(t.img_per_s > 0 and t.accuracy is not None for t in choice.trials)
    accepted = [t for t in choice.trials if t.accepted]
    assert choice.precision.value == max(accepted, key=lambda t: t.img_per_s).precision
    for t in choice.trials:
        assert t.accepted == (t.accuracy >= 1.0 - 0.05)


def test_select_precision_rejects_nan_mode(tiny):
    m = _overflowing(tiny)
    choice = select_precision(m, _loader(m, 16), CPU, candidates=["fp32", "fp16"], repeats=1,
                              min_repeat_seconds=0.01, progress=False)
    fp16 = next(t for t in choice.trials if t.precision == "fp16")
    assert not fp16.accepted and "non-finite" in fp16.reason
    assert choice.precision is Precision.FP32
