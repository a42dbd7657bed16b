"""Train a reslab model: one run directory, crash-safe checkpoints, exact resume, diagnostics on log steps.

    summary = train(TrainConfig(model="gpt", steps=2000), {"layers": 4}, Path("runs/gpt"))

The run directory holds config.json (everything needed to rebuild the run), tokenizer.reslab.json, metrics.jsonl (one
JSON object per logged step), checkpoint.safetensors + state.json, and summary.json at the end.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reslab import __version__
from reslab.data import Tokenizer, load_tokenizer
from reslab.data.shards import PreparedData, TokenSpan
from reslab.data.training import check_resumable, training_data
from reslab.errors import ReslabError
from reslab.memory import check_fits
from reslab.metrics import run_summary
from reslab.models import check_saved_model_config, make_config
from reslab.rundir import CHECKPOINT, CONFIG, METRICS, SUMMARY, DamagedRunError, RunDir
from reslab.train.checkpoint import checkpoint_step
from reslab.train.config import RESUMABLE_FIELDS, TrainConfig, resolve_device
from reslab.train.distributed import check_launch, connect
from reslab.train.progress import Reporter
from reslab.train.trainer import Interrupted, NonFiniteLoss, StopSignal, Trainer, estimate_loss

__all__ = ["METRICS", "SUMMARY", "Interrupted", "NonFiniteLoss", "RunSetup", "estimate_loss", "prepare", "train"]


@dataclass
class RunSetup:
    """Everything `train` needs, prepared and validated before the run directory is touched."""

    config: TrainConfig
    model_name: str
    model_config: dict[str, Any]
    tokenizer: Tokenizer
    train_tokens: torch.Tensor | TokenSpan  # memory-mapped shards when read from prepared data
    val_tokens: torch.Tensor | TokenSpan
    data: dict[str, Any]
    run: RunDir  # opened once, in `prepare`; `train` locks it, the trainer writes into it
    resume: bool
    command: list[str] = field(default_factory=list)
    overwrite: bool = False  # a new run may replace reslab's files of an earlier run in run_dir

    @property
    def run_dir(self) -> Path:
        return self.run.path


def prepare(config_overrides: dict[str, Any], model_overrides: dict[str, Any], run_dir: Path, resume: bool = False,
            overwrite: bool = False, command: list[str] | None = None) -> RunSetup:
    """Validate the request and load the data. Raises ReslabError, having written nothing, on bad input.

    Resuming a run that was stopped before its first checkpoint starts it again from step 0 with its saved config.
    """
    run = RunDir(run_dir)
    if resume:
        saved = _read_saved_config(run)
        config = _merge_for_resume(saved, config_overrides, model_overrides)
        if not run.has_checkpoint():  # killed before the first checkpoint: nothing to continue, start it again
            run.check_restartable()
            restart = {**config.to_dict(), "model": saved["model"]}
            return _prepare_new(restart, dict(saved["model_config"]), run, saved.get("command"), overwrite=True)
        check_launch(config)  # batch vs world size, --fsdp outside torchrun
        _check_resume_steps(run, config)
        check_fits(saved["model"], saved["model_config"], config, resolve_device(config.device))
        tokenizer = load_tokenizer(run.path)
        data = _resume_data(config, saved["data"]["sha256"])
        check_resumable(data, tokenizer, saved["data"], run.path, config.data)
        return _finish_setup(config, saved["model"], dict(saved["model_config"]), data, run, True, command)
    run.check_new(overwrite)
    return _prepare_new(config_overrides, model_overrides, run, command, overwrite, flags_given=True)


def _prepare_new(config_overrides: dict[str, Any], model_overrides: dict[str, Any], run: RunDir,
                 command: list[str] | None, overwrite: bool, flags_given: bool = False) -> RunSetup:
    """A new run (or one restarted from its saved config: then `config_overrides` is the whole config, not flags)."""
    config = TrainConfig.from_dict(config_overrides)
    check_launch(config)
    model_name = config.model
    make_config(model_name, **model_overrides)  # fail on a bad model flag before the data is read
    data = training_data(config.data, config.tokenizer, config.vocab_size)
    if flags_given and config_overrides.get("tokenizer", data.tokenizer.kind) != data.tokenizer.kind:
        raise ReslabError(f"--data {config.data} was prepared with the {data.tokenizer.kind} tokenizer, not "
                          f"--tokenizer {config_overrides['tokenizer']}; drop the flag or prepare the data again")
    model_config = make_config(model_name, **{**model_overrides, "vocab_size": data.tokenizer.vocab_size}).to_dict()
    check_fits(model_name, model_config, config, resolve_device(config.device))
    setup = _finish_setup(config, model_name, model_config, data, run, False, command)
    setup.overwrite = overwrite
    return setup


def _finish_setup(config: TrainConfig, model_name: str, model_config: dict[str, Any], data: PreparedData,
                  run: RunDir, resume: bool, command: list[str] | None) -> RunSetup:
    context = model_config["context"]
    for split, part in (("train", data.train), ("validation", data.val)):
        if len(part) < context + 1:
            raise ReslabError(f"the {split} split of {data.record['description']} has {len(part):,} tokens but "
                              f"--context {context} needs at least {context + 1:,}; lower --context or use more text")
    record = {**data.record, "source": config.data}
    return RunSetup(config, model_name, model_config, data.tokenizer, data.train, data.val, record, run, resume,
                    list(command or []))


def _resume_data(config: TrainConfig, sha256: str) -> PreparedData:
    try:
        return training_data(config.data, config.tokenizer, config.vocab_size, expect_sha256=sha256)
    except DamagedRunError:
        raise
    except ReslabError as error:
        raise ReslabError(f"cannot read the run's data: {error}. If the file moved, resume with --data NEW_PATH "
                          "(its text must be the same)") from None


def _read_saved_config(run: RunDir) -> dict[str, Any]:
    saved = run.resumable_config()
    check_saved_model_config(saved["model"], saved["model_config"], run / CONFIG)
    return saved


def _check_resume_steps(run: RunDir, config: TrainConfig) -> None:
    """A resumed run can be extended, never shortened below the step it has reached."""
    done = checkpoint_step(run / CHECKPOINT)
    if config.steps < done:
        raise ReslabError(f"--steps {config.steps} is below the {done} steps {run.path} has already trained; "
                          f"a resumed run can only be extended (--steps N with N >= {done})")


def _merge_for_resume(saved: dict[str, Any], config_overrides: dict[str, Any],
                      model_overrides: dict[str, Any]) -> TrainConfig:
    """The saved config with the few fields a resume may change; any other differing flag is an error."""
    values = {**saved["train"], "stop_at": None}  # a stop point applies to one invocation only
    for name, value in config_overrides.items():
        if name in RESUMABLE_FIELDS or name == "data":  # new data is checked against the run's sha256 in prepare
            values[name] = value
        elif values.get(name) != value:
            raise ReslabError(f"--{name.replace('_', '-')} {value} differs from the run's {values.get(name)}; "
                              "a resumed run keeps its config: drop the flag, or start a new run in another directory")
    for name, value in model_overrides.items():
        if saved["model_config"].get(name) != value:
            raise ReslabError(f"model {name} {value} differs from the run's {saved['model_config'].get(name)}; "
                              "a resumed run keeps its model: drop the flag, or start a new run in another directory")
    return TrainConfig.from_dict(values)


def _init_run_dir(setup: RunSetup, run: RunDir) -> None:
    """A new run: the marker first, then reslab's old files removed (--overwrite), then config and tokenizer."""
    run.create()
    run.clear()  # --overwrite of a reslab run directory (checked in prepare); the user's own files stay
    run.write_config({
        "reslab_version": __version__,
        "model": setup.model_name,
        "model_config": setup.model_config,
        "train": setup.config.to_dict(),
        "data": setup.data,
        "tokenizer": setup.tokenizer.kind,
        "command": setup.command,
    })
    setup.tokenizer.save(run.path)


