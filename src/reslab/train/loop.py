"""Train a reslab model: one run directory, crash-safe checkpoints, exact resume, diagnostics on log steps.

    summary = train(TrainConfig(model="gpt", steps=2000), {"layers": 4}, Path("runs/gpt"))

The run directory holds config.json (everything needed to rebuild the run), tokenizer.json, metrics.jsonl (one
JSON object per logged step), checkpoint.safetensors + state.json, and summary.json at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reslab import __version__
from reslab.data import BatchSampler, Tokenizer, build_tokenizer, encode_corpus, load_text, load_tokenizer, split_tokens
from reslab.errors import ReslabError
from reslab.faults import failpoint
from reslab.memory import check_fits
from reslab.models import build_model, make_config
from reslab.rundir import CHECKPOINT, CONFIG, METRICS, SUMMARY, MetricsFile, RunDir
from reslab.train.checkpoint import (checkpoint_step, check_model_tensors, check_optimizer_tensors, check_rng_tensors,
                                     check_training_state, model_tensors, read_checkpoint)
from reslab.train.config import RESUMABLE_FIELDS, TrainConfig, check_device_name
from reslab.train.distributed import check_launch, connect
from reslab.train.progress import Reporter
from reslab.train.schedule import build_optimizer, lr_at
from reslab.train.step import TrainStep

__all__ = ["METRICS", "SUMMARY", "Interrupted", "NonFiniteLoss", "RunSetup", "prepare", "train"]


def resolve_device(name: str) -> torch.device:
    """The torch device for a `--device` value (checked: a known name this machine has)."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class RunSetup:
    """Everything `train` needs, prepared and validated before the run directory is touched."""

    config: TrainConfig
    model_name: str
    model_config: dict[str, Any]
    tokenizer: Tokenizer
    train_tokens: torch.Tensor
    val_tokens: torch.Tensor
    data: dict[str, Any]
    run_dir: Path
    resume: bool
    command: list[str] = field(default_factory=list)
    overwrite: bool = False  # a new run may replace reslab's files of an earlier run in run_dir


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
            restart = {**config.to_dict(), "model": saved["model"]}
            return _prepare_new(restart, dict(saved["model_config"]), run, saved.get("command"), overwrite=True)
        check_launch(config)  # batch vs world size, --fsdp outside torchrun
        _check_resume_steps(run, config)
        text, description = load_text(config.data)
        if hashlib.sha256(text.encode()).hexdigest() != saved["data"]["sha256"]:
            raise ReslabError(f"the data {config.data!r} changed since run {run.path} started; resume with the same "
                              "text or start a new run")
        tokenizer = load_tokenizer(run.path)
        return _finish_setup(config, saved["model"], dict(saved["model_config"]), tokenizer, text, description, run,
                             True, command)
    run.check_new(overwrite)
    return _prepare_new(config_overrides, model_overrides, run, command, overwrite)


def _prepare_new(config_overrides: dict[str, Any], model_overrides: dict[str, Any], run: RunDir,
                 command: list[str] | None, overwrite: bool) -> RunSetup:
    config = TrainConfig.from_dict(config_overrides)
    check_launch(config)
    model_name = config.model
    make_config(model_name, **model_overrides)  # fail on a bad model flag before the data is read
    text, description = load_text(config.data)
    tokenizer = build_tokenizer(config.tokenizer, text, config.vocab_size)
    model_config = make_config(model_name, **{**model_overrides, "vocab_size": tokenizer.vocab_size}).to_dict()
    check_fits(model_name, model_config, config, resolve_device(config.device))
    setup = _finish_setup(config, model_name, model_config, tokenizer, text, description, run, False, command)
    setup.overwrite = overwrite
    return setup


