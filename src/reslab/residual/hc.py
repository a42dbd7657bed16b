from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.residual.base import SiteSpec, check_bool_option
from reslab.residual.multistream import MultiStreamSite


class HyperConnections(MultiStreamSite):
    """Hyper-connections: the stream is widened to `n` streams `H` (n x d), read and written with learned weights.

        h  = A_m^T H                       read (A_m: n x 1)
        H' = A_r^T H + B^T F(LN(h))        mix and write (A_r: n x n, B: 1 x n)

    Static HC learns A_m, A_r and B. Dynamic HC (`hc_dynamic`) adds input-dependent terms computed from the
    normalised streams `Hn = norm(H)`: `A_m + s_a tanh(Hn W_m)`, `A_r + s_a tanh(Hn W_r)`, `B + s_b tanh(Hn W_b)^T`,
    with the W initialised to 0 and s_a = s_b = 0.01.
    Init for the sublayer at depth k: A_m = e_(k mod n), A_r = I, B = 1, so every stream holds pre-LN's stream and
    every sublayer reads pre-LN's input; with n = 1 the model is exactly pre-LN. Streams are summed before the
    final norm.
    Zhu et al. 2025, Hyper-Connections, ICLR 2025 (arXiv 2409.19606).

    Here `read` is A_m, `stream_mix` is A_r^T (the matrix that multiplies the streams) and `write` is B.
    """

    name = "hc"
    formula = "h = A_m^T H;  H = A_r^T H + B^T F(LN(h))"
    paper = "Zhu et al. 2025, Hyper-Connections (arXiv 2409.19606)"
    option_defaults = {**MultiStreamSite.option_defaults, "hc_dynamic": False}

    decayed_parameters = ("dynamic_proj",)  # reslab.contracts: a projection of the stream, decayed like one

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        n = self.num_streams
        self.dynamic = bool(self.options["hc_dynamic"])
        # 1-D parameters: coefficients, not weight matrices, so reslab's AdamW does not decay them towards 0
        self.read = nn.Parameter(torch.eye(n)[spec.depth_index % n].clone())
        self.stream_mix = nn.Parameter(torch.eye(n).flatten())  # A_r^T, stored flat
        self.write = nn.Parameter(torch.ones(n))
        self.dynamic_proj: nn.Parameter | None = None  # static: no projection
        if self.dynamic:
            self.dynamic_norm = spec.make_norm(spec.width)
            # one projection for all dynamic terms: columns [read | stream_mix row | write] per stream
            self.dynamic_proj = nn.Parameter(torch.zeros(spec.width, n + 2))
            self.dynamic_scale = nn.Parameter(torch.tensor([0.01, 0.01]))  # s_a (read, mix), s_b (write)

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_bool_option(cls.name, options, "hc_dynamic")
        return options

    @classmethod
    def per_token_weights(cls, options: Mapping[str, Any]) -> bool:
        return bool(options["hc_dynamic"])

    def connection_weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.num_streams
        read, stream_mix, write = self.read, self.stream_mix.view(n, n), self.write
        if not self.dynamic:
            return read, stream_mix, write
        # per token and stream i: tanh(norm(H_i) W) = [read_i | row i of A_r | write_i]
        by_token = streams.movedim(0, -2)  # (batch, seq, n, width): contiguous when the streams lie tokens first
        dynamic = torch.tanh(self.dynamic_norm(by_token) @ self.dynamic_proj)  # (batch, seq, n, n + 2)
        width_scale, depth_scale = self.dynamic_scale[0], self.dynamic_scale[1]
        read = read + width_scale * dynamic[..., 0]
        stream_mix = stream_mix + width_scale * dynamic[..., 1:n + 1].transpose(-1, -2)  # A_r -> A_r^T
        write = write + depth_scale * dynamic[..., n + 1]
        return read, stream_mix, write

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {'dynamic' if self.dynamic else 'static'}"
