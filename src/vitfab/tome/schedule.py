"""``Schedule``: how many tokens ToMe merges in each layer.

Forms (``Schedule.parse``):
- an int ``r``: the same r in every layer (the paper's constant schedule);
- ``(r, inflection)``: linear in depth with the same mean r; the first layer merges
  r * (1 - inflection), the last r * (1 + inflection); inflection -1 is the paper's decreasing
  schedule (2r down to 0), +1 increasing, 0 constant;
- a list: r per layer (shorter lists are padded with 0);
- ``"keep=F"``: the constant r whose final token count comes closest to a fraction F of the
  input tokens;
- ``"macs=F"``: the smallest constant r whose MACs are at most a fraction F of the unmerged
  model's (counted from the layer shapes; ``vitfab bench`` then measures them).
Strings ``"8"``, ``"16:-1"`` and ``"4,4,2,0"`` (or ``"4/4/2/0"``, where commas separate other
things) parse like the int, tuple and list forms.
Layer counts come from the model, and every r is clipped so that at most half of the
mergeable tokens merge in one layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, Union

from ..errors import VitfabError
from ..options import RECORDED
from .merge import clip_r

ScheduleSpec = Union[int, tuple, list, str, "Schedule", None]
NO_MERGING = ("none", "stock", "off")


class ScheduleError(VitfabError):
    """A ToMe schedule that cannot be parsed or reached."""


@dataclass(frozen=True)
class Schedule:
    kind: str  # "constant", "linear", "list", "keep", "macs"
    r: int = 0
    inflection: float = 0.0
    values: tuple[int, ...] = ()
    target: float = 1.0

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, spec: ScheduleSpec) -> "Schedule":
        if isinstance(spec, Schedule):
            return spec
        if spec is None:
            return cls("constant", 0)
        if isinstance(spec, bool):
            raise ScheduleError(f"not a ToMe schedule: {spec!r}")
        if isinstance(spec, int):
            if spec < 0:
                raise ScheduleError(f"ToMe r must be >= 0, got {spec}")
            return cls("constant", spec)
        if isinstance(spec, tuple) and len(spec) == 2:
            r, inflection = int(spec[0]), float(spec[1])
            if r < 0 or not -1.0 <= inflection <= 1.0:
                raise ScheduleError(f"ToMe (r, inflection) needs r >= 0 and -1 <= inflection <= 1, got {spec!r}")
            return cls("linear", r, inflection)
        if isinstance(spec, (list, tuple)):
            values = tuple(int(v) for v in spec)
            if any(v < 0 for v in values):
                raise ScheduleError(f"ToMe r per layer must be >= 0, got {list(values)}")
            return cls("list", values=values)
        if isinstance(spec, str):
            return cls._parse_str(spec.strip())
        raise ScheduleError(f"not a ToMe schedule: {spec!r}")

    @classmethod
    def _parse_str(cls, s: str) -> "Schedule":
        try:
            if "=" in s:
                key, _, value = s.partition("=")
                key, target = key.strip().lower(), float(value)
                if key not in ("keep", "macs"):
                    raise ValueError
                if not 0.0 < target <= 1.0:
                    raise ScheduleError(f"ToMe target {key}={target} must be in (0, 1]")
                return cls(key, target=target)
            if ":" in s:
                r, _, inflection = s.partition(":")
                return cls.parse((int(r), float(inflection)))
            if "," in s or "/" in s:
                return cls.parse([int(v) for v in s.replace("/", ",").split(",") if v.strip()])
            return cls.parse(int(s))
        except ValueError:
            raise ScheduleError(
                f"cannot read ToMe schedule '{s}' (use R, R:INFLECTION, R1/R2/..., keep=F or macs=F)") from None

    # ------------------------------------------------------------------ resolving
    @property
    def needs_model(self) -> bool:
        return self.kind in ("keep", "macs")

    def per_layer(self, num_layers: int) -> list[int]:
        """r for each of ``num_layers`` layers (before clipping)."""
        if self.kind == "constant":
            return [self.r] * num_layers
        if self.kind == "linear":
            first, last = self.r * (1.0 - self.inflection), self.r * (1.0 + self.inflection)
            if num_layers == 1:
                return [self.r]
            step = (last - first) / (num_layers - 1)
            return [int(first + step * i) for i in range(num_layers)]
        if self.kind == "list":
            if len(self.values) > num_layers:
                raise ScheduleError(f"ToMe schedule lists {len(self.values)} layers; the model has {num_layers}")
            return list(self.values) + [0] * (num_layers - len(self.values))
        raise ScheduleError(f"a '{self.kind}=' schedule is resolved against a model (tome.apply does that)")

    def spec(self) -> str:
        """A string that ``Schedule.parse`` reads back to this schedule."""
        if self.kind == "constant":
            return str(self.r)
        if self.kind == "linear":
            return f"{self.r}:{self.inflection:g}"
        if self.kind == "list":
            return "/".join(map(str, self.values)) + ("/" if len(self.values) == 1 else "")
        return f"{self.kind}={self.target:g}"

    def describe(self) -> str:
        if self.kind == "constant":
            return f"r={self.r}"
        if self.kind == "linear":
            return f"r={self.r}:{self.inflection:g}"
        if self.kind == "list":
            return "r=[" + ",".join(map(str, self.values)) + "]"
        return f"{self.kind}={self.target:g}"


def parse_tome_spec(value: str | None) -> str | None:
    """A command's ToMe setting: ``none``/``stock``/``off`` -> None (the stock model, merging
    removed); ``recorded`` -> the schedule saved with the checkpoint, as it is; anything else is
    a schedule, checked here and returned as given."""
    if value is None:
        return None
    value = str(value).strip()
    if value.lower() in NO_MERGING:
        return None
    if value.lower() == RECORDED:
        return RECORDED
    Schedule.parse(value)
    return value


def token_counts(r_per_layer: Sequence[int], num_tokens: int, protected: int) -> list[int]:
    """Tokens leaving each layer after the clip (input tokens include the protected ones)."""
    counts, n = [], num_tokens
    for r in r_per_layer:
        n -= clip_r(r, n, protected)
        counts.append(n)
    return counts


def token_flow(r_per_layer: Sequence[int], num_tokens: int, protected: int) -> list[tuple[int, int]]:
    """(tokens into attention, tokens into the MLP) of each block."""
    counts = token_counts(r_per_layer, num_tokens, protected)
    return list(zip([num_tokens] + counts[:-1], counts))


class BlockShape(NamedTuple):
    """What a block's MACs per token depend on: width in, attention width (heads x head dim), width
    out of the projection, MLP MACs per token, and whether the attention has a gate."""

    dim: int
    attn_dim: int
    proj_out: int
    mlp_per_token: int
    gated: bool = False


def flow_macs(embed_macs: float, shapes: Sequence[BlockShape], flow: Sequence[tuple[int, int]]) -> float:
    """MACs of the embedding (given) and the blocks when block i attends over ``flow[i][0]`` tokens
    and runs its MLP on ``flow[i][1]`` (merges and head left out)."""
    total = float(embed_macs)
    for s, (n_attn, n_mlp) in zip(shapes, flow):
        total += n_attn * s.dim * 3 * s.attn_dim + 2 * n_attn * n_attn * s.attn_dim + n_attn * s.attn_dim * s.proj_out
        if s.gated:
            total += n_attn * s.dim * s.attn_dim
        total += n_mlp * s.mlp_per_token
    return total


def resolve_target(
    schedule: Schedule,
    num_layers: int,
    num_tokens: int,
    protected: int,
    macs_of: Callable[[list[tuple[int, int]]], float],
) -> list[int]:
    """Turn ``keep=F`` / ``macs=F`` into a constant-r schedule for a concrete model.

    ``macs_of(flow)`` gives the blocks' MACs when block i attends over ``flow[i][0]`` tokens and
    runs its MLP on ``flow[i][1]`` (merging sits between the two).
    """
    max_r = (num_tokens - protected) // 2
    candidates = range(0, max_r + 1)
    if schedule.kind == "keep":
        goal = schedule.target * num_tokens

        def final(r):
            return token_counts([r] * num_layers, num_tokens, protected)[-1]

        best = min(candidates, key=lambda r: (abs(final(r) - goal), r))
        return [best] * num_layers
    full = macs_of(token_flow([0] * num_layers, num_tokens, protected))
    for r in candidates:
        if macs_of(token_flow([r] * num_layers, num_tokens, protected)) <= schedule.target * full + 1e-9:
            return [r] * num_layers
    raise ScheduleError(f"macs={schedule.target:g} cannot be reached by merging tokens in this model "
                        f"(the floor is the layers' fixed cost)")
