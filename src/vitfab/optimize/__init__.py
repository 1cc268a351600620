"""The joint optimiser: architecture x tokens x bit-width, the budget, the ablation, the main job."""

from .ablation import AblationRow, ablation_rows, measure_ablation
from .budget import Budget, probe_train_speed
from .config import JobConfig, Requirement
from .context import JobContext, Stage, run_stages
from .job import resume_job, run_job
from .joint import JointCandidate, choose, joint_front, joint_search
from .stages import PIPELINE

__all__ = [
    "AblationRow", "Budget", "JobConfig", "JobContext", "JointCandidate", "PIPELINE", "Requirement", "Stage",
    "ablation_rows", "choose", "joint_front", "joint_search", "measure_ablation", "probe_train_speed", "resume_job",
    "run_job", "run_stages",
]
