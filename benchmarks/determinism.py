"""A tiny main job with --budget-minutes 0 and fixed epochs; writes OUT/behaviour.json: the
search's evaluated candidates, the joint search's validation accuracies and a hash of every
trained model's tensors. Run it before and after a change with the same seed and compare the two
files (`cmp`): identical means the change kept the behaviour (speeds are not in the file).

    PYTHONPATH=src python benchmarks/determinism.py /tmp/before   # on the old version
    PYTHONPATH=src python benchmarks/determinism.py /tmp/after    # on the new one
    cmp /tmp/before/behaviour.json /tmp/after/behaviour.json
"""

import hashlib
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from vitfab.optimize import JobConfig, run_job


def tensors_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(load_file(str(path)).items()):
        digest.update(key.encode())
        digest.update(value.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def main(out: Path) -> None:
    cfg = JobConfig(n_per_class=24, img_size=32, patch_size=8, baseline_model="deit_tiny_patch16_224",
                    min_reduction=1.0, baseline_epochs=2, supernet_epochs=3, finetune_epochs=1, final_epochs=1,
                    batch_size=16, budget_minutes=0, top_k=2, tome_grid="none,macs=0.5,4", measure_seconds=0.02,
                    speed_at_224=False, device="cpu", distill="soft")
    run = out / "run"
    run_job(cfg, out=run, progress=False)
    search = json.loads((run / "search" / "state.json").read_text())
    joint = json.loads((run / "joint" / "candidates.json").read_text())
    res = {"search": sorted((c["arch"]["EMBED_DIM"], c["arch"]["DEPTH"], c["arch"]["NUM_HEADS"],
                             c["arch"]["MLP_RATIO"], c["accuracy"]) for c in search["evaluated"]),
           "joint": sorted((c["key"], c["accuracy"], c["error"]) for c in joint),
           "weights": {str(p.relative_to(run)): tensors_hash(p)
                       for p in sorted(run.glob("**/checkpoints/best/model.safetensors"))
                       if not str(p).startswith(str(run / "final"))}}  # final: which candidate won is speed's call
    (out / "behaviour.json").write_text(json.dumps(res, indent=1))
    print(f"{len(res['search'])} search candidates, {len(res['joint'])} joint candidates -> {out / 'behaviour.json'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
