"""What weight selection keeps before any training: a trained ViT selected into the tiny space's
supernet (uniform vs leading indices; extra blocks as identity vs a repeated neighbour), and the
validation top-1 of a few of its subnets on the source's own classes, against the source itself.

    PYTHONPATH=src python benchmarks/weight_selection.py SOURCE_CHECKPOINT DATA_DIR

SOURCE_CHECKPOINT: a vitfab training run or checkpoint (e.g. a ViT trained on a large synthetic
set); DATA_DIR: the data it was trained on (its seeded split's validation images are used).
"""

import sys

import numpy as np
import torch

from vitfab.evaluate.runner import collect_logits, make_eval_loader
from vitfab.models.arch import ArchConfig
from vitfab.nas import SupernetConfig, build_supernet
from vitfab.nas.train import select_into_supernet
from vitfab.runtimes import load_model
from vitfab.train import TrainConfig
from vitfab.train.loop import prepare_split


def top1(model, loader) -> float:
    logits, targets = collect_logits(model, loader, torch.device("cpu"), progress=False)
    return float((logits.argmax(1) == targets).mean())


def main(source_path: str, data: str) -> None:
    source = load_model(source_path).eval()
    meta = source.vitfab_meta
    size, patch = meta.preprocess.img_size, source.patch_embed.patch_size[0]
    split = prepare_split(TrainConfig(data=data), progress=False)
    assert split.classes == meta.classes, "the data's classes differ from the source's"
    loader = make_eval_loader(split.root, split.val, meta.preprocess, 64)
    print(f"source: embed {source.embed_dim}, depth {len(source.blocks)}, {size} px, patch {patch}; "
          f"{len(split.val)} validation images; val top-1 {100 * top1(source, loader):.1f} %")
    cfg = SupernetConfig(data=data, img_size=size, patch_size=patch, drop_path=0.0)
    rows = []
    for method in ("uniform", "leading"):
        for extra in ("identity", "repeat"):
            net = build_supernet(cfg, meta.classes, with_weights=False)
            select_into_supernet(net, source, extra, method)
            sp = net.space
            archs = {"largest (240, d14)": sp.largest(), "smallest (192, d12)": sp.smallest(),
                     "240 wide, d12": ArchConfig(240, 12, (4,) * 12, (4.0,) * 12)}
            scores = {}
            for label, arch in archs.items():
                net.set_arch(arch)
                scores[label] = top1(net.eval(), loader)
            rows.append((method, extra, scores))
    labels = list(rows[0][2])
    print("| selection | extra blocks | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for method, extra, scores in rows:
        print(f"| {method} | {extra} | " + " | ".join(f"{100 * scores[k]:.1f}" for k in labels) + " |")
    print(f"(chance {100 / len(meta.classes):.1f} %; numpy {np.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
