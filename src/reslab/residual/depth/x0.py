from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.residual.base import check_bool_option, check_number_option
from reslab.residual.depth.base import Connection, DepthStream

GATE_CHANNELS = 12  # a dynamic gate reads the first 12 channels, as the speedrun's gates do


class X0Injection(Connection):
    """The embedding re-injected at the start of every block: `x = x + c_i x0`, `c_i` learned per block.

    modded-nanogpt record #9 (2024-11-06, ShortcutsTweaks; log dd7304a6...txt lines 206-209, 241-243) starts every
    block with `x = l0 x + l1 x0`, `(l0, l1)` initialised to (1, 0); the `l0` half is the residual scale (`scales`),
    so `c_i` starts at `x0_init` (0: the model starts as its base scheme). With `x0_gated` the coefficient is also a
    function of the token, `c_i + w_i . x0[:12]` with `w_i` zero at init, the form of the speedrun's later gates
    (record #55, 2025-12-29; at HEAD the x0 gates are produced by MUDD's gate network, train_gpt.py:1469-1484).
    x0 is the stream the first block receives (the embedding, after the model's dropout).
    """

    name = "x0"
    formula = "x = x + c_i x0  (at the start of block i)"
    paper = "Jordan et al. 2024, modded-nanogpt speedrun record #9 (2024-11-06), value and embedding skips"
    reference = "KellerJordan/modded-nanogpt records/track_1_short/2024-11-06_ShortcutsTweaks log lines 206-209,241-243"
    kind = "embedding re-injection"
    option_defaults = {"x0_init": 0.0, "x0_gated": False}

    def __init__(self, spec, options: Mapping[str, Any]):
        super().__init__(spec, options)
        self.coefficient = nn.Parameter(torch.tensor(float(options["x0_init"]))) if self.block_start else None
        gated = self.block_start and options["x0_gated"]
        self.gate = nn.Parameter(torch.zeros(min(GATE_CHANNELS, spec.width))) if gated else None

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_number_option(cls.name, options, "x0_init", -10.0, 10.0)
        check_bool_option(cls.name, options, "x0_gated")
        return options

    @property
    def static(self) -> bool:
        return not self.options["x0_gated"]  # a gated coefficient is computed from x0

    def enter(self, stream: DepthStream) -> DepthStream:
        if self.coefficient is None:
            return stream
        coefficient = self.coefficient
        if self.gate is not None:
            coefficient = coefficient + (stream.x0[..., :self.gate.numel()] @ self.gate).unsqueeze(-1)
        return stream._replace(x=stream.x + coefficient * stream.x0)

    def coefficients(self) -> dict[str, Any]:
        return {} if self.coefficient is None else {"c": self.coefficient.item()}