def _finish_setup(config: TrainConfig, model_name: str, model_config: dict[str, Any], tokenizer: Tokenizer,
                  text: str, description: str, run: RunDir, resume: bool, command: list[str] | None) -> RunSetup:
    tokens = encode_corpus(tokenizer, text)
    train_tokens, val_tokens = split_tokens(tokens)
    context = model_config["context"]
    for split, part in (("train", train_tokens), ("validation", val_tokens)):
        if len(part) < context + 1:
            raise ReslabError(f"the {split} split of {description} has {len(part):,} tokens but --context {context} "
                              f"needs at least {context + 1:,}; lower --context or use more text")
    data = {"source": config.data, "description": description, "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "tokens": len(tokens), "train_tokens": len(train_tokens), "val_tokens": len(val_tokens)}
    return RunSetup(config, model_name, model_config, tokenizer, train_tokens, val_tokens, data, run.path, resume,
                    list(command or []))


def _read_saved_config(run: RunDir) -> dict[str, Any]:
    if not run.path.is_dir():
        raise ReslabError(f"cannot resume: {run.path} is not a directory; give the run directory to continue")
    if not (run / CONFIG).exists():
        if run.is_reslab_run():
            raise ReslabError(f"cannot resume: {run.path} was stopped before its config was written, so there is "
                              "nothing to continue; run the same command again without --resume")
        raise ReslabError(f"cannot resume: {run.path} has no config.json; is it a reslab run directory?")
    return run.read_config()


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
        if name in RESUMABLE_FIELDS:
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


@torch.no_grad()
def estimate_loss(step: TrainStep, tokens: torch.Tensor, batch: int, context: int, batches: int, seed: int,
                  device: torch.device) -> float:
    """Mean loss over `batches` batches drawn from a fixed seed: the same batches at every evaluation.

    Uses the training step's forward (compiled, autocast) in eval mode, so it measures the model being trained.
    """
    was_training = step.model.training
    step.model.eval()
    sampler = BatchSampler(tokens, batch, context, torch.Generator().manual_seed(seed), device)
    total = torch.zeros((), device=device)
    for _ in range(batches):
        x, y = sampler.sample()
        total += step.loss(step.world.rows(x), step.world.rows(y))  # each rank its share; the mean over ranks below
    step.model.train(was_training)
    return step.world.mean(total).item() / batches


def _rng_state(batch_generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "batch": batch_generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict[str, torch.Tensor], batch_generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["rng.torch"])
    batch_generator.set_state(state["rng.batch"])
    if device.type == "cuda" and "rng.cuda" in state:
        torch.cuda.set_rng_state(state["rng.cuda"], device)


class NonFiniteLoss(ReslabError):
    pass


class Interrupted(ReslabError):
    """Ctrl-C (or SIGTERM) stopped the run at the end of a step, after checkpointing it; the CLI exits 130."""


class StopSignal:
    """Ctrl-C / SIGTERM ask the run to stop at the end of the current step (so a checkpoint pairs the weights of
    step N with the RNG state of step N, and no write is cut); a second Ctrl-C stops at once, keeping the last
    checkpoint. Only in a one-process run's main thread: ranks of a job must stop together, so they stop at once."""

    def __init__(self, enabled: bool, console=None):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.console = console
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.console is not None:
            self.console.print("stopping at the end of this step (Ctrl-C again to stop at once)")


class LogWindow:
    """The steps since the last log record: their summed loss (on the device: no host sync per step), and time."""

    def __init__(self, device: torch.device, loss_sum: float = 0.0, steps: int = 0):
        self.loss_sum = torch.full((), float(loss_sum), device=device)
        self.steps = steps
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def close(self, state: dict[str, Any], tokens_per_step: int) -> tuple[float, float, int]:
        """(mean loss, seconds, steps) of the window; its time and tokens go into `state`; it starts empty."""
        elapsed, steps = time.perf_counter() - self.started, self.steps
        mean = self.loss_sum.item() / max(steps, 1)
        state["train_seconds"] += elapsed
        state["tokens_seen"] += steps * tokens_per_step
        self.loss_sum.zero_()
        self.steps = 0
        return mean, elapsed, steps

    def saved(self) -> dict[str, Any]:
        """What a checkpoint keeps of an open window, so a resumed run logs the same mean loss."""
        return {"window_loss_sum": self.loss_sum.item(), "window_steps": self.steps}


class Trainer:
    """One training run, from a validated `RunSetup`: built, restored when resuming, then `run()`."""

    def __init__(self, setup: RunSetup, world, reporter: Reporter):
        self.setup, self.config, self.world, self.reporter = setup, setup.config, world, reporter
        self.run_dir = RunDir(setup.run_dir)
        self.device = world.device
        torch.manual_seed(self.config.seed)
        self.model = build_model(setup.model_name, **setup.model_config).to(self.device)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        resumed = self._read_resume_checkpoint() if setup.resume else None  # checked before anything is changed
        parallel = world.parallelize(self.model)  # DDP wrapper, FSDP2-sharded model, or the model itself
        self.optimizer = build_optimizer(self.config, self.model, self.device)
        self.train_step = TrainStep(parallel, self.optimizer, self.config.grad_clip, self.device, self.config.dtype,
                                    self.config.compile, micro_batches=self.config.grad_accum,
                                    console=reporter.console, world=world)
        self.batch_generator = torch.Generator().manual_seed(self.config.seed)
        self.context = setup.model_config["context"]
        self.sampler = BatchSampler(setup.train_tokens, self.config.batch, self.context, self.batch_generator,
                                    self.device)
        self.state: dict[str, Any] = {"step": 0, "best_val_loss": None, "train_seconds": 0.0, "tokens_seen": 0}
        if resumed is not None:
            self._restore(*resumed)
        self.step = self.state["step"]
        self.last_checkpoint = self.step
        self.window = LogWindow(self.device, self.state.pop("window_loss_sum", 0.0), self.state.pop("window_steps", 0))
        self.rng = _rng_state(self.batch_generator, self.device)  # the RNG state that goes with `self.step`
        self.last_val: float | None = None

    # -- resume ----------------------------------------------------------------------------------------------

    def _read_resume_checkpoint(self):
        path = self.run_dir / CHECKPOINT
        tensors, meta = read_checkpoint(path)
        model_part = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        check_model_tensors(model_part, model_tensors(self.model), path)
        check_rng_tensors(tensors, _rng_state(torch.Generator(), self.device), path)
        check_training_state(meta, path)
        optimizer_part = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        rng_part = {k: v for k, v in tensors.items() if k.startswith("rng.")}
        return model_part, optimizer_part, rng_part, meta

    def _restore(self, model_part, optimizer_part, rng_part, meta) -> None:
        check_optimizer_tensors(optimizer_part, meta["optimizer"], self.optimizer, self.run_dir / CHECKPOINT)
        self.world.load_model(self.model, model_part)
        self.world.load_optimizer(self.optimizer, optimizer_part, meta["optimizer"])
        _restore_rng(rng_part, self.batch_generator, self.device)
        self.state.update(meta["state"])
        if self.world.is_main:  # only rank 0 writes the run directory
            self.run_dir.remove_temp_files()
            self.run_dir.truncate_metrics(self.state["step"])
        self.reporter.note(f"resuming {self.run_dir.path} at step {self.state['step']}")

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self, stop: StopSignal) -> None:
        """Train to `--steps` (or `--stop-at`), checkpointing on the way; a stop request ends it after a step."""
        config = self.config
        end = min(config.steps, config.stop_at or config.steps)
        self.reporter.start(config.steps, self.step, f"{self.setup.model_name} / "
                                                     f"{self.setup.model_config.get('residual', '')}")
        self.model.train()
        while self.step < end:
            self._one_step(end)
            if stop.requested and self.step < end:
                if self.last_checkpoint < self.step:
                    self._checkpoint()
                raise Interrupted(f"interrupted at step {self.step}; checkpoint saved, "
                                  f"continue with: reslab train --resume {self.run_dir.path}")

    def _one_step(self, end: int) -> None:
        config = self.config
        lr = lr_at(self.step, config.lr, config.floor_lr, config.warmup, config.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        step = self.step + 1
        log_now = step % config.log_interval == 0 or step == config.steps
        eval_now = step % config.eval_interval == 0 or step == config.steps
        x, y = self.sampler.sample()
        result = self.train_step(x, y, diagnostics=log_now and config.diagnostics)
        self.window.add(result.loss)
        self.step = step
        self.rng = _rng_state(self.batch_generator, self.device)
        record = self._log_record(lr, result) if log_now else None
        if eval_now:
            self._evaluate(record)
        elif record is not None:
            self.metrics.write(record)
            self.reporter.update(step, record["loss"], self.last_val, record["tokens_per_second"])
        if step % config.checkpoint_interval == 0 or step in (config.steps, end):
            self._checkpoint()
        if log_now or eval_now:
            self.window.started = time.perf_counter()

    def _log_record(self, lr: float, result) -> dict[str, Any]:
        mean_loss, elapsed, steps = self.window.close(self.state, self.config.batch * self.context)
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(f"loss became {mean_loss} by step {self.step} (checked every "
                                f"{self.config.log_interval} steps); {self._kept()}")
        tokens = steps * self.config.batch * self.context
        record: dict[str, Any] = {"step": self.step, "loss": mean_loss, "lr": lr,
                                  "tokens_per_second": tokens / max(elapsed, 1e-9),
                                  "train_seconds": self.state["train_seconds"]}
        if result.norms is not None:
            record.update(result.norms.to_metrics())
            record.update(result.probe.to_metrics(reduce=self.world.sum))  # sums over ranks: the global batch
            sites = [site for _, _, site in self.model.residual_sites()]
            record.update(type(sites[0]).scheme_metrics(sites, self.world))  # every rank takes part
            if self.config.print_grad_norms:
                self.reporter.grad_norms(self.step, result.norms.per_parameter, result.norms.total)
        return record

    def _evaluate(self, record: dict[str, Any] | None) -> None:
        config = self.config
        if self.window.steps:  # an eval step that is not a log step: close the window first
            self.window.close(self.state, config.batch * self.context)
        failpoint("eval")
        self.last_val = estimate_loss(self.train_step, self.setup.val_tokens, config.batch, self.context,
                                      config.eval_batches, config.seed + 1, self.device)
        train_eval = estimate_loss(self.train_step, self.setup.train_tokens, config.batch, self.context,
                                   config.eval_batches, config.seed + 2, self.device)
        if self.state["best_val_loss"] is None or self.last_val < self.state["best_val_loss"]:
            self.state["best_val_loss"] = self.last_val
        self.state["last_val_loss"], self.state["last_train_loss"] = self.last_val, train_eval
        record = record or {"step": self.step}
        record.update({"val_loss": self.last_val, "train_loss_eval": train_eval})
        self.metrics.write(record)
        self.reporter.update(self.step, record.get("loss"), self.last_val, record.get("tokens_per_second"),
                             eval_done=True)

    def _checkpoint(self) -> None:
        """Save step `self.step` with its RNG state; never weights that are not finite (the last good one stays)."""
        if not math.isfinite(self.window.loss_sum.item()):
            raise NonFiniteLoss(f"loss became non-finite by step {self.step}; {self._kept()}")
        if not self.world.all_finite(self.model):
            raise NonFiniteLoss(f"the weights became non-finite by step {self.step}; {self._kept()}")
        failpoint("checkpoint")
        self.world.save_checkpoint(self.run_dir.path, self.model, self.optimizer, self.rng,
                                   {**self.state, **self.window.saved(), "step": self.step})
        self.last_checkpoint = self.step

    def _kept(self) -> str:
        where = (f"the last good checkpoint (step {self.last_checkpoint}) is kept in {self.run_dir.path}"
                 if self.last_checkpoint else "no checkpoint had been written yet")
        return f"training stopped; {where}; lower --lr or set --grad-clip"

    # -- outputs ---------------------------------------------------------------------------------------------

    def open_outputs(self) -> None:
        self.writer = _tensorboard_writer(self.run_dir.path) if self.world.is_main else None
        self.metrics = MetricsLog(self.run_dir.open_metrics() if self.world.is_main else None, self.writer)

    def close_outputs(self) -> None:
        self.reporter.stop()
        self.metrics.close()


def train(setup: RunSetup, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run (or continue) the training described by `setup`; returns the summary written to summary.json.

    The run directory is locked for the whole run (rank 0 holds the lock): a second process on it is refused.
    """
    config = setup.config
    world = connect(config, resolve_device(config.device))  # one process, or this rank of a torchrun job
    reporter = reporter or Reporter(enabled=config.progress and world.is_main)
    run = RunDir(setup.run_dir)
    with run.locked() if world.is_main else contextlib.nullcontext():
        if not setup.resume and world.is_main:
            _recheck_new_run(run, setup)
        trainer = Trainer(setup, world, reporter)
        if not setup.resume and world.is_main:
            _init_run_dir(setup, run)
        if trainer.step >= config.steps:
            return _already_finished(trainer)
        trainer.open_outputs()
        try:
            with StopSignal(enabled=not world.distributed, console=reporter.console) as stop:
                trainer.run(stop)
        finally:
            trainer.close_outputs()
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


class MetricsLog:
    """Where a log record goes: metrics.jsonl (rank 0) and TensorBoard (when installed)."""

    def __init__(self, metrics_file: MetricsFile | None, writer):
        self.file, self.writer = metrics_file, writer

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(record)
        if self.writer is not None:
            _write_tensorboard(self.writer, record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _write_tensorboard(writer, record: dict[str, Any]) -> None:
    step = record["step"]
    for key in ("loss", "val_loss", "train_loss_eval", "lr", "tokens_per_second", "grad_norm_total",
                "first_layer_grad_share"):
        if record.get(key) is not None:
            writer.add_scalar(key, record[key], step)
    for key in ("stream_rms", "drift", "block_grad_norms"):
        for layer, value in enumerate(record.get(key) or []):
            writer.add_scalar(f"{key}/block{layer}", value, step)


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional extra: reslab[tensorboard]
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _summary(setup: RunSetup, state: dict[str, Any], parameters: int, run: RunDir) -> dict[str, Any]:
    last_diagnostics: dict[str, Any] = {}
    drifts: list[float] = []
    for record in run.read_metrics():
        if "drift" in record:
            last_diagnostics = record
            drifts.extend(record["drift"])
    return {
        "model": setup.model_name,
        "residual": setup.model_config.get("residual"),
        "steps": state["step"],
        "final_train_loss": state.get("last_train_loss"),
        "final_val_loss": state.get("last_val_loss"),
        "best_val_loss": state.get("best_val_loss"),
        "tokens_per_second": state["tokens_seen"] / max(state["train_seconds"], 1e-9),
        "train_seconds": state["train_seconds"],
        "parameters": parameters,
        "first_layer_grad_share": last_diagnostics.get("first_layer_grad_share"),
        "final_stream_rms": last_diagnostics.get("stream_rms"),
        "final_drift": last_diagnostics.get("drift"),
        "mean_drift": sum(drifts) / len(drifts) if drifts else None,
    }
