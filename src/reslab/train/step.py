"""One optimisation step, shared by `reslab train` and `reslab bench` so the benchmark times what training runs.

Ordinary steps run the (optionally compiled) model with no host synchronisation: the loss stays a tensor. Log steps
run the eager model with the stream probe attached and compute every gradient norm with one foreach call, then clip
with the total they already have. Autocast to bf16 keeps fp32 master weights and optimizer state.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.errors import ReslabError
from reslab.faults import failpoint
from reslab.probe import GradientNorms, StreamProbe
from reslab.train.distributed import World, current, unwrap

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast pays off only with native bf16 matmuls: AVX512-BF16/AMX on CPU, Ampere+ on CUDA."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


@dataclass
class StepResult:
    loss: torch.Tensor  # detached, on the device: read it (a host sync) only when needed
    norms: GradientNorms | None = None
    probe: StreamProbe | None = None


class TrainStep:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, device: torch.device,
                 dtype: str = "fp32", compile: bool = False, micro_batches: int = 1, console=None,
                 world: World | None = None):
        self.model = unwrap(model)  # the bare model (probes, norms, clipping) when `model` is a DDP wrapper
        self.parallel = model  # forward and backward go through it, so gradients are synced over ranks
        self.world = world or current()
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.micro_batches = micro_batches
        self.console = console
        if dtype not in DTYPES:
            raise ReslabError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        if dtype == "bf16" and not bf16_supported(device):
            raise ReslabError(f"--dtype bf16 needs native bf16 support (AVX512-BF16/AMX CPU or CUDA), which "
                              f"{device} lacks; use --dtype fp32")
        self.autocast = (torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "fp32"
                         else contextlib.nullcontext())
        self.forward = model
        self.compile_seconds = 0.0
        self.compiled = False
        if compile:
            self.forward, self.compiled = compile_model(model, console)

    def loss(self, x: torch.Tensor, y: torch.Tensor, forward=None) -> torch.Tensor:
        with self.autocast:
            logits = (forward or self.forward)(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def __call__(self, x: torch.Tensor, y: torch.Tensor, diagnostics: bool = False) -> StepResult:
        probe = StreamProbe() if diagnostics else None
        total = torch.zeros((), device=x.device)
        started = time.perf_counter()
        for xs, ys in self.world.micro_batches(self.parallel, x, y, self.micro_batches):  # this rank's rows
            if probe is not None:  # eager, so the probe sees every site (compiled graphs skip Python hooks)
                with probe.attached(self.model):
                    loss = self.loss(xs, ys, self.parallel)
            elif self.compiled and not self.compile_seconds:
                loss = self._first_compiled_loss(xs, ys)
            else:
                loss = self.loss(xs, ys)
            (loss / self.micro_batches).backward()
            total += loss.detach()
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
        return StepResult(self.world.mean(total / self.micro_batches), norms, probe)  # the global batch's loss


    def _first_compiled_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Compilation happens on the first call; if it fails there, say so once and continue eager."""
        try:
            return self.loss(x, y)
        except Exception as error:  # noqa: BLE001 (any compiler failure means: run eager)
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            if self.console is not None:
                self.console.print(f"torch.compile failed ({type(error).__name__}: {message[:200]}); running eager")
            self.forward, self.compiled = self.parallel, False
            return self.loss(x, y)


def compile_model(model: nn.Module, console=None):
    """torch.compile the model, or say why not and run eager. Returns (callable, compiled?)."""
    try:
        import torch._inductor  # noqa: F401  (fails early where inductor cannot run)

        return torch.compile(model), True
    except Exception as error:  # compile support varies by platform; training must go on without it
        if console is not None:
            console.print(f"torch.compile is not available here ({type(error).__name__}: {error}); running eager")
        return model, False
