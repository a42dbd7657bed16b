from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from reslab.contracts import ValueMixing, is_attention, require
from reslab.residual.base import (
    ResidualSite,
    SiteSpec,
    StreamAdapter,
    check_bool_option,
    check_number_option,
    on_single_stream,
)


class ValueStream(NamedTuple):
    """The residual stream plus the first attention layer's values, carried along so later layers can mix them in."""

    x: torch.Tensor
    first_values: torch.Tensor | None


class CarryFirstValues(StreamAdapter):
    def widen(self, x: torch.Tensor) -> ValueStream:
        return ValueStream(x, None)

    def reduce(self, stream: ValueStream) -> torch.Tensor:
        return stream.x


class ValueResidual(ResidualSite):
    """Value residual (ResFormer): pre-LN, and every attention layer mixes its values with the first layer's.

        x = x + F(LN(x)),   in attention: v = lerp(v_1, v, m) = v_1 + m (v - v_1)

    `m` is the weight of the layer's own values: fixed (`value_mix`, default 0.5, the plain average) or learned per
    key/value head (`value_mix_learned`, starting at `value_mix`). The first layer computes v_1 and keeps its own
    values. The scheme installs the mix into each attention sublayer (`CausalSelfAttention.value_mix`); models do not
    know about it.
    Zhou et al. 2024, Value Residual Learning For Alleviating Attention Concentration In Transformers
    (arXiv 2410.17897).
    """

    name = "value-residual"
    formula = "x = x + F(LN(x)),  v = lerp(v_1, v, m)"
    paper = "Zhou et al. 2024, ResFormer: Value Residual Learning (arXiv 2410.17897)"
    additive_stream = True  # x_L = x_0 + sum of every F written: decomposable (reslab.lens)
    option_defaults = {"value_mix": 0.5, "value_mix_learned": False}
    options_need_layers = 2  # one block has no later layer to mix the first layer's values into

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.norm = spec.make_norm(spec.width)
        self.mix: nn.Parameter | None = None  # learned m per head, created once the attention sublayer is known
        self._first_values: torch.Tensor | None = None  # v_1, only while this site's sublayer runs

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_number_option(cls.name, options, "value_mix", 0, 1)
        check_bool_option(cls.name, options, "value_mix_learned")
        return options

    @classmethod
    def stream_adapter(cls, width: int, num_layers: int, options: Mapping[str, Any]) -> StreamAdapter:
        return CarryFirstValues()

    def init_branch(self, sublayer: nn.Module) -> None:
        if not is_attention(sublayer):
            return  # a feed-forward sublayer: plain pre-LN
        require(sublayer, ValueMixing, type(sublayer).__name__, f"residual scheme {self.name!r}")
        sublayer.value_mix = self.mix_values
        if self.spec.layer > 0 and self.options["value_mix_learned"]:
            self.mix = nn.Parameter(torch.full((sublayer.kv_heads,), float(self.options["value_mix"])))

    def forward(self, stream: ValueStream, sublayer: nn.Module) -> ValueStream:
        if isinstance(stream, torch.Tensor):  # a plain stream: called outside a model
            return on_single_stream(self, stream, sublayer)
        x, self._first_values = stream
        try:
            fx = sublayer(self.norm(x))  # an attention sublayer calls `mix_values` on its values
            first_values = self._first_values
        finally:
            self._first_values = None  # hold no activations between forwards
        out = x + fx
        self.observe(x, fx, out)
        return ValueStream(out, first_values)

    def mix_values(self, values: torch.Tensor) -> torch.Tensor:
        """Called by the attention sublayer on its values (batch, kv_heads, seq, head_dim)."""
        if self._first_values is None:  # the first attention layer supplies v_1 and keeps its own values
            self._first_values = values
            return values
        mix = self.mix.view(-1, 1, 1) if self.mix is not None else float(self.options["value_mix"])
        return torch.lerp(self._first_values, values, mix)

    def extra_repr(self) -> str:
        learned = ", learned per head" if self.options["value_mix_learned"] else ""
        return f"{super().extra_repr()}, m={self.options['value_mix']}{learned}"
