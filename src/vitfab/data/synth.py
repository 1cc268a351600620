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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import DataError
from ..files import write_json_atomic
from ..options import option

CLASSES = ("good", "void", "bridge", "missing_ball", "misaligned", "non_wet", "crack")
CHANNELS = ("substrate_side", "ball_mid_plane", "die_side")

# attenuation of each structure in each slice
A_PAD, A_BALL, A_DIE, A_TRACE = 1.1, 1.6, 1.2, 0.35


@dataclass(frozen=True)
class SynthConfig:
    n_per_class: int = option(300, help="Images per class.")
    img_size: int = option(64, help="Image side in pixels.")
    seed: int = option(0, help="Seed: the same seed gives the same pixels.")
    difficulty: float = option(0.5, help="0 = blatant defects, 1 = subtle and noisy.")
    classes: tuple[str, ...] = option(CLASSES, help="Classes to render.", cli=False)

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


@dataclass
class Scene:
    """One image being rendered: the ball grid, its slices, and which joints carry the defect."""

    size: int
    difficulty: float
    rng: np.random.Generator  # the scene's draws (grid, nuisances, noise): the same for every label
    defect_rng: np.random.Generator  # the defect's draws
    pitch: float
    radius: float
    theta: float
    pos: np.ndarray  # (n, 2) pad centres
    radii: np.ndarray
    xx: np.ndarray
    yy: np.ndarray
    ks: list[int] = field(default_factory=list)  # the defective joints
    info: dict = field(default_factory=dict)
    pos_ball: np.ndarray | None = None  # ball centres in slices 1-2 (a misplaced component moves them)
    scale_ball: np.ndarray | None = None  # ball present (1) / missing (0) in slices 1-2
    d_pad: np.ndarray | None = None  # (n, size, size) distances to the pad centres
    d_ball: np.ndarray | None = None  # ... and to the ball centres
    pads: np.ndarray | None = None  # (n, size, size) attenuation per joint and slice
    balls: np.ndarray | None = None
    dies: np.ndarray | None = None
    att: np.ndarray | None = None  # (3, size, size) the slices' total attenuation

    @property
    def s(self) -> float:
        return self.size / 64.0  # pixel scale relative to a 64 px image

    @property
    def edge(self) -> float:
        return 0.6 * self.s

    @property
    def n(self) -> int:
        return len(self.pos)

    def distances(self, centres: np.ndarray) -> np.ndarray:
        """(n, size, size) distance of every pixel to each of n centres."""
        axis = self.xx[0]
        dx2 = (axis[None, None, :] - centres[:, 0, None, None]) ** 2
        dy2 = (axis[None, :, None] - centres[:, 1, None, None]) ** 2
        return np.sqrt(dx2 + dy2)

    def segment(self, a, b) -> np.ndarray:
        return _segment_distance(self.xx, self.yy, *a, *b)


class Defect:
    """A defect class: hooks called at three points of the rendering (none by default)."""

    moves_balls = False  # the ball centres differ from the pad centres

    def place(self, sc: Scene) -> None:
        """Before the slices are drawn: change the grid (ball positions, presence)."""

    def substrate(self, sc: Scene) -> None:
        """The per-joint slices exist (``sc.pads``, ``sc.balls``, ``sc.dies``): change them."""

    def joint(self, sc: Scene, k: int) -> None:
        """Once per defective joint ``k``, after the nuisances: change ``sc.att``."""


DEFECTS: dict[str, Defect] = {}


def defect(name: str):
    def register(cls):
        DEFECTS[name] = cls()
        return cls

    return register


@defect("good")
class Good(Defect):
    pass


@defect("missing_ball")
class MissingBall(Defect):
    def place(self, sc: Scene) -> None:
        residue = _lerp(0.0, 0.3, sc.difficulty)
        sc.scale_ball[sc.ks] = residue
        sc.info["residue"] = round(residue, 3)


@defect("misaligned")
class Misaligned(Defect):
    """Component placement error: every ball sits off its pad by the same offset."""

    moves_balls = True

    def place(self, sc: Scene) -> None:
        shift = sc.radius * _lerp(0.55, 0.22, sc.difficulty)
        phi = sc.defect_rng.uniform(0, 2 * np.pi)
        sc.pos_ball += shift * np.array([np.cos(phi), np.sin(phi)])
        sc.info["shift_px"] = round(float(shift), 2)


