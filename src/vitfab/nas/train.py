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
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from ..data.transforms import Preprocess
from ..errors import VitfabError
from ..models.arch import ArchConfig, SearchSpace, SpaceError
from ..models.checkpoint import read_meta
from ..models.embed import EMBEDS
from ..models.meta import ModelMeta
from ..models.factory import check_model_name, create_model
from ..models.selection import EXTRA_BLOCKS, METHODS, Selection, select_into
from ..models.supernet import SUPERNET_NAME, Supernet
from ..models.weights import read_state_dict
from ..lock import run_lock
from ..options import option
from ..progress import console
from ..rundir import RunDir, resolve_weights
from ..runtime import autocast, resolve_amp, resolve_device, seeded, world
from ..runtimes import load_model
from ..train.config import TrainConfig
from ..train.loop import Trainer, TrainResult, epoch_seed, prepare_split, start_run
from ..train.resume import resume_run
from .official import load_official_autoformer


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
    embed: str = option("patch", help="Patch embedding: patch (one stride-p convolution), conv (a convolutional "
                                      "stem, Xiao et al. 2021) or spt (shifted patch tokens, Lee et al. 2021); "
                                      "subnets inherit it.")
    init_from: str | None = option(None, help="A trained vitfab checkpoint copied into the leading slices.")
    supernet_weights: str | None = option(None, help="Start from a trained supernet: a vitfab supernet checkpoint or "
                                                     "a file the AutoFormer authors released (in --space).")
    supernet_init: str | None = option(None, help="Start by weight selection from a pretrained ViT: a timm name "
                                                  "(hub weights), NAME=FILE (local weights) or a vitfab checkpoint.")
    extra_blocks: str = option(EXTRA_BLOCKS[0], help="With --supernet-init, blocks beyond the source's depth: identity "
                                                "(zeroed residual outputs) or repeat (a copy of the last block).")
    select: str = option(METHODS[0], help="With --supernet-init: uniform (evenly spaced channels, heads, units and "
                                         "layers; Xu et al. 2024) or leading (the first ones).")

    def validate(self) -> None:
        super().validate()
        if self.num_random < 0:
            raise VitfabError(f"--num-random must be >= 0, got {self.num_random}")
        if self.embed not in EMBEDS:
            raise VitfabError(f"--embed must be one of {', '.join(EMBEDS)}, got '{self.embed}'")
        if self.select not in METHODS:
            raise VitfabError(f"--select must be one of {', '.join(METHODS)}, got '{self.select}'")
        if self.extra_blocks not in EXTRA_BLOCKS:
            raise VitfabError(f"--extra-blocks must be one of {', '.join(EXTRA_BLOCKS)}, got '{self.extra_blocks}'")
        starts = [f for f in ("init_from", "supernet_weights", "supernet_init") if getattr(self, f)]
        if len(starts) > 1:
            raise VitfabError("give one start for the supernet: " + " or ".join("--" + f.replace("_", "-")
                                                                               for f in starts))

    def search_space(self) -> SearchSpace:
        return SearchSpace.load(self.space, self.img_size, self.patch_size)


def step_rng(seed: int, epoch: int, step: int) -> random.Random:
    return random.Random(epoch_seed(seed, epoch) * 1_000_003 + step)


def build_supernet(config: SupernetConfig, classes: list[str], with_weights: bool = True) -> Supernet:
    """The supernet of a run; its initial weights depend on ``config.seed`` alone (the caller's
    random state is left as it was), then on the one start it is given: ``supernet_weights`` (a
    trained supernet, the authors' or vitfab's), ``supernet_init`` (weight selection from a
    pretrained ViT) or ``init_from`` (a ViT copied into the leading slices). What it started from
    is ``net.vitfab_meta.extra["init"]``."""
    space = config.search_space()
    source = load_supernet_file(config.supernet_weights, config.space) if with_weights and config.supernet_weights \
        else None
    with seeded(config.seed):
        if source is not None:  # the file's kind of supernet (relative position, pooling, ...) at this run's size
            space = dataclasses.replace(source.space, img_size=space.img_size, patch_size=space.patch_size)
            net = Supernet.from_kwargs(source.meta_kwargs(), config.drop_path, space=space, num_classes=len(classes))
        else:
            net = Supernet(space, len(classes), drop_path_rate=config.drop_path, global_pool=config.global_pool,
                           embed=config.embed)
    net.vitfab_meta = ModelMeta(name=SUPERNET_NAME, kwargs=net.meta_kwargs(), classes=list(classes),
                                preprocess=Preprocess(img_size=space.img_size, crop_pct=1.0))
    init = "random weights"
    if source is not None:
        copied = load_trained_supernet(net, source)
        init = f"the trained supernet {config.supernet_weights} ({copied} tensors)"
    elif with_weights and config.supernet_init:
        model, what = load_init_source(config.supernet_init)
        sel = select_into_supernet(net, model, config.extra_blocks, config.select)
        init = f"weight selection ({config.select}) from {what}: {sel.describe()}"
    elif with_weights and config.init_from:
        copied = init_from_model(net, config.init_from)
        init = f"{config.init_from} copied into the leading slices ({copied} tensors)"
    net.vitfab_meta.extra["init"] = init
    if with_weights:
        console.print(f"supernet start: {init}")
    return net


