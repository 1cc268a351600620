"""AutoFormer's evolutionary search under resource limits, scored on held-out data.

Per generation: the ``parents`` best candidates so far; ``mutations`` children of random parents
(depth and embed dim each re-drawn with probability ``p_depth`` / ``p_embed``, each block's heads
and MLP ratio with ``p_heads`` / ``p_mlp``); ``crossovers`` children taking each gene from one of
two parents; random architectures to fill the population. Only candidates within every limit
(params, GMACs, measured batch-1 latency) are evaluated. Accuracy is the supernet's with the
candidate set, on the supernet run's validation split (never its test split). The state is
written after every generation, so a killed search resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from ..data.split import Split
from ..errors import VitfabError
from ..evaluate.metrics import metric_value
from ..evaluate.runner import make_eval_loader
from ..files import atomic_path, read_json, write_json_atomic, write_text_atomic
from ..measure.speed import Timed, measure_speed
from ..models.arch import ArchConfig, SearchSpace, arch_macs, arch_params
from ..options import option
from ..progress import console, make_progress
from ..rundir import JOB_STATE_FILE, RunDir
from ..runtime import is_main, map_shards, on_main, resolve_device
from .extract import extract_subnet
from .train import load_supernet


@dataclass
class Limits:
    max_params: float | None = None  # absolute counts
    min_params: float | None = None
    max_gmacs: float | None = None
    max_latency_ms: float | None = None

    def static_ok(self, params: int, gmacs: float) -> bool:
        return ((self.max_params is None or params <= self.max_params)
                and (self.min_params is None or params >= self.min_params)
                and (self.max_gmacs is None or gmacs <= self.max_gmacs))

    def describe(self) -> str:
        parts = []
        if self.min_params is not None:
            parts.append(f"params >= {self.min_params / 1e6:g}M")
        if self.max_params is not None:
            parts.append(f"params <= {self.max_params / 1e6:g}M")
        if self.max_gmacs is not None:
            parts.append(f"GMACs <= {self.max_gmacs:g}")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        return ", ".join(parts) or "no limits"


@dataclass
class SearchConfig:
    population: int = option(50, help="Candidates per generation.")
    generations: int = option(20, help="Generations of the evolution.")
    parents: int = option(10, help="Top-k parents per generation.")
    mutations: int = option(25, help="Mutated children per generation.")
    crossovers: int = option(25, help="Crossover children per generation.")
    p_depth: float = option(0.4, help="Mutation probability of the depth.", cli=False)
    p_embed: float = option(0.4, help="Mutation probability of the embed dim.", cli=False)
    p_heads: float = option(0.2, help="Mutation probability of each block's heads.", cli=False)
    p_mlp: float = option(0.2, help="Mutation probability of each block's MLP ratio.", cli=False)
    seed: int = option(0, help="Seed of the evolution.")
    max_tries: int = option(500, help="Random draws allowed per needed candidate before giving up.", cli=False)

    def validate(self) -> None:
        if min(self.population, self.generations, self.parents) < 1:
            raise VitfabError("--population, --generations and --parents must be at least 1")
        if self.mutations < 0 or self.crossovers < 0:
            raise VitfabError("--mutations and --crossovers must be >= 0")


@dataclass
class Candidate:
    arch: ArchConfig
    accuracy: float
    params: int
    gmacs: float
    latency_ms: float | None = None
    generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch.to_dict(), "accuracy": self.accuracy, "params": self.params, "gmacs": self.gmacs,
                "latency_ms": self.latency_ms, "generation": self.generation}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        return cls(ArchConfig.from_dict(d["arch"]), d["accuracy"], d["params"], d["gmacs"], d.get("latency_ms"),
                   d.get("generation", 0))


# --------------------------------------------------------------------------- the genetic operators
def mutate(arch: ArchConfig, space: SearchSpace, rng: random.Random, cfg: SearchConfig) -> ArchConfig:
    depth, embed = arch.depth, arch.embed_dim
    if rng.random() < cfg.p_depth:
        depth = rng.choice(space.depth)
    if rng.random() < cfg.p_embed:
        embed = rng.choice(space.embed_dim)
    heads, mlp = list(arch.num_heads[:depth]), list(arch.mlp_ratio[:depth])
    while len(heads) < depth:  # a deeper child gets random genes for its new blocks
        heads.append(rng.choice(space.num_heads))
        mlp.append(rng.choice(space.mlp_ratio))
    heads = [rng.choice(space.num_heads) if rng.random() < cfg.p_heads else h for h in heads]
    mlp = [rng.choice(space.mlp_ratio) if rng.random() < cfg.p_mlp else r for r in mlp]
    return ArchConfig(embed, depth, tuple(heads), tuple(mlp))


def crossover(a: ArchConfig, b: ArchConfig, rng: random.Random) -> ArchConfig:
    depth = rng.choice((a.depth, b.depth))
    embed = rng.choice((a.embed_dim, b.embed_dim))
    heads, mlp = [], []
    for i in range(depth):
        donors = [p for p in (a, b) if i < p.depth]
        heads.append(rng.choice(donors).num_heads[i])
        mlp.append(rng.choice(donors).mlp_ratio[i])
    return ArchConfig(embed, depth, tuple(heads), tuple(mlp))


def pareto_front(cands: list[Candidate], cost: Callable[[Candidate], float],
                 score: Callable[[Candidate], float] = lambda c: c.accuracy) -> list[Candidate]:
    """Candidates no other candidate beats on both ``score`` (higher; default accuracy) and cost (lower)."""
    front, best = [], -1.0
    for c in sorted(cands, key=lambda c: (cost(c), -score(c))):
        if score(c) > best:
            front.append(c)
            best = score(c)
    return front


# --------------------------------------------------------------------------- the search
@dataclass
class SearchResult:
    best: Candidate
    ranked: list[Candidate]
    pareto: list[Candidate]
    out: Path
    evaluated: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


class EvolutionarySearch:
    def __init__(self, supernet, loader, device: torch.device, limits: Limits, cfg: SearchConfig, out: str | Path,
                 progress: bool = True, metric: str = "top1"):
        """``metric``: what scores a candidate on the validation split (one of ``evaluate.metrics.METRICS``)."""
        cfg.validate()
        self.metric = metric
        self.net, self.loader, self.device, self.limits, self.cfg = supernet, loader, device, limits, cfg
        self.space: SearchSpace = supernet.space
        self.num_classes = supernet.num_classes
        self.out, self.progress = Path(out), progress
        self.evaluated: dict[str, Candidate] = {}
        self.rejected: set[str] = set()
        self.latency_cache: dict[str, float] = {}
        self.generation = 0
        self.rng = random.Random(cfg.seed)
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0

    # ------------------------------------------------------------------ costs and scores
    def costs(self, arch: ArchConfig) -> tuple[int, float]:
        s, emb = self.space, {"embed": self.net.embed, "stem": self.net.stem}
        return (arch_params(arch, self.num_classes, s.img_size, s.patch_size, s.head_dim, **emb),
                arch_macs(arch, s.img_size, s.patch_size, s.head_dim, self.num_classes, **emb) / 1e9)

    def latency_ms(self, arch: ArchConfig) -> float:
        """Median batch-1 latency of the extracted subnet on the device, measured once and cached."""
        key = arch.short()
        if key not in self.latency_cache:

            def measure() -> float:  # on rank 0's device alone under torchrun: one clock decides
                model = extract_subnet(self.net, arch).to(self.device)
                size = (self.space.img_size, self.space.img_size)
                return measure_speed([Timed(model, size, 1)], self.device, repeats=0, latency_runs=15)[0].latency_ms_p50

            self.latency_cache[key] = on_main(measure)
        return self.latency_cache[key]

    def admissible(self, arch: ArchConfig) -> bool:
        key = arch.short()
        if key in self.rejected:
            return False
        params, gmacs = self.costs(arch)
        ok = self.space.fits(arch) is None and self.limits.static_ok(params, gmacs)
        if ok and self.limits.max_latency_ms is not None:
            ok = self.latency_ms(arch) <= self.limits.max_latency_ms
        if not ok:
            self.rejected.add(key)
        return ok

    @torch.inference_mode()
    def accuracy(self, arch: ArchConfig) -> float:
        """The candidate's validation score with the supernet's weights (in ``metric``)."""
        self.net.set_arch(arch)
        preds, targets = [], []
        for x, y in self.loader:
            preds.append(self.net(x.to(self.device)).argmax(1).cpu())
            targets.append(torch.as_tensor(y))
        p, t = torch.cat(preds).numpy(), torch.cat(targets).numpy()
        return metric_value(self.metric, t, p, self.num_classes)

    def evaluate(self, archs: list[ArchConfig]) -> list[Candidate]:
        """The candidates of ``archs``, scoring those not seen before; under ``torchrun`` the new
        ones are shared out over the ranks and every rank gets every score."""
        new = list({a.short(): a for a in archs if a.short() not in self.evaluated}.values())
        for arch, accuracy in zip(new, map_shards(self.accuracy, new)):
            key = arch.short()
            params, gmacs = self.costs(arch)
            self.evaluated[key] = Candidate(arch, accuracy, params, gmacs, self.latency_cache.get(key), self.generation)
        return [self.evaluated[a.short()] for a in archs]

    # ------------------------------------------------------------------ population
    def _draw(self, make: Callable[[], ArchConfig], seen: set[str]) -> ArchConfig | None:
        for _ in range(self.cfg.max_tries):
            arch = make()
            if arch.short() not in seen and self.admissible(arch):
                return arch
        return None

    def _random_fill(self, pop: list[ArchConfig], seen: set[str], size: int) -> None:
        while len(pop) < size:
            arch = self._draw(lambda: self.space.sample(self.rng), seen)
            if arch is None:
                break
            pop.append(arch)
            seen.add(arch.short())

    def ranked(self) -> list[Candidate]:
        return sorted(self.evaluated.values(), key=lambda c: (-c.accuracy, c.gmacs, c.arch.short()))

    def next_population(self) -> list[ArchConfig]:
        cfg, pop, seen = self.cfg, [], set(self.evaluated)  # a visited architecture is not drawn again
        parents = [c.arch for c in self.ranked()[: cfg.parents]]
        if parents:
            for _ in range(cfg.mutations):
                arch = self._draw(lambda: mutate(self.rng.choice(parents), self.space, self.rng, cfg), seen)
                if arch is not None:
                    pop.append(arch)
                    seen.add(arch.short())
            for _ in range(cfg.crossovers):
                arch = self._draw(lambda: crossover(self.rng.choice(parents), self.rng.choice(parents), self.rng),
                                  seen)
                if arch is not None:
                    pop.append(arch)
                    seen.add(arch.short())
        self._random_fill(pop, seen, cfg.population)
        return pop

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> Path:
        return self.out / JOB_STATE_FILE

    def _settings(self) -> dict[str, Any]:
        settings = {"search": asdict(self.cfg), "limits": asdict(self.limits), "space": self.space.to_dict()}
        return settings | ({"metric": self.metric} if self.metric != "top1" else {})

    def save_state(self) -> None:
        if not is_main():  # rank 0 writes
            return
        state = self.rng.getstate()
        write_json_atomic(self.state_path, {
            "settings": self._settings(), "generation": self.generation, "seconds": self.seconds,
            "rng": [state[0], list(state[1]), state[2]], "history": self.history,
            "evaluated": [c.to_dict() for c in self.evaluated.values()], "rejected": sorted(self.rejected),
            "latency_ms": self.latency_cache,
        })

    def load_state(self) -> bool:
        if not self.state_path.is_file():
            return False
        st = read_json(self.state_path)
        if st["settings"] != json.loads(json.dumps(self._settings())):
            raise VitfabError(f"{self.out} holds a search with other settings; use another --out to start anew")
        self.generation, self.seconds, self.history = st["generation"], st["seconds"], st["history"]
        self.rng.setstate((st["rng"][0], tuple(st["rng"][1]), st["rng"][2]))
        cands = [Candidate.from_dict(c) for c in st["evaluated"]]
        self.evaluated = {c.arch.short(): c for c in cands}
        self.rejected, self.latency_cache = set(st["rejected"]), dict(st["latency_ms"])
        return True

    # ------------------------------------------------------------------ the loop
    def check_feasible(self) -> None:
        """Fail at once where no architecture can meet the limits: the smallest subnet bounds params,
        MACs and latency from below, the largest bounds params from above."""
        small, large = self.space.smallest(), self.space.largest()
        (p_small, g_small), (p_large, _) = self.costs(small), self.costs(large)
        lim = self.limits
        bad = ((lim.max_params is not None and p_small > lim.max_params)
               or (lim.max_gmacs is not None and g_small > lim.max_gmacs)
               or (lim.min_params is not None and p_large < lim.min_params)
               or (lim.max_latency_ms is not None and self.latency_ms(small) > lim.max_latency_ms))
        if bad:
            lat = f", {self.latency_ms(small):.2f} ms" if lim.max_latency_ms is not None else ""
            raise VitfabError(f"no architecture of the space meets {lim.describe()} (the smallest has "
                              f"{p_small / 1e6:.2f}M params, {g_small:.3f} GMACs{lat}; the largest "
                              f"{p_large / 1e6:.2f}M params)")

    def run(self) -> SearchResult:
        self.check_feasible()
        if is_main():
            self.out.mkdir(parents=True, exist_ok=True)
        if self.load_state():
            console.print(f"resuming the search in {self.out} after generation {self.generation}")
        with make_progress(self.progress) as bar:
            task = bar.add_task("evolution", total=self.cfg.generations, completed=self.generation, info="")
            while self.generation < self.cfg.generations:
                t0 = time.perf_counter()
                pop = self.next_population()
                if not pop and not self.evaluated:
                    raise VitfabError(f"no architecture drawn from the space meets {self.limits.describe()}")
                self.evaluate(pop)
                top = self.ranked()[: self.cfg.parents]
                self.seconds += time.perf_counter() - t0
                self.history.append({"generation": self.generation, "new": len(pop), "evaluated": len(self.evaluated),
                                     "best_accuracy": top[0].accuracy, "best": top[0].arch.short(),
                                     "top_mean_accuracy": float(np.mean([c.accuracy for c in top]))})
                self.generation += 1
                self.save_state()
                bar.update(task, advance=1, info=f"best {100 * top[0].accuracy:.1f}%  {len(self.evaluated)} evaluated")
        return self.finish()

    def finish(self) -> SearchResult:
        ranked = self.ranked()
        if not ranked:
            raise VitfabError(f"the search found no architecture within {self.limits.describe()}")
        use_latency = self.limits.max_latency_ms is not None
        front = pareto_front(ranked, (lambda c: c.latency_ms) if use_latency else (lambda c: c.gmacs))
        best = ranked[0]
        if is_main():
            self._write_results(ranked, front)
        return SearchResult(best, ranked, front, self.out, len(self.evaluated), self.seconds, self.history)

    def _write_results(self, ranked: list[Candidate], front: list[Candidate]) -> None:
        best = ranked[0]
        top = {"RANKED": [{"RETRAIN": c.arch.to_dict(), "ACCURACY": c.accuracy, "PARAMS": c.params,
                           "GMACS": round(c.gmacs, 4), "LATENCY_MS": c.latency_ms} for c in ranked[: self.cfg.parents]]}
        write_text_atomic(self.out / "candidates.yaml", yaml.safe_dump(top, sort_keys=False))
        write_text_atomic(self.out / "best.yaml", yaml.safe_dump(
            {"RETRAIN": best.arch.to_dict(), "ACCURACY": best.accuracy, "PARAMS": best.params,
             "GMACS": round(best.gmacs, 4), "LIMITS": self.limits.describe()}, sort_keys=False))
        with atomic_path(self.out / "pareto.csv") as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["accuracy", "params", "gmacs", "latency_ms", "arch"])
            for c in front:
                w.writerow([f"{c.accuracy:.4f}", c.params, f"{c.gmacs:.4f}", c.latency_ms or "", c.arch.short()])
        with atomic_path(self.out / "log.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(h) + "\n" for h in self.history))


@dataclass
class SearchRequest:
    """``vitfab nas search``: a trained supernet, the limits, where to write."""

    supernet: str | None = option(None, help="A supernet run folder (`vitfab nas train`).")
    data: str | None = option(None, help="Where the run's data lives now [default: as recorded].")
    max_params: float | None = option(None, help="Limit, millions of parameters.")
    min_params: float | None = option(None, help="Lower limit, millions of parameters.")
    max_gmacs: float | None = option(None, help="Limit, GMACs per image.")
    max_latency_ms: float | None = option(None, help="Limit, batch-1 latency on --device (measured, cached).")
    device: str = option("auto", help="auto, cpu or cuda.")
    out: str | None = option(None, help="Search folder [default: SUPERNET/search]; resumes if present.")

    def limits(self) -> Limits:
        millions = (lambda v: None if v is None else v * 1e6)
        return Limits(millions(self.max_params), millions(self.min_params), self.max_gmacs, self.max_latency_ms)

    def run(self, cfg: SearchConfig, progress: bool = True) -> SearchResult:
        if self.supernet is None:
            raise VitfabError("--supernet is required: a supernet run folder (vitfab nas train)")
        dev = resolve_device(self.device)
        run = RunDir.open(self.supernet)
        net = load_supernet(self.supernet, dev)
        split = Split.load(run.split_path)
        root = self.data or split.root
        if not split.val:
            raise VitfabError(f"{self.supernet} has no validation split to score candidates on")
        if not Path(root).is_dir():
            raise VitfabError(f"data folder of this run not found: {root} (pass --data to point to it)")
        loader = make_eval_loader(root, split.val, net.vitfab_meta.preprocess)
        out = self.out or run.root / "search"
        return EvolutionarySearch(net, loader, dev, self.limits(), cfg, out, progress).run()
