"""AltUp (`--residual altup`): Gemma 3n's alternating updates. The stream is widened to K streams; each block
computes on one of them (the active stream, index 0) and a learned, token-dependent predict and correct keep the
other K - 1 in step.

Facts (transformers 5.25 `models/gemma3n/modeling_gemma3n.py`, restated in /work/shared/reference/residuals-2026.md
section 3; Baykal et al. 2023, Alternating Updates for Efficient Transformers, NeurIPS 2023):
- router (lines 998-1001): `m(x) = tanh(W_m (RMSNorm_r(x) / D))` in (-1, 1)^K, the tanh in fp32; `W_m` (K x D);
- predict (lines 1003-1029): `C = reshape_(K x K)(W_p m(X_0))`, `X^_i = X_i + sum_j C_ij X_j`; `W_p` (K^2 x K);
- the layer computes on the active prediction only, `v = layer(X^_0)` (`Gemma3nTextDecoderLayer.forward`, lines
  1282-1306: predict at 1282, correct at 1306);
- correct (lines 1031-1060): `delta = v - X^_0`, `c = W_c m(v) + 1`, `X~_i = X^_i + c_i delta`; `W_c` (K x K);
- in training the prediction and correction matrices are clipped to `+-altup_coef_clip` (120) before use
  (lines 1015-1016, 1047-1048);
- init (`Gemma3nPreTrainedModel._init_weights`, lines 1356-1358, and `initializer_range` 0.02 of
  configuration_gemma3n.py:104): W_m, W_p, W_c N(0, 0.02^2), the router norm's gain 1;
- model (`Gemma3nTextModel.forward`, lines 1681-1694 and 1716-1730, the stream adapter here): stream 0 is the
  embedding `x`, stream i >= 1 is `A_i x` rescaled per token to the RMS of `x` (`altup_projections`, the mean
  square floored at 1e-5); before the final norm streams i >= 1 go through `altup_unembed_projections` and are
  rescaled to the RMS of stream 0, and the K streams are averaged.

How it maps onto reslab's two sites per block. Gemma 3n predicts before its whole layer and corrects after it;
reslab calls a block's attention site, then its FFN site. So:
- the attention site predicts, then runs attention on the active prediction with pre-LN: `u = p + Attn(LN(p))`,
  p = X^_0. It returns an `AltUpState`: the K predictions X^ (which correct starts from), u and the block's
  coefficients (the lens and the adapter read it as the K streams with the active one advanced to u);
- the FFN site runs `v = u + FFN(LN(u))` and corrects all K streams with `delta = v - p`, returning the K streams.
The block between predict and correct is thus pre-LN (Gemma 3n's own layer adds peri-LN norms, LAuReL and
per-layer inputs: other schemes' business). One router serves predict and correct, as in Gemma 3n: the attention
site owns the block's coefficients (`AltUpCoefficients`, named as `Gemma3nTextAltUp`'s parameters, so its weights
load as they are) and hands them to the FFN site inside the state. Left out: `correct_output_scale`, which only
gates Gemma 3n's per-layer-input embeddings, and `altup_active_idx` (always 0, as Gemma 3n's default; its
widening treats stream 0 as the embedding in any case).

Differences. The router norm (like every pre-norm) is the model's kind: RMSNorm as in Gemma 3n on llama and
deepseek, LayerNorm on gpt and tiny. The prediction clip is applied to the weight functionally, where Gemma 3n
clamps the parameter in place inside `forward`: the same forward; the gradient differs only for a weight already
beyond the clip.
A site called alone on a plain (batch, seq, width) tensor widens with copies and collapses with the mean (the
adapter with identity projections, which has no parameters to draw), and wraps AltUp around its own sublayer: the
attention site predicts and corrects with its coefficients; the FFN site, which has none, corrects with c = 1 (every
stream receives the update), as it does when given K streams with no state from an attention site. With zero
coefficients either site alone is pre-LN.

Probes see the active stream (stream in: X_0 at the attention site, u at the FFN site; stream out: u, then X~_0).
`scheme_metrics` reports the Amax gain of the composite skip mix prod_l (I + C_l), as hc and mhc do for theirs, and the
sums of each block's connection weights in mHC's terms: H_res = I + C (the prediction), H_pre = row 0 of I + C (the
block reads the active prediction X^_0), H_post = c (every stream takes c_i times the block's update v - p, both
sublayers' outputs); the attention site logs the first two, the FFN site the third.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.errors import ReslabError
from reslab.residual.base import (
    NormFactory,
    RankReduce,
    ResidualSite,
    SiteSpec,
    StreamAdapter,
    check_integer_option,
    check_number_option,
)
from reslab.residual.multistream import connection_sums, stream_metrics

ACTIVE = 0  # the stream the blocks compute on (Gemma 3n's altup_active_idx default, configuration_gemma3n.py:120)
INIT_STD = 0.02  # Gemma 3n's initializer_range (configuration_gemma3n.py:104), for a site built outside a model
MAGNITUDE_FLOOR = 1e-5  # the floor on a projected stream's mean square before rescaling (modeling_gemma3n.py:1690)


class AltUpState(NamedTuple):
    """The stream between a block's attention site and its FFN site."""

    predictions: torch.Tensor  # (K, batch, seq, width): X^, what correct starts from
    advanced: torch.Tensor  # (batch, seq, width): u = p + Attn(LN(p)), the active stream after attention
    altup: AltUpCoefficients | None  # the block's coefficients (its attention site's); None: c = 1

    @property
    def streams(self) -> torch.Tensor:
        """The K streams as they stand mid-block: the predictions, the active one advanced to u."""
        return torch.cat([self.advanced[None], self.predictions[1:]])


