"""MUDD: multiway dynamic dense connections (Xiao et al. 2025, MUDDFormer, arXiv 2502.12170).

After block i (0-based) the sources are X_0 (the embedding, `DepthStream.x0`) and X_1..X_{i+1} (the raw block
outputs, `blocks.j:out`), L_i = i + 2 of them. A generator reads the current block's output,

    A_i = W2 GELU(W1 RMS(X_{i+1})) + B_i,   A_i: (batch, seq, C, L_i),  B_i: (C, L_i) static,

and stream c of the next block is `X^c = sum_j A_i[c, j] X_j`. With `mudd_streams=qkvr` (the paper's, C = 4) the
next block reads four streams: `h = X^R + Attn(N_q(X^Q), N_k(X^K), N_v(X^V))`, each with its own norm ("sepln"),
then `out = h + FFN(N(h))`; with `mudd_streams=r` (C = 1, the reference's `dense_type "l"`) it reads one, as a
plain pre-LN block. After the last block C = 1 and that stream goes to the head.

Reference: Caiyun-AI/MUDDFormer @fc067b2 `pytorch/muddformer/modeling_muddformer.py` (MIT):
`MultiwayDynamicDenseBlock` lines 54-76 (RMS without a gain, eps = config.norm_eps = 1e-6, `w1: D -> C L_i`, x4 for
the last with `expand_last`, GELU, `w2: -> C L_i`, rearranged `(C L) -> C`, `layer_mix` line 75), the static biases
`dense_bs` line 94 and their use lines 181-190 (the generator reads the raw output `x` of block i; the sources
are the raw outputs `hiddens`, never the mixed streams), the block lines 212-223 (block 0 reads the embedding, R is
`x[-1]`, Q/K/V each normed by `attention_norms`). The torch code's `torch.randn` biases are a checkpoint
placeholder; the training init is the JAX code's (`jax/MaxText/layers/llama2.py:107-130`): W1 normal with std
1/sqrt(D) (`nd_dense_init(1.0, "fan_in", "normal")`), W2 zero, B_i one-hot on the current block's output for every
stream ("current_only"). So the model starts as plain pre-LN: `--residual mudd` gives pre's logits at init.

Hidden width: the reference's is C L_i (x4 after the last block, `expand_last`, and the shipped model rounds it up
to a multiple of 64, `round64`); reslab's default (`mudd_hidden=0`) is C L_i, x4 after the last block, not rounded
(at lab widths a 64-wide generator per block would rival the block); `mudd_hidden=N` makes every generator N wide.
Not implemented: the JAX code's `mudd_prenorm`/`mudd_postnorm` variant (normed sources, a post-norm on R).

In reslab: the generator of block i lives at its last site and mixes in `leave`; Q, K, V travel in the stream's
`saved` (`mudd:q`, ...) to the next block's attention site, whose `update` replaces pre-LN's (so `mudd` composes
only with `pre`, and not with another connection that replaces the update, such as `scales`). Attention must take
separate key and value inputs (`takes_kv_inputs`: CausalSelfAttention, MultiHeadLatentAttention); a model whose
attention does not is refused with qkvr. The generator matrices are plain parameters, not `nn.Linear`: the
model's init leaves them alone and draws exactly the numbers pre-LN's model draws (W1 comes from a private
generator seeded from the global one's state); weight decay applies to them (`decayed_parameters`), Muon does not.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.errors import ReslabError
from reslab.residual.base import ResidualSite, check_integer_option
from reslab.residual.depth.base import Connection, DepthStream

STREAMS = ("qkvr", "r")  # the values of `mudd_streams`: the stream names, R (the residual) last
RMS_EPS = 1e-6  # RMSnormNoscale(epsilon=config.norm_eps), norm_eps 1e-6 (modeling_muddformer.py:57, config)
CARRIED = ("q", "k", "v")  # the streams carried to the next block's attention in `saved`, as `mudd:q`, ...


def carried_key(stream: str) -> str:
    return f"mudd:{stream}"


def generator_width(option: int, sources: int, streams: int, last: bool) -> int:
    """The generator's hidden width: `option` if set, else C L_i, x4 after the last block (the reference's
    `hid_dim = l * C`, `*= 4` with `expand_last`, modeling_muddformer.py:61-62; no `round64`)."""
    return option or sources * streams * (4 if last else 1)


def private_generator(layer: int) -> torch.Generator:
    """A CPU generator seeded from the global generator's state and the block index, without advancing the global
    one: W1 differs by seed and by block, and the model draws its own weights exactly as without MUDD."""
    state = torch.random.get_rng_state().numpy().tobytes() + layer.to_bytes(4, "little")
    seed = int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") & (2 ** 63 - 1)
    return torch.Generator().manual_seed(seed)


def rms(x: torch.Tensor) -> torch.Tensor:
    """RMS normalisation without a gain (RMSnormNoscale, modeling_muddformer.py:350-360)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)


