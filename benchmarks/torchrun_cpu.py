"""Wall time of the tiny main job of tests/test_distributed.py in one process and under torchrun
(gloo, N CPU processes, one thread each): runs interleaved (1 N 1 N ...), medians, and each stage's
seconds from state.json of the last pair.

    PYTHONPATH=src python benchmarks/torchrun_cpu.py [RUNS] [PROCESSES]   # default 3 runs, 2 processes

Writes under benchmarks/results/torchrun/ (not tracked).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_distributed import _env, _vitfab, job  # noqa: E402  (the job the test runs, not a copy)


def main(runs: int = 3, processes: int = 2) -> None:
    out = REPO / "benchmarks" / "results" / "torchrun"
    times: dict[int, list[float]] = {1: [], processes: []}
    for k in range(runs):
        for n in (1, processes):
            folder = out / f"{n}-{k}"
            shutil.rmtree(folder, ignore_errors=True)
            done, seconds = _vitfab(job() + ["--out", str(folder)], n, _env())
            if done.returncode != 0:
                sys.exit(f"{n} process(es) failed:\n{done.stderr[-3000:]}")
            times[n].append(seconds)
            print(f"run {k + 1}/{runs}, {n} process(es): {seconds:.1f} s", flush=True)
    one, many = statistics.median(times[1]), statistics.median(times[processes])
    print(f"median: one process {one:.1f} s, {processes} processes {many:.1f} s ({many / one:.2f}x the time)")
    stages = {n: json.loads((out / f"{n}-{runs - 1}" / "state.json").read_text())["stages"] for n in (1, processes)}
    for name in stages[1]:
        print(f"  {name:<10} {stages[1][name]['seconds']:6.1f} s   {stages[processes][name]['seconds']:6.1f} s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
