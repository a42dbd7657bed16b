"""One optimisation step, and the optimizer and learning-rate schedule it steps with.

The step is shared by `reslab train` and `reslab bench` so the benchmark times what training runs. Ordinary steps run
the (optionally compiled) model with no host synchronisation: the loss stays a tensor. Log steps run the eager model
with the stream probe attached and compute every gradient norm with one foreach call, then clip with the total they
already have. Autocast to bf16 keeps fp32 master weights and optimizer state.

`build_optimizer` makes AdamW (or Muon with its AdamW companion) over the parameter groups the model declares
(`contracts.parameter_groups`), scaled per block where a parametrisation asks (`block_scales`); `lr_at` is the
warmup-then-cosine schedule.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab._torch_compat import bf16_supported, cpu_bf16_flags, load_inductor
from reslab.contracts import parameter_groups
from reslab.errors import ReslabError
from reslab.io import failpoint
from reslab.probe import GradientNorms, StreamProbe
from reslab.train.distributed import World, current, unwrap

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo's names for the instructions that run bf16 natively


def native_bf16(device: torch.device) -> str | None:
    """What runs bf16 natively on `device` (e.g. "this CPU (amx_bf16)"), or None. Stricter than `bf16_supported`: an
    AVX512 CPU without AMX/AVX512-BF16 emulates bf16 and gains nothing, so `--dtype auto` keeps fp32 there."""
    if device.type == "cuda":
        # compute capability 8 (Ampere) and up has bf16 tensor cores; `is_bf16_supported()` also counts emulation
        native = torch.cuda.get_device_capability(device)[0] >= 8
        return f"CUDA device {torch.cuda.get_device_name(device)}" if native else None
    if device.type != "cpu":
        return None
    flags = cpu_flags()
    if flags is None:  # no /proc/cpuinfo (macOS, Windows): ask torch's cpuinfo
        flags = cpu_bf16_flags()
    found = [flag for flag in CPU_BF16_FLAGS if flag in flags]
    return f"this CPU ({', '.join(found)})" if found else None


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return set()


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto` -> bf16 where `device` runs it natively, else fp32; fp32 and bf16 stay as they are."""
    if dtype != "auto":
        return dtype
    return "bf16" if native_bf16(device) else "fp32"


@dataclass
class StepResult:
    loss: torch.Tensor  # the cross-entropy, detached, on the device: read it (a host sync) only when needed
    norms: GradientNorms | None = None
    probe: StreamProbe | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # each auxiliary loss, unweighted, detached
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # the model's extra metrics (last micro-batch)


@dataclass
class Losses:
    """One forward's losses: the cross-entropy (what is logged and evaluated) and what is minimised."""

    cross_entropy: torch.Tensor
    total: torch.Tensor  # cross-entropy + sum of weight x auxiliary loss
    aux: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]


class TrainStep:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, device: torch.device,
                 dtype: str = "fp32", compile: bool = False, micro_batches: int = 1, console=None,
                 world: World | None = None, aux_weights: dict[str, float] | None = None):
        self.model = unwrap(model)  # the bare model (probes, norms, clipping) when `model` is a DDP wrapper
        self.parallel = model  # forward and backward go through it, so gradients are synced over ranks
        self.world = world or current()
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.micro_batches = micro_batches
        self.console = console
        self.aux_weights = dict(aux_weights or {})  # auxiliary loss name -> weight (1.0 when not named)
        dtype = resolve_dtype(dtype, device)
        if dtype not in DTYPES:
            raise ReslabError(f"unknown dtype {dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
        if dtype == "bf16" and not bf16_supported(device):
            raise ReslabError(f"--dtype bf16 needs native bf16 support (AVX512-BF16/AMX CPU or CUDA), which "
                              f"{device} lacks; use --dtype fp32")
        self.dtype = dtype
        self.autocast = (torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "fp32"
                         else contextlib.nullcontext())
        self.forward = model
        self.compile_seconds = 0.0
        self.compiled = False
        if compile:
            self.forward, self.compiled = compile_model(model, console)

    def loss(self, x: torch.Tensor, y: torch.Tensor, forward=None) -> torch.Tensor:
        """The cross-entropy of the next token (what evaluation measures)."""
        return self.losses(x, y, forward).cross_entropy

    def losses(self, x: torch.Tensor, y: torch.Tensor, forward=None) -> Losses:
        """Cross-entropy plus the model's auxiliary losses (`ModelOutput.aux_losses`), each with its weight."""
        with self.autocast:
            out = (forward or self.forward)(x)
        cross_entropy = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
        aux = {name: value.float() for name, value in out.aux_losses.items()}
        total = cross_entropy
        for name, value in aux.items():
            total = total + self.aux_weights.get(name, 1.0) * value
        return Losses(cross_entropy, total, aux, out.metrics)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, diagnostics: bool = False) -> StepResult:
        probe = StreamProbe() if diagnostics else None
        total = torch.zeros((), device=x.device)
        aux: dict[str, torch.Tensor] = {}
        started = time.perf_counter()
        for xs, ys in self.world.micro_batches(self.parallel, x, y, self.micro_batches):  # this rank's rows
            if probe is not None:  # eager, so the probe sees every site (compiled graphs skip Python hooks)
                with probe.attached(self.model):
                    losses = self.losses(xs, ys, self.parallel)
            elif self.compiled and not self.compile_seconds:
                losses = self._first_compiled_losses(xs, ys)
            else:
                losses = self.losses(xs, ys)
            (losses.total / self.micro_batches).backward()
            total += losses.cross_entropy.detach()
            for name, value in losses.aux.items():
                aux[name] = aux.get(name, 0.0) + value.detach() / self.micro_batches
        if self.compiled and not self.compile_seconds:
            self.compile_seconds = time.perf_counter() - started  # the first call compiles
        norms = None
        if probe is not None:
            norms = self.world.gradient_norms(self.model, clip=self.grad_clip)  # norms before clipping, then clips
        elif self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        failpoint("step")  # the fault tests' "inside a step": gradients computed, weights not yet updated
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_balance(self.world.sum)  # MoE routing bias, from this step's expert counts over ranks
        aux = {name: self.world.mean(value) for name, value in aux.items()}
        metrics = {name: value.detach() for name, value in losses.metrics.items()}
        return StepResult(self.world.mean(total / self.micro_batches), norms, probe, aux, metrics)  # global batch


    def _first_compiled_losses(self, x: torch.Tensor, y: torch.Tensor) -> Losses:
        """Compilation happens on the first call; if it fails there, say so once and continue eager."""
        try:
            return self.losses(x, y)
        except Exception as error:  # noqa: BLE001 (any compiler failure means: run eager)
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            if self.console is not None:
                self.console.print(f"torch.compile failed ({type(error).__name__}: {message[:200]}); running eager")
            self.forward, self.compiled = self.parallel, False
            return self.losses(x, y)


