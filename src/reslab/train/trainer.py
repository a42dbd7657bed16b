"""Train a reslab model: one run directory, crash-safe checkpoints, exact resume, diagnostics on log steps.

    setup = prepare({"model": "gpt", "steps": 2000}, {"layers": 4}, Path("runs/gpt"))   # validates, writes nothing
    summary = train(setup)                                                              # locks, trains, summarises

`prepare` checks the request and reads the data with the run directory opened once (`RunSetup.run`); `train` holds
the directory's lock around the `Trainer`. The run directory holds config.json (everything needed to rebuild the
run), tokenizer.reslab.json, metrics.jsonl (one JSON object per logged step), checkpoint.safetensors + state.json,
and summary.json at the end.

The training loop is assembled from small parts that each own their cadence and their share of the resume state:

    LogWindow     the steps since the last log record (mean loss, tokens/s)      log_interval
    Evaluator     validation and train loss on fixed batches, the best so far    eval_interval
    Checkpointer  weights + optimizer + RNG + state, only when finite            checkpoint_interval
    LoggerSet     metrics.jsonl, the trackers (TensorBoard, W&B) and the progress bar, closed on every path
    StopSignal    Ctrl-C / SIGTERM: stop at the end of a step, checkpointed

`Trainer` builds the model, optimizer and batches, restores them from the run's checkpoint when resuming, and runs
the steps.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reslab import __version__
from reslab.data import BatchSampler, Tokenizer, load_tokenizer
from reslab.data.shards import PreparedData, TokenSpan
from reslab.data.tokenfiles import DataChanged, lease_breaks, reading
from reslab.data.training import check_resumable, training_data
from reslab.errors import Interrupted, ReslabError
from reslab.io import failpoint
from reslab.memory import check_fits
from reslab.metrics import computed, run_summary
from reslab.models import build_model, check_saved_model_config, make_config
from reslab.rundir import CHECKPOINT, CONFIG, DamagedRunError, RunDir
from reslab.train.checkpoint import (
    check_model_tensors,
    check_optimizer_tensors,
    check_rng_tensors,
    check_training_state,
    checkpoint_step,
    model_tensors,
    read_checkpoint,
)
from reslab.train.config import RESUMABLE_FIELDS, TrainConfig, resolve_device
from reslab.train.distributed import check_launch, connect
from reslab.train.loggers import Reporter, Tracker, final_metrics, open_trackers, run_config
from reslab.train.step import StepResult, TrainStep, build_optimizer, lr_at


class NonFiniteLoss(ReslabError):
    pass


def rng_state(batch_generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "batch": batch_generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], batch_generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["rng.torch"])
    batch_generator.set_state(state["rng.batch"])
    if device.type == "cuda" and "rng.cuda" in state:
        torch.cuda.set_rng_state(state["rng.cuda"], device)


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
    """The steps since the last log record: their summed loss (on the device: no host sync per step), and time.
    Its resume state is the open window (`saved`), so a resumed run logs the same mean loss."""

    def __init__(self, interval: int, last_step: int, device: torch.device, state: dict[str, Any]):
        self.interval, self.last_step = interval, last_step
        self.loss_sum = torch.full((), float(state.pop("window_loss_sum", 0.0)), device=device)
        self.steps = state.pop("window_steps", 0)
        self.started = time.perf_counter()

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.last_step

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
        return {"window_loss_sum": self.loss_sum.item(), "window_steps": self.steps}


class Evaluator:
    """Validation and training loss on fixed batches every `eval_interval` steps and at the end; keeps the best."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.config = trainer.config
        self.last_val: float | None = None

    def due(self, step: int) -> bool:
        return step % self.config.eval_interval == 0 or step == self.config.steps

    def evaluate(self, state: dict[str, Any]) -> dict[str, float]:
        """Both losses, recorded in `state` (the resume state: last and best)."""
        t, config = self.trainer, self.config
        failpoint("eval")
        self.last_val = estimate_loss(t.train_step, t.setup.val_tokens, config.batch, t.context,
                                      config.eval_batches, config.seed + 1, t.device)
        train_eval = estimate_loss(t.train_step, t.setup.train_tokens, config.batch, t.context, config.eval_batches,
                                   config.seed + 2, t.device)
        if state["best_val_loss"] is None or self.last_val < state["best_val_loss"]:
            state["best_val_loss"] = self.last_val
        state["last_val_loss"], state["last_train_loss"] = self.last_val, train_eval
        return {"val_loss": self.last_val, "train_loss_eval": train_eval}


