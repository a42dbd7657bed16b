"""Ablation grids: the same model trained under several residual schemes, depths and seeds, side by side."""

from reslab.ablate.executors import Executor, InlineExecutor, ProcessExecutor, RayExecutor, local_executor
from reslab.ablate.grid import GridPoint, run_ablation
from reslab.ablate.summary import summarize

__all__ = ["Executor", "GridPoint", "InlineExecutor", "ProcessExecutor", "RayExecutor", "local_executor",
           "run_ablation", "summarize"]
