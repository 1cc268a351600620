"""Timing each runtime with its thread pool to itself: one worker process per runtime.

In one process the pools of PyTorch (OpenMP), ONNX Runtime and OpenVINO (TBB) take the same cores:
a pool that is still spinning after its own call slows the next runtime's, so configurations
interleaved across runtimes read slower than they run (measured 10-40 %), and by amounts that
differ between runtimes -- a search would choose on that noise. Here every runtime's models live
in a worker process of their own, built there from a picklable recipe; the parent's one timing
primitive (``timing.interleaved_*``) still runs the rounds A B C A B C, each call a message to the
item's worker, which runs the model on its own copy of the seeded batch and answers. Idle workers
wait on a pipe, their pools asleep. The message costs tens of microseconds, against milliseconds a
call.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable, Sequence

import torch

from ..errors import VitfabError
from .timing import seeded_batch


def _serve(conn, threads: int | None, seed: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    models: dict[int, Any] = {}
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode():
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] == "load":
                _, i, build, batch, size, channels = msg
                try:
                    models[i] = build()
                    x = seeded_batch(batch, tuple(size), "cpu", seed, channels)
                    inputs[i] = (x, x[:1].clone())
                    models[i](x)
                    conn.send((i, None))
                except Exception as exc:  # the parent reports which item could not be built, and why
                    conn.send((i, f"{type(exc).__name__}: {exc}"))
            else:
                _, i, one = msg
                models[i](inputs[i][1 if one else 0])
                conn.send(None)


class Workers:
    """One CPU worker process per pool (``item.pool``), each building its items (``item.build()``);
    ``fn(i, one)`` is the call that runs item ``i`` there (on the batch-1 input where ``one``)."""

    def __init__(self, items: Sequence[Any], threads: int | None = None, seed: int = 0):
        ctx = mp.get_context("spawn")  # a fork would copy this process's thread pools' state
        self.conns: dict[str, Any] = {}
        self.procs = []
        self.where: list[Any] = []
        for it in items:
            if it.pool not in self.conns:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(child, threads or torch.get_num_threads(), seed), daemon=True)
                proc.start()
                self.conns[it.pool], _ = parent, self.procs.append(proc)
            self.where.append(self.conns[it.pool])
        for i, (it, conn) in enumerate(zip(items, self.where)):
            conn.send(("load", i, it.build, it.batch_size, tuple(it.input_size), it.channels))
        errors = [conn.recv() for conn in self.where]
        bad = [f"{items[i].pool} item {i}: {err}" for i, err in errors if err]
        if bad:
            self.close()
            raise VitfabError("a timing worker could not build its model: " + "; ".join(bad))

    def fn(self, i: int, one: bool = False) -> Callable[[], None]:
        conn = self.where[i]

        def call() -> None:
            conn.send(("run", i, one))
            conn.recv()
        return call

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