class AltUpCoefficients(nn.Module):
    """One block's AltUp parameters, named as in `Gemma3nTextAltUp`: the router norm and `modality_router` (K x D),
    `prediction_coefs` (K^2 x K), `correction_coefs` (K x K)."""

    def __init__(self, width: int, num_streams: int, make_norm: NormFactory, clip: float):
        super().__init__()
        self.num_streams, self.width, self.clip = num_streams, width, clip
        self.router_norm = make_norm(width)
        self.modality_router = nn.Linear(width, num_streams, bias=False)
        self.prediction_coefs = nn.Linear(num_streams, num_streams ** 2, bias=False)
        self.correction_coefs = nn.Linear(num_streams, num_streams, bias=False)
        for linear in (self.modality_router, self.prediction_coefs, self.correction_coefs):
            nn.init.normal_(linear.weight, 0.0, INIT_STD)

    def modalities(self, x: torch.Tensor) -> torch.Tensor:
        """`tanh(W_m (norm(x) / D))` (batch, seq, K); the tanh in fp32, as Gemma 3n computes it."""
        routed = self.modality_router(self.router_norm(x) * (1.0 / self.width))
        return torch.tanh(routed.float()).to(x.dtype)

    def clipped(self, linear: nn.Linear) -> torch.Tensor:
        """The coefficient matrix as used: clipped to +-clip in training (clip 0: never)."""
        if self.training and self.clip > 0:
            return linear.weight.clamp(-self.clip, self.clip)
        return linear.weight

    def predict(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions `X_i + sum_j C_ij X_j` (K, batch, seq, width), the mix C (batch, seq, K, K))."""
        k = self.num_streams
        mix = F.linear(self.modalities(streams[ACTIVE]), self.clipped(self.prediction_coefs)).unflatten(-1, (k, k))
        # (batch, seq, width, K) @ C^T, as Gemma 3n multiplies (lines 1019-1027): the streams are the left operand,
        # so the audit reads X + C X as it reads Gemma 3n's, an identity skip beside a learned branch
        predicted = torch.matmul(streams.permute(1, 2, 3, 0), mix.transpose(-1, -2)).permute(3, 0, 1, 2)
        return streams + predicted, mix

    def correction_scale(self, activated: torch.Tensor) -> torch.Tensor:
        """`c = W_c m(v) + 1` (batch, seq, K): how much of the active stream's innovation each stream takes."""
        return F.linear(self.modalities(activated), self.clipped(self.correction_coefs)) + 1.0

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        """`X^_i + c_i (v - X^_0)` with `c = W_c m(v) + 1`: every stream moves by the active stream's innovation."""
        scale = self.correction_scale(activated)
        return predictions + scale.movedim(-1, 0).unsqueeze(-1) * (activated - predictions[ACTIVE])

    def extra_repr(self) -> str:
        return f"streams={self.num_streams}, clip={self.clip:g}"


def rescaled(x: torch.Tensor, target_rms: torch.Tensor) -> torch.Tensor:
    """`x` scaled per token to RMS `target_rms`, its mean square floored as Gemma 3n does (lines 1689-1691)."""
    return x * target_rms / x.pow(2).mean(-1, keepdim=True).clamp(min=MAGNITUDE_FLOOR).sqrt()


