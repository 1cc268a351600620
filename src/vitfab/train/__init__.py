"""Training: the DeiT-style fine-tuning recipe, run folders, resume."""

from .config import TrainConfig
from .loop import TrainResult, resume, train

__all__ = ["TrainConfig", "TrainResult", "resume", "train"]
