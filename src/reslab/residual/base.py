"""The one place where a sublayer meets the residual stream.

Every transformer block in reslab calls `stream = site(stream, sublayer)` once per sublayer and never adds a
sublayer's output to the stream itself. A residual *scheme* is a subclass of `ResidualSite`: it owns the norms
and learned coefficients of its formula, states the formula and the paper, and may set its branch's init.
Probes (update ratio, stream RMS, drift) attach here through `observe`.

Multi-stream schemes (hyper-connections, ...) also provide a `StreamAdapter`, which the model calls once after
the embedding (`widen`) and once before the final norm (`reduce`); for one stream both are the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

from reslab.errors import ReslabError

NormFactory = Callable[[int], nn.Module]  # width -> a norm of the model's kind


@dataclass(frozen=True)
class SiteSpec:
    """Where a site sits and what it needs to build itself."""

    layer: int  # block index, from 0
    index: int  # sublayer index within the block: 0 attention, 1 FFN
    num_layers: int  # L, the number of blocks
    width: int
    make_norm: NormFactory
    options: Mapping[str, Any] = field(default_factory=dict)
    sublayers_per_block: int = 2
    vocab_size: int = 0  # the model's vocabulary (token-indexed connections, e.g. value embeddings); 0: unknown

    @property
    def depth_index(self) -> int:
        """Position of this sublayer in the whole network, from 0."""
        return self.layer * self.sublayers_per_block + self.index


class Probe(Protocol):
    def record(self, site: ResidualSite, x: torch.Tensor, fx: torch.Tensor, out: torch.Tensor) -> None: ...


class StreamAdapter(nn.Module):
    """Turns the embedding into the residual stream and back. One stream: both directions are the identity."""

    def enter(self, x: torch.Tensor, tokens: torch.Tensor):
        """What a model calls after its embedding: `x` the embedded tokens, `tokens` their ids (batch, seq), for
        adapters that index by token (value embeddings); the others widen `x` alone."""
        return self.widen(x)

    def widen(self, x: torch.Tensor):
        return x

    def reduce(self, stream) -> torch.Tensor:
        return stream


class ResidualSite(nn.Module):
    """Base class of every residual scheme. Subclasses set the class attributes and write `forward`."""

    name: ClassVar[str]
    formula: ClassVar[str]
    paper: ClassVar[str]
    final_norm: ClassVar[bool] = True  # does the model normalise the stream before its head?
    has_skip: ClassVar[bool] = True  # False only for schemes without an identity path (`none`)
    additive_stream: ClassVar[bool] = False  # True: the final stream is exactly embedding + every write (reslab.lens)
    option_defaults: ClassVar[dict[str, Any]] = {}  # the scheme's hyper-parameters and their defaults
    streams_option: ClassVar[str | None] = None  # the option that counts the parallel streams it carries, if any
    options_need_layers: ClassVar[int] = 1  # below this many blocks the options change nothing, so they are refused

    def __init__(self, spec: SiteSpec):
        super().__init__()
        self.spec = spec
        self.options = self.resolve_options(spec.options)
        self.check_model(spec.num_layers, spec.options)
        self.probe: Probe | None = None

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(given) - set(cls.option_defaults)
        if unknown:
            valid = ", ".join(sorted(cls.option_defaults)) or "none"
            raise ReslabError(f"residual scheme {cls.name!r} has no option {sorted(unknown)[0]!r}; "
                              f"its options: {valid}")
        for name, value in given.items():  # a number must be finite: nan or inf would only fail steps later
            if isinstance(value, float) and not math.isfinite(value):
                raise ReslabError(f"residual scheme {cls.name!r}: {name} must be a finite number, got {value!r}")
        return {**cls.option_defaults, **given}

    @classmethod
    def check_model(cls, num_layers: int, given: Mapping[str, Any]) -> None:
        """Refuse, in one line, options given (`given`, as the user set them) that cannot change a model of
        `num_layers` blocks. Schemes with other limits override this."""
        if given and num_layers < cls.options_need_layers:
            flag = "--" + sorted(given)[0].replace("_", "-")
            raise ReslabError(f"{flag} does not apply to a model of {num_layers} block{'s' * (num_layers != 1)}: "
                              f"residual scheme {cls.name!r} needs {cls.options_need_layers} or more for its options "
                              f"to change anything (raise --layers)")

    @classmethod
    def streams(cls, options: Mapping[str, Any]) -> int:
        """How many copies of the (batch, seq, width) stream the scheme carries (memory estimates): the value of its
        `streams_option` where it has one, else 1."""
        return cls.resolve_options(options)[cls.streams_option] if cls.streams_option else 1

    @classmethod
    def stream_adapter(cls, width: int, num_layers: int, options: Mapping[str, Any]) -> StreamAdapter:
        return StreamAdapter()

    def forward(self, stream: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, x: torch.Tensor, fx: torch.Tensor, out: torch.Tensor) -> None:
        """Hand the stream in, the sublayer's update and the stream out to an attached probe (if any)."""
        if self.probe is not None:
            self.probe.record(self, x, fx, out)

    @classmethod
    def scheme_metrics(cls, sites: list[ResidualSite], ranks: RankReduce | None = None) -> dict[str, Any]:
        """Scheme-wide diagnostics on a log step (after the probed forward), e.g. HC's Amax gain. In a distributed
        run every rank calls this, and `ranks` turns each rank's figure into the global batch's."""
        return {}

    def init_branch(self, sublayer: nn.Module) -> None:
        """Called once after the model's own init: schemes that prescribe a branch init (DeepNet) set it here."""

    def optimizer_scales(self) -> tuple[float, float]:
        """(learning-rate, Adam-epsilon) multipliers for every parameter of this site's block, for schemes whose
        parametrisation prescribes them (CompleteP's depth rules); the AdamW builder (`train/step.py`) gives a
        block's parameters their own groups when they are not (1, 1). The sites of one block must agree."""
        return 1.0, 1.0

    def extra_repr(self) -> str:
        return f"{self.name}: {self.formula}"


