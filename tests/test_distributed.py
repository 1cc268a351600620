"""The main job under torchrun: two gloo processes on the CPU against one process, and a rank
killed in the middle of the supernet training that ``--resume`` finishes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A tiny job in which nothing random differs between one process and two: no drop-path, one
# augmentation stream per image (ShareSampler), no BatchNorm reference (its statistics would be
# over each process's share), 42 training images = 3 global batches of 14 (7 per process).
def job(supernet_epochs: int = 2) -> list[str]:
    return ["run", "--n-per-class", "8", "--img-size", "32", "--patch-size", "8", "--baseline-model",
            "deit_tiny_patch16_224", "--min-reduction", "1", "--baseline-epochs", "1", "--supernet-epochs",
            str(supernet_epochs), "--finetune-epochs", "1", "--final-epochs", "1", "--references", "none", "--embed",
            "patch", "--batch-size", "14", "--budget-minutes", "0", "--top-k", "2", "--tome-grid", "none,macs=0.5",
            "--measure-seconds", "0.02", "--no-speed-at-224", "--device", "cpu", "--runtimes", "torch",
            "--no-tome-search", "--drop-path", "0", "--no-progress"]


TRAINED = ("baseline", "supernet", "finetune/subnet-1", "finetune/subnet-2", "final")
# bf16 autocast on this CPU: the same training in one process and in two (where only the order of
# float sums differs) ends within ~5e-4 of the same validation loss; each process taking the same
# half of every batch instead of its own share moves it by 0.04-0.24
LOSS_TOLERANCE = 3e-3


def _env(extra_path: Path | None = None) -> dict[str, str]:
    path = [str(extra_path)] if extra_path else []
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join(path + [str(REPO / "src")]))


def _vitfab(args: list[str], processes: int, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
              if processes > 1 else [sys.executable])
    t0 = time.perf_counter()
    done = subprocess.run([*launch, "-m", "vitfab", *args], env=env, capture_output=True, text=True, timeout=900)
    return done, time.perf_counter() - t0


def _metrics(run: Path, folder: str) -> list[dict]:
    return [json.loads(line) for line in (run / folder / "metrics.jsonl").read_text().splitlines()]


HELPERS = """
from vitfab.errors import VitfabError
from vitfab.runtime import PeerFailed, init_distributed, map_shards, on_main, processes, set_collective_timeout, world

rank, n = init_distributed("cpu")
set_collective_timeout(120)
assert (n, processes()) == (2, 2)
shared = map_shards(lambda x: (x * x, world()[0]), range(5))
assert shared == [(0, 0), (1, 1), (4, 0), (9, 1), (16, 0)], shared  # rank r computes items r, r + 2, ...
alone = on_main(lambda: (world(), processes(), on_main(lambda: map_shards(str, [7, 8]))))
assert alone == ((0, 1), 2, ["7", "8"]), alone  # inside it rank 0 acts as one process


def bad_input():
    raise VitfabError("a bad input found by rank 0")


def fails_on_rank_1(x):
    if world()[0] == 1:
        raise ValueError("rank 1's own failure")
    return x


for call in (lambda: on_main(bad_input), lambda: map_shards(fails_on_rank_1, range(4))):
    try:
        call()
    except PeerFailed as exc:
        print(f"rank {rank} stopped: {exc}")
    except (VitfabError, ValueError) as exc:
        print(f"rank {rank} failed: {exc}")
