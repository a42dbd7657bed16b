"""One training run over several processes, on PyTorch's own stack: torchrun starts them, DDP or FSDP2 syncs them.

    torchrun --nproc-per-node 2 -m reslab train --model gpt --batch 64 ...          # DDP, 32 sequences per rank
    torchrun --nproc-per-node 2 -m reslab train --model gpt --batch 64 --fsdp ...   # FSDP2: parameters sharded

`--batch` is the global batch: per-rank batch x world size x `--grad-accum`. Every rank draws the same global
batch from the same seeded generator and keeps only its own rows, so N processes follow the loss curve of one
process with the same `--batch` and seed (up to float rounding), and a run may be resumed with another world size.
Only rank 0 writes the run directory; checkpoints hold full (unsharded) tensors in the one-process format.

The model files know nothing of this module: the training loop asks a `World` to wrap the model, to slice
batches, to average losses and to save or load checkpoints. Outside torchrun the `World` is one process and every
method is the identity or the plain single-process call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from reslab._torch_compat import foreach_mul_, foreach_norm
from reslab.errors import ReslabError
from reslab.io import command_line

DEFAULT_TIMEOUT = 600.0  # seconds a collective waits for the other ranks before the job fails


def launched() -> bool:
    """True inside a torchrun (or equivalent env://) launch: RANK and WORLD_SIZE are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    """Processes in the job, known from the environment before the process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Rank 0, the one process that writes files and prints results (true outside torchrun)."""
    return rank() == 0


def check_launch(config) -> None:
    """Bad combinations of flags and launch, raised before anything is written (called by `prepare`)."""
    size = world_size()
    if config.fsdp and not launched():
        raise ReslabError("--fsdp shards the model over the processes of a torchrun job and needs a process group; "
                          "launch with: torchrun --nproc-per-node N -m reslab train ... --fsdp")
    if config.fsdp and getattr(config, "optimizer", "adamw") == "muon":
        raise ReslabError("--optimizer muon orthogonalises whole matrices, which --fsdp shards over ranks; "
                          "drop --fsdp (DDP keeps whole matrices on every rank) or use --optimizer adamw")
    per_step = size * config.grad_accum
    if config.batch % per_step:
        raise ReslabError(f"--batch {config.batch} is not divisible by {size} process(es) x --grad-accum "
                          f"{config.grad_accum} = {per_step}; --batch is the global batch, split into equal "
                          f"micro-batches: choose a multiple of {per_step}")
    if size > 1 and config.device.startswith("cuda:"):
        raise ReslabError(f"--device {config.device} under torchrun would put every rank on one GPU; use --device "
                          "cuda (or auto): rank r uses cuda:LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place in the job. The defaults describe a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1 or self.fsdp

    # -- the model -------------------------------------------------------------------------------------------

    def parallelize(self, model: nn.Module) -> nn.Module:
        """The module to run forward and backward through; build the optimizer on `model` after this call.

        FSDP2 shards every block and then the root in place (the parameters become DTensors) and returns `model`;
        DDP returns a wrapper whose backward averages gradients over ranks; one process returns `model`.
        """
        if self.fsdp:
            import warnings

            from torch.distributed.fsdp import fully_shard

            # The models return logits as a view; the loss never modifies them in place, which is what it warns of.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            for block in getattr(model, "blocks", []):
                fully_shard(block)
            fully_shard(model)
            return model
        if self.size == 1:
            return model
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # Buffers (RoPE tables) are computed from the config, the same on every rank: no broadcast at each forward.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=_has_unused_parameters(model, self.device),
                                       **no_buffer_sync)

    def micro_batches(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's rows of the global batch (x, y) in `count` equal micro-batches.

        Run each micro-batch's forward and backward inside the loop body: gradients accumulate locally and are
        reduced over ranks only during the last backward (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`).
        """
        pairs = list(zip(self.rows(x).chunk(count), self.rows(y).chunk(count)))
        for index, pair in enumerate(pairs):
            with self.sync_gradients(module, sync=index == len(pairs) - 1):
                yield pair

    def sync_gradients(self, module: nn.Module, sync: bool):
        """Context for one micro-batch's forward and backward: gradients are reduced over ranks only when `sync`."""
        if sync or not self.distributed:
            return contextlib.nullcontext()
        if self.fsdp:
            return _fsdp_no_sync(module)
        return module.no_sync()

    # -- batches and reductions ------------------------------------------------------------------------------

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's equal share of the rows of a global batch (a view)."""
        if self.size == 1:
            return tensor
        share = tensor.shape[0] // self.size
        return tensor[self.rank * share:(self.rank + 1) * share]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (a new tensor); the tensor itself on one process."""
        if self.size == 1:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over ranks (a new tensor); the tensor itself on one process."""
        if self.size == 1:
            return tensor
        largest = tensor.detach().clone()
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return largest

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks: the global batch's loss from each rank's loss over its equal share of rows."""
        return tensor if self.size == 1 else self.sum(tensor) / self.size

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def all_finite(self, model: nn.Module) -> bool:
        """Whether every parameter of the model is finite on every rank (each rank checks its shards)."""
        local = [_local(p.detach()) for p in model.parameters()]
        bad = torch.stack([(~torch.isfinite(t)).any() for t in local if t.numel()]).any().float()
        return not bool(self.max(bad).item())

    # -- diagnostics -----------------------------------------------------------------------------------------

    def gradient_norms(self, model: nn.Module, clip: float = 0.0):
        """`reslab.probe.gradient_norms`; with FSDP2 from each rank's gradient shards and one all-reduce."""
        from reslab.probe import gradient_norms

        if not self.fsdp:
            return gradient_norms(model, clip=clip)
        from reslab.probe.grads import GradientNorms

        named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
        if not named:
            return GradientNorms({}, 0.0, [])
        local = [_local(g) for _, g in named]
        squares = torch.stack(foreach_norm(local)).float().pow(2)  # an empty shard has norm 0
        dist.all_reduce(squares)
        norms = squares.sqrt()
        total = torch.linalg.vector_norm(norms)
        if clip > 0:
            foreach_mul_(local, torch.clamp(clip / (total + 1e-6), max=1.0).to(local[0].dtype))
        return GradientNorms.from_values([name for name, _ in named], norms.tolist(), total.item())

    # -- checkpoints -----------------------------------------------------------------------------------------

    def save_checkpoint(self, run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        rng: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Rank 0 writes the one-process checkpoint format; with FSDP2 every rank first helps gather full tensors."""
        from reslab.train.checkpoint import save_checkpoint

        model = unwrap(model)
        if self.fsdp:
            model = _Gathered(_full_model_state(model))
            if optimizer is not None:
                saved = optimizer.state_dict()
                optimizer = _Gathered({"state": {i: _full_state(s) for i, s in saved["state"].items()},
                                       "param_groups": saved["param_groups"]})
        if self.is_main:
            save_checkpoint(run_dir, model, optimizer, rng, state)

    def load_model(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Every rank loads the full tensors; with FSDP2 each keeps its shard. The tensors have been checked against
        the model already (`reslab.train.checkpoint.check_model_tensors`, before the model was parallelised)."""
        model = unwrap(model)
        if not self.fsdp:
            model.load_state_dict(tensors, strict=False)
            return
        current = model.state_dict()
        model.load_state_dict({k: _shard_like(v, current[k]) for k, v in tensors.items()}, strict=False)

    def load_optimizer(self, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       meta: dict[str, Any]) -> None:
        from reslab.train.checkpoint import restore_optimizer

        if self.fsdp:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            tensors = {name: _shard_like(t, params[int(name.split(".")[1])]) for name, t in tensors.items()}
        restore_optimizer(optimizer, tensors, meta)


_WORLD = World()


def current() -> World:
    """The World set up by `connect` in this process (one process until then)."""
    return _WORLD


def connect(config, device: torch.device) -> World:
    """Join the torchrun job's process group (gloo on CPU, nccl on CUDA), or describe the single process.

    Every rank has validated its input (`prepare`) before it gets here, and the barrier at the end keeps rank 0
    from writing the run directory before the others have looked at it. Collectives time out after
    `config.dist_timeout` seconds, so a rank that hangs ends the job instead of blocking it forever.
    """
    global _WORLD
    timeout = float(getattr(config, "dist_timeout", DEFAULT_TIMEOUT))
    fsdp = bool(getattr(config, "fsdp", False))
    if not launched():
        _WORLD = World(device=device, fsdp=False, timeout=timeout)
        return _WORLD
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout),
                                device_id=device if device.type == "cuda" else None)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local_rank, device, fsdp, timeout)
    _WORLD.barrier()
    return _WORLD


def close() -> None:
    """Tear the process group down (at the end of a torchrun job); a no-op outside one."""
    global _WORLD
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


@contextlib.contextmanager
def job(run_dir: Path) -> Iterator[None]:
    """Around a training run: a failed or hung peer becomes one clear error line; the group is closed at the end.

    When a rank dies, torchrun stops the others; when one hangs, the survivors' collectives time out. Either way
    the survivors say which rank they are, what failed, and how to resume from the last checkpoint.
    """
    try:
        yield
    except RuntimeError as error:
        world = current()
        if not world.distributed or not _collective_failure(error):
            raise
        raise ReslabError(
            f"rank {world.rank} of {world.size}: a collective operation failed ({_first_line(error)}): another rank "
            f"died, or hung for more than --dist-timeout {world.timeout:g} s. The checkpoints in {run_dir} are kept; "
            f"continue with the same torchrun options and: {command_line('-m', 'reslab', 'train', '--resume', run_dir)}"
        ) from None
    finally:
        close()


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def _has_unused_parameters(model: nn.Module, device: torch.device) -> bool:
    """Whether a parameter gets no gradient (a scheme that discards its branch, e.g. article-edit).

    DDP must then look for unused parameters at every step (an extra pass over the autograd graph), and leaves
    them without a gradient, as one process would; other models skip that cost. Found with one forward and
    backward of a single token, with the random state put back afterwards.
    """
    training = model.training
    model.eval()  # no dropout and no MoE load counting; which parameters are used does not depend on it
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            out = model(torch.zeros(1, 1, dtype=torch.long, device=device))
            getattr(out, "logits", out).float().sum().backward()  # language models return a ModelOutput
        except Exception:  # noqa: BLE001 (a model that takes other input: let DDP look at every step)
            model.zero_grad(set_to_none=True)
            return True
        finally:
            model.train(training)
    unused = any(p.grad is None for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    return unused


def _first_line(error: BaseException) -> str:
    """The gist of a backend error: its first line, without gloo's [source.cc:123] prefix, at most 160 characters."""
    import re

    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    line = re.sub(r"^\[[^\]]*\]\s*", "", line).split(". ")[0]
    return line[:160]


def _collective_failure(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return any(word in text for word in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset",
                                         "timed out", "Timed out", "Socket Timeout", "Application timeout",
                                         "pair closure"))


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


class _Gathered:
    """Stands in for a model or optimizer whose state has been gathered: what `save_checkpoint` reads of it."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _full_state(state: dict[str, Any]) -> dict[str, Any]:
    """Full tensors from DTensors: a collective, so every rank calls it with the same keys in the same order."""
    return {key: value.full_tensor() if _is_dtensor(value) else value for key, value in state.items()}


def _full_model_state(model: nn.Module) -> dict[str, Any]:
    """The model's full state dict; a tied weight is gathered once and its alias points to the same tensor, so
    `save_checkpoint` stores it once, as for one process."""
    state = model.state_dict()
    tied = _tied_names(model)
    full = _full_state({key: value for key, value in state.items() if key not in tied})
    return {key: full[tied.get(key, key)] for key in state}


def _tied_names(model: nn.Module) -> dict[str, str]:
    """alias -> first name of every parameter or buffer registered under two names (tied embeddings).

    Taken from the module structure, the same on every rank (a sharded state dict gives each name its own DTensor).
    """
    first: dict[int, str] = {}
    tied = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(tensor) in first:
            tied[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return tied


def _shard_like(tensor: torch.Tensor, like: Any) -> torch.Tensor:
    """A full tensor as a DTensor sharded like `like` (a parameter or state entry); other tensors unchanged."""
    if not _is_dtensor(like) or tuple(tensor.shape) != tuple(like.shape):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements)
