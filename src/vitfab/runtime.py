"""Device and mixed-precision choices shared by training, evaluation and prediction."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .errors import VitfabError

AMP_MODES = ("auto", "off", "bf16", "fp16")
T = TypeVar("T")


# --------------------------------------------------------------------------- torchrun
# Objects (plans, stage results, decisions) travel over a gloo group even where training uses NCCL:
# a process waiting for rank 0 then blocks on a socket instead of spinning on its GPU.
_objects: "dist.ProcessGroup | None" = None
_solo = False  # inside ``on_main`` on rank 0: this process acts alone (see ``world``)


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside ``torchrun``, and on rank 0 inside ``on_main``, where
    rank 0 works alone while the others wait."""
    if dist.is_available() and dist.is_initialized() and not _solo:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def processes() -> int:
    """How many processes run the job (torchrun's world size), also inside ``on_main``."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that decides, measures and writes."""
    return world()[0] == 0


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group that ``torchrun`` set up (gloo on CPU, NCCL on GPUs); no-op otherwise."""
    global _objects
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        _objects = dist.new_group(backend="gloo") if use_cuda else None
    return world()


def set_collective_timeout(seconds: float) -> None:
    """How long a process waits for the others in any collective from now on (each stage of the
    main job sets it from its own budget); no-op outside ``torchrun``."""
    if world()[1] == 1:
        return
    setter = getattr(dist, "set_timeout", None) or getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:  # an older torch: the timeout of init_process_group stays
        return
    for group in {None, _objects}:
        setter(datetime.timedelta(seconds=seconds), group)


def peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says another process of the group died or stopped answering."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "gloo", "NCCL", "Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out"))


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier(group=_objects)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_objects)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj, group=_objects)
    return out


class PeerFailed(VitfabError):
    """Another process of the run failed; its own message is on its own stderr."""


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _peer_failed(rank: int, line: str) -> PeerFailed:
    return PeerFailed(f"process {rank} failed ({line}); its line says why")


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone (inside it ``world()`` is (0, 1)), its result on every rank;
    where it fails, the other ranks stop with one line instead of waiting for it."""
    global _solo
    if world()[1] == 1:
        return fn()
    if is_main():
        _solo = True
        try:
            result = fn()
        except BaseException as exc:
            _solo = False
            broadcast_object(("failed", _first_line(exc)))
            raise
        _solo = False
        broadcast_object(("ok", result))
        return result
    status, value = broadcast_object(None)
    if status == "failed":
        raise _peer_failed(0, value)
    return value


def map_shards(fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """``fn(item)`` of every item, rank r computing items r, r + N, r + 2N, ... of N processes;
    every rank gets all the results, in the items' order. Where ``fn`` fails on one rank, the
    others stop with one line."""
    rank, n = world()
    if n == 1:
        return [fn(x) for x in items]
    mine, failure = [], None
    try:
        mine = [(i, fn(x)) for i, x in enumerate(items) if i % n == rank]
    except Exception as exc:
        failure = exc
    parts = gather_objects(("failed", _first_line(failure)) if failure else ("ok", mine))
    if failure is not None:
        raise failure
    out: list = [None] * len(items)
    for k, (status, value) in enumerate(parts):
        if status == "failed":
            raise _peer_failed(k, value)
        for i, v in value:
            out[i] = v
    return out


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world()[1] > 1 else 0)
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VitfabError(f"--device {device} asked for, but no CUDA GPU is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise VitfabError(f"unknown device '{device}' (use auto, cpu or cuda)") from None


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is
    emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> fp16 on CUDA, bf16 on a CPU with native bf16, else off."""
    if amp not in AMP_MODES:
        raise VitfabError(f"unknown --amp '{amp}' (choose {', '.join(AMP_MODES)})")
    if amp == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"
    if amp == "fp16" and device.type != "cuda":
        raise VitfabError("--amp fp16 needs a CUDA GPU; on CPU use bf16 or off")
    return amp


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_workers() -> int:
    """DataLoader workers: none on small machines (they would compete with the model)."""
    n = os.cpu_count() or 1
    return 0 if n <= 2 else min(8, n - 1)


# --------------------------------------------------------------------------- global state, restored
def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy and torch (CPU and CUDA). Callers that must not leave the process
    reseeded use :func:`seeded` or wrap their work in :func:`rng_restored`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def rng_restored() -> Iterator[None]:
    """Whatever the block does to the global RNGs (``random``, numpy, torch), the caller's
    states come back afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=_cuda_devices()):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The block runs with every global RNG seeded by ``seed``; the caller's states are restored."""
    with rng_restored():
        seed_everything(seed)
        yield


@contextlib.contextmanager
def seeded_draws(seed: int) -> Iterator[None]:
    """The block's draws from ``random`` and torch's CPU generator (what the augmentations use)
    come from ``seed``; both states are restored afterwards. Cheaper than :func:`seeded` (numpy
    and CUDA left alone), for a call per image."""
    py, cpu = random.getstate(), torch.random.get_rng_state()
    random.seed(seed)
    torch.random.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        torch.random.set_rng_state(cpu)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block (None: unchanged), then restored."""
    if threads is None:
        yield
        return
    if threads < 1:
        raise VitfabError(f"--threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