def rms(x: torch.Tensor) -> torch.Tensor:
    """Per-token root mean square over the width, no epsilon (Gemma 3n's target magnitude, lines 1682 and 1718)."""
    return x.pow(2).mean(-1, keepdim=True).sqrt()


def collapse(streams: torch.Tensor, unembed: list[nn.Module] | None) -> torch.Tensor:
    """The mean of stream 0 and the streams i >= 1, each unembedded (identity when `unembed` is None) and rescaled
    to the RMS of stream 0."""
    target = rms(streams[0])
    others = [rescaled(stream if unembed is None else unembed[i](stream), target)
              for i, stream in enumerate(streams[1:])]
    return torch.stack([streams[0], *others]).mean(0)


class AltUpAdapter(StreamAdapter):
    """Gemma 3n's widening and collapse: the embedding and K - 1 learned projections of it in, each rescaled to
    its RMS; out, the mean of stream 0 and the unembedded other streams, each rescaled to stream 0's RMS. The
    projections are named as `Gemma3nTextModel`'s (`altup_projections`, `altup_unembed_projections`)."""

    def __init__(self, width: int, num_streams: int):
        super().__init__()
        self.num_streams = num_streams
        self.altup_projections = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(num_streams - 1))
        self.altup_unembed_projections = nn.ModuleList(nn.Linear(width, width, bias=False)
                                                       for _ in range(num_streams - 1))
        for linear in (*self.altup_projections, *self.altup_unembed_projections):
            nn.init.normal_(linear.weight, 0.0, INIT_STD)

    def widen(self, x: torch.Tensor) -> torch.Tensor:
        target = rms(x)
        return torch.stack([x, *(rescaled(project(x), target) for project in self.altup_projections)])

    def reduce(self, stream: torch.Tensor | AltUpState) -> torch.Tensor:
        """Also reads the state between a block's two sites (the lens decodes every site's output)."""
        streams = stream.streams if isinstance(stream, AltUpState) else stream
        return collapse(streams, list(self.altup_unembed_projections))

    def extra_repr(self) -> str:
        return f"streams={self.num_streams}"


