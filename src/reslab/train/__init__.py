"""Training: config, loop, checkpoints."""

from reslab.train.checkpoint import load_run_model
from reslab.train.config import TrainConfig
from reslab.train.trainer import prepare, train

__all__ = ["TrainConfig", "load_run_model", "prepare", "train"]
