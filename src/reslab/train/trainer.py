"""The training loop, assembled from small parts that each own their cadence and their share of the resume state:

    LogWindow     the steps since the last log record (mean loss, tokens/s)      log_interval
    Evaluator     validation and train loss on fixed batches, the best so far    eval_interval
    Checkpointer  weights + optimizer + RNG + state, only when finite            checkpoint_interval
    LoggerSet     metrics.jsonl, the trackers (TensorBoard, W&B) and the progress bar, closed on every path
    StopSignal    Ctrl-C / SIGTERM: stop at the end of a step, checkpointed

`Trainer` builds the model, optimizer and batches, restores them from the run's checkpoint when resuming, and runs
the steps; `reslab.train.loop.train` holds the run directory's lock around it.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any

import torch

from reslab.data import BatchSampler
from reslab.data.shards import TokenSpan
from reslab.data.tokenfiles import DataChanged, lease_breaks, reading
from reslab.errors import Interrupted, ReslabError
from reslab.io import failpoint
from reslab.metrics import computed, run_summary
from reslab.models import build_model
from reslab.rundir import CHECKPOINT
from reslab.train.checkpoint import (
    check_model_tensors,
    check_optimizer_tensors,
    check_rng_tensors,
    check_training_state,
    model_tensors,
    read_checkpoint,
)
from reslab.train.loggers import Tracker, final_metrics, open_trackers, run_config
from reslab.train.progress import Reporter
from reslab.train.schedule import build_optimizer, lr_at
from reslab.train.step import StepResult, TrainStep


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
