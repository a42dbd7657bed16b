"""Train a reslab model: one run directory, crash-safe checkpoints, exact resume, diagnostics on log steps.

    summary = train(TrainConfig(model="gpt", steps=2000), {"layers": 4}, Path("runs/gpt"))

The run directory holds config.json (everything needed to rebuild the run), tokenizer.json, metrics.jsonl (one
JSON object per logged step), checkpoint.safetensors + state.json, and summary.json at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reslab import __version__
from reslab.data import BatchSampler, Tokenizer, build_tokenizer, encode_corpus, load_text, load_tokenizer, split_tokens
from reslab.errors import ReslabError
from reslab.io import read_json, write_json
from reslab.models import build_model, make_config
from reslab.train.checkpoint import CHECKPOINT, CONFIG, read_checkpoint
from reslab.train.config import RESUMABLE_FIELDS, TrainConfig, check_device_name
from reslab.train.distributed import check_launch, connect
from reslab.train.progress import Reporter
from reslab.train.schedule import build_optimizer, lr_at
from reslab.train.step import TrainStep

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


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


def prepare(config_overrides: dict[str, Any], model_overrides: dict[str, Any], run_dir: Path, resume: bool = False,
            overwrite: bool = False, command: list[str] | None = None) -> RunSetup:
    """Validate the request and load the data. Raises ReslabError, having written nothing, on bad input."""
    run_dir = Path(run_dir)
    if resume:
        saved = _read_saved_config(run_dir)
        config = _merge_for_resume(saved, config_overrides, model_overrides)
        check_launch(config)  # batch vs world size, --fsdp outside torchrun
        model_name, model_config = saved["model"], dict(saved["model_config"])
        text, description = load_text(config.data)
        if hashlib.sha256(text.encode()).hexdigest() != saved["data"]["sha256"]:
            raise ReslabError(f"the data {config.data!r} changed since run {run_dir} started; resume with the same "
                              "text or start a new run")
        tokenizer = load_tokenizer(run_dir)
    else:
        _check_output_dir(run_dir, overwrite)
        config = TrainConfig.from_dict(config_overrides)
        check_launch(config)
        model_name = config.model
        make_config(model_name, **model_overrides)  # fail on a bad model flag before the data is read
        text, description = load_text(config.data)
        tokenizer = build_tokenizer(config.tokenizer, text, config.vocab_size)
        model_config = make_config(model_name, **{**model_overrides, "vocab_size": tokenizer.vocab_size}).to_dict()
    tokens = encode_corpus(tokenizer, text)
    train_tokens, val_tokens = split_tokens(tokens)
    context = model_config["context"]
    for split, part in (("train", train_tokens), ("validation", val_tokens)):
        if len(part) < context + 1:
            raise ReslabError(f"the {split} split of {description} has {len(part):,} tokens but --context {context} "
                              f"needs at least {context + 1:,}; lower --context or use more text")
    data = {"source": config.data, "description": description, "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "tokens": len(tokens), "train_tokens": len(train_tokens), "val_tokens": len(val_tokens)}
    return RunSetup(config, model_name, model_config, tokenizer, train_tokens, val_tokens, data, run_dir, resume,
                    list(command or []))


def _read_saved_config(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / CONFIG).exists():
        raise ReslabError(f"cannot resume: {run_dir} has no config.json; is it a reslab run directory?")
    if not (run_dir / CHECKPOINT).exists():
        raise ReslabError(f"cannot resume: {run_dir} has no checkpoint yet; start it again with --overwrite")
    return read_json(run_dir / CONFIG)


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


def _check_output_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ReslabError(f"output path {run_dir} is a file, not a directory; choose another --out")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not overwrite:
        raise ReslabError(f"output directory {run_dir} is not empty; pass --resume {run_dir} to continue it, "
                          "--overwrite to replace it, or choose another --out")
    if not (run_dir / CONFIG).exists():
        raise ReslabError(f"--overwrite only replaces reslab run directories, and {run_dir} has no config.json; "
                          "choose another --out")


def _init_run_dir(setup: RunSetup) -> None:
    run_dir = setup.run_dir
    if run_dir.exists():
        for child in run_dir.iterdir():  # --overwrite of a reslab run directory (checked in prepare)
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / CONFIG, {
        "reslab_version": __version__,
        "model": setup.model_name,
        "model_config": setup.model_config,
        "train": setup.config.to_dict(),
        "data": setup.data,
        "tokenizer": setup.tokenizer.kind,
        "command": setup.command,
    })
    setup.tokenizer.save(run_dir)


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


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from, so steps are not recorded twice."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


class NonFiniteLoss(ReslabError):
    pass


def train(setup: RunSetup, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run (or continue) the training described by `setup`; returns the summary written to summary.json."""
    config, run_dir = setup.config, setup.run_dir
    world = connect(config, resolve_device(config.device))  # one process, or this rank of a torchrun job
    device = world.device
    reporter = reporter or Reporter(enabled=config.progress and world.is_main)
    torch.manual_seed(config.seed)
    model = build_model(setup.model_name, **setup.model_config).to(device)
    parallel = world.parallelize(model)  # DDP wrapper, FSDP2-sharded model, or the model itself (one process)
    optimizer = build_optimizer(config, model, device)
    train_step = TrainStep(parallel, optimizer, config.grad_clip, device, config.dtype, config.compile,
                           micro_batches=config.grad_accum, console=reporter.console, world=world)
    batch_generator = torch.Generator().manual_seed(config.seed)
    context = setup.model_config["context"]
    sampler = BatchSampler(setup.train_tokens, config.batch, context, batch_generator, device)

    state: dict[str, Any] = {"step": 0, "best_val_loss": None, "train_seconds": 0.0, "tokens_seen": 0}
    if setup.resume:
        tensors, meta = read_checkpoint(run_dir / CHECKPOINT)
        world.load_model(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
        world.load_optimizer(optimizer, optimizer_tensors, meta["optimizer"])
        _restore_rng({k: v for k, v in tensors.items() if k.startswith("rng.")}, batch_generator, device)
        state.update(meta["state"])
        if world.is_main:  # only rank 0 writes the run directory
            _truncate_metrics(run_dir / METRICS, state["step"])
        reporter.note(f"resuming {run_dir} at step {state['step']}")
    elif world.is_main:
        _init_run_dir(setup)
    parameters = sum(p.numel() for p in model.parameters())
    if state["step"] >= config.steps:
        reporter.note(f"{run_dir} already finished {state['step']} steps; "
                      f"pass --steps N (N > {state['step']}) to continue")
        if not world.is_main:
            return {"steps": state["step"]}  # rank 0 returns the summary
        if not (run_dir / SUMMARY).exists():  # killed between the last checkpoint and the summary
            write_json(run_dir / SUMMARY, _summary(setup, state, parameters, run_dir))
        return read_json(run_dir / SUMMARY)

    writer = _tensorboard_writer(run_dir) if world.is_main else None
    metrics_file = open(run_dir / METRICS if world.is_main else os.devnull, "a")
    tokens_per_step = config.batch * context
    last_val = None
    last_checkpoint = state["step"]
    loss_sum = torch.full((), float(state.pop("window_loss_sum", 0.0)), device=device)
    steps_in_window = state.pop("window_steps", 0)
    window_start = time.perf_counter()
    reporter.start(config.steps, state["step"], f"{setup.model_name} / {setup.model_config.get('residual', '')}")
    model.train()
    step = state["step"]
    rng_before_step = _rng_state(batch_generator, device)

    def kept() -> str:
        where = (f"the last good checkpoint (step {last_checkpoint}) is kept in {run_dir}" if last_checkpoint
                 else "no checkpoint had been written yet")
        return f"training stopped; {where}; lower --lr or set --grad-clip"

    def checkpoint(step_done: int, rng: dict[str, torch.Tensor]) -> None:
        nonlocal last_checkpoint
        # the open log window too, so a resumed run logs the same mean loss as an uninterrupted one
        window = {"window_loss_sum": loss_sum.item(), "window_steps": steps_in_window}
        world.save_checkpoint(run_dir, model, optimizer, rng, {**state, **window, "step": step_done})
        last_checkpoint = step_done

    end = min(config.steps, config.stop_at or config.steps)
    try:
        while step < end:
            rng_before_step = _rng_state(batch_generator, device)
            lr = lr_at(step, config.lr, config.floor_lr, config.warmup, config.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            step_done = step + 1
            log_now = step_done % config.log_interval == 0 or step_done == config.steps
            eval_now = step_done % config.eval_interval == 0 or step_done == config.steps
            x, y = sampler.sample()
            result = train_step(x, y, diagnostics=log_now and config.diagnostics)
            norms, probe = result.norms, result.probe
            loss_sum += result.loss
            steps_in_window += 1
            step = step_done

            if log_now:
                elapsed = time.perf_counter() - window_start
                mean_loss = loss_sum.item() / steps_in_window
                if not math.isfinite(mean_loss):
                    raise NonFiniteLoss(f"loss became {mean_loss} by step {step_done} (checked every "
                                        f"{config.log_interval} steps); {kept()}")
                state["train_seconds"] += elapsed
                state["tokens_seen"] += steps_in_window * tokens_per_step
                record: dict[str, Any] = {"step": step_done, "loss": mean_loss, "lr": lr,
                                          "tokens_per_second": steps_in_window * tokens_per_step / max(elapsed, 1e-9),
                                          "train_seconds": state["train_seconds"]}
                if norms is not None:
                    record.update(norms.to_metrics())
                    record.update(probe.to_metrics(reduce=world.sum))  # sums over ranks: the global batch's stream
                    sites = [site for _, _, site in model.residual_sites()]
                    record.update(type(sites[0]).scheme_metrics(sites, world))  # every rank takes part
                    if config.print_grad_norms:
                        reporter.grad_norms(step_done, norms.per_parameter, norms.total)
                if not eval_now:  # on eval steps the record is completed and written below
                    _write_record(metrics_file, writer, record)
                    reporter.update(step_done, mean_loss, last_val, record["tokens_per_second"])
                    record = None
                loss_sum.zero_()
                steps_in_window = 0
            else:
                record = None

            if eval_now:
                if steps_in_window:  # an eval step that is not a log step: close the window first
                    elapsed = time.perf_counter() - window_start
                    state["train_seconds"] += elapsed
                    state["tokens_seen"] += steps_in_window * tokens_per_step
                    loss_sum.zero_()
                    steps_in_window = 0
                last_val = estimate_loss(train_step, setup.val_tokens, config.batch, context, config.eval_batches,
                                         config.seed + 1, device)
                train_eval = estimate_loss(train_step, setup.train_tokens, config.batch, context, config.eval_batches,
                                           config.seed + 2, device)
                if state["best_val_loss"] is None or last_val < state["best_val_loss"]:
                    state["best_val_loss"] = last_val
                state["last_val_loss"], state["last_train_loss"] = last_val, train_eval
                record = record or {"step": step_done}
                record.update({"val_loss": last_val, "train_loss_eval": train_eval})
                _write_record(metrics_file, writer, record)
                reporter.update(step_done, record.get("loss"), last_val, record.get("tokens_per_second"),
                                eval_done=True)
            if step_done % config.checkpoint_interval == 0 or step_done in (config.steps, end):
                if not math.isfinite(loss_sum.item()):
                    raise NonFiniteLoss(f"loss became non-finite by step {step_done}; {kept()}")
                checkpoint(step_done, _rng_state(batch_generator, device))
            if log_now or eval_now:
                window_start = time.perf_counter()
    except KeyboardInterrupt:
        reporter.stop()
        if last_checkpoint < step and math.isfinite(loss_sum.item()):
            # `step` counts completed steps; the RNG snapshot was taken before the interrupted one began.
            checkpoint(step, rng_before_step if rng_before_step is not None else _rng_state(batch_generator, device))
        metrics_file.close()
        raise ReslabError(f"interrupted at step {step}; checkpoint saved, "
                          f"continue with: reslab train --resume {run_dir}")
    except NonFiniteLoss:
        reporter.stop()
        metrics_file.close()
        raise
    reporter.stop()
    metrics_file.close()
    if writer is not None:
        writer.close()
    state["step"] = step
    if step < config.steps:
        return {"stopped_at": step}
    if not world.is_main:
        return {"steps": step}  # rank 0 writes and returns the summary
    summary = _summary(setup, state, parameters, run_dir)
    write_json(run_dir / SUMMARY, summary)
    return summary


def _write_record(metrics_file, writer, record: dict[str, Any]) -> None:
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
    if writer is not None:
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


def _summary(setup: RunSetup, state: dict[str, Any], parameters: int, run_dir: Path) -> dict[str, Any]:
    last_diagnostics: dict[str, Any] = {}
    drifts: list[float] = []
    with open(run_dir / METRICS) as handle:
        for line in handle:
            record = json.loads(line)
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
