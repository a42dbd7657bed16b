import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from reslab.errors import ReslabError
from reslab.residual.base import ResidualSite, SiteSpec, check_integer_option
from reslab.residual.stream_ops import backward_in_stream_precision, fusable_without_autocast

FORMS = ("rw", "lr", "rw+lr", "gemma3n")


class LaurelBlock(nn.Module):
    """`g(h) = h + N(W_R W_L h)`: the identity plus a rank-r map (N: a norm in Gemma 3n, none in the paper's LR).

    The names are transformers' `Gemma3nTextLaurelBlock`'s (`linear_left` (r x D), `linear_right` (D x r),
    `post_laurel_norm`), so its weights load as they are.
    """

    def __init__(self, width: int, rank: int, norm: nn.Module | None = None):
        super().__init__()
        self.linear_left = nn.Linear(width, rank, bias=False)
        self.linear_right = nn.Linear(rank, width, bias=False)
        self.post_laurel_norm = norm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.low_rank(h)

    def low_rank(self, h: torch.Tensor) -> torch.Tensor:
        low_rank = self.linear_right(self.linear_left(h))
        return low_rank if self.post_laurel_norm is None else self.post_laurel_norm(low_rank)


class Laurel(ResidualSite):
    """LAuReL, learned augmented residual: `x = alpha F(LN(x)) + g(x)` on the pre-LN base, by `laurel_form`:

    - `rw` (residual weights): `x = alpha F(LN(x)) + beta x`, two learned scalars per sublayer, both 1 at init
      (pre-LN exactly; the paper's normalisation of alpha and beta is not reproduced);
    - `lr` (low rank): `x = F(LN(x)) + (I + W_R W_L) x`, `W_L` (r x D) random, `W_R` (D x r) zero at init;
    - `rw+lr` (default): `x = alpha F(LN(x)) + beta (I + W_R W_L) x`;
    - `gemma3n`: Gemma 3n's decoder layer, which applies LAuReL to the attention sublayer only, on the normalised
      input `h = LN(x)`, beside peri-LN: `x = (x + LN_o(F(h)) + h + LN_l(W_R W_L h)) / sqrt(2)`; its FFN site is
      `x + LN_o(F(LN(x)))`. `LaurelBlock` computes `h + LN_l(W_R W_L h)` as transformers'
      `Gemma3nTextLaurelBlock` does (models/gemma3n/modeling_gemma3n.py), combined with the attention output and
      scaled by 1/sqrt(2) as in `Gemma3nTextDecoderLayer.forward`; both matrices random at init, as there.

    Rank `laurel_rank` (default 16, or the width if smaller; Gemma 3n uses 64 at width 2048). Menghani, Kumar, Kumar
    2024, LAuReL: Learned Augmented Residual Layer (arXiv 2411.07501, ICML 2025).
    """

    name = "laurel"
    formula = "x = alpha F(LN(x)) + beta (I + W_R W_L) x  (forms rw, lr, rw+lr; gemma3n)"
    paper = "Menghani, Kumar, Kumar 2024, LAuReL: Learned Augmented Residual Layer (arXiv 2411.07501)"
    option_defaults = {"laurel_form": "rw+lr", "laurel_rank": None}  # None: min(16, width)

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        form, rank = self.options["laurel_form"], self.options["laurel_rank"] or min(16, spec.width)
        if rank > spec.width:
            raise ReslabError(f"residual scheme 'laurel': laurel_rank {rank} exceeds the model width {spec.width}; "
                              "choose a smaller --laurel-rank")
        self.form = form
        self.norm = spec.make_norm(spec.width)
        self.weighted = form in ("rw", "rw+lr")
        if self.weighted:
            self.alpha = nn.Parameter(torch.ones(()))
            self.beta = nn.Parameter(torch.ones(()))
        self.norm_out = spec.make_norm(spec.width) if form == "gemma3n" else None
        self.laurel = None
        if form in ("lr", "rw+lr") or (form == "gemma3n" and spec.index == 0):
            self.laurel = LaurelBlock(spec.width, rank, spec.make_norm(spec.width) if form == "gemma3n" else None)

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        if options["laurel_form"] not in FORMS:
            raise ReslabError(f"residual scheme 'laurel': laurel_form must be one of {', '.join(FORMS)}, "
                              f"got {options['laurel_form']!r}")
        if options["laurel_rank"] is not None:
            check_integer_option(cls.name, options, "laurel_rank", 1)
        return options

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        if self.form == "gemma3n":
            return self._gemma3n(x, sublayer)
        fx = sublayer(self.norm(x))
        if self.form == "rw+lr" and self.probe is None:
            left, right = self.laurel.linear_left.weight, self.laurel.linear_right.weight
            if fusable_without_autocast(x, fx, self.alpha, left):
                return WeightedLowRankSum.apply(x, fx, left, right, self.alpha, self.beta)
        low_rank = None if self.laurel is None else self.laurel.low_rank(x)
        skip = x
        if self.weighted:
            fx, skip = self.alpha * fx, self.beta * x
            low_rank = None if low_rank is None else self.beta * low_rank
        if low_rank is not None:  # (I + W_R W_L) x: the low-rank term joins the branch, one residual of x
            fx = fx + low_rank
        out = skip + fx
        self.observe(x, fx, out)
        return out

    def _gemma3n(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        h = self.norm(x)
        fx = self.norm_out(sublayer(h))
        out = x + fx
        if self.laurel is not None:  # the attention site: Gemma3nTextDecoderLayer's `(attn_gated + laurel) / sqrt(2)`
            out = (out + self.laurel(h)) / math.sqrt(2)
        self.observe(x, fx, out)
        return out

    def init_branch(self, sublayer: nn.Module) -> None:
        if self.laurel is not None and self.form != "gemma3n":  # (I + W_R W_L) = I at init: LR starts as pre-LN
            nn.init.zeros_(self.laurel.linear_right.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, form={self.form}"


class WeightedLowRankSum(torch.autograd.Function):
    """`out = alpha fx + beta (x + W_R W_L x)`, LAuReL's rw+lr update, in fewer passes over the stream than the
    plain ops (three scalar products, two adds, each differentiated on its own): forward, `s = x + (x W_L^T) W_R^T`
    is one `addmm` (the add rides on the matrix product), then `beta s` and a fused `+= alpha fx`; backward, with
    `ds = beta dout`: `dx = ds + (ds W_R) W_L` (again one `addmm`), `dfx = alpha dout`, and the scalars' gradients
    `dalpha = <dout, fx>`, `dbeta = <dout, s>` as dot products, which write nothing of the stream's size."""

    @staticmethod
    def forward(ctx, x, fx, left, right, alpha, beta):
        flat = x.reshape(-1, x.shape[-1])
        low = flat @ left.t()  # (tokens, rank)
        skip = torch.addmm(flat, low, right.t())  # x + W_R W_L x
        out = skip * beta
        out.addcmul_(fx.reshape(flat.shape), alpha)
        ctx.save_for_backward(flat, fx, left, right, alpha, beta, low, skip)
        return out.view(x.shape)

    @staticmethod
    @once_differentiable
    @backward_in_stream_precision
    def backward(ctx, grad):
        flat, fx, left, right, alpha, beta, low, skip = ctx.saved_tensors
        grad = grad.reshape(flat.shape)
        grad_skip = grad * beta
        grad_low = grad_skip @ right  # (tokens, rank)
        grad_x = torch.addmm(grad_skip, grad_low, left)
        grad_alpha = torch.dot(grad.flatten(), fx.reshape(-1)).view(alpha.shape)
        grad_beta = torch.dot(grad.flatten(), skip.flatten()).view(beta.shape)
        return (grad_x.view(fx.shape), (grad * alpha).view(fx.shape), grad_low.t() @ flat, grad_skip.t() @ low,
                grad_alpha, grad_beta)
