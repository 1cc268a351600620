"""``state.json`` of a main-job run: each finished stage's typed result and wall time, the plan
each stage fixed when it first started, and the budget. Versioned by ``JOB_STATE_FORMAT``: a run
folder written by another version resumes only where the format matches, otherwise it says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import VitfabError
from ..files import read_json, write_json_atomic
from ..records import RecordError, from_json, to_json
from ..runtime import is_main, on_main
from .budget import Budget

JOB_STATE_FORMAT = "vitfab-job-state/4"  # 4: the metric, good classes, operating points, quality


class JobState:
    def __init__(self, path: Path, budget_seconds: float | None, weights: dict[str, float]):
        self.path = Path(path)
        self.stages: dict[str, dict[str, Any]] = {}  # name -> {"result": JSON, "seconds": s}
        self.plans: dict[str, dict[str, Any]] = {}
        self.budget = Budget(budget_seconds, dict(weights))
        data = on_main(lambda: read_json(self.path) if self.path.is_file() else None)  # rank 0's, on every rank
        if data is not None:
            if data.get("format") != JOB_STATE_FORMAT:
                found = data.get("format") or "no format field (vitfab 0.1 before the typed stages)"
                raise VitfabError(f"{self.path.parent} was written by another vitfab version ({found}); this one "
                                  f"resumes {JOB_STATE_FORMAT} runs only: start a new run")
            self.stages, self.plans = data["stages"], data["plans"]
            self.budget = Budget.from_dict(data["budget"], weights)

    def save(self) -> None:
        """Written by rank 0 only (under ``torchrun`` every rank keeps the same state in memory)."""
        if is_main():
                write_json_atomic(self.path, {"format": JOB_STATE_FORMAT, "stages": self.stages, "plans": self.plans,
                                          "budget": self.budget.to_dict()})

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def result(self, stage: str, result_type: type) -> Any:
        try:
            return from_json(result_type, self.stages[stage]["result"])
        except RecordError as exc:
            raise VitfabError(f"{self.path}: the saved result of stage '{stage}' does not fit this version ({exc}); "
                              "start a new run") from None

    def finish(self, stage: str, result: Any, seconds: float) -> None:
        self.stages[stage] = {"result": to_json(result), "seconds": round(seconds, 1)}
        self.budget.finish(stage, seconds)
        self.save()

    def seconds(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.stages.items()}

    def plan(self, stage: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A stage's settings, fixed when it first starts (a resumed stage keeps them). Under
        ``torchrun`` rank 0 makes them (its clock, its probes) and every rank gets them, with the
        budget's cuts, so the ranks never plan apart."""

        def decide():
            if stage not in self.plans:
                self.plans[stage] = make()
                self.save()
            return self.plans[stage], list(self.budget.cuts)

        self.plans[stage], self.budget.cuts = on_main(decide)
        return self.plans[stage]
