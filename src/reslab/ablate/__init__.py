"""Ablation grids: the same model trained under several residual schemes, depths and seeds, side by side."""

from reslab.ablate.grid import GridPoint, run_ablation
from reslab.ablate.summary import summarize

__all__ = ["GridPoint", "run_ablation", "summarize"]