def load_supernet(path: str | Path, device: str | torch.device = "cpu") -> Supernet:
    """A supernet run folder or checkpoint -> the trained ``Supernet`` (eval mode)."""
    weights = resolve_weights(Path(path))
    meta = read_meta(weights)
    if meta.name != SUPERNET_NAME:
        raise VitfabError(f"{path} holds a {meta.name}, not a supernet (train one with `vitfab nas train`)")
    net = Supernet.from_kwargs(meta.kwargs)
    net.load_state_dict(read_state_dict(weights))
    net.vitfab_meta = meta
    return net.to(device).eval()


def load_supernet_file(path: str | Path, space: str = "tiny") -> Supernet:
    """A trained supernet: a vitfab run folder or checkpoint, or a file the AutoFormer authors
    released (read as ``nas extract --official-checkpoint`` reads it, in the ``space`` given)."""
    path = Path(path)
    if not path.exists():
        raise VitfabError(f"--supernet-weights not found: {path}")
    if path.is_file() and path.suffix != ".safetensors":  # the authors' torch pickle
        return load_official_autoformer(path, space)
    return load_supernet(path)


def load_trained_supernet(net: Supernet, source: Supernet) -> int:
    """``source``'s weights into ``net`` (the same space and kind of supernet, built for this run's
    classes and size): the position embedding resampled to the grid, the patch embedding to the
    patch (timm's rules), the head kept at its initialisation for another class count."""
    src, own = source.state_dict(), net.state_dict()
    grid, old = net.space.img_size // net.space.patch_size, source.space.img_size // source.space.patch_size
    with torch.no_grad():
        if grid != old:
            src["pos_embed"] = resample_abs_pos_embed(src["pos_embed"], (grid, grid), (old, old), num_prefix_tokens=1)
        if net.pre_embed is None and src["patch_embed.weight"].shape != own["patch_embed.weight"].shape:
            src["patch_embed.weight"] = resample_patch_embed(src["patch_embed.weight"], [net.space.patch_size] * 2)
        if src["head.weight"].shape != own["head.weight"].shape:
            src["head.weight"], src["head.bias"] = own["head.weight"], own["head.bias"]
    wrong = sorted(k for k in own if k not in src or src[k].shape != own[k].shape)
    if wrong:
        raise VitfabError(f"--supernet-weights does not fit this supernet at {', '.join(wrong[:3])}")
    net.load_state_dict(src)
    return len(own)


def load_init_source(spec: str) -> tuple[torch.nn.Module, str]:
    """``--supernet-init``: a timm ViT name (hub weights), ``NAME=FILE`` (that model with a local
    weights file), or a vitfab checkpoint / run folder. Returns the model and how it was found."""
    if Path(spec).exists():
        return load_model(spec), spec
    name, _, file = spec.partition("=")
    if file:
        return create_model(name, weights=file), f"{name} ({file})"
    return create_model(spec, pretrained=True), f"{spec} (hub weights)"


def check_supernet_start(supernet_weights: str | None, supernet_init: str | None) -> None:
    """The cheap checks of a supernet's start, before any image is read: files exist, a timm name
    is known ('none' for ``supernet_init`` is no start)."""
    if supernet_weights and not Path(supernet_weights).exists():
        raise VitfabError(f"--supernet-weights not found: {supernet_weights}")
    if supernet_init in (None, "none") or Path(supernet_init).exists():
        return
    name, _, file = supernet_init.partition("=")
    if file and not Path(file).is_file():
        raise VitfabError(f"--supernet-init: weights file not found: {file}")
    check_model_name(name)


def select_into_supernet(net: Supernet, source: torch.nn.Module, extra: str = EXTRA_BLOCKS[0],
                         method: str = METHODS[0]) -> Selection:
    """Weight selection from ``source`` into the space's largest subnet, written into ``net``."""
    target = net.subnet_model(net.space.largest())
    sel = select_into(source, target, extra, method)
    net.load_leading(sel.state_dict)
    return sel


def init_from_model(net: Supernet, path: str | Path) -> int:
    """Copy a trained timm ViT (vitfab checkpoint) into the leading slices of the supernet where
    the shapes allow (same patch grid, head width 64); returns how many tensors were copied."""
    model = load_model(path)
    hd = net.space.head_dim
    heads = {blk.attn.head_dim for blk in model.blocks}
    if heads != {hd} or model.patch_embed.patch_size[0] != net.space.patch_size:
        raise VitfabError(f"--init-from needs head width {hd} and patch {net.space.patch_size}; {path} has head "
                          f"width {sorted(heads)} and patch {model.patch_embed.patch_size[0]}")
    try:
        return net.load_leading(model.state_dict())
    except SpaceError as exc:
        raise VitfabError(f"--init-from: {exc}") from None


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
    check_supernet_start(config.supernet_weights, config.supernet_init)
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
    with run_lock(run.root):
        trainer = SupernetTrainer(run, config, split, progress)
        trainer.setup(net)
        return trainer.fit()


def resume_supernet(run_dir: str | Path, progress: bool = True) -> TrainResult:
    """Continue a supernet run after its last complete epoch (the subnet sequence included)."""
    return resume_run(run_dir, "nas-train", SupernetConfig, build_supernet, SupernetTrainer, progress)