class Checkpointer:
    """Every `checkpoint_interval` steps, at `--stop-at` and at the end: the step with its own RNG state. Never
    writes non-finite weights or a non-finite open window: the last good checkpoint stays."""

    def __init__(self, trainer: Trainer, end: int):
        self.trainer, self.end = trainer, end
        self.last = trainer.state["step"]

    def due(self, step: int) -> bool:
        config = self.trainer.config
        return step % config.checkpoint_interval == 0 or step in (config.steps, self.end)

    def save(self, step: int, rng: dict[str, torch.Tensor], state: dict[str, Any], window: LogWindow) -> None:
        t = self.trainer
        if not math.isfinite(window.loss_sum.item()):
            raise NonFiniteLoss(f"loss became non-finite by step {step}; {self.kept()}")
        if not t.world.all_finite(t.model):
            raise NonFiniteLoss(f"the weights became non-finite by step {step}; {self.kept()}")
        failpoint("checkpoint")
        t.world.save_checkpoint(t.run_dir.path, t.model, t.optimizer, rng, {**state, **window.saved(), "step": step})
        self.last = step

    def kept(self) -> str:
        where = (f"the last good checkpoint (step {self.last}) is kept in {self.trainer.run_dir.path}" if self.last
                 else "no checkpoint had been written yet")
        return f"training stopped; {where}; lower --lr or set --grad-clip"


class LoggerSet:
    """Where records go: metrics.jsonl and the trackers of `--log` (rank 0: `reslab.train.loggers`), and the
    progress display. When the run finishes, the trackers get its config and final metrics (`finish`)."""

    def __init__(self, setup, is_main: bool, reporter: Reporter):
        self.reporter, self.run_dir = reporter, setup.run
        self.config = run_config(setup)
        self.file = self.run_dir.open_metrics() if is_main else None
        try:
            self.trackers: list[Tracker] = open_trackers(setup) if is_main else []
        except BaseException:
            if self.file is not None:
                self.file.close()
            raise

    def write(self, record: dict[str, Any], last_val: float | None, eval_done: bool = False) -> None:
        if self.file is not None:
            self.file.write(record)
        for tracker in self.trackers:
            tracker.log(record)
        self.reporter.update(record["step"], record.get("loss"), last_val, record.get("tokens_per_second"),
                             eval_done=eval_done)

    def finish(self) -> None:
        """The run reached its last step: the hyper-parameters with the final metrics (from metrics.jsonl)."""
        if self.trackers:
            final = final_metrics(run_summary(self.run_dir.read_metrics(), {}))
            for tracker in self.trackers:
                tracker.hparams(self.config, final)

    def close(self) -> None:
        self.reporter.stop()
        if self.file is not None:
            self.file.close()
        for tracker in self.trackers:
            tracker.close()


