"""Training: config, the trainer (prepare, train), checkpoints.

The names below load on first use (PEP 562), so `reslab train --help` reads the flags without importing torch."""

from reslab.registry import lazy_names

_LAZY = {"TrainConfig": ".config", "load_run_model": ".checkpoint", "prepare": ".trainer", "train": ".trainer"}
__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_names(__name__, _LAZY)