def compile_model(model: nn.Module, console=None):
    """torch.compile the model, or say why not and run eager. Returns (callable, compiled?)."""
    try:
        load_inductor()  # fails early where inductor cannot run
        return torch.compile(model), True
    except Exception as error:  # compile support varies by platform; training must go on without it
        if console is not None:
            console.print(f"torch.compile is not available here ({type(error).__name__}: {error}); running eager")
        return model, False


def lr_at(step: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `min_lr` at `steps` (nanoGPT's schedule)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= steps:
        return min_lr
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay where modules declare it (`reslab.contracts.parameter_groups`: linear and embedding
    weights, not norms, biases or residual coefficients), fused where supported."""
    split = parameter_groups(model)
    groups = [{"params": split.decay, "weight_decay": weight_decay}, {"params": split.no_decay, "weight_decay": 0.0}]
    groups = scaled_groups(groups, block_scales(model), lr)
    # fused AdamW runs one kernel for all parameters (CUDA and, since torch 2.4, CPU); foreach is the fallback.
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=device.type != "cpu" or None)


ADAM_EPS = 1e-8  # torch's AdamW default


def block_scales(model: nn.Module) -> dict[int, tuple[float, float]]:
    """id(parameter) -> the (lr, eps) multipliers its block's residual sites declare
    (`ResidualSite.optimizer_scales`, CompleteP's depth rules), for the parameters whose block's are not (1, 1)."""
    scales: dict[int, tuple[float, float]] = {}
    for layer, _, site in getattr(model, "residual_sites", lambda: ())():
        scale = site.optimizer_scales()
        if scale != (1.0, 1.0):
            scales.update({id(p): scale for p in model.blocks[layer].parameters()})
    return scales


def scaled_groups(groups: list[dict], scales: dict[int, tuple[float, float]], lr: float) -> list[dict]:
    """Split each group by its parameters' multipliers; a scaled group carries `lr_scale` (the trainer's schedule
    multiplies by it every step) and its own `eps`. Without scales the groups are returned as they are."""
    if not scales:
        return groups
    split = []
    for group in groups:
        by_scale: dict[tuple[float, float], list] = {}
        for p in group["params"]:
            by_scale.setdefault(scales.get(id(p), (1.0, 1.0)), []).append(p)
        split += [{**group, "params": params, "lr": lr * lr_scale, "lr_scale": lr_scale, "eps": ADAM_EPS * eps_scale}
                  for (lr_scale, eps_scale), params in by_scale.items()]
    return split


def build_optimizer(config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (default) or Muon for hidden matrices + AdamW for the rest (`--optimizer muon`)."""
    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        from reslab.train.muon import MuonAdamW

        return MuonAdamW(model, config.lr, config.muon_lr, config.weight_decay, betas)
    return build_adamw(model, config.lr, config.weight_decay, betas, device)
