"""The typed training config. Together with the model config it is everything needed to rebuild a run."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from reslab.checks import (
    BETA,
    COUNT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    SEED,
    OnlyWith,
    Range,
    check_applies,
    check_field_type,
    check_numbers,
    flag_name,
)
from reslab.errors import ReslabError

# What each numeric field admits; `validate` checks them all (finite, in range), so every command shares one rule.
RANGES: dict[str, Range] = {
    "steps": COUNT, "stop_at": COUNT, "batch": COUNT, "grad_accum": COUNT, "vocab_size": Range(low=2, integer=True),
    "lr": POSITIVE, "min_lr": NON_NEGATIVE, "warmup": NON_NEGATIVE_INT, "weight_decay": NON_NEGATIVE,
    "beta1": BETA, "beta2": BETA, "grad_clip": NON_NEGATIVE, "muon_lr": POSITIVE, "seed": SEED,
    "eval_interval": COUNT, "eval_batches": COUNT, "log_interval": COUNT, "checkpoint_interval": COUNT,
    "dist_timeout": POSITIVE,
}
# Fields that matter only when another is set: given alone (`--muon-lr` with AdamW), the flag is refused.
ONLY_WITH: dict[str, OnlyWith] = {"muon_lr": OnlyWith("optimizer", ("muon",))}
DEVICE_HELP = "choose auto, cpu, cuda or cuda:N"

def runtime(default: Any, **kwargs) -> Any:
    """A field of the runtime: how a run is carried out, which may change when it is resumed (or an ablation is run
    again); every other field is the experiment, which must match the run's config.json."""
    return field(default=default, metadata={"runtime": True}, **kwargs)


@dataclass
class TrainConfig:
    """The training config, in two parts told apart by each field's `runtime` mark: the experiment (what is
    computed: must match on resume) and the runtime (how and how long: may change)."""

    model: str = "tiny"
    data: str = "shakespeare"  # "shakespeare", "tinyshakespeare" or a path to a UTF-8 text file
    tokenizer: str = "char"  # "char" or "bpe"
    vocab_size: int | None = None  # BPE vocabulary size (char: from the corpus)
    steps: int = runtime(2000)  # a resumed run may be extended
    stop_at: int | None = runtime(None)  # checkpoint and exit after this step (the schedule still runs to `steps`)
    batch: int = 32  # the global batch: per-rank batch x world size x grad_accum
    grad_accum: int = runtime(1)  # micro-batches per step (gradients summed): the same curve, less memory
    lr: float = 1e-3
    min_lr: float | None = None  # cosine floor; default lr / 10 (nanoGPT)
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"  # "adamw" or "muon" (Muon for hidden matrices, AdamW for the rest)
    muon_lr: float = 0.02
    aux_weights: dict[str, float] = field(default_factory=dict)  # auxiliary loss name -> weight (default: model's)
    # "auto" (bf16 where the hardware runs it natively, else fp32), "fp32" (exact) or "bf16" (autocast; fp32 master
    # weights). `from_dict` resolves auto for this machine, so a run records the dtype it trains in.
    dtype: str = "auto"
    dtype_auto: bool = runtime(False)  # `dtype` was chosen by --dtype auto (how it was picked, not what is computed)
    compile: bool = runtime(False)  # torch.compile the model (falls back to eager where unavailable)
    seed: int = 1337
    device: str = runtime("auto")  # auto: cuda if present, else cpu
    eval_interval: int = runtime(250)
    eval_batches: int = runtime(20)
    log_interval: int = runtime(50)
    checkpoint_interval: int = runtime(500)
    diagnostics: bool = True
    print_grad_norms: bool = runtime(False)
    progress: bool = runtime(True)
    fsdp: bool = runtime(False)  # under torchrun: shard parameters, gradients and optimizer state with FSDP2
    dist_timeout: float = runtime(600.0)  # seconds a collective waits for the other ranks before the job fails

    def validate(self) -> None:
        check_numbers(self.to_dict(), RANGES)
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ReslabError(f"--min-lr {self.min_lr:g} is above --lr {self.lr:g}; "
                              "the cosine decays from lr to min-lr")
        if self.batch % self.grad_accum:
            raise ReslabError(f"--batch {self.batch} is not divisible by --grad-accum {self.grad_accum}; "
                              "micro-batches must be equal")
        if self.optimizer not in ("adamw", "muon"):
            raise ReslabError(f"unknown optimizer {self.optimizer!r}; choose one of: adamw, muon")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ReslabError(f"unknown dtype {self.dtype!r}; choose one of: auto, bf16, fp32")
        if self.tokenizer not in ("char", "bpe"):
            raise ReslabError(f"unknown tokenizer {self.tokenizer!r}; choose one of: bpe, char")
        if self.tokenizer == "bpe" and self.vocab_size is None:
            raise ReslabError("--tokenizer bpe needs --vocab-size N (e.g. 512)")
        check_device_name(self.device)

    @property
    def floor_lr(self) -> float:
        return self.min_lr if self.min_lr is not None else self.lr / 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def experiment(self) -> dict[str, Any]:
        """The fields that define what the run computes (must match when it is resumed)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_FIELDS}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        hints = typing.get_type_hints(cls)
        config = cls(**{k: check_field_type(flag_name(k), v, hints[k]) for k, v in values.items() if k in hints})
        config.validate()
        config.resolve_dtype()
        return config

    def resolve_dtype(self) -> None:
        """Turn `--dtype auto` into the dtype this machine runs natively (see `reslab.train.step.native_bf16`)."""
        if self.dtype != "auto":
            return
        from reslab.train.step import resolve_dtype

        self.dtype, self.dtype_auto = resolve_dtype("auto", resolve_device(self.device)), True


def check_flags_apply(given: dict[str, Any], base: dict[str, Any] | None = None) -> None:
    """Refuse a training setting `given` by a flag that the run would not use (`ONLY_WITH`), starting from `base`
    (a recipe's or a saved run's values; default: TrainConfig's)."""
    check_applies(given, {**TrainConfig().to_dict(), **(base or {}), **given}, ONLY_WITH)


def check_device_name(name: str) -> None:
    """auto, cpu, cuda or cuda:N, and only what this machine has: never a torch traceback for a device string."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise ReslabError(f"unknown device {name!r}; {DEVICE_HELP}")
    import torch

    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise ReslabError(f"--device {name}: this machine has {have}; use --device auto or cpu")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ReslabError("--device mps: Apple's MPS backend is not available here; use --device auto or cpu")


def resolve_device(name: str) -> torch.device:
    """The torch device for a `--device` value (checked: a known name this machine has)."""
    check_device_name(name)
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# The runtime fields, as declared on TrainConfig: what `train --resume` (and an ablation run again) may change.
RESUMABLE_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("runtime"))
