"""Backout: a mid-network snapshot of the stream, scaled by a learned lambda, subtracted before the final norm."""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.residual.base import check_number_option
from reslab.residual.depth.base import Connection, DepthStream, block_output
from reslab.residual.depth.skips import check_block_option, check_block_range

BACKED_OUT = "backout"  # the DepthStream entry holding lambda * h_k, saved at block k's end, read before the head


def backout_block(num_layers: int, options: Mapping[str, Any]) -> int:
    """The block whose output is backed out: `backout_from`, or by default the output of the 8th of 11 blocks
    scaled to the depth, 8L // 11 - 1 (0-based: 7 at 11 and 12 blocks, 1 at 4, 0 at 2), always before the last."""
    given = options["backout_from"]
    return 8 * num_layers // 11 - 1 if given is None else given


class BackoutHead(nn.Module):
    """The model-level part (in the stream adapter, before the final norm): `x = x - lambda h_k`, with
    `lambda h_k` as block k's site saved it. A stream from before block k's end (the logit lens decodes every
    site's stream with this adapter) has nothing to back out yet and passes unchanged."""

    def forward(self, stream: DepthStream) -> DepthStream:
        scaled = stream.saved.get(BACKED_OUT)
        return stream if scaled is None else stream._replace(x=stream.x - scaled)


class Backout(Connection):
    """Backout: `x = x - lambda h_k` before the final norm, `h_k` block k's output, `lambda` learned.

    modded-nanogpt record #40 (2025-10-04, Backout; README and log d655b12a...txt): "context added to the residual
    stream in the first 8 layers can be backed out before the final prediction": `x_backout = x` after block 8 of
    the 12-block model whose block 0 is skipped (the output of its 8th of 11 layers), then `x -= backout_lambda *
    x_backout; x = norm(x)`, `backout_lambda` init 0.5. At HEAD (`train_gpt.py @f411b3d`, lines 1393-1394,
    1677-1680) it is MUDD's last aggregation's `h_7` term with bias -0.5. So `backout_from` defaults to the 8th of
    11 blocks' output scaled to depth (0-based 8L // 11 - 1; `backout_block`), `backout_init` to 0.5.

    The subtraction runs once, in the stream adapter (`head_part`); `lambda` lives at block k's last sublayer,
    which saves `lambda h_k` in the stream, so that it is reported with the other connections' coefficients.
    """

    name = "backout"
    formula = "x = x - lambda h_k  (before the final norm; h_k block k's output)"
    paper = "Jordan et al. 2025, modded-nanogpt speedrun record #40 (2025-10-04), backout"
    reference = ("KellerJordan/modded-nanogpt records/track_1_short/2025-10-04_Backout README and log d655b12a; "
                 "@f411b3d train_gpt.py:1393-1394,1677-1680")
    kind = "backout"
    option_defaults = {"backout_from": None, "backout_init": 0.5}
    options_need_layers = 2  # backing out the last block's output (the final stream) only rescales it
    static = True  # lambda is a parameter: the final stream is a fixed linear combination of the writes (lens)

    def __init__(self, spec, options: Mapping[str, Any]):
        super().__init__(spec, options)
        here = self.block_end and spec.layer == backout_block(spec.num_layers, options)
        self.weight = nn.Parameter(torch.tensor(float(options["backout_init"]))) if here else None

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_block_option(cls.name, options, "backout_from")
        check_number_option(cls.name, options, "backout_init", -10.0, 10.0)
        return options

    @classmethod
    def check_model(cls, num_layers: int, options: Mapping[str, Any]) -> None:
        """Refuse a block that does not exist or is the last (its output is the final stream itself)."""
        super().check_model(num_layers, options)
        check_block_range(cls.name, "backout_from", backout_block(num_layers, options), 0, num_layers - 2,
                          f"a block before the last; the model has {num_layers} blocks")

    @classmethod
    def head_part(cls, width: int, num_layers: int, options: Mapping[str, Any]) -> nn.Module:
        return BackoutHead()

    def leave(self, before: DepthStream, after: DepthStream) -> DepthStream:
        if self.weight is None:
            return after
        # block k's output as the composed site saved it, before any connection's `leave` at this site changed the
        # stream (a DenseFormer average, MUDD's mix): the same h_k whatever the order the connections are written in
        return after.save(BACKED_OUT, self.weight * after.saved[block_output(self.spec.layer)])

    def coefficients(self) -> dict[str, Any]:
        return {} if self.weight is None else {"lambda": self.weight.item()}
