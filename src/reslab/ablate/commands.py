"""`reslab ablate`: the main job. Residual schemes x depths x seeds, a summary table, plots and an HTML report."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from reslab.cli_args import add_model_arguments, check_flags_apply, given_overrides, model_name, parse_sets
from reslab.errors import ReslabError
from reslab.report.commands import add_comparison_arguments

DEFAULT_RESIDUALS = "pre,post,none"
DEFAULT_LAYERS = "4"
DEFAULT_SEEDS = "0,1"
DEFAULT_STEPS = 1000


def register(commands) -> None:
    from reslab.train.commands import add_train_arguments

    ablate = commands.add_parser("ablate", help="train a grid of residual schemes x depths x seeds and compare them")
    add_model_arguments(ablate, lists=("--residual", "--layers"))
    group = add_train_arguments(ablate)
    group.add_argument("--seeds", default=DEFAULT_SEEDS, help=f"comma list of seeds (default {DEFAULT_SEEDS})")
    group.add_argument("--jobs", default="auto", help="grid points trained in parallel processes (default auto: "
                       "one per core, each with cores/jobs threads)")
    group.add_argument("--out", type=Path, default=Path("runs/ablation"), help="ablation directory "
                       "(default runs/ablation); re-running into it skips finished points and resumes stopped ones")
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


def cmd_ablate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from reslab.ablate.grid import run_ablation
    from reslab.ablate.summary import comparison_table, few_seeds_warning, summary_table
    from reslab.train.commands import train_overrides
    from reslab.train.config import check_flags_apply as check_train_flags

    residuals = comma_list(DEFAULT_RESIDUALS if args.residual is None else args.residual, str, "--residual")
    layers = comma_list(DEFAULT_LAYERS if args.layers is None else args.layers, int, "--layers")
    seeds = comma_list(args.seeds, int, "--seeds")
    model = model_name(args)
    grid = [key for key in parse_sets(args.sets) if key in ("residual", "layers")]
    if grid:
        raise ReslabError(f"--set {grid[0]}: the grid's {grid[0]} are --{grid[0]} A,B; give them there")
    flags = argparse.Namespace(**{**vars(args), "residual": None, "layers": None})
    overrides = given_overrides(flags, model, base={"residual": residuals[0]})
    for residual in residuals:  # a scheme option must apply to every scheme of the grid
        check_flags_apply(model, {**overrides, "residual": residual})
    train = train_overrides(args)
    check_train_flags(train)
    train.setdefault("steps", DEFAULT_STEPS)
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
    warning = few_seeds_warning(result)
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