print(f"rank {rank} done")
"""


def test_rank_zero_decides_work_is_shared_and_a_failure_stops_every_rank(tmp_path):
    """The helpers every stage uses under torchrun (2 gloo processes): ``map_shards`` shares the
    items out and gives every rank all results in order; inside ``on_main`` rank 0 works alone;
    a failure on one rank stops the other with a line instead of leaving it waiting."""
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "rank 0 failed: a bad input found by rank 0" in out
    assert "rank 1 stopped: process 0 failed (VitfabError: a bad input found by rank 0)" in out
    assert "rank 1 failed: rank 1's own failure" in out
    assert "rank 0 stopped: process 1 failed (ValueError: rank 1's own failure)" in out
    assert "rank 0 done" in out and "rank 1 done" in out


def test_the_collective_timeout_follows_the_stage():
    from vitfab.optimize.context import collective_timeout

    for share in (10.0, 600.0, 5000.0):  # a training stage waits less than one where rank 0 works alone
        train, alone = collective_timeout(share, "train"), collective_timeout(share, "main")
        assert 2 * share <= train < alone and 4 * share <= alone and collective_timeout(share, "shard") == alone
    assert collective_timeout(10.0, "train") == 900  # a peer that hangs stops the run within 15 minutes
    assert collective_timeout(None, "train") == 1800 and collective_timeout(None, "main") == 86400
    with pytest.raises(ValueError):
        collective_timeout(10.0, "everyone")


@pytest.mark.slow
def test_two_processes_reproduce_one(tmp_path):
    one, t_one = _vitfab(job() + ["--out", str(tmp_path / "one")], 1, _env())
    assert one.returncode == 0, one.stderr[-3000:]
    two, t_two = _vitfab(job() + ["--out", str(tmp_path / "two")], 2, _env())
    assert two.returncode == 0, two.stderr[-3000:]
    print(f"the tiny main job: one process {t_one:.0f} s, two processes (torchrun, gloo) {t_two:.0f} s")
    a, b = tmp_path / "one", tmp_path / "two"
    state = {r: json.loads((r / "state.json").read_text()) for r in (a, b)}
    n_val = state[a]["stages"]["data"]["result"]["images"]["val"]
    assert state[a]["plans"] == state[b]["plans"]
    for folder in TRAINED:
        ma, mb = _metrics(a, folder), _metrics(b, folder)
        assert [m["epoch"] for m in ma] == [m["epoch"] for m in mb]
        for x, y in zip(ma, mb):
            assert abs(x["val_loss"] - y["val_loss"]) < LOSS_TOLERANCE, (folder, x["val_loss"], y["val_loss"])
            assert abs(x["val_top1"] - y["val_top1"]) <= 1 / n_val + 1e-9, folder
    # the search: the same candidates in the same order, the same scores within one image
    ea, eb = (json.loads((r / "search" / "state.json").read_text())["evaluated"] for r in (a, b))
    assert [c["arch"] for c in ea] == [c["arch"] for c in eb] and len(ea) > 8
    assert all(abs(x["accuracy"] - y["accuracy"]) <= 1 / n_val + 1e-9 for x, y in zip(ea, eb))
    top = [state[r]["stages"]["search"]["result"]["top"] for r in (a, b)]
    assert [t["arch"] for t in top[0]] == [t["arch"] for t in top[1]]
    # the joint search's validation passes (shared out over the ranks under torchrun)
    ja, jb = (json.loads((r / "joint" / "candidates.json").read_text()) for r in (a, b))
    assert [c["key"] for c in ja] == [c["key"] for c in jb]
    for x, y in zip(ja, jb):
        assert (x["error"] is None) == (y["error"] is None), x["key"]
        if x["error"] is None:
            assert abs(x["accuracy"] - y["accuracy"]) <= 1 / n_val + 1e-9, x["key"]
            assert y["img_per_s"] > 0  # timed on rank 0
    # recorded: the world size, each process's share of the batch, the report's line
    assert json.loads((b / "config.json").read_text())["world_size"] == 2
    supernet = json.loads((b / "supernet" / "config.json").read_text())
    assert supernet["world_size"] == 2 and supernet["batch_per_process"] == 7 and supernet["train"]["batch_size"] == 14
    assert "Processes: **2**" in (b / "report" / "report.md").read_text()
    assert "Processes:" not in (a / "report" / "report.md").read_text()
    assert json.loads((b / "config.json").read_text())["status"] == "done"


KILLER = '''
import os, signal
if os.environ.get("RANK") == "1":
    from vitfab.nas import train

    real = train.SupernetTrainer.train_one_epoch

    def die_in_second_epoch(self, epoch, progress):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, epoch, progress)

    train.SupernetTrainer.train_one_epoch = die_in_second_epoch
'''


@pytest.mark.slow
def test_a_rank_killed_mid_supernet_leaves_a_run_that_resume_finishes(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(KILLER)
    run = tmp_path / "run"
    cut, _ = _vitfab(job(supernet_epochs=3) + ["--out", str(run)], 2, _env(tmp_path / "site"))
    assert cut.returncode != 0
    # the surviving rank says where it stopped and how to go on, in one line
    lines = [ln for ln in cut.stderr.splitlines() if ln.startswith("error:")]
    assert any("stopped in stage 'supernet'" in ln and f"--resume {run}" in ln for ln in lines), cut.stderr[-3000:]
    state = json.loads((run / "state.json").read_text())
    assert "search" not in state["stages"] and "baseline" in state["stages"]
    assert [m["epoch"] for m in _metrics(run, "supernet")] == [0]  # epoch 0 kept, epoch 1 lost with the rank
    before = {f: f.read_bytes() for f in (run / "state.json", run / "config.json", run / "supernet" / "metrics.jsonl")}
    # one process cannot continue a supernet half trained by two (its batches were cut for two): one line
    alone, _ = _vitfab(["run", "--resume", str(run), "--no-progress"], 1, _env())
    assert alone.returncode == 2 and "trained by 2 process(es)" in alone.stderr, alone.stderr[-3000:]
    assert sum(ln.startswith("error:") for ln in alone.stderr.splitlines()) == 1 and "Traceback" not in alone.stderr
    assert {f: f.read_bytes() for f in before} == before  # nothing written
    done, _ = _vitfab(["run", "--resume", str(run), "--no-progress"], 2, _env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m["epoch"] for m in _metrics(run, "supernet")] == [0, 1, 2]
    assert json.loads((run / "config.json").read_text())["status"] == "done"
    assert (run / "summary.json").is_file() and (run / "chosen" / "model.safetensors").is_file()
