"""The typed training config. Together with the model config it is everything needed to rebuild a run."""

from __future__ import annotations

import dataclasses
import re
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
    check_declared,
    option,
)
from reslab.errors import ReslabError

# Fields that matter only when another is set: given alone (`--muon-lr` with AdamW), the flag is refused.
ONLY_WITH: dict[str, OnlyWith] = {"muon_lr": OnlyWith("optimizer", ("muon",))}
DEVICE_HELP = "choose auto, cpu, cuda or cuda:N"


def runtime(default: Any, **declared) -> Any:
    """A field of the runtime: how a run is carried out, which may change when it is resumed (or an ablation is run
    again); every other field is the experiment, which must match the run's config.json."""
    return option(default, runtime=True, **declared)


# Each field declares its help, range and flag once (`reslab.checks.option`): `train` and `ablate` generate their
# flags from them, and `validate` checks every range.
@dataclass
class TrainConfig:
    """The training config, in two parts told apart by each field's `runtime` mark: the experiment (what is
    computed: must match on resume) and the runtime (how and how long: may change)."""

    model: str = "tiny"
    data: str = option("shakespeare", flag=True, help="corpus: shakespeare (default, offline), tinyshakespeare "
                       "(download), or a UTF-8 file")
    tokenizer: str = option("char", help="char (default) or bpe", flag=True)
    # BPE vocabulary size (char: from the corpus)
    vocab_size: int | None = option(None, help="BPE vocabulary size", range=Range(low=2, integer=True), flag=True)
    steps: int = runtime(2000, help="optimizer steps", range=COUNT, flag=True)  # a resumed run may be extended
    stop_at: int | None = runtime(None, range=COUNT, flag=True, help="checkpoint and stop after this step; --resume "
                                  "continues (schedule unchanged)")
    batch: int = option(32, help="sequences per step, over all processes of a torchrun job", range=COUNT, flag=True)
    # micro-batches per step (gradients summed): the same curve, less memory
    grad_accum: int = runtime(1, help="split each step's batch into this many micro-batches", range=COUNT, flag=True)
    lr: float = option(1e-3, help="peak learning rate", range=POSITIVE, flag=True)
    min_lr: float | None = option(None, help="final learning rate of the cosine decay (default lr/10)",
                                  range=NON_NEGATIVE, flag=True)  # nanoGPT's floor
    warmup: int = option(100, help="linear warmup steps", range=NON_NEGATIVE_INT, flag=True)
    weight_decay: float = option(0.1, help="AdamW weight decay on matrices", range=NON_NEGATIVE, flag=True)
    beta1: float = option(0.9, help="AdamW beta1", range=BETA, flag=True)
    beta2: float = option(0.99, help="AdamW beta2", range=BETA, flag=True)
    grad_clip: float = option(1.0, help="clip the gradient norm to this (0 = off)", range=NON_NEGATIVE, flag=True)
    optimizer: str = option("adamw", flag=True, help="adamw (default) or muon (Muon for hidden matrices, AdamW for "
                            "the rest)")
    muon_lr: float = option(0.02, help="Muon learning rate", range=POSITIVE, flag=True)
    aux_weights: dict[str, float] = field(default_factory=dict)  # auxiliary loss name -> weight (default: model's)
    # `from_dict` resolves auto for this machine, so a run records the dtype it trains in.
    dtype: str = option("auto", flag=True, help="auto (default: bf16 autocast where the hardware runs bf16 natively, "
                        "CUDA or AMX/AVX512-BF16 CPUs, else fp32), fp32 (exact) or bf16")
    dtype_auto: bool = runtime(False)  # `dtype` was chosen by --dtype auto (how it was picked, not what is computed)
    # falls back to eager where unavailable
    compile: bool = runtime(False, help="torch.compile the model", flag="--compile")
    seed: int = option(1337, help="seed for init, batches and dropout", range=SEED, flag=True)
    device: str = runtime("auto", help="auto (default: cuda if present), cpu, cuda, cuda:N", flag=True)
    eval_interval: int = runtime(250, help="steps between validation estimates", range=COUNT, flag=True)
    eval_batches: int = runtime(20, help="batches per validation estimate", range=COUNT, flag=True)
    log_interval: int = runtime(50, help="steps between metrics records and diagnostics", range=COUNT, flag=True)
    checkpoint_interval: int = runtime(500, help="steps between checkpoints", range=COUNT, flag=True)
    diagnostics: bool = option(True, help="skip gradient norms and stream probes", flag="--no-diagnostics")
    print_grad_norms: bool = runtime(False, help="print every parameter's gradient norm", flag="--print-grad-norms")
    progress: bool = runtime(True, help="no progress bar", flag="--no-progress")
    log: str = runtime("auto", flag=True, help="trackers beside metrics.jsonl: tensorboard, wandb, a comma list, or "
                       "none (default auto: tensorboard when installed)")
    fsdp: bool = runtime(False, help="under torchrun: shard the model with FSDP2 (default DDP)", flag="--fsdp")
    # seconds a collective waits for the other ranks before the job fails
    dist_timeout: float = runtime(600.0, help="under torchrun: fail the job when a rank is silent this long",
                                  range=POSITIVE, flag=True, metavar="SECONDS")

    def validate(self) -> None:
        check_declared(self.to_dict(), TrainConfig)
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
        from reslab.train.loggers import trackers

        trackers(self.log)  # known names, each installed: one line naming the pip command

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
        names = {f.name for f in dataclasses.fields(cls)}
        config = cls(**check_declared({k: v for k, v in values.items() if k in names}, cls))
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
