"""Every private torch name reslab uses, each behind one small function: when a torch release moves or drops one,
this file is the one place to look (`tests/test_torch_compat.py` calls each on the pinned torch, and
`tests/test_architecture.py` checks that no other module names a private torch member).

Why private at all: the `_foreach_*` ops run one kernel over a list of tensors (what `clip_grad_norm_` and the
optimizers use internally; there is no public spelling), and the dispatcher queries tell the multi-stream
schemes' fused autograd Functions when they must step aside (under a tracer, torch.func or batched gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

Tensors = Sequence[torch.Tensor]


# --- one kernel over a list of tensors (the optimizers' and gradient clipping's) -------------------------------
def foreach_norm(tensors: Tensors) -> list[torch.Tensor]:
    """The L2 norm of each tensor, `[t.norm() for t in tensors]` in one kernel launch."""
    return list(torch._foreach_norm(tensors))


def foreach_mul_(tensors: Tensors, factor: float | torch.Tensor) -> None:
    """Multiply each tensor in place by `factor` (a number or a 0-d tensor)."""
    torch._foreach_mul_(tensors, factor)


def foreach_add_(tensors: Tensors, others: Tensors, alpha: float = 1.0) -> None:
    """`t += alpha * other` in place for each pair."""
    torch._foreach_add_(tensors, others, alpha=alpha)


def foreach_lerp_(starts: Tensors, ends: Tensors, weight: float) -> None:
    """`start += weight * (end - start)` in place for each pair (an exponential moving average)."""
    torch._foreach_lerp_(starts, ends, weight)


def foreach_lerp(starts: Tensors, ends: Tensors, weight: float) -> list[torch.Tensor]:
    """`start + weight * (end - start)` for each pair, as new tensors."""
    return list(torch._foreach_lerp(starts, ends, weight))


# --- what the dispatcher is doing now ------------------------------------------------------------------------
def torch_function_mode_enabled() -> bool:
    """Is a `TorchFunctionMode` active (the audit's tracer, a FLOP counter)?"""
    return torch._C._is_torch_function_mode_enabled()


def functorch_transforms_active() -> bool:
    """Is a torch.func transform (grad, vmap, jvp) running?"""
    return torch._C._are_functorch_transforms_active()


def is_batched_gradient(tensor: torch.Tensor) -> bool:
    """Is `tensor` a legacy batched tensor (autograd's `is_grads_batched` gradients)?"""
    return torch._C._functorch.is_legacy_batchedtensor(tensor)


def view_base(tensor: torch.Tensor) -> torch.Tensor | None:
    """The tensor `tensor` is a view of, or None when it owns its memory."""
    return tensor._base


# --- what this machine can run -------------------------------------------------------------------------------
def mkldnn_bf16_supported() -> bool:
    """Does oneDNN run bf16 on this CPU (AVX512 cores and up)? False where torch cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def bf16_supported(device: torch.device) -> bool:
    """Whether `--dtype bf16` may run here: CUDA with bf16, or a CPU oneDNN runs bf16 on (AVX512 cores and up)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return mkldnn_bf16_supported()
    return False


def cpu_bf16_flags() -> set[str]:
    """The bf16 instructions torch's cpuinfo finds on this CPU, by /proc/cpuinfo's names (`amx_bf16`,
    `avx512_bf16`); every CPU with AMX tiles so far has AMX-BF16 (Sapphire Rapids and later)."""
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return {flag for flag, check in checks.items() if getattr(torch.cpu, check, lambda: False)()}


def load_inductor() -> None:
    """Import torch.compile's default backend; raises where it cannot run (no compiler, an unsupported platform)."""
    import torch._inductor  # noqa: F401


__all__ = ["bf16_supported", "cpu_bf16_flags", "foreach_add_", "foreach_lerp", "foreach_lerp_", "foreach_mul_",
           "foreach_norm", "functorch_transforms_active", "initialisers_skipped", "is_batched_gradient",
           "load_inductor", "mkldnn_bf16_supported", "torch_function_mode_enabled", "view_base"]


# --- building a model on the meta device without running its initialisers --------------------------------------
@contextlib.contextmanager
def initialisers_skipped() -> Iterator[None]:
    """torch.nn.init's in-place initialisers leave a meta tensor as it is, for the block. Under `torch.device("meta")`
    an initialiser has nothing to fill, yet torch runs it through its Python reference kernels, whose first use
    imports torch._dynamo: seconds at the start of every run that checks whether its model fits. (transformers'
    `no_init_weights` does the like.) A real tensor is still initialised, so a model built on another thread
    meanwhile is unaffected, and overlapping blocks put back the originals captured at import."""
    for name, original in _INITIALISERS.items():
        setattr(torch.nn.init, name, _skipping_meta(original))
    try:
        yield
    finally:
        for name, original in _INITIALISERS.items():
            setattr(torch.nn.init, name, original)


def _skipping_meta(original):
    def initialise(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return tensor if tensor.is_meta else original(tensor, *args, **kwargs)

    return initialise


_INITIALISERS = {name: value for name, value in vars(torch.nn.init).items()
                 if name.endswith("_") and not name.startswith("_") and callable(value)}
