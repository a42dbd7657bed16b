"""Skips across depth: a block's output carried to the start of a later block with a learned scalar weight.

`unet`: every block of the first half feeds its mirror in the second half (U-net pairs i -> L-1-i);
`long-skip`: one source block feeds one destination block through a sigmoid gate. Both read the source's output
from the `DepthStream` (saved there by the composed site as `blocks.i:out`) and add it in `enter` at the
destination's first sublayer, so with other connections composed (`pre+x0+unet`) each `enter` runs in turn.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.errors import ReslabError
from reslab.residual.base import check_bool_option, check_number_option
from reslab.residual.depth.base import Connection, DepthStream, block_output

SIGMOID_INIT = -1.5  # the raw init of the speedrun's gated skips: sigmoid(-1.5) = 0.18 (records #32 and HEAD)
PLAIN_INIT = 1.0  # record #11's skip_weights init, used as is (no sigmoid)


def check_block_option(connection: str, options: Mapping[str, Any], key: str) -> None:
    """A block-index option is an integer or None (None: the default rule scaled to the model's depth)."""
    value = options[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ReslabError(f"connection {connection!r}: {key} must be a block index (an integer from 0), got {value!r}")


def check_block_range(connection: str, key: str, value: int, low: int, high: int, why: str) -> None:
    """One line naming the option and its valid range when block index `value` is outside [low, high]."""
    if not low <= value <= high:
        raise ReslabError(f"connection {connection!r}: {key} must be a block index in [{low}, {high}] ({why}), "
                          f"got {value}")


def skip_in(stream: DepthStream, source: int, coefficient: torch.Tensor) -> DepthStream:
    """`x + coefficient * h_source`; the stream unchanged where block `source` has not run (a site called alone,
    outside a model, has no earlier blocks)."""
    saved = stream.saved.get(block_output(source))
    if saved is None:
        return stream
    return stream._replace(x=stream.x + coefficient * saved)


class UNetSkips(Connection):
    """U-net skips: block i's output is added, with a learned weight, at the start of block L-1-i (i < L // 2).

    modded-nanogpt record #11 (2024-11-10, UNetDoubleLr; log c87bb826...txt lines 241-244, 257-270): the first
    L/2 blocks push their outputs on a stack and block L/2 + j starts with `x = x + w_j pop()`, pairs (5->6, 4->7,
    ..., 0->11) at 12 layers, `skip_weights` init 1. Record #32 (2025-09-11, README) passes each weight through a
    sigmoid with raw init -1.5 (0.18), the form kept through record #40 (Backout log d655b12a...txt:
    `gate = torch.sigmoid(skip_weights[i - n])`). That later form is the default here; `unet_plain` (`--unet-plain`)
    gives record #11's plain weight. `unet_init` is the raw init: by default -1.5 through the
    sigmoid, 1 without. With an odd L the middle block receives nothing. (x-transformers' `unet_skips` is not this
    form: it concatenates the skip with the stream and projects them with a learned (2D -> D) matrix.)
    """

    name = "unet"
    formula = "x = x + s_d h_(L-1-d)  (at the start of block d >= ceil(L/2); s_d = sigmoid(w_d) or w_d)"
    paper = "Jordan et al. 2024-25, modded-nanogpt speedrun records #11 (2024-11-10) and #32 (2025-09-11), U-net skips"
    reference = ("KellerJordan/modded-nanogpt records/track_1_short/2024-11-10_UNetDoubleLr log lines 241-244,257-270;"
                 " README record #32 (sigmoid, init -1.5)")
    kind = "long skip"
    option_defaults = {"unet_init": None, "unet_plain": False}
    options_need_layers = 2  # one block has no pair
    static = True  # the weights are parameters: the final stream is a fixed linear combination of the writes (lens)

    def __init__(self, spec, options: Mapping[str, Any]):
        super().__init__(spec, options)
        layers = spec.num_layers
        self.source = layers - 1 - spec.layer if self.block_start and spec.layer >= layers - layers // 2 else None
        self.sigmoid = not options["unet_plain"]
        init = options["unet_init"]
        if init is None:
            init = SIGMOID_INIT if self.sigmoid else PLAIN_INIT
        self.weight = nn.Parameter(torch.tensor(float(init))) if self.source is not None else None

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        if options["unet_init"] is not None:
            check_number_option(cls.name, options, "unet_init", -10.0, 10.0)
        check_bool_option(cls.name, options, "unet_plain")
        return options

    def coefficient(self) -> torch.Tensor:
        return torch.sigmoid(self.weight) if self.sigmoid else self.weight

    def enter(self, stream: DepthStream) -> DepthStream:
        if self.weight is None:
            return stream
        return skip_in(stream, self.source, self.coefficient())

    def coefficients(self) -> dict[str, Any]:
        """The skip's weight as applied (after the sigmoid where there is one), at each destination block."""
        return {} if self.weight is None else {"w": self.coefficient().item()}


def long_skip_blocks(num_layers: int, options: Mapping[str, Any]) -> tuple[int, int]:
    """(source, destination) of the long skip, each the option given or the default rule, unchecked.

    Default rule: the speedrun's 3 -> 6 of 11 blocks (HEAD) scaled to the depth, the source at 3L // 11 and the
    destination at 6L // 11 but at least two blocks after the source (one block between them: a skip into the
    next block would only rescale the stream) and at most the last block. It gives 3 -> 6 at 11 and 12 blocks,
    1 -> 3 at 4, 2 -> 4 at 8, 0 -> 2 at 3, 0 -> 1 at 2. A source given alone keeps the destination rule relative to
    it; a destination given alone puts the default source before it when 3L // 11 would not be.
    """
    source, destination = options["long_skip_from"], options["long_skip_to"]
    if source is None:
        source = 3 * num_layers // 11
        if destination is not None:
            source = min(source, destination - 1)
    if destination is None:
        destination = min(num_layers - 1, max(source + 2, 6 * num_layers // 11))
    return source, destination


class LongSkip(Connection):
    """One long skip: block `long_skip_from`'s output added at the start of block `long_skip_to` through a
    sigmoid gate, `x = x + sigmoid(w) h_src`, raw `w` initialised to `long_skip_init` (-1.5: 0.18).

    modded-nanogpt record #45 (2025-11-18, RefineSkip, README) reduced the U-net pairs to one skip (4 -> 7 in that
    record's numbering); at HEAD (`train_gpt.py @f411b3d`) it is 3 -> 6 of 11 blocks: `h_3` cached at line 1249
    (`cache_layers = [3, 7]`, stored at 1667-1668), added at block 6's start (lines 1592-1595) with
    `skip_lambda` init -1.5 (line 1346). HEAD also multiplies the gate by a MUDD-gate output (init 0.5, lines 1455,
    1461); that factor belongs to MUDD and is not part of this connection. The default blocks scale 3 -> 6 of 11 to
    the model's depth (`long_skip_blocks`).
    """

    name = "long-skip"
    formula = "x = x + sigmoid(w) h_src  (at the start of block dst)"
    paper = "Jordan et al. 2025-26, modded-nanogpt speedrun record #45 (2025-11-18), train_gpt.py @f411b3d"
    reference = "KellerJordan/modded-nanogpt @f411b3d train_gpt.py:1249,1346,1592-1595,1667-1668"
    kind = "long skip"
    option_defaults = {"long_skip_from": None, "long_skip_to": None, "long_skip_init": SIGMOID_INIT}
    options_need_layers = 2  # a skip needs a source before its destination
    static = True  # the gate is a parameter: the final stream is a fixed linear combination of the writes (lens)

    def __init__(self, spec, options: Mapping[str, Any]):
        super().__init__(spec, options)
        self.source, destination = long_skip_blocks(spec.num_layers, options)
        here = self.block_start and spec.layer == destination
        self.weight = nn.Parameter(torch.tensor(float(options["long_skip_init"]))) if here else None

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_block_option(cls.name, options, "long_skip_from")
        check_block_option(cls.name, options, "long_skip_to")
        check_number_option(cls.name, options, "long_skip_init", -10.0, 10.0)
        return options

    @classmethod
    def check_model(cls, num_layers: int, options: Mapping[str, Any]) -> None:
        """Refuse a destination that is not a block after the first, or a source that is not a block before it."""
        super().check_model(num_layers, options)
        source, destination = long_skip_blocks(num_layers, options)
        check_block_range(cls.name, "long_skip_to", destination, 1, num_layers - 1,
                          f"a block after the first; the model has {num_layers} blocks")
        check_block_range(cls.name, "long_skip_from", source, 0, destination - 1,
                          f"a block before long_skip_to = {destination}; the model has {num_layers} blocks")

    def enter(self, stream: DepthStream) -> DepthStream:
        if self.weight is None:
            return stream
        return skip_in(stream, self.source, torch.sigmoid(self.weight))

    def coefficients(self) -> dict[str, Any]:
        """The gate as applied, sigmoid(w), at the destination block."""
        return {} if self.weight is None else {"gate": torch.sigmoid(self.weight).item()}
