from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.contracts import ValueMixing, is_attention, require
from reslab.errors import ReslabError
from reslab.residual.depth.base import Connection, DepthStream

INIT_STD = 0.01  # the table's init, 0.01 N(0, 1): modded-nanogpt @f411b3d train_gpt.py:1261
LAMBDA_INIT = (0.5, 0.5)  # (l0, l1): record #15 (2024-12-08) log 0069607b-....txt:186
ENDS = 3  # "ends": the first 3 and the last 3 layers, banks 0 1 2 ... 0 1 2 (record #17, 2024-12-17)
LAYOUTS = ("all", "ends")


def bank_of(layer: int, num_layers: int, layout: str) -> int | None:
    """The value-embedding bank block `layer`'s attention uses, or None for none.

    "all": U-net order, encoder layer i and decoder layer L-1-i share bank min(i, L-1-i) (ceil(L/2) banks; one
    layer, one bank). "ends": layers 0, 1, 2 use banks 0, 1, 2 and layers L-3, L-2, L-1 use banks 0, 1, 2 again.
    """
    if layout == "all":
        return min(layer, num_layers - 1 - layer)
    if layer < ENDS:
        return layer
    return layer - (num_layers - ENDS) if layer >= num_layers - ENDS else None


class ValueEmbeddings(Connection):
    """Value embeddings: token-indexed tables mixed into attention's values, `v = l0 v + l1 ve_b[token]`.

    The generalisation of the value residual: instead of the first layer's values, each attention layer mixes in a
    learned embedding of the current token (a `vocab x kv_size` table, shaped like the values). modded-nanogpt
    record #14 (2024-12-04, ValueEmbed, `train_gpt2.py` lines 186, 246, 268, 274-279) gave each of the 12 layers
    its own table; record #15 (2024-12-08, UNetValueEmbedsTweaks, log `0069607b-aa90-49fd-9766-4368bcd168c4.txt`
    lines 186, 199, 263, 301-313) shares 6 tables in U-net order (encoder layer i and decoder layer 11-i) with
    per-attention `lambdas` (2,) initialised to [0.5, 0.5]: `v = l0 v + l1 ve`. That form is the default here
    (`value_embed_layers` "all": bank min(i, L-1-i)). "ends" is record #17's (2024-12-17, SparsifyEmbeds, log
    `165384d5-5a41-4fba-9b79-8ecc372616ea.txt` lines 225-242, kept to 2025): three tables, for layers 0, 1, 2 and
    again, in the same order, for the last three; needs 6 or more blocks. Layers without a bank are left alone
    (record #17 still scaled their values by l0, a reparametrisation of W_v not copied). At HEAD (@f411b3d
    train_gpt.py:1543) five unshared tables serve layers 1, 2, 8, 9, 10 of 11, with gates from the stream
    (record #55) in place of the lambdas: not offered here.

    The tables are initialised 0.01 N(0, 1), HEAD's (line 1261; record #15 kept nn.Embedding's N(0, 1)). Sharing
    a bank shares no parameter between modules: the first layer that uses it owns the table, looks its rows up at
    its block start and keeps them in the stream (`value_embed:bank<b>`); the later layer reads them from there.
    The lookup reaches the attention through its `value_mix` hook (`reslab.contracts.ValueMixing`), set during the
    sublayer's call only. A site called alone, outside a model, has no token ids: its values pass unchanged.
    """

    name = "value-embed"
    formula = "v = l0 v + l1 ve_b(token)  (in attention; bank b = min(i, L-1-i))"
    paper = "Jordan et al. 2024, modded-nanogpt speedrun records #14-15 (2024-12-04, 2024-12-08), value embeddings"
    reference = ("KellerJordan/modded-nanogpt records/track_1_short/2024-12-08_UNetValueEmbedsTweaks log lines "
                 "186,199,263,301-313; train_gpt.py @f411b3d:1261,1543")
    kind = "value embedding"
    option_defaults = {"value_embed_layers": "all"}
    additive = True  # only attention's values change: the stream stays the embedding + the sublayers' writes
    decayed_parameters = ("table",)  # an embedding table: decayed like `nn.Embedding` weights (reslab.contracts)

    def __init__(self, spec, options: Mapping[str, Any]):
        super().__init__(spec, options)
        layout = options["value_embed_layers"]
        self.bank = bank_of(spec.layer, spec.num_layers, layout) if self.block_start else None
        later = range(spec.layer + 1, spec.num_layers)
        self.shared = self.bank is not None and any(bank_of(j, spec.num_layers, layout) == self.bank for j in later)
        self.register_parameter("table", None)  # (vocab, kv_size), owned by the bank's first layer (init_branch)
        self.register_parameter("lambdas", None)  # (l0, l1), on every attention that uses a bank (init_branch)
        self._values: torch.Tensor | None = None  # this layer's ve, only while its sublayer runs

    @property
    def owner(self) -> bool:
        return self.bank == self.spec.layer  # in both layouts a bank's first user has the bank's index

    @property
    def key(self) -> str:
        return f"value_embed:bank{self.bank}"

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        if options["value_embed_layers"] not in LAYOUTS:
            raise ReslabError(f"connection 'value-embed': value_embed_layers must be {' or '.join(LAYOUTS)}, got "
                              f"{options['value_embed_layers']!r}")
        return options

    @classmethod
    def check_model(cls, num_layers: int, options: Mapping[str, Any]) -> None:
        super().check_model(num_layers, options)
        if options["value_embed_layers"] == "ends" and num_layers < 2 * ENDS:
            raise ReslabError(f"--value-embed-layers ends does not apply to a model of {num_layers} blocks: it needs "
                              f"{2 * ENDS} or more (the first {ENDS} and the last {ENDS}); raise --layers or use all")

    def init_branch(self, sublayer: nn.Module) -> None:
        """Create this layer's lambdas (and, at a bank's first layer, its table) and install the value hook."""
        if self.bank is None or not is_attention(sublayer):
            return
        require(sublayer, ValueMixing, type(sublayer).__name__, f"connection {self.name!r}")
        if sublayer.value_mix is not None and sublayer.value_mix != self.mix_values:
            raise ReslabError(f"connection {self.name!r}: the attention of block {self.spec.layer} already has its "
                              "values mixed by another scheme or connection; use one of them")
        values = [weight for role, weight in sublayer.branch_weights() if role == "v"]
        kv_size = sum(weight.shape[0] for weight in values)  # kv_heads x value head dim (MLA: heads x v_head_dim)
        like = {"device": values[0].device, "dtype": values[0].dtype}
        self.lambdas = nn.Parameter(torch.tensor(LAMBDA_INIT, **like))
        if self.owner:
            if self.spec.vocab_size <= 0:
                raise ReslabError(f"connection {self.name!r} needs the model's vocabulary size, and this model does "
                                  "not pass it to its sites (SiteSpec.vocab_size); use a reslab transformer")
            table = torch.empty(self.spec.vocab_size, kv_size, **like)
            self.table = nn.Parameter(nn.init.normal_(table, 0.0, INIT_STD))
        sublayer.value_mix = self.mix_values

    def enter(self, stream: DepthStream) -> DepthStream:
        if self.lambdas is None:
            return stream
        if self.owner:
            if stream.tokens is None:  # called alone, outside a model: no token ids, no value embedding
                return stream
            self._values = F.embedding(stream.tokens, self.table)  # (batch, seq, kv_size)
            return stream.save(self.key, self._values) if self.shared else stream
        self._values = stream.saved.get(self.key)  # None outside a model: the values pass unchanged
        return stream

    def leave(self, before: DepthStream, after: DepthStream) -> DepthStream:
        self._values = None  # hold no activations between forwards
        return after

    def mix_values(self, values: torch.Tensor) -> torch.Tensor:
        """Called by the attention on its values (batch, kv_heads, seq, head_dim): `l0 v + l1 ve`."""
        if self._values is None:
            return values
        batch, heads, seq, dim = values.shape
        ve = self._values.view(batch, seq, heads, dim).transpose(1, 2).to(values.dtype)
        l0, l1 = self.lambdas.to(values.dtype)
        return l0 * values + l1 * ve

    def coefficients(self) -> dict[str, Any]:
        return {} if self.lambdas is None else {"l0": self.lambdas[0].item(), "l1": self.lambdas[1].item()}

    def extra_repr(self) -> str:
        bank = "" if self.bank is None else f", bank {self.bank}{' (owner)' if self.owner else ''}"
        return f"{super().extra_repr()}{bank}"
