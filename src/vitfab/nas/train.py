"""Supernet training (AutoFormer): one subnet sampled uniformly per step, or the sandwich rule.

Built on the foundation's ``Trainer`` (recipe, run folder, resume, torchrun/DDP); only the step
differs. The subnet of step ``i`` in epoch ``e`` is drawn from ``Random((seed, e, i))``, so every
rank draws the same subnet without talking, and a resumed run draws the same sequence.
``--sandwich``: the largest, the smallest and ``num_random`` random subnets in every step; the
largest learns from the labels, the others from the largest's predictions (in-place
distillation).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..data.transforms import Preprocess
from ..errors import VitfabError
from ..models.arch import ArchConfig, SearchSpace
from ..models.checkpoint import read_meta
from ..models.meta import ModelMeta
from ..models.supernet import Supernet
from ..models.weights import read_state_dict
from ..options import option
from ..progress import console
from ..rundir import RunDir, resolve_weights
from ..runtime import autocast, resolve_amp, resolve_device, seeded, world
from ..runtimes import load_model
from ..train.config import TrainConfig
from ..train.loop import Trainer, TrainResult, epoch_seed, prepare_split, resume_run, start_run

SUPERNET_NAME = "vitfab_supernet"


@dataclass
class SupernetConfig(TrainConfig):
    # the architecture is the space's; these TrainConfig fields are not options of `vitfab nas train`
    CLI_EXCLUDE: ClassVar[tuple[str, ...]] = ("model", "model_args", "pretrained", "weights", "arch",
                                              "init_checkpoint", "tome")
    model: str = option(SUPERNET_NAME, help="The supernet (not a timm name).", cli=False)
    space: str = option("tiny", help="tiny, small, base, or a YAML file with SUPERNET and SEARCH_SPACE.")
    sandwich: bool = option(False, help="Largest + smallest + random subnets per step, in-place distillation.")
    num_random: int = option(2, help="Random subnets per sandwich step.")
    global_pool: str = option("token", help="token (class token) or avg.")
    init_from: str | None = option(None, help="A trained vitfab checkpoint copied into the leading slices.")

    def validate(self) -> None:
        super().validate()
        if self.num_random < 0:
            raise VitfabError(f"--num-random must be >= 0, got {self.num_random}")

    def search_space(self) -> SearchSpace:
        return SearchSpace.load(self.space, self.img_size, self.patch_size)


def step_rng(seed: int, epoch: int, step: int) -> random.Random:
    return random.Random(epoch_seed(seed, epoch) * 1_000_003 + step)


def build_supernet(config: SupernetConfig, classes: list[str], with_weights: bool = True) -> Supernet:
    """The supernet of a run; its initial weights depend on ``config.seed`` alone (the caller's
    random state is left as it was)."""
    space = config.search_space()
    with seeded(config.seed):
        net = Supernet(space, len(classes), drop_path_rate=config.drop_path, global_pool=config.global_pool)
    net.vitfab_meta = ModelMeta(
        name=SUPERNET_NAME,
        kwargs={"space": space.to_dict(), "num_classes": len(classes), "global_pool": config.global_pool},
        classes=list(classes), preprocess=Preprocess(img_size=space.img_size, crop_pct=1.0),
    )
    if with_weights and config.init_from:
        copied = init_from_model(net, config.init_from)
        console.print(f"supernet initialised from {config.init_from}: {copied} tensors copied into leading slices")
    return net


def load_supernet(path: str | Path, device: str | torch.device = "cpu") -> Supernet:
    """A supernet run folder or checkpoint -> the trained ``Supernet`` (eval mode)."""
    weights = resolve_weights(Path(path))
    meta = read_meta(weights)
    if meta.name != SUPERNET_NAME:
        raise VitfabError(f"{path} holds a {meta.name}, not a supernet (train one with `vitfab nas train`)")
    k = meta.kwargs
    net = Supernet(SearchSpace.from_dict(k["space"]), int(k["num_classes"]), drop_path_rate=0.0,
                   global_pool=k.get("global_pool", "token"), rel_pos=int(k.get("rel_pos", 0)),
                   qkv_layout=k.get("qkv_layout", "blocked"), ln_eps=float(k.get("ln_eps", 1e-6)))
    net.load_state_dict(read_state_dict(weights))
    net.vitfab_meta = meta
    return net.to(device).eval()


def init_from_model(net: Supernet, path: str | Path) -> int:
    """Copy a trained timm ViT (vitfab checkpoint) into the leading slices of the supernet where
    the shapes allow (same patch grid, head width 64); returns how many tensors were copied."""
    model = load_model(path)
    hd, copied = net.space.head_dim, 0
    heads = {blk.attn.head_dim for blk in model.blocks}
    if heads != {hd} or model.patch_embed.patch_size[0] != net.space.patch_size:
        raise VitfabError(f"--init-from needs head width {hd} and patch {net.space.patch_size}; {path} has head "
                          f"width {sorted(heads)} and patch {model.patch_embed.patch_size[0]}")
    src, own = model.state_dict(), net.state_dict()

    def put(name: str, value: torch.Tensor) -> None:
        nonlocal copied
        target = own[name]
        if value.dim() != target.dim() or any(v > t for v, t in zip(value.shape, target.shape)):
            raise VitfabError(f"--init-from: {name} {tuple(value.shape)} does not fit the supernet's "
                              f"{tuple(target.shape)}")
        target[tuple(slice(0, n) for n in value.shape)] = value
        copied += 1

    renames = {"patch_embed.proj.": "patch_embed.", "mlp.fc1.": "fc1.", "mlp.fc2.": "fc2."}
    with torch.no_grad():
        for name, value in src.items():
            if name.startswith("head.") and value.shape[0] != own["head.weight"].shape[0]:
                continue
            if name == "pos_embed" and value.shape[1] != own["pos_embed"].shape[1]:
                continue
            mapped = name
            for a, b in renames.items():
                mapped = mapped.replace(a, b)
            if mapped.endswith("attn.qkv.weight") and mapped in own:  # (3*h*64, e) -> (3, H, 64, E) slices
                h = value.shape[0] // (3 * hd)
                own[mapped].view(3, -1, hd, own[mapped].shape[1])[:, :h, :, : value.shape[1]] = value.view(3, h, hd, -1)
                copied += 1
            elif mapped.endswith("attn.qkv.bias") and mapped in own:
                h = value.shape[0] // (3 * hd)
                own[mapped].view(3, -1, hd)[:, :h] = value.view(3, h, hd)
                copied += 1
            elif mapped in own:
                put(mapped, value)
    return copied


class SupernetTrainer(Trainer):
    unused_parameters = True  # a shallow subnet leaves the deeper blocks out of the step

    def __init__(self, run: RunDir, config: SupernetConfig, split, progress: bool = True):
        super().__init__(run, config, split, progress)
        self.space = config.search_space()

    def _use(self, arch: ArchConfig) -> None:
        self.model.set_arch(arch)

    def train_step(self, x, target, epoch: int, step: int):
        c: SupernetConfig = self.config
        rng = step_rng(c.seed, epoch, step)
        if not c.sandwich:
            self._use(self.space.sample(rng))
            return super().train_step(x, target, epoch, step)
        archs = [self.space.largest(), self.space.smallest()] + [self.space.sample(rng) for _ in range(c.num_random)]
        teacher, first_loss, first_out = None, None, None
        for k, arch in enumerate(archs):
            self._use(arch)
            last = k == len(archs) - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else self.train_model.no_sync()
            with sync:
                with autocast(self.device, self.amp):
                    out = self.train_model(x).float()
                if teacher is None:
                    loss = self.loss_of(out, target)
                    if self.teacher is not None:  # every subnet also learns from the run's teacher
                        loss = self.distill_loss(x, out, loss)
                    teacher, first_loss, first_out = out.detach().softmax(-1), loss, out
                else:  # in-place distillation from the largest subnet (and the run's teacher, if any)
                    loss = torch.sum(-teacher * F.log_softmax(out, dim=-1), dim=-1).mean()
                    if self.teacher is not None:
                        loss = self.distill_loss(x, out, loss)
                self.backward(loss, epoch)
        return first_loss, first_out

    def validate(self, progress=None) -> dict[str, Any]:
        """The largest subnet on the validation split (what 'best' follows)."""
        self._use(self.space.largest())
        return super().validate(progress)

    def test(self) -> None:
        """A supernet is judged through its subnets: `vitfab nas search`, then extract and test."""
        return None


def check_supernet_config(config: SupernetConfig) -> SearchSpace:
    if config.data is None:
        raise VitfabError("--data DIR is required (or --resume RUN_DIR)")
    config.validate()
    resolve_amp(config.amp, resolve_device(config.device))
    if config.init_from and not Path(config.init_from).exists():  # a new run only: resume has the weights
        raise VitfabError(f"--init-from not found: {config.init_from}")
    return config.search_space()


def train_supernet(config: SupernetConfig, out: str | Path | None = None, progress: bool = True,
                   split=None) -> TrainResult:
    """A new supernet run; ``split``: an existing one to use (the joint optimiser's), else made from the data."""
    space = check_supernet_config(config)
    split = split or prepare_split(config, progress and world()[0] == 0)
    net = build_supernet(config, split.classes)
    n = sum(p.numel() for p in net.parameters())
    run = start_run(out, "supernet", {"kind": "nas-train", "status": "running", "train": config.to_dict(),
                                       "space": space.to_dict(), "lr": config.resolved_lr()}, split,
                    f"supernet '{space.name}': {n / 1e6:.2f}M shared params, {space.img_size} px, "
                    f"patch {space.patch_size}, {'sandwich' if config.sandwich else 'one subnet'} per step")
    trainer = SupernetTrainer(run, config, split, progress)
    trainer.setup(net)
    return trainer.fit()


def resume_supernet(run_dir: str | Path, progress: bool = True) -> TrainResult:
    """Continue a supernet run after its last complete epoch (the subnet sequence included)."""
    return resume_run(run_dir, "nas-train", SupernetConfig, build_supernet, SupernetTrainer, progress)