@defect("non_wet")
class NonWet(Defect):
    """Head-in-pillow: in the substrate slice the ball rests on the paste without merging: a
    bright gap ring separates the inner contact from the pad's rim."""

    def substrate(self, sc: Scene) -> None:
        gap = _lerp(0.75, 0.4, sc.difficulty)
        ring_w = _lerp(1.3, 0.8, sc.difficulty) * sc.s
        for k in sc.ks:
            ring = np.exp(-0.5 * ((sc.d_pad[k] - 0.55 * sc.radii[k]) / ring_w) ** 2)
            sc.pads[k] *= 1 - gap * ring
        sc.info["gap"] = round(gap, 3)


@defect("void")
class Void(Defect):
    def joint(self, sc: Scene, k: int) -> None:
        d, rng = sc.difficulty, sc.defect_rng
        vr = sc.radii[k] * _lerp(0.5, 0.26, d) * rng.uniform(0.9, 1.1)
        off = rng.uniform(-1, 1, 2) * (sc.radii[k] - vr) * 0.6
        vd = np.hypot(sc.xx - sc.pos_ball[k, 0] - off[0], sc.yy - sc.pos_ball[k, 1] - off[1])
        sc.att[1] -= A_BALL * _lerp(0.9, 0.6, d) * _soft_disc(vd, vr, sc.edge)


@defect("bridge")
class Bridge(Defect):
    def joint(self, sc: Scene, k: int) -> None:
        pos, d = sc.pos, sc.difficulty
        nbrs = [j for j in range(sc.n) if j != k and np.hypot(*(pos[j] - pos[k])) < 1.2 * sc.pitch]
        j = int(sc.defect_rng.choice(nbrs))
        width = sc.radii[k] * _lerp(0.7, 0.3, d)
        bar = _soft_disc(sc.segment(sc.pos_ball[k], sc.pos_ball[j]), width / 2, sc.edge)
        # the bridge fills the gap between the balls, not the balls themselves
        sc.att[1] += A_BALL * _lerp(1.0, 0.7, d) * bar * np.clip(1 - sc.balls.sum(0) / A_BALL, 0, 1)


@defect("crack")
class Crack(Defect):
    def joint(self, sc: Scene, k: int) -> None:
        d, s = sc.difficulty, sc.s
        phi = sc.defect_rng.uniform(0, np.pi)
        r2 = 0.7 * sc.radii[k]
        a = sc.pos_ball[k] - r2 * np.array([np.cos(phi), np.sin(phi)])
        b = sc.pos_ball[k] + r2 * np.array([np.cos(phi), np.sin(phi)])
        line = _soft_disc(sc.segment(a, b), _lerp(0.9, 0.55, d) * s, 0.4 * s)
        sc.att[2] -= A_DIE * _lerp(0.9, 0.6, d) * line * _soft_disc(sc.d_ball[k], r2, sc.edge)


def _scene(rng: np.random.Generator, size: int, difficulty: float, label: str) -> Scene:
    """The ball grid and the defective joints (drawn from the scene, so the same for every label)."""
    defect_rng = np.random.default_rng(int(rng.integers(0, 2**63)))
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
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    sc = Scene(size, difficulty, rng, defect_rng, pitch, radius, theta, pos, radii, xx, yy)
    sc.pos_ball, sc.scale_ball = pos.copy(), np.ones(len(pos))
    interior = np.where(np.all((pos > 0.22 * size) & (pos < 0.78 * size), axis=1))[0]
    if not len(interior):
        interior = np.array([int(np.argmin(np.abs(pos - size / 2).sum(1)))])
    k = int(rng.choice(interior))  # drawn from the scene: the same for every label
    # a defect rarely comes alone: more defective joints when defects are blatant
    extra = int(defect_rng.poisson(_lerp(1.5, 0.2, difficulty)))
    others = [i for i in interior if i != k]
    sc.ks = [k] + [int(i) for i in defect_rng.permutation(others)[:extra]]
    sc.info = {"label": label, "grid": g, "pitch": round(float(pitch), 2), "balls": sc.ks}
    return sc


