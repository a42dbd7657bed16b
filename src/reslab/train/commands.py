"""`reslab train` and `reslab sample`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from reslab.checks import COUNT, NON_NEGATIVE, SEED, Declared, Range, check_numbers, declarations
from reslab.cli_args import (
    add_config_argument,
    add_flags,
    add_model_arguments,
    file_model_config,
    flagged,
    given,
    model_name,
    model_overrides,
    read_settings,
)
from reslab.data.sources import normalise_data
from reslab.errors import ReslabError
from reslab.train.config import TrainConfig, check_flags_apply

# TrainConfig fields whose flags only `train` takes (one run, not an ablation's grid)
RUN_ONLY = ("print_grad_norms", "progress", "fsdp", "dist_timeout")


def train_fields(run_only: bool | None = None) -> list[Declared]:
    """TrainConfig's flagged fields: all, or those only `train` takes (`run_only=True`), or the others."""
    fields = flagged(declarations(TrainConfig).values())
    return [f for f in fields if run_only is None or (f.name in RUN_ONLY) == run_only]


def _default(field: Declared) -> str:
    """The note after a training flag's help: its default, unless the help says it."""
    plain = field.default is not None and field.annotation is not bool and "default" not in field.metadata["help"]
    return f" (default {field.default:g})" if plain and isinstance(field.default, float) else (
        f" (default {field.default})" if plain else "")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The data/optimizer/schedule flags shared by `train` and `ablate`, generated from TrainConfig."""
    group = parser.add_argument_group("training")
    add_flags(group, train_fields(run_only=False), note=_default)
    group.add_argument("--recipe", help="start from a named recipe, model + training flags, that explicit flags "
                       "override: nanogpt-cpu (nanoGPT's CPU shakespeare-char run), fast (val <= 1.70 on "
                       "tinyshakespeare in under 110 s on 2 CPU cores)")
    return group


SAMPLE_RANGES = {"tokens": COUNT, "temperature": NON_NEGATIVE, "top_k": COUNT,
                 "top_p": Range(low=0, high=1, low_open=True),
                 "samples": COUNT, "seed": SEED}


def register(commands) -> None:
    train = commands.add_parser("train", help="train a model; writes a run directory")
    add_model_arguments(train)
    group = add_train_arguments(train)
    group.add_argument("--out", type=Path, metavar="DIR", help="the directory to write: the run directory "
                       "(default runs/MODEL-RESIDUAL)")
    group.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run")
    add_config_argument(group)
    group.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    group.add_argument("--json", action="store_true", help="print JSON to stdout on every exit: summary.json at "
                       "the end, or where the run stopped and the command that continues it")
    add_flags(group, train_fields(run_only=True), note=_default)
    train.set_defaults(handler=cmd_train)

    sample = commands.add_parser("sample", help="generate text from a trained run")
    sample.add_argument("run_dir", type=Path, help="a run directory or a Hugging Face save_pretrained folder")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument("--tokens", type=int, default=200, help="tokens to generate (default 200)")
    sample.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    sample.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    sample.add_argument("--top-p", type=float, help="nucleus sampling: smallest set with this probability")
    sample.add_argument("--seed", type=int, default=1337, help="seed of the sampling (default 1337)")
    sample.add_argument("--samples", type=int, default=1, help="independent samples (default 1)")
    sample.add_argument("--device", default="auto", help="torch device the model runs on: auto (default: cuda if "
                        "present), cpu, cuda, cuda:N")
    sample.set_defaults(handler=cmd_sample)


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training settings whose flags the user gave."""
    values = given(args, train_fields())
    if "data" in values:
        values["data"] = normalise_data(values["data"])
    return values


def apply_recipe(args: argparse.Namespace, config: dict[str, Any]):
    """The recipe's settings under the flags the user gave explicitly."""
    from reslab.train.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    if args.model is not None and args.model != recipe["model"]:
        raise ReslabError(f"recipe {args.recipe!r} trains model {recipe['model']!r}; drop --model {args.model}")
    check_flags_apply(config, recipe["train"])
    config = {**recipe["train"], **config, "model": recipe["model"]}
    overrides = {**recipe["model_config"], **model_overrides(args, recipe["model"], base=recipe["model_config"])}
    return config, overrides


def apply_settings_file(args: argparse.Namespace, config: dict[str, Any]):
    """The settings of --config FILE under the flags given explicitly (a run's config.json: that run again)."""
    if args.recipe:
        raise ReslabError("--recipe and --config both give the settings to start from; choose one")
    settings = read_settings(args.config)
    model = args.model or settings["model"] or args.default_model
    base = settings["train"]
    check_flags_apply(config, base)
    config = {**base, **config, "model": model}
    model_config = file_model_config(settings, model, args.config)
    return config, {**model_config, **model_overrides(args, model, base=model_config)}