class Trainer:
    """One training run, from a validated `RunSetup`: built, restored when resuming, then `run()`."""

    def __init__(self, setup, world, reporter: Reporter):
        self.setup, self.config, self.world, self.reporter = setup, setup.config, world, reporter
        self.run_dir = setup.run
        self.device = world.device
        torch.manual_seed(self.config.seed)
        self.model = build_model(setup.model_name, **setup.model_config).to(self.device)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        resumed = self._read_resume_checkpoint() if setup.resume else None  # checked before anything is changed
        parallel = world.parallelize(self.model)  # DDP wrapper, FSDP2-sharded model, or the model itself
        self.optimizer = build_optimizer(self.config, self.model, self.device)
        self.train_step = TrainStep(parallel, self.optimizer, self.config.grad_clip, self.device, self.config.dtype,
                                    self.config.compile, micro_batches=self.config.grad_accum,
                                    console=reporter.console, world=world, aux_weights=self._aux_weights())
        self.batch_generator = torch.Generator().manual_seed(self.config.seed)
        self.context = setup.model_config["context"]
        self.sampler = BatchSampler(setup.train_tokens, self.config.batch, self.context, self.batch_generator,
                                    self.device, vocab_size=setup.model_config["vocab_size"])
        self.state: dict[str, Any] = {"step": 0, "best_val_loss": None, "train_seconds": 0.0, "tokens_seen": 0}
        if resumed is not None:
            self._restore(*resumed)
        self.step = self.state["step"]
        self.end = min(self.config.steps, self.config.stop_at or self.config.steps)
        self.window = LogWindow(self.config.log_interval, self.config.steps, self.device, self.state)
        self.evaluator = Evaluator(self)
        self.checkpointer = Checkpointer(self, self.end)
        self.rng = rng_state(self.batch_generator, self.device)  # the RNG state that goes with `self.step`
        self.loggers: LoggerSet | None = None

    def _aux_weights(self) -> dict[str, float]:
        """The weight of each auxiliary loss: the model's own (`aux_loss_weights`), then the config's."""
        return {**getattr(self.model, "aux_loss_weights", {}), **self.config.aux_weights}

    # -- resume ----------------------------------------------------------------------------------------------

    def _read_resume_checkpoint(self):
        path = self.run_dir / CHECKPOINT
        tensors, meta = read_checkpoint(path)
        model_part = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        check_model_tensors(model_part, model_tensors(self.model), path)
        check_rng_tensors(tensors, rng_state(torch.Generator(), self.device), path)
        check_training_state(meta, path)
        optimizer_part = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        rng_part = {k: v for k, v in tensors.items() if k.startswith("rng.")}
        return model_part, optimizer_part, rng_part, meta

    def _restore(self, model_part, optimizer_part, rng_part, meta) -> None:
        check_optimizer_tensors(optimizer_part, meta["optimizer"], self.optimizer, self.run_dir / CHECKPOINT)
        self.world.load_model(self.model, model_part)
        self.world.load_optimizer(self.optimizer, optimizer_part, meta["optimizer"])
        restore_rng(rng_part, self.batch_generator, self.device)
        self.state.update(meta["state"])
        if self.world.is_main:  # only rank 0 writes the run directory
            self.run_dir.remove_temp_files()
            self.run_dir.truncate_metrics(self.state["step"])
        self.reporter.note(f"resuming {self.run_dir.path} at step {self.state['step']}")

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self, stop: StopSignal) -> None:
        """Train to `--steps` (or `--stop-at`), with every part on its cadence; a stop request ends it after a step.
        The loggers are closed on every path."""
        self.loggers = LoggerSet(self.setup, self.world.is_main, self.reporter)
        try:
            self.reporter.start(self.config.steps, self.step, f"{self.setup.model_name} / "
                                f"{self.setup.model_config.get('residual', '')}")
            self.model.train()
            while self.step < self.end:
                self._step_on_guarded_data()
                self.reporter.advance(self.step)  # the bar's count and ETA move every step
                if stop.requested and self.step < self.end:
                    self._stop()
            if self.step >= self.config.steps:
                self.loggers.finish()
        finally:
            self.loggers.close()

    def _step_on_guarded_data(self) -> None:
        """One step. A token file truncated under it (read with pread: a short read), or opened for writing by
        another process (a lease-break notice, `reslab.data.tokenfiles`), stops the run at the last finished step,
        checkpointed, in one line naming the file. Cut short after its update (a validation window read with pread
        during the step's evaluation), the step is not finished: it is not checkpointed, and the run keeps its last
        checkpoint, from which a resume redoes the step, evaluation and log record included."""
        begun, changed = self.step, None
        try:
            with reading():  # a shard's writer waits for the end of the step: it ends on the tokens it began with
                changed = self._data_changed()  # a notice between two steps: its writer may be at work already
                if changed is None:
                    self._one_step()
        except DataChanged as error:
            self._stop_for_data(str(error), finished=self.step == begun)
        changed = changed or self._data_changed()
        if changed is not None:
            self._stop_for_data(f"another process opened {changed} for writing while this run read it")

    def _data_changed(self) -> str | None:
        """A token file whose lease broke (another process opens it for writing), if any."""
        if not lease_breaks() or self.world.distributed or self.step >= self.end:
            return None
        changed = sorted({path for span in (self.setup.train_tokens, self.setup.val_tokens)
                          if isinstance(span, TokenSpan) for path in span.changed()})
        return str(changed[0]) if changed else None

    def _stop_for_data(self, problem: str, finished: bool = True) -> None:
        if self.world.distributed:  # a checkpoint takes every rank, and the others may not have seen it
            raise DataChanged(f"{problem}; stopped; the last checkpoint is kept in {self.run_dir.path}")
        if not finished:  # weights of step N without its evaluation and record: a checkpoint of them would lie
            kept = (f"the last checkpoint (step {self.checkpointer.last}) is kept" if self.checkpointer.last else
                    "no checkpoint had been written yet")
            raise DataChanged(f"{problem}; stopped during step {self.step}; {kept}; check the data (reslab data info "
                              f"DIR --verify), then continue with: {self.run_dir.resume_command()}")
        if self.checkpointer.last < self.step:
            self.checkpointer.save(self.step, self.rng, self.state, self.window)
        raise DataChanged(f"{problem}; stopped at step {self.step}, checkpointed; check the data (reslab data info "
                          f"DIR --verify), then continue with: {self.run_dir.resume_command()}")

    def _one_step(self) -> None:
        config = self.config
        lr = lr_at(self.step, config.lr, config.floor_lr, config.warmup, config.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        step = self.step + 1
        log_now, eval_now = self.window.due(step), self.evaluator.due(step)
        x, y = self.sampler.sample()
        result = self.train_step(x, y, diagnostics=log_now and config.diagnostics)
        self.window.add(result.loss)
        self.step = step
        self.rng = rng_state(self.batch_generator, self.device)
        record = self._log_record(lr, result) if log_now else None
        if eval_now:
            if self.window.steps:  # an eval step that is not a log step: close the window first
                self.window.close(self.state, config.batch * self.context)
            record = {**(record or {"step": step}), **self.evaluator.evaluate(self.state)}
        if record is not None:
            self.loggers.write(record, self.evaluator.last_val, eval_done=eval_now)
        if self.checkpointer.due(step):
            self.checkpointer.save(step, self.rng, self.state, self.window)
        if log_now or eval_now:
            self.window.started = time.perf_counter()

    def _stop(self) -> None:
        if self.checkpointer.last < self.step:
            self.checkpointer.save(self.step, self.rng, self.state, self.window)
        raise Interrupted(f"interrupted at step {self.step}; checkpoint saved, "
                          f"continue with: {self.run_dir.resume_command()}")

    def _log_record(self, lr: float, result: StepResult) -> dict[str, Any]:
        tokens_per_step = self.config.batch * self.context
        mean_loss, elapsed, steps = self.window.close(self.state, tokens_per_step)
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(f"loss became {mean_loss} by step {self.step} (checked every "
                                f"{self.config.log_interval} steps); {self.checkpointer.kept()}")
        record: dict[str, Any] = {"step": self.step, "loss": mean_loss, "lr": lr,
                                  "tokens_per_second": steps * tokens_per_step / max(elapsed, 1e-9),
                                  "train_seconds": self.state["train_seconds"]}
        if result.aux_losses:  # the log step's auxiliary losses, unweighted (MoE load balancing, ...)
            record["aux_losses"] = {name: value.item() for name, value in result.aux_losses.items()}
        if result.metrics:
            record["model_metrics"] = {name: value.tolist() for name, value in result.metrics.items()}
        if result.norms is not None:
            record.update(result.norms.to_metrics())
            record.update(result.probe.to_metrics(reduce=self.world.sum))  # sums over ranks: the global batch
            sites = [site for _, _, site in self.model.residual_sites()]
            record.update(type(sites[0]).scheme_metrics(sites, self.world))  # every rank takes part
            if self.config.print_grad_norms:
                self.reporter.grad_norms(self.step, result.norms.per_parameter, result.norms.total)
        record.update(computed(self.model, result))  # metrics declared with their own computation
        return record


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
