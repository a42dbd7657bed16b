"""`reslab ablate`: the main job. Residual schemes x depths x seeds, a summary table, plots and an HTML report."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from reslab.cli_args import (
    SECTIONS,
    add_config_argument,
    add_model_arguments,
    check_flags_apply,
    file_model_config,
    given_overrides,
    parse_sets,
    read_settings,
)
from reslab.errors import ReslabError
from reslab.report.commands import add_comparison_arguments

DEFAULT_RESIDUALS = "pre,post,none"
DEFAULT_LAYERS = "4"
DEFAULT_SEEDS = "0,1"
DEFAULT_STEPS = 1000


CONFIG_HELP = ("start from a settings file (TOML, YAML or JSON): model = NAME, [model_config], [train] and [grid] "
               "(residual, layers, seeds: lists); a run's config.json gives its one grid point; flags given "
               "override it")
GRID = ("residual", "layers", "seeds")


def register(commands) -> None:
    from reslab.train.commands import add_train_arguments

    ablate = commands.add_parser("ablate", help="train a grid of residual schemes x depths x seeds and compare them")
    add_model_arguments(ablate, lists=("--residual", "--layers"))
    group = add_train_arguments(ablate)
    group.add_argument("--seeds", help=f"comma list of seeds (default {DEFAULT_SEEDS})")
    add_config_argument(group, CONFIG_HELP)
    group.add_argument("--jobs", default="auto", help="grid points trained in parallel processes (default auto: "
                       "one per core, each with cores/jobs threads)")
    group.add_argument("--out", type=Path, default=Path("runs/ablation"), metavar="DIR", help="the directory to "
                       "write: the ablation directory (default runs/ablation); re-running into it skips finished "
                       "points and resumes stopped ones")
    group.add_argument("--no-report", action="store_true", help="skip plots and report.html")
    group.add_argument("--no-progress", action="store_true", help="accepted as for train; grid points show no bar")
    group.add_argument("--shuffle", type=int, metavar="SEED", help="train the grid points in an order shuffled "
                       "with this seed (default: grid order), so a machine slowing down does not favour one scheme")
    comparison = ablate.add_argument_group("comparison (paired by seed, in summary.json and the report)")
    add_comparison_arguments(comparison)
    cluster = ablate.add_argument_group("cluster (Ray; pip install \"reslab[ray]\")")
    cluster.add_argument("--executor", choices=("local", "ray"), default="local",
                         help="local processes (default) or one Ray task per grid point")
    cluster.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, a cluster started on "
                         "this machine, or a new local instance)")
    cluster.add_argument("--ray-cpus", type=float, default=1.0,
                         help="CPUs per task, also its torch threads (default 1)")
    cluster.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per task, may be fractional (default 0)")
    ablate.set_defaults(handler=cmd_ablate)


def comma_list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ReslabError(f"{flag} takes a comma list of {kind.__name__} values, got {text!r}") from None
    if not values:
        raise ReslabError(f"{flag} is empty; give a comma list")
    if len(set(values)) != len(values):
        raise ReslabError(f"{flag} repeats a value: {text!r}")
    return values


def default_jobs(points: int) -> int:
    return max(1, min(points, os.cpu_count() or 1))


def executor_from_args(args: argparse.Namespace, jobs: int):
    """The executor --executor names: local (one process, or a pool of `jobs`) or Ray, checked before anything is
    written."""
    from reslab.ablate.executors import RayExecutor, local_executor
    from reslab.ablate.ray_executor import require_ray

    if args.executor == "ray":
        require_ray()
        if args.ray_cpus <= 0 or args.ray_gpus < 0:
            raise ReslabError(f"--ray-cpus must be positive and --ray-gpus >= 0, got {args.ray_cpus}, {args.ray_gpus}")
        return RayExecutor(args.ray_address, args.ray_cpus, args.ray_gpus)
    if args.ray_address is not None:
        raise ReslabError("--ray-address applies to --executor ray; add --executor ray")
    return local_executor(jobs)


def read_grid_settings(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """--config FILE's settings and its grid (each axis as comma text): [grid], else a run's own scheme, depth
    and seed (a run's config.json: its one grid point)."""
    settings = read_settings(path, (*SECTIONS, "grid"))
    grid = settings.pop("grid", None) or {}
    if not isinstance(grid, dict) or any(key not in GRID for key in grid):
        raise ReslabError(f"{path}: grid must be a table of {', '.join(GRID)} (lists), got {grid!r}")
    recorded = {"residual": settings["model_config"].pop("residual", None),
                "layers": settings["model_config"].pop("layers", None), "seeds": settings["train"].pop("seed", None)}
    axes = {}
    for axis in GRID:
        value = grid.get(axis, recorded[axis])
        if value is not None:
            axes[axis] = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return settings, axes


def grid_from_args(args: argparse.Namespace):
    """The grid (model, residuals, layers, seeds), model overrides and training settings: the flags, over
    --config FILE's settings, over the defaults. Checked before anything is written."""
    from reslab.train.commands import train_overrides
    from reslab.train.config import check_flags_apply as check_train_flags

    settings, axes = read_grid_settings(args.config) if args.config is not None else (
        {"model": None, "model_config": {}, "train": {}}, {})
    residuals = comma_list(args.residual or axes.get("residual", DEFAULT_RESIDUALS), str, "--residual")
    layers = comma_list(args.layers or axes.get("layers", DEFAULT_LAYERS), int, "--layers")
    seeds = comma_list(args.seeds or axes.get("seeds", DEFAULT_SEEDS), int, "--seeds")
    model = args.model or settings["model"] or args.default_model
    grid = [key for key in parse_sets(args.sets) if key in ("residual", "layers")]
    if grid:
        raise ReslabError(f"--set {grid[0]}: the grid's {grid[0]} are --{grid[0]} A,B; give them there")
    base = file_model_config(settings, model, args.config) if args.config is not None else {}
    flags = argparse.Namespace(**{**vars(args), "residual": None, "layers": None})
    overrides = {**base, **given_overrides(flags, model, base={**base, "residual": residuals[0]})}
    for residual in residuals:  # a scheme option must apply to every scheme of the grid
        check_flags_apply(model, {**overrides, "residual": residual})
    given = train_overrides(args)
    check_train_flags(given, settings["train"])
    train = {**settings["train"], **given}
    train.setdefault("steps", DEFAULT_STEPS)
    return model, residuals, layers, seeds, overrides, train


def cmd_ablate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from reslab.ablate.grid import run_ablation
    from reslab.ablate.summary import comparison_table, few_seeds_warning, summary_table

    model, residuals, layers, seeds, overrides, train = grid_from_args(args)
    if args.jobs == "auto":
        jobs = default_jobs(len(residuals) * len(layers) * len(seeds))
    else:
        jobs = comma_list(args.jobs, int, "--jobs")[0]
        if jobs <= 0:
            raise ReslabError(f"--jobs must be positive, got {jobs}")
    executor = executor_from_args(args, jobs)
    console = Console(stderr=True, highlight=False)
    console.soft_wrap = not console.is_terminal  # piped: a long note stays one line in the log
    result = run_ablation(args.out, model, residuals, layers, seeds, overrides, train, executor=executor,
                          command=args.argv, console=console, shuffle=args.shuffle,
                          compare={"baseline": args.baseline, "target_loss": args.target_loss})
    out = Console()
    if not out.is_terminal:
        out = Console(width=160)  # a file or pipe: do not wrap the table at 80 columns
    out.print(summary_table(result))
    versus = comparison_table(result)
    if versus is not None:
        out.print(versus)
    warning = few_seeds_warning(result["rows"])
    if warning:
        console.print(warning)
    if not args.no_report:
        try:
            from reslab.report import write_report
        except ImportError:
            return 0
        path = write_report(args.out)
        console.print(f"report: {path}")
    return 0