def new_run(args: argparse.Namespace) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A new run's directory, training settings and model overrides, from the flags (over --config's or
    --recipe's)."""
    config = train_overrides(args)
    if args.config is not None:
        config, overrides = apply_settings_file(args, config)
    elif args.recipe:
        config, overrides = apply_recipe(args, config)
    else:
        check_flags_apply(config)
        config["model"] = model_name(args)
        overrides = model_overrides(args)
    return args.out or Path("runs") / f"{config['model']}-{overrides.get('residual', 'default')}", config, overrides


def resumed_run(args: argparse.Namespace) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The run --resume continues, and the flags given with it (compared with the saved config in prepare())."""
    from reslab.train.checkpoint import read_run_config

    if args.out is not None and args.out != args.resume:
        raise ReslabError("--resume RUN_DIR continues that directory; drop --out")
    if args.overwrite:
        raise ReslabError("--resume and --overwrite contradict each other; choose one")
    if args.recipe or args.config is not None:
        flag = "--recipe" if args.recipe else "--config"
        raise ReslabError(f"{flag} applies to new runs; a resumed run keeps its config: drop {flag}")
    config = train_overrides(args)
    saved = read_run_config(args.resume)
    check_flags_apply(config, saved["train"])
    if args.model is not None:
        config["model"] = args.model  # compared with the run's model in prepare()
    overrides = model_overrides(args, saved["model"], base=saved["model_config"])
    if config.get("dtype") == "auto":
        del config["dtype"]  # a resumed run keeps the dtype it recorded
    return args.resume, config, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from reslab.errors import Interrupted
    from reslab.train.trainer import prepare, train

    resume = args.resume is not None
    run_dir, config, overrides = resumed_run(args) if resume else new_run(args)
    setup = prepare(config, overrides, run_dir, resume=resume, overwrite=args.overwrite, command=args.argv)
    from reslab.train import distributed

    main = distributed.is_main()  # rank 0 prints
    reporter = start_line_reporter(describe_dtype(setup.config, resume), setup.config.progress and main)
    stopped = {"run": str(run_dir), "resume_command": setup.run.resume_command()}
    try:
        with distributed.job(run_dir):  # under torchrun: clear errors when a rank fails, group closed at the end
            summary = train(setup, reporter)
    except Interrupted:  # Ctrl-C / SIGTERM: checkpointed at the step the reporter saw last; one line on stderr
        if args.json and main:
            print(json.dumps({"stopped_at": reporter.step, "interrupted": True, **stopped}, indent=2))
        raise
    if not main:
        return 0
    if args.json:
        print(json.dumps({**summary, **stopped} if "stopped_at" in summary else summary, indent=2))
    elif "stopped_at" in summary:
        print(f"stopped at step {summary['stopped_at']}; continue with: {stopped['resume_command']}")
    else:
        print(f"run: {run_dir}  val loss {summary.get('final_val_loss', float('nan')):.4f} "
              f"(best {summary.get('best_val_loss', float('nan')):.4f})  "
              f"{summary.get('tokens_per_second', 0):,.0f} tok/s  {summary.get('parameters', 0):,} parameters")
    return 0


def start_line_reporter(line: str, enabled: bool):
    """The run's progress reporter, plus one line printed when training starts, like its other notes (not under
    --no-progress): after every check has passed, so a refused run still prints only its one-line error. (rich is
    imported here, not at the top: `reslab train --help` stays light.) Disabled, it still counts the steps (the
    step a stop is at)."""
    from reslab.train.loggers import Reporter

    class StartLine(Reporter):
        def start(self, total: int, completed: int, title: str) -> None:
            nonlocal line
            if line:
                self.note(line)
                line = ""
            super().start(total, completed, title)

    return StartLine(enabled=enabled)


def describe_dtype(config, resume: bool) -> str:
    """The one line `reslab train` prints at start: the dtype it trains in, and why."""
    from reslab.train.config import resolve_device
    from reslab.train.step import native_bf16

    what = "bf16 autocast (fp32 weights)" if config.dtype == "bf16" else config.dtype
    if resume:
        return f"dtype: {what}, as the run recorded"
    if not config.dtype_auto:
        return f"dtype: {what} (--dtype {config.dtype})"
    device = resolve_device(config.device)
    native = native_bf16(device)
    why = f"{native} runs bf16 natively" if native else f"no native bf16 on {device.type}"
    return f"dtype: {what} (--dtype auto: {why}; --dtype fp32 for exact fp32)"


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from reslab.graph.targets import WEIGHTED, load_trained, resolve_target
    from reslab.train.config import resolve_device

    check_numbers(vars(args), SAMPLE_RANGES)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ReslabError("--prompt holds bytes that are not valid UTF-8; give the prompt as UTF-8 text") from None
    device = resolve_device(args.device)
    trained = load_trained(resolve_target(str(args.run_dir), WEIGHTED), device)
    model, tokenizer = trained.model, trained.tokenizer
    prompt = tokenizer.encode(args.prompt) or [0]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt] * args.samples, dtype=torch.long, device=device)
    out = model.generate(idx, args.tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         generator=generator)
    for row in out.tolist():
        print(tokenizer.decode(row))
        if args.samples > 1:
            print("-" * 40)
    return 0