class AltUp(ResidualSite):
    """Gemma 3n's AltUp over `altup_streams` streams (see the module docstring), pre-LN between predict and correct:

        X^ = X + C(X_0) X,  p = X^_0   (attention site: predict)     u = p + Attn(LN(p))
        v = u + FFN(LN(u)),  X~ = X^ + c(v) (v - p)                   (FFN site: correct)
    """

    name = "altup"
    formula = "X^ = X + C(X_0) X; u = X^_0 + Attn(LN(X^_0)); v = u + FFN(LN(u)); X = X^ + c(v) (v - X^_0)"
    paper = "Baykal et al. 2023, Alternating Updates for Efficient Transformers (NeurIPS 2023); Gemma 3n"
    option_defaults = {"altup_streams": 4, "altup_coef_clip": 120.0}
    not_for_muon = ("altup",)  # reslab.contracts: coefficient maps of K streams, not hidden matrices

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        if spec.sublayers_per_block != 2:
            raise ReslabError(f"residual scheme 'altup' predicts at a block's first sublayer and corrects at its "
                              f"second; a block of {spec.sublayers_per_block} sublayers has no such pair")
        self.num_streams = self.options["altup_streams"]
        self.norm = spec.make_norm(spec.width)  # the sublayer's own pre-norm
        self.altup: AltUpCoefficients | None = None  # the FFN site borrows its block's through the AltUpState
        if spec.index == 0:
            self.altup = AltUpCoefficients(spec.width, self.num_streams, spec.make_norm,
                                           float(self.options["altup_coef_clip"]))
        self.last_stream_mix: torch.Tensor | None = None  # I + C of the last probed forward, for `scheme_metrics`
        self.last_sums: torch.Tensor | None = None  # `connection_sums` of the last probed forward, likewise

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_integer_option(cls.name, options, "altup_streams", 1)
        check_number_option(cls.name, options, "altup_coef_clip", 0, float("inf"), " (0: no clipping)")
        return options

    streams_option = "altup_streams"  # the option that counts its streams (ResidualSite.streams)

    @classmethod
    def stream_adapter(cls, width: int, num_layers: int, options: Mapping[str, Any]) -> StreamAdapter:
        return AltUpAdapter(width, cls.resolve_options(options)["altup_streams"])

    def forward(self, stream: torch.Tensor | AltUpState, sublayer: nn.Module) -> torch.Tensor | AltUpState:
        if isinstance(stream, torch.Tensor) and stream.dim() == 3:  # one plain stream: called outside a model
            return self.alone(stream, sublayer)
        return self.update(stream, sublayer)

    def update(self, stream: torch.Tensor | AltUpState, sublayer: nn.Module) -> torch.Tensor | AltUpState:
        """This site's part of the block: predict and attention (index 0), or the FFN and correct (index 1)."""
        return self.predict_and_attend(stream, sublayer) if self.altup is not None else self.correct(stream, sublayer)

    def predict_and_attend(self, streams: torch.Tensor, sublayer: nn.Module) -> AltUpState:
        """The attention site: predict all K streams, then `u = p + F(LN(p))` on the active prediction p."""
        if not isinstance(streams, torch.Tensor) or streams.shape[0] != self.num_streams:
            raise ReslabError(f"altup's attention site needs the {self.num_streams} streams of altup's stream "
                              f"adapter, got {describe(streams)}; build the model with --residual altup")
        predictions, mix = self.altup.predict(streams)
        prediction = predictions[ACTIVE]
        fx = sublayer(self.norm(prediction))
        advanced = prediction + fx
        if self.probe is not None:
            eye = torch.eye(self.num_streams, device=mix.device, dtype=mix.dtype)
            self.last_stream_mix = (eye + mix).detach()
            self.last_sums = connection_sums(self.num_streams, self.last_stream_mix[..., ACTIVE, :].sum(-1),
                                             self.last_stream_mix)
        self.observe(streams[ACTIVE], fx, advanced)  # the probe's stream: the active one
        return AltUpState(predictions, advanced, self.altup)

    def correct(self, state: torch.Tensor | AltUpState, sublayer: nn.Module) -> torch.Tensor:
        """The FFN site: `v = u + F(LN(u))`, then every stream corrected by the innovation `v - p`."""
        if not isinstance(state, AltUpState):  # K streams without a prediction: the FFN site alone (p = u, c = 1)
            state = AltUpState(state, state[ACTIVE], None)
        advanced = state.advanced
        fx = sublayer(self.norm(advanced))
        out = corrected(state, advanced + fx)
        if self.probe is not None:
            self.last_sums = correction_sums(state, advanced + fx, self.num_streams)
        self.observe(advanced, fx, out[ACTIVE])
        return out

    def alone(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        """A plain (batch, seq, width) stream in and out: K copies, AltUp around this site's sublayer alone (the
        attention site corrects right after it), the mean (the adapter with identity projections)."""
        streams = x.unsqueeze(0).expand(self.num_streams, *x.shape).contiguous()
        if self.altup is None:
            return collapse(self.correct(streams, sublayer), None)
        state = self.predict_and_attend(streams, sublayer)
        return collapse(corrected(state, state.advanced), None)

    @classmethod
    def scheme_metrics(cls, sites: list[ResidualSite], ranks: RankReduce | None = None) -> dict[str, float]:
        """Amax gain of the composite skip mix `prod_l (I + C_l)` (per token; the max over tokens and ranks) of the
        last probed forward: how far the predictions alone can grow the streams, forward and backward; and the
        sums of each block's H_res, H_pre and H_post (see the module docstring)."""
        mixes = [getattr(site, "last_stream_mix", None) for site in sites if getattr(site, "altup", None) is not None]
        return stream_metrics(mixes, [getattr(site, "last_sums", None) for site in sites], ranks)

    def extra_repr(self) -> str:
        role = "predict + attention" if self.altup is not None else "FFN + correct"
        return f"{super().extra_repr()}, streams={self.num_streams}, {role}"


def corrected(state: AltUpState, activated: torch.Tensor) -> torch.Tensor:
    """The K streams after correct: the predictions moved by `c (v - p)`, c = 1 when no coefficients came along."""
    if state.altup is None:
        return state.predictions + (activated - state.predictions[ACTIVE])
    return state.altup.correct(state.predictions, activated)


@torch.no_grad()
def correction_sums(state: AltUpState, activated: torch.Tensor, streams: int) -> torch.Tensor:
    """`connection_sums` of the FFN site: H_post = c, the block's write into each stream (c = 1 without
    coefficients); this site has no H_pre or H_res of its own (its block's attention site logs them)."""
    if state.altup is None:
        return connection_sums(streams, write_sum=torch.full((), float(streams), device=activated.device))
    return connection_sums(streams, write_sum=state.altup.correction_scale(activated).sum(-1))


def describe(stream: Any) -> str:
    """What a site was given instead of the streams, for its one-line error."""
    if isinstance(stream, torch.Tensor):
        return f"a tensor of shape {tuple(stream.shape)}"
    return f"a {type(stream).__name__}"