MAX_HIDDEN = 65536


class MUDD(Connection):
    """Multiway dynamic dense connections: after block i, each stream the next block reads (Q, K, V, R, or R
    alone) is a per-position, input-dependent weighted sum of the embedding and every block output so far.

    See the module docstring for the formula, the reference lines and the init (pre-LN exactly at init).
    """

    name = "mudd"
    formula = "X^c = sum_j A_i[c,j] X_j,  A_i = W2 GELU(W1 RMS(X_{i+1})) + B_i  (after block i; c in Q, K, V, R)"
    paper = ("Xiao et al. 2025, MUDDFormer: Breaking Residual Bottlenecks in Transformers via Multiway Dynamic Dense "
             "Connections (arXiv 2502.12170)")
    reference = ("Caiyun-AI/MUDDFormer @fc067b2 pytorch/muddformer/modeling_muddformer.py:54-76,94,181-190,212-223; "
                 "jax/MaxText/layers/llama2.py:107-130 (init)")
    kind = "dense"
    option_defaults = {"mudd_streams": "qkvr", "mudd_hidden": 0}
    replaces_update = True  # the next block's attention reads Q, K, V apart from the residual R
    additive = False
    decayed_parameters = ("w1", "w2")  # the generator's matrices (reslab.contracts): decayed like a Linear weight

    def __init__(self, spec, options: Mapping[str, Any]):
        super().__init__(spec, options)
        self.streams = options["mudd_streams"] if spec.layer < spec.num_layers - 1 else "r"
        separate = options["mudd_streams"] == "qkvr" and self.block_start and spec.layer > 0
        self.norm_k = spec.make_norm(spec.width) if separate else None  # N_q is the pre-LN site's own norm
        self.norm_v = spec.make_norm(spec.width) if separate else None
        self.w1 = self.w2 = self.bias = None
        if self.block_end:
            self.build_generator(spec, options["mudd_hidden"])
        self.pending: tuple[torch.Tensor, ...] | None = None  # Q, K, V between `enter` and `update`
        self.last_mean: torch.Tensor | None = None  # the mean of A_i over the last forward's positions (C, L_i)

    def build_generator(self, spec, hidden_option: int) -> None:
        """W1 (H, D) normal std 1/sqrt(D), W2 (C L_i, H) zero, B_i (C, L_i) one-hot on the current block's output
        (llama2.py:107-130); W1 drawn from `private_generator`, so the global random stream is untouched."""
        sources, streams = spec.layer + 2, len(self.streams)
        hidden = generator_width(hidden_option, sources, streams, spec.layer == spec.num_layers - 1)
        draw = torch.randn(hidden, spec.width, generator=private_generator(spec.layer), device="cpu")
        draw = draw / math.sqrt(spec.width)
        self.w1 = nn.Parameter(torch.empty(hidden, spec.width))
        with torch.no_grad():
            self.w1.copy_(draw)  # copy_: also onto a meta or CUDA tensor when the model is built under a device
        self.w2 = nn.Parameter(torch.zeros(sources * streams, hidden))
        self.bias = nn.Parameter(torch.zeros(streams, sources))
        with torch.no_grad():
            self.bias[:, -1] = 1.0

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        if options["mudd_streams"] not in STREAMS:
            raise ReslabError(f"connection 'mudd': mudd_streams must be 'qkvr' (the paper's: query, key, value and "
                              f"residual streams) or 'r' (the residual stream alone), got {options['mudd_streams']!r}")
        check_integer_option(cls.name, options, "mudd_hidden", 0, " (0: C L_i, the number of weights it makes)")
        if options["mudd_hidden"] > MAX_HIDDEN:
            raise ReslabError(f"connection 'mudd': mudd_hidden must be at most {MAX_HIDDEN} (a generator wider than "
                              f"any model here), got {options['mudd_hidden']}")
        return options

    def init_branch(self, sublayer: nn.Module) -> None:
        """Refuse, at build, attention that cannot read keys and values from their own streams under qkvr."""
        if self.norm_k is not None:
            check_takes_kv_inputs(sublayer, self.spec.layer)

    def enter(self, stream: DepthStream) -> DepthStream:
        """At the attention site of block i > 0 under qkvr: keep the Q, K, V streams for `update`."""
        if self.norm_k is not None and carried_key("q") in stream.saved:
            self.pending = tuple(stream.saved[carried_key(name)] for name in CARRIED)
        return stream

    def update(self, site: ResidualSite, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        """Pre-LN's update, `x + F(N(x))`, except at an attention site that carries Q, K, V:
        `X^R + Attn(N_q(X^Q), key_input=N_k(X^K), value_input=N_v(X^V))` (modeling_muddformer.py:216-223)."""
        pending, self.pending = self.pending, None
        if pending is None:
            fx = sublayer(site.norm(x))
        else:
            check_takes_kv_inputs(sublayer, self.spec.layer)
            q, k, v = pending
            fx = sublayer(site.norm(q), key_input=self.norm_k(k), value_input=self.norm_v(v))
        out = x + fx
        site.observe(x, fx, out)
        return out

    def leave(self, before: DepthStream, after: DepthStream) -> DepthStream:
        """At the block's last site: the next block's streams, R as the stream, Q/K/V in `saved`; elsewhere drop
        the Q, K, V the attention site has used."""
        if self.w1 is None:
            if self.norm_k is None:
                return after
            return after._replace(saved={k: v for k, v in after.saved.items() if not k.startswith("mudd:")})
        raw = self.source(after, self.spec.layer + 1)
        mixed = self.mix([self.source(after, j) for j in range(self.spec.layer + 2)])
        residual = mixed[-1] if after.x is raw else mixed[-1] + (after.x - raw)  # keep an earlier connection's change
        saved = {**after.saved, **{carried_key(name): s for name, s in zip(self.streams, mixed[:-1])}}
        return after._replace(x=residual, saved=saved)

    def weights(self, current: torch.Tensor) -> torch.Tensor:
        """A_i (batch, seq, C, L_i) from the current block's output (modeling_muddformer.py:68-72, 182-183)."""
        dynamic = F.gelu(rms(current) @ self.w1.t()) @ self.w2.t()
        return dynamic.unflatten(-1, self.bias.shape) + self.bias

    def mix(self, sources: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The next block's streams `sum_j A[c, j] X_j`, one per stream name (R last), from X_0..X_{i+1}; the
        generator reads the last. A sum term by term in the reference's order (`layer_mix`, line 75): no stacked
        copy of the sources is kept for the backward pass, and the audit reads each term as a gated skip."""
        if self.w1 is None:
            raise ReslabError(f"connection 'mudd': blocks.{self.spec.layer}'s sublayer {self.spec.index} mixes "
                              "nothing; the generator of a block sits at its last sublayer")
        if len(sources) != self.bias.shape[1]:
            raise ReslabError(f"connection 'mudd' after block {self.spec.layer} mixes {self.bias.shape[1]} sources "
                              f"(the embedding and {self.spec.layer + 1} block outputs), got {len(sources)}")
        weights = self.weights(sources[-1]).movedim(-2, 0)  # (C, batch, seq, L_i)
        self.last_mean = weights.detach().mean(dim=(1, 2))
        mixed = weights[..., 0, None] * sources[0]
        for j in range(1, len(sources)):
            mixed = mixed + weights[..., j, None] * sources[j]
        return list(mixed.unbind(0))

    def coefficients(self) -> dict[str, Any]:
        """Per stream c: `static_c`, the bias row B_i[c] over X_0..X_{i+1}, and `mean_c`, the mean of the whole
        weight A_i[c] over the positions of the last forward (the dynamic part included)."""
        if self.bias is None:
            return {}
        found: dict[str, Any] = {f"static_{c}": row for c, row in zip(self.streams, self.bias.detach().tolist())}
        if self.last_mean is not None:
            found.update({f"mean_{c}": row for c, row in zip(self.streams, self.last_mean.float().tolist())})
        return found

    def extra_repr(self) -> str:
        if self.w1 is None:
            return f"{self.name}: {'separate Q, K, V norms' if self.norm_k is not None else 'pre-LN update'}"
        return (f"{self.name}: streams {self.streams.upper()} from X_0..X_{self.spec.layer + 1}, "
                f"generator {self.w1.shape[1]} -> {self.w1.shape[0]} -> {self.w2.shape[0]}")


def check_takes_kv_inputs(sublayer: nn.Module, layer: int) -> None:
    """One line when the attention sublayer cannot read keys and values from streams of their own."""
    if not getattr(type(sublayer), "takes_kv_inputs", False):
        raise ReslabError(f"connection 'mudd': mudd_streams 'qkvr' feeds blocks.{layer}'s attention separate query, "
                          f"key and value streams, and {type(sublayer).__name__} does not take key and value inputs "
                          "(takes_kv_inputs); use --set mudd_streams=r")