def _slices(sc: Scene, moves_balls: bool) -> None:
    """Pads (substrate side), balls (mid-plane) and die-side joints, per joint."""
    sc.d_pad = sc.distances(sc.pos)
    sc.d_ball = sc.distances(sc.pos_ball) if moves_balls else sc.d_pad
    cupping = sc.rng.uniform(0.0, 0.15)
    r = sc.radii[:, None, None]
    profile = 1.0 - cupping * np.clip(1 - (sc.d_ball / r) ** 2, 0, 1)
    sc.pads = A_PAD * _soft_disc(sc.d_pad, 0.85 * r, sc.edge)
    sc.balls = A_BALL * _soft_disc(sc.d_ball, r, sc.edge) * profile
    sc.dies = A_DIE * _soft_disc(sc.d_ball, 0.7 * r, sc.edge)
    sc.balls *= sc.scale_ball[:, None, None]
    sc.dies *= sc.scale_ball[:, None, None]


def _nuisances(sc: Scene) -> None:
    """Copper traces on the substrate and harmless small voids (acceptable under IPC-7095)."""
    rng, s = sc.rng, sc.s
    for i in np.where(rng.random(sc.n) < 0.35)[0]:  # a short line from some pads
        phi = rng.choice([0, np.pi / 2, np.pi, 3 * np.pi / 2]) + sc.theta + np.pi / 4
        end = sc.pos[i] + sc.pitch * 0.7 * np.array([np.cos(phi), np.sin(phi)])
        sc.att[0] += A_TRACE * _soft_disc(sc.segment(sc.pos[i], end), 0.6 * s, sc.edge)
    for i in np.where(rng.random(sc.n) < 0.15)[0]:
        off = rng.uniform(-0.4, 0.4, 2) * sc.radii[i]
        vd = np.hypot(sc.xx - sc.pos_ball[i, 0] - off[0], sc.yy - sc.pos_ball[i, 1] - off[1])
        sc.att[1] -= (A_BALL * 0.5 * _soft_disc(vd, sc.radii[i] * rng.uniform(0.08, 0.14), sc.edge)
                      * sc.scale_ball[i])


def _detector(sc: Scene, att: np.ndarray, noise: bool) -> np.ndarray:
    """Source with a beam-hardening gradient, transmission, detector blur and Poisson noise."""
    rng, size, d = sc.rng, sc.size, sc.difficulty
    gdir = rng.uniform(0, 2 * np.pi)
    ramp = ((sc.xx - size / 2) * np.cos(gdir) + (sc.yy - size / 2) * np.sin(gdir)) / size
    i0 = 0.9 + rng.uniform(0.05, 0.2) * ramp  # intensity gradient across the field
    img = i0[None] * np.exp(-att)
    sigma = rng.uniform(0.35, 0.8) * sc.s * (1 + 0.5 * d)
    kmat = _gaussian_matrix(size, sigma)
    img = kmat @ img @ kmat.T
    if noise:
        photons = _lerp(600, 150, d)
        img = rng.poisson(np.clip(img, 0, None) * photons) / photons
    return np.clip(img, 0, 1)


def render_bga(label: str, rng: np.random.Generator, size: int, difficulty: float, noise: bool = True):
    """One image as a float array (3, size, size) in [0, 1] and a dict describing it.

    The scene (grid, nuisances, noise) draws from ``rng``, the defect from a generator split
    off at the start, so the same ``rng`` state gives the same scene for every label: a
    defect image differs from its good twin only where the defect is. ``noise=False`` leaves
    out the Poisson noise (for tests of exactly that). The defect classes are ``DEFECTS``.
    """
    kind = DEFECTS[label]
    sc = _scene(rng, size, difficulty, label)
    kind.place(sc)
    _slices(sc, kind.moves_balls)
    kind.substrate(sc)
    sc.att = np.stack([sc.pads.sum(0), sc.balls.sum(0), sc.dies.sum(0)])
    _nuisances(sc)
    for k in sc.ks:
        kind.joint(sc, k)
    return _detector(sc, np.clip(sc.att, 0, None), noise), sc.info


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
