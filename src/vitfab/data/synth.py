"""Simulated 3D X-ray images of BGA / flip-chip solder joints in an IC package.

A laminography or CT scanner reconstructs a volume; inspection looks at slices through it.
We render three slices of a ball-grid array as the three channels of an image:

- channel 0, substrate side: the copper pads (and traces) on the package substrate;
- channel 1, ball mid-plane: the widest cross-section of each solder ball;
- channel 2, die side: the smaller joint at the die / component side.

Solder attenuates strongly, so balls are dark on a bright background (transmission model
``I = I0 * exp(-attenuation)``). Each image of a defect class carries its defect on one or
more interior balls (more of them, on average, at low difficulty):

- ``void``: a gas void, a bright blob inside a dark ball (mid-plane);
- ``bridge``: solder joining a ball to its neighbour (mid-plane);
- ``missing_ball``: the pad is there, the ball is not (mid-plane and die side);
- ``misaligned``: the component is placed off its pads: every ball is shifted in the
  mid-plane and die-side slices, the pads are not;
- ``non_wet``: head-in-pillow: ball and pad look normal in two slices, but separate in the
  substrate slice only, as a bright gap ring - the reason a 3D volume beats a 2D shadow;
- ``crack``: a thin bright crack across the die-side joint.

Nuisances that every class shares: grid pitch and ball size variation, per-ball position
jitter, small rotations, harmless small voids, a beam-hardening intensity gradient and
cupping, detector blur and Poisson noise. ``difficulty`` in [0, 1] makes defects smaller and
fainter and the image noisier.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import DataError
from ..files import write_json_atomic

CLASSES = ("good", "void", "bridge", "missing_ball", "misaligned", "non_wet", "crack")
CHANNELS = ("substrate_side", "ball_mid_plane", "die_side")

# attenuation of each structure in each slice
A_PAD, A_BALL, A_DIE, A_TRACE = 1.1, 1.6, 1.2, 0.35


@dataclass(frozen=True)
class SynthConfig:
    n_per_class: int = 300
    img_size: int = 64
    seed: int = 0
    difficulty: float = 0.5
    classes: tuple[str, ...] = CLASSES

    def __post_init__(self) -> None:
        if self.n_per_class < 1:
            raise DataError(f"--n-per-class must be at least 1, got {self.n_per_class}")
        if self.img_size < 24:
            raise DataError(f"--img-size must be at least 24 px, got {self.img_size}")
        if not 0.0 <= self.difficulty <= 1.0:
            raise DataError(f"--difficulty must lie in [0, 1], got {self.difficulty}")
        unknown = set(self.classes) - set(CLASSES)
        if unknown:
            raise DataError(f"unknown synthetic classes: {', '.join(sorted(unknown))}")


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _soft_disc(d: np.ndarray, radius, edge: float) -> np.ndarray:
    """1 inside, 0 outside, a smooth edge of ``edge`` pixels (partial-volume effect)."""
    return 1.0 / (1.0 + np.exp(np.clip((d - radius) / edge, -30, 30)))


def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """``K @ img @ K.T`` blurs an ``n x n`` image with a Gaussian of ``sigma`` pixels."""
    idx = np.arange(n)
    k = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def _segment_distance(px, py, ax, ay, bx, by):
    """Distance of each pixel to the segment a-b."""
    vx, vy = bx - ax, by - ay
    t = np.clip(((px - ax) * vx + (py - ay) * vy) / (vx * vx + vy * vy + 1e-9), 0.0, 1.0)
    return np.hypot(px - (ax + t * vx), py - (ay + t * vy))


def render_bga(label: str, rng: np.random.Generator, size: int, difficulty: float, noise: bool = True):
    """One image as a float array (3, size, size) in [0, 1] and a dict describing it.

    The scene (grid, nuisances, noise) draws from ``rng``, the defect from a generator split
    off at the start, so the same ``rng`` state gives the same scene for every label: a
    defect image differs from its good twin only where the defect is. ``noise=False`` leaves
    out the Poisson noise (for tests of exactly that).
    """
    defect_rng = np.random.default_rng(int(rng.integers(0, 2**63)))
    s = size / 64.0  # pixel scale relative to a 64 px image
    d = difficulty
    edge = 0.6 * s

    # --- the ball grid -------------------------------------------------------------------
    g = int(rng.integers(3, 5))  # 3x3 or 4x4 balls in view
    pitch = size / (g + 0.4) * rng.uniform(0.92, 1.08)
    radius = pitch * rng.uniform(0.28, 0.34)
    theta = np.deg2rad(rng.uniform(-8, 8))
    centre = size / 2 + rng.uniform(-0.25, 0.25, 2) * pitch
    ij = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij"), -1).reshape(-1, 2)
    local = (ij - (g - 1) / 2) * pitch
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pos = local @ rot.T + centre + rng.normal(0, 0.03 * pitch, (len(ij), 2))
    radii = radius * rng.uniform(0.94, 1.06, len(ij))
    n = len(pos)

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    # per-slice ball centres (a misaligned ball moves in slices 1 and 2 only)
    pos_ball = pos.copy()
    axis = xx[0]

    def dist(p: np.ndarray) -> np.ndarray:  # (n, size, size) distances to n centres
        dx2 = (axis[None, None, :] - p[:, 0, None, None]) ** 2
        dy2 = (axis[None, :, None] - p[:, 1, None, None]) ** 2
        return np.sqrt(dx2 + dy2)

    interior = np.where(np.all((pos > 0.22 * size) & (pos < 0.78 * size), axis=1))[0]
    if not len(interior):
        interior = np.array([int(np.argmin(np.abs(pos - size / 2).sum(1)))])
    k = int(rng.choice(interior))  # drawn from the scene: the same for every label
    # a defect rarely comes alone: more defective joints when defects are blatant
    extra = int(defect_rng.poisson(_lerp(1.5, 0.2, d)))
    others = [i for i in interior if i != k]
    ks = [k] + [int(i) for i in defect_rng.permutation(others)[:extra]]
    info: dict = {"label": label, "grid": g, "pitch": round(float(pitch), 2), "balls": ks}

    scale_ball = np.ones(n)  # ball present (1) / missing (0) in slices 1-2
    if label == "missing_ball":
        residue = _lerp(0.0, 0.3, d)
        scale_ball[ks] = residue
        info["residue"] = round(residue, 3)
    if label == "misaligned":
        # component placement error: every ball sits off its pad by the same offset
        shift = radius * _lerp(0.55, 0.22, d)
        phi = defect_rng.uniform(0, 2 * np.pi)
        pos_ball += shift * np.array([np.cos(phi), np.sin(phi)])
        info["shift_px"] = round(float(shift), 2)

    d_pad = dist(pos)
    d_ball = dist(pos_ball) if label == "misaligned" else d_pad
    cupping = rng.uniform(0.0, 0.15)
    profile = 1.0 - cupping * np.clip(1 - (d_ball / radii[:, None, None]) ** 2, 0, 1)

    pads = A_PAD * _soft_disc(d_pad, 0.85 * radii[:, None, None], edge)
    balls = A_BALL * _soft_disc(d_ball, radii[:, None, None], edge) * profile
    dies = A_DIE * _soft_disc(d_ball, 0.7 * radii[:, None, None], edge)
    balls *= scale_ball[:, None, None]
    dies *= scale_ball[:, None, None]

    if label == "non_wet":
        # head-in-pillow: in the substrate slice the ball rests on the paste without merging:
        # a bright gap ring separates the inner contact from the pad's rim.
        gap = _lerp(0.75, 0.4, d)
        ring_w = _lerp(1.3, 0.8, d) * s
        for k in ks:
            ring = np.exp(-0.5 * ((d_pad[k] - 0.55 * radii[k]) / ring_w) ** 2)
            pads[k] *= 1 - gap * ring
        info["gap"] = round(gap, 3)

    att = np.stack([pads.sum(0), balls.sum(0), dies.sum(0)])

    # copper traces on the substrate: a short line from some pads
    for i in np.where(rng.random(n) < 0.35)[0]:
        phi = rng.choice([0, np.pi / 2, np.pi, 3 * np.pi / 2]) + theta + np.pi / 4
        end = pos[i] + pitch * 0.7 * np.array([np.cos(phi), np.sin(phi)])
        att[0] += A_TRACE * _soft_disc(_segment_distance(xx, yy, *pos[i], *end), 0.6 * s, edge)

    # harmless small voids anywhere (acceptable under IPC-7095 limits)
    for i in np.where(rng.random(n) < 0.15)[0]:
        off = rng.uniform(-0.4, 0.4, 2) * radii[i]
        vd = np.hypot(xx - pos_ball[i, 0] - off[0], yy - pos_ball[i, 1] - off[1])
        att[1] -= A_BALL * 0.5 * _soft_disc(vd, radii[i] * rng.uniform(0.08, 0.14), edge) * scale_ball[i]

    for k in ks:
        if label == "void":
            vr = radii[k] * _lerp(0.5, 0.26, d) * defect_rng.uniform(0.9, 1.1)
            off = defect_rng.uniform(-1, 1, 2) * (radii[k] - vr) * 0.6
            vd = np.hypot(xx - pos_ball[k, 0] - off[0], yy - pos_ball[k, 1] - off[1])
            att[1] -= A_BALL * _lerp(0.9, 0.6, d) * _soft_disc(vd, vr, edge)
        elif label == "bridge":
            nbrs = [j for j in range(n) if j != k and np.hypot(*(pos[j] - pos[k])) < 1.2 * pitch]
            j = int(defect_rng.choice(nbrs))
            width = radii[k] * _lerp(0.7, 0.3, d)
            bar = _soft_disc(_segment_distance(xx, yy, *pos_ball[k], *pos_ball[j]), width / 2, edge)
            # the bridge fills the gap between the balls, not the balls themselves
            att[1] += A_BALL * _lerp(1.0, 0.7, d) * bar * np.clip(1 - balls.sum(0) / A_BALL, 0, 1)
        elif label == "crack":
            phi = defect_rng.uniform(0, np.pi)
            r2 = 0.7 * radii[k]
            a = pos_ball[k] - r2 * np.array([np.cos(phi), np.sin(phi)])
            b = pos_ball[k] + r2 * np.array([np.cos(phi), np.sin(phi)])
            line = _soft_disc(_segment_distance(xx, yy, *a, *b), _lerp(0.9, 0.55, d) * s, 0.4 * s)
            att[2] -= A_DIE * _lerp(0.9, 0.6, d) * line * _soft_disc(d_ball[k], r2, edge)

    att = np.clip(att, 0, None)

    # --- source, beam hardening, detector -----------------------------------------------
    gdir = rng.uniform(0, 2 * np.pi)
    ramp = ((xx - size / 2) * np.cos(gdir) + (yy - size / 2) * np.sin(gdir)) / size
    i0 = 0.9 + rng.uniform(0.05, 0.2) * ramp  # intensity gradient across the field
    img = i0[None] * np.exp(-att)
    sigma = rng.uniform(0.35, 0.8) * s * (1 + 0.5 * d)
    kmat = _gaussian_matrix(size, sigma)
    img = kmat @ img @ kmat.T
    if noise:
        photons = _lerp(600, 150, d)
        img = rng.poisson(np.clip(img, 0, None) * photons) / photons
    return np.clip(img, 0, 1), info


def synthesize(
    out: str | Path,
    config: SynthConfig,
    on_progress: Callable[[], None] | None = None,
) -> dict:
    """Write an ImageFolder dataset (``<class>/<class>_00000.png``) and ``metadata.json``.

    Deterministic: image ``i`` of class ``c`` is drawn from its own generator seeded by
    ``(seed, class index in CLASSES, i)``, so the same seed always gives the same pixels.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output folder {out} exists and is not empty: choose a new --out")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for label in config.classes:
        folder = out / label
        folder.mkdir()
        cidx = CLASSES.index(label)
        for i in range(config.n_per_class):
            rng = np.random.default_rng([config.seed, cidx, i])
            img, info = render_bga(label, rng, config.img_size, config.difficulty)
            name = f"{label}_{i:05d}.png"
            arr = (img.transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)
            Image.fromarray(arr, mode="RGB").save(folder / name, compress_level=1)
            info["file"] = f"{label}/{name}"
            records.append(info)
            if on_progress is not None:
                on_progress()
    meta = {
        "generator": "vitfab.data.synth (simulated 3D X-ray of BGA solder joints)",
        "config": asdict(config),
        "channels": list(CHANNELS),
        "classes": list(config.classes),
        "counts": {c: config.n_per_class for c in config.classes},
        "seconds": round(time.perf_counter() - t0, 2),
        "images": records,
    }
    write_json_atomic(out / "metadata.json", json.loads(json.dumps(meta, default=_jsonable)))
    return meta


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))