def train(setup: RunSetup, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run (or continue) the training described by `setup`; returns the summary written to summary.json.

    The run directory is locked for the whole run (rank 0 holds the lock): a second process on it is refused.
    """
    config = setup.config
    world = connect(config, resolve_device(config.device))  # one process, or this rank of a torchrun job
    reporter = reporter or Reporter(enabled=config.progress and world.is_main)
    run = setup.run
    with run.locked() if world.is_main else contextlib.nullcontext():
        if not setup.resume and world.is_main:
            _recheck_new_run(run, setup)
        trainer = Trainer(setup, world, reporter)
        if not setup.resume and world.is_main:
            _init_run_dir(setup, run)
        if trainer.step >= config.steps:
            return _already_finished(trainer)
        with StopSignal(enabled=not world.distributed, console=reporter.console) as stop:
            trainer.run(stop)
        trainer.state["step"] = trainer.step
        if trainer.step < config.steps:
            return {"stopped_at": trainer.step}
        if not world.is_main:
            return {"steps": trainer.step}  # rank 0 writes and returns the summary
        summary = _summary(setup, trainer.state, trainer.parameters, run)
        run.write_summary(summary)
        return summary


def _recheck_new_run(run: RunDir, setup: RunSetup) -> None:
    """Under the lock: a run another process created here since `prepare` looked is not replaced silently."""
    if not setup.overwrite:
        run.check_new(overwrite=False)


def _already_finished(trainer: Trainer) -> dict[str, Any]:
    state, run = trainer.state, trainer.run_dir
    trainer.reporter.note(f"{run.path} already finished {state['step']} steps; "
                          f"pass --steps N (N > {state['step']}) to continue")
    if not trainer.world.is_main:
        return {"steps": state["step"]}  # rank 0 returns the summary
    summary = run.read_summary()
    if summary is None:  # killed between the last checkpoint and the summary
        summary = _summary(trainer.setup, state, trainer.parameters, run)
        run.write_summary(summary)
    return summary


def _summary(setup: RunSetup, state: dict[str, Any], parameters: int, run: RunDir) -> dict[str, Any]:
    """The run's facts, then every summary field its metrics declare (`reslab.metrics`), from metrics.jsonl."""
    totals = {"tokens_per_second": state["tokens_seen"] / max(state["train_seconds"], 1e-9),
              "train_seconds": state["train_seconds"]}
    return {"model": setup.model_name, "residual": setup.model_config.get("residual"), "steps": state["step"],
            "parameters": parameters, **run_summary(run.read_metrics(), totals)}