class RankReduce(Protocol):
    """Reductions over the processes of a distributed run (`reslab.train.distributed.World` provides them)."""

    def max(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def mean(self, tensor: torch.Tensor) -> torch.Tensor: ...


def on_single_stream(site: ResidualSite, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
    """Run a widened-stream site on a plain (batch, seq, width) stream: widen, update, reduce with its scheme's
    adapter. Models widen once for all sites; this lets such a site be called alone, like any other, as x -> x'."""
    adapter = type(site).stream_adapter(site.spec.width, site.spec.num_layers, site.options)
    return adapter.reduce(site(adapter.widen(x), sublayer))


def check_integer_option(scheme: str, options: Mapping[str, Any], name: str, minimum: int, hint: str = "") -> None:
    """Scheme options that count things (streams, iterations, block sizes) must be integers >= minimum."""
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}{hint}"
        raise ReslabError(f"residual scheme {scheme!r}: {name} must be {bound}, got {value!r}")


def check_bool_option(scheme: str, options: Mapping[str, Any], name: str) -> None:
    """Scheme options that switch something on or off must be booleans (not 1, not "yes")."""
    if not isinstance(options[name], bool):
        raise ReslabError(f"residual scheme {scheme!r}: {name} must be true or false, got {options[name]!r}")


def check_number_option(scheme: str, options: Mapping[str, Any], name: str, low: float, high: float,
                        meaning: str = "") -> None:
    """Scheme options that are fractions or scales must be numbers (not booleans) in [low, high]."""
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ReslabError(f"residual scheme {scheme!r}: {name} must be a number in [{low:g}, {high:g}]{meaning}, "
                          f"got {value!r}")


def layerscale_default_init(num_layers: int) -> float:
    """CaiT's rule for the LayerScale init by depth: 0.1 up to 18 blocks, 1e-5 at 24, 1e-6 deeper."""
    if num_layers <= 18:
        return 0.1
    return 1e-5 if num_layers <= 24 else 1e-6


def deepnorm_constants(num_layers: int) -> tuple[float, float]:
    """DeepNet (decoder-only): alpha = (2L)^(1/4) scales the skip; beta = (8L)^(-1/4) is the branch init gain."""
    return (2 * num_layers) ** 0.25, (8 * num_layers) ** -0.25


def xavier_normal_(weight: torch.Tensor, gain: float) -> None:
    """Xavier-normal init in place; works on row-slice views of fused matrices, unlike a Linear's reset."""
    fan_out, fan_in = weight.shape
    with torch.no_grad():
        weight.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))
