"""The joint optimiser: architecture x tokens x bit-width, the budget, the ablation, the main job."""

from .ablation import AblationRow, ablation_rows, measure_ablation
from .budget import Budget, probe_train_speed
from .joint import JointCandidate, Requirement, choose, joint_front, joint_search
from .job import JobConfig, JointOptimizer, resume_job, run_job

__all__ = [
    "AblationRow", "Budget", "JobConfig", "JointCandidate", "JointOptimizer", "Requirement", "ablation_rows",
    "choose", "joint_front", "joint_search", "measure_ablation", "probe_train_speed", "resume_job", "run_job",
]
