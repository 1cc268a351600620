"""What ToMe's own work costs in the forward pass: a ToMe model against (a) the same model without
proportional attention and (b) one whose "merge" drops the last r tokens instead (the same token
counts, so the same GEMM shapes, but no matching, no weighted merge, no attention bias), and the
stock model; all interleaved in one run on the CPU, batch 16, 224 px, random weights.

  ToMe's own work = 1 - img/s(ToMe) / img/s(tokens dropped)   (bias and matching+merge apart)
  the remaining gap = img/s(tokens dropped) / img/s(stock) / MACs ratio  (kernel efficiency at
                      fewer tokens: what no merging code can change)

    PYTHONPATH=src python benchmarks/tome_own_cost.py deit_small_patch16_224 bf16 "8;16;(16,-1)"
"""

import sys

import torch

import vitfab.tome.patch as patch
from vitfab import tome
from vitfab.measure import Timed, count_macs, measure_speed
from vitfab.models import create_model
from vitfab.precision import prepare_model

REAL_MATCH, REAL_WAVG = patch.bipartite_soft_matching, patch.merge_wavg
DROPPING = {"on": False}


class Drop:
    def __init__(self, r: int):
        self.r = r


def matching(metric, r, protected=0, partition="reference"):
    if DROPPING["on"]:
        return Drop(patch.clip_r(r, metric.shape[1], protected))
    return REAL_MATCH(metric, r, protected, partition)


def wavg(m, x, size=None):
    if isinstance(m, Drop):
        n = x.shape[1] - m.r
        return x[:, :n], (size[:, :n] if size is not None else None)
    return REAL_WAVG(m, x, size)


patch.bipartite_soft_matching, patch.merge_wavg = matching, wavg


class Mode(torch.nn.Module):
    def __init__(self, model, dropping: bool):
        super().__init__()
        self.model, self.dropping = model, dropping

    def forward(self, x):
        DROPPING["on"] = self.dropping
        return self.model(x)


def main(name: str, precision: str, schedules: list, repeats: int = 5, seconds: float = 1.0) -> None:
    stock = create_model(name).eval()
    stock_macs = count_macs(stock)
    items, macs = [Timed(prepare_model(stock, precision, "cpu"), (224, 224), 16)], []
    for r in schedules:
        variants = [(True, False), (False, False), (False, True)]  # (prop_attn, dropping)
        for prop, dropping in variants:
            m = tome.apply(create_model(name).eval(), r, prop_attn=prop)
            items.append(Timed(Mode(prepare_model(m, precision, "cpu"), dropping), (224, 224), 16))
        macs.append(count_macs(m))
    sp = measure_speed(items, "cpu", repeats, seconds, latency_runs=0)
    s0 = sp[0].img_per_s
    for i, r in enumerate(schedules):
        t, n, d = (sp[1 + 3 * i + k].img_per_s for k in range(3))
        ratio = stock_macs / macs[i]
        print(f"{name} {precision} r={r}: stock {s0:.1f}, ToMe {t:.1f}, no prop-attn {n:.1f}, tokens dropped {d:.1f} "
              f"img/s | ToMe's own work {100 * (1 - t / d):.1f} % (bias {100 * (1 - t / n):.1f}, matching + merge "
              f"{100 * (1 - n / d):.1f}) | speedup/MACs ratio: ToMe {t / s0 / ratio:.3f}, tokens dropped "
              f"{d / s0 / ratio:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [eval(v) for v in sys.argv[3].split(";")],
         *([int(sys.argv[4])] if len(sys.argv) > 4 else []))
