"""The report's figures (matplotlib, Agg): Pareto front, speedup per axis, ToMe merges."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..data.images import load_image
from ..data.transforms import eval_transform
from ..files import atomic_path
from ..tome import resolve_schedule, token_counts
from ..tome.patch import num_input_tokens
from ..tome.visualize import patch_groups, render_groups
from ..evaluate.accuracy import METRIC_NAMES
from .summary import AblationRecord, CandidateRow, metric_of


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_x(ax, values: Sequence[float]) -> None:
    """Log-scaled x with plain numbers and no crowded minor labels; linear within one decade."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    values = [v for v in values if v and v > 0]
    if not values or max(values) / min(values) < 10:
        return
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def save_png(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


AXIS_COLOURS = {0: "#444444", 1: "#1f77b4", 2: "#ff7f0e", 3: "#d62728"}
REFERENCE_COLOUR, RUNTIME_COLOUR = "#2ca02c", "#9467bd"


def row_colour(r: AblationRecord) -> str:
    if r.kind in ("reference", "runtime"):
        return REFERENCE_COLOUR if r.kind == "reference" else RUNTIME_COLOUR
    return AXIS_COLOURS[len(r.axes)]


OBJECTIVE_AXIS = {"throughput": ("img_per_s", "img/s"), "latency": ("latency_ms", "batch-1 latency, ms"),
                  "energy": ("joules_per_img", "J/img")}


def plot_pareto(candidates: Sequence[CandidateRow], rows: Sequence[AblationRecord], path: Path,
                threshold: float | None = None, objective: str = "throughput", metric: str = "top1") -> Path:
    """Left: the joint search on validation, the run's metric against the objective's own measure
    (every candidate, the front, the choice). Right: the ablation rows on test, coloured by how many
    axes they use."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    key, label = OBJECTIVE_AXIS.get(objective, OBJECTIVE_AXIS["throughput"])
    ok = [c for c in candidates if metric_of(c, metric) is not None and getattr(c, key)]

    def y(c):
        return 100 * metric_of(c, metric)

    if ok:
        a.scatter([getattr(c, key) for c in ok], [y(c) for c in ok], s=18, c="#9aa7b1", label="candidate")
        fr = sorted((c for c in ok if c.front), key=lambda c: getattr(c, key))
        a.plot([getattr(c, key) for c in fr], [y(c) for c in fr], "-o", c="#1f77b4", ms=5, label="Pareto front")
        for c in ok:
            if c.chosen:
                a.scatter([getattr(c, key)], [y(c)], s=160, marker="*", c="#d62728", zorder=5, label="chosen")
        if threshold is not None:
            a.axhline(100 * threshold, ls="--", c="#2ca02c", lw=1, label="requirement")
        _log_x(a, [getattr(c, key) for c in ok])
    a.set_xlabel(label + ("" if key == "img_per_s" else " (lower is better)"))
    a.set_ylabel(f"validation {METRIC_NAMES.get(metric, metric)} (%)")
    a.set_title("joint search: subnet x ToMe x precision")
    a.legend(fontsize=8)
    for i, r in enumerate(sorted(rows, key=lambda r: r.img_per_s)):
        b.scatter([r.img_per_s], [100 * r.accuracy], s=140 if r.chosen else 50, marker="*" if r.chosen else "o",
                  c=row_colour(r), zorder=3)
        b.annotate(r.name, (r.img_per_s, 100 * r.accuracy), fontsize=7, rotation=30,
                   xytext=(4, 6 if i % 2 == 0 else -12), textcoords="offset points")
    for n, name in ((0, "baseline"), (1, "one axis"), (2, "two axes"), (3, "all three")):
        b.scatter([], [], c=AXIS_COLOURS[n], label=name)
    if any(r.kind == "reference" for r in rows):
        b.scatter([], [], c=REFERENCE_COLOUR, label="reference")
    if rows:
        _log_x(b, [r.img_per_s for r in rows])
    b.set_xlabel("img/s")
    b.set_ylabel("test top-1 (%)")
    b.set_title("ablation (test split)")
    b.legend(fontsize=8)
    return save_png(fig, path)


def plot_speedup(rows: Sequence[AblationRecord], path: Path) -> Path:
    """Throughput speedup over the baseline for every ablation row (log scale)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    names = [r.name + ("  (chosen)" if r.chosen else "") for r in rows]
    vals = [r.speedup or 0.0 for r in rows]
    y = np.arange(len(rows))[::-1]
    ax.barh(y, vals, color=[row_colour(r) for r in rows])
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    _log_x(ax, vals)
    ax.axvline(1.0, c="k", lw=0.8)
    ax.set_xlabel("throughput speedup over DeiT-B/16 fp32 (log)")
    ax.set_title("speedup contribution per axis")
    return save_png(fig, path)


def readable_prefix(r_per_layer: Sequence[int], num_tokens: int, protected: int) -> int:
    """How many blocks of the schedule to show: the most after which at least a quarter of the
    patches (and 4) remain as separate groups -- after the last block a strong schedule may have
    merged everything into one token, which shows nothing."""
    patches = num_tokens - protected
    keep = 0
    for n in range(1, len(r_per_layer) + 1):
        if token_counts(list(r_per_layer[:n]), num_tokens, protected)[-1] - protected >= max(4, patches / 4):
            keep = n
    return keep


def plot_tome_merges(model, split, schedule: str | None, path: Path, per_class: int = 2) -> Path:
    """A few test images of each class beside the chosen model's merged patch groups (after the
    deepest block where a quarter of the patches are still separate groups)."""
    plt = pyplot()
    meta = model.vitfab_meta
    size = meta.preprocess.img_size
    r = resolve_schedule(model, schedule or 0)[1]
    blocks = readable_prefix(r, num_input_tokens(model), model.num_prefix_tokens)
    shown = list(r[:blocks]) + [0] * (len(r) - blocks)
    picks = []
    for ci, cls in enumerate(split.classes):
        picks += [(cls, p) for p, y in split.test if y == ci][:per_class]
    cols = 2 * per_class
    rows = len(split.classes)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    counters = {c: 0 for c in split.classes}
    tf = eval_transform(meta.preprocess)
    for cls, rel in picks:
        pil = load_image(Path(split.root) / rel, max_pixels=None)  # checked by the split's scan
        view = np.asarray(pil.convert("RGB").resize((size, size), Image.BICUBIC))
        groups, _ = patch_groups(model, tf(pil)[None], shown)
        i, j = split.classes.index(cls), 2 * counters[cls]
        counters[cls] += 1
        axes[i, j].imshow(view)
        axes[i, j + 1].imshow(render_groups(view, groups))
        axes[i, j].set_title(cls, fontsize=7)
        axes[i, j + 1].set_title(f"{len(np.unique(groups))} groups", fontsize=7)
    fig.suptitle(f"ToMe merges of the chosen model ({schedule or 'no ToMe'}): patch groups after block "
                 f"{blocks} of {len(r)}", fontsize=9)
    return save_png(fig, path)


def plot_tome_schedule(model, schedule: str | None, path: Path, compare: str | None = None) -> Path:
    """The chosen schedule per block: r merged (bars) and tokens leaving the block (line), beside
    ``compare`` (the fixed target a searched schedule stands against) where given."""
    plt = pyplot()
    n, prot = num_input_tokens(model), model.num_prefix_tokens
    shown = [(schedule or "no ToMe", schedule)] + ([(compare, compare)] if compare and compare != schedule else [])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    width = 0.8 / len(shown)
    for k, (label, spec) in enumerate(shown):
        r = resolve_schedule(model, spec or 0)[1]
        counts = token_counts(r, n, prot)
        real = [before - after for before, after in zip([n] + counts[:-1], counts)]  # r after the clip
        x = np.arange(1, len(r) + 1)
        a.bar(x + (k - (len(shown) - 1) / 2) * width, real, width, label=label)
        b.plot(np.arange(0, len(r) + 1), [n] + counts, marker="o", ms=3, label=label)
    a.set_xlabel("block")
    a.set_ylabel("tokens merged (r)")
    a.set_title("where tokens merge")
    b.set_xlabel("after block")
    b.set_ylabel("tokens")
    b.set_title(f"token count ({n} in)")
    for ax in (a, b):
        ax.legend(fontsize=7)
    return save_png(fig, path)
