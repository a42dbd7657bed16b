from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from reslab.residual.base import SiteSpec, check_integer_option
from reslab.residual.multistream import MultiStreamSite
from reslab.residual.stream_ops import backward_in_stream_precision, fused_path, stream_precision

PROJ_INIT_STD = 0.02  # the dynamic projections phi start small and random, so the gates get a gradient at once


class SinkhornKnopp(nn.Module):
    """Projects logits onto the doubly-stochastic matrices: `M0 = exp(logits)`, then rows and columns are
    normalised in turn, `iterations` times. Entries end >= 0 and rows and columns sum to 1, so the spectral norm
    is at most 1 and products of such matrices stay doubly stochastic.

    Computed in log space (subtracting the log-sum-exp of each row, then of each column, after shifting by the
    maximum), so large logits cannot overflow `exp`. The last step normalises the columns, which therefore sum to
    1 exactly; the rows to within the remaining Sinkhorn error. The gradient is taken at the projection's fixed
    point (`ImplicitSinkhornGrad`) rather than back through the 2 x `iterations` normalisations.
    """

    def __init__(self, iterations: int = 20):
        super().__init__()
        self.iterations = iterations

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        n = logits.shape[-1]
        # matrices last, (n, n, tokens): each normalisation then reduces a short axis over long contiguous rows,
        # several times faster on CPU than reducing a trailing axis of length n for every token
        tokens_last = logits.reshape(-1, n, n).permute(1, 2, 0).contiguous()
        matrices = ImplicitSinkhornGrad.apply(tokens_last, self.iterations)
        return matrices.permute(2, 0, 1).reshape(logits.shape)

    def extra_repr(self) -> str:
        return f"iterations={self.iterations}"


EXP_SPACE_SPAN = 30.0  # logits of one matrix spread wider than this: normalise in log space (exp could underflow)


def sinkhorn(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """The Sinkhorn-Knopp iterations on (n, n, tokens) logits: in exp space (2 kernels per normalisation, in place)
    when every matrix's logits span at most EXP_SPACE_SPAN, where no entry can underflow; else in log space."""
    shifted = logits - logits.amax(dim=(0, 1), keepdim=True)  # each matrix's largest logit is 0
    if shifted.device.type == "meta" or torch.compiler.is_compiling() or shifted.amin() < -EXP_SPACE_SPAN:
        return sinkhorn_log_space(logits, iterations)
    matrix = shifted.exp()
    for _ in range(iterations):
        matrix.div_(matrix.sum(1, keepdim=True))  # rows sum to 1
        matrix.div_(matrix.sum(0, keepdim=True))  # columns sum to 1
    return matrix


def sinkhorn_log_space(logits: torch.Tensor, iterations: int) -> torch.Tensor:
    """The Sinkhorn-Knopp iterations on (n, n, tokens) logits: rows are axis 1, columns axis 0."""
    log_matrix = logits
    for _ in range(iterations):
        log_matrix = subtract_logsumexp(log_matrix, dim=1)  # rows sum to 1
        log_matrix = subtract_logsumexp(log_matrix, dim=0)  # columns sum to 1
    return log_matrix.exp()


def subtract_logsumexp(log_matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """`x - logsumexp(x, dim)` for finite x, in 6 kernels (torch.logsumexp also handles infinities, in more)."""
    shifted = log_matrix - log_matrix.amax(dim, keepdim=True)  # <= 0, so exp cannot overflow; the sum is >= 1
    return shifted - shifted.exp().sum(dim, keepdim=True).log()


class ImplicitSinkhornGrad(torch.autograd.Function):
    """Sinkhorn forward; backward by implicit differentiation at the doubly-stochastic fixed point
    (Eisenberger et al. 2022, arXiv 2205.06688): one small linear solve per token instead of autograd through
    every normalisation. The same gradient once the iterations have converged, at a fraction of the CPU time.

    The projection has the form P = diag(e^f) exp(Z) diag(e^g) with P 1 = 1 and P^T 1 = 1. For dL/dP = G,
        dL/dZ = P * (G - a 1^T - 1 b^T),   where   a + P b = r,  P^T a + b = c,
    r and c the row and column sums of P * G. Eliminating a: (I - P^T P) b = c - P^T r. The system is singular
    along b = 1 (and along any block of P that does not mix with the rest), where dL/dZ does not depend on b;
    a tiny ridge picks one solution.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iterations: int) -> torch.Tensor:
        matrices = sinkhorn(logits, iterations)
        ctx.save_for_backward(matrices)
        return matrices

    @staticmethod
    @backward_in_stream_precision
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (matrices,) = ctx.saved_tensors
        p = matrices.permute(2, 0, 1).double()  # (tokens, n, n), solved in float64
        weighted = p * grad.permute(2, 0, 1).double()
        r, c = weighted.sum(-1, keepdim=True), weighted.sum(-2).unsqueeze(-1)  # (tokens, n, 1)
        system = torch.eye(p.shape[-1], dtype=p.dtype, device=p.device) * (1 + 1e-9) - p.mT @ p
        b = torch.linalg.solve(system, c - p.mT @ r)
        a = r - p @ b
        grad_logits = weighted - p * (a + b.mT)
        return grad_logits.to(grad.dtype).permute(1, 2, 0), None


def normalized_projection(rows: torch.Tensor, proj: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`(x phi) / (rms(x) + eps)`, rms(x)) for rows x: RMSNorm(vec(x)) phi == (vec(x) phi) / rms(vec(x)),
    normalising after the matmul (as the paper's kernels do) saves a pass over the wide stream."""
    rms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True) / rows.shape[-1] ** 0.5
    return (rows @ proj) / (rms + eps), rms


class NormalizedProjection(torch.autograd.Function):
    """`(x phi) / (rms(x) + eps)` for (tokens, K) rows x: mHC's RMSNorm(vec(x)) phi without the normalised copy.
    Backward in one product and one fused multiply-add per row: `dx = (dout / r) phi^T + c x`, with r = rms + eps and
    `c = -<dout, out> / (r K rms)` (0 where rms = 0, as autograd's norm gradient), and `dphi = x^T (dout / r)`."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, proj: torch.Tensor, eps: float) -> torch.Tensor:
        out, rms = normalized_projection(rows, proj, eps)
        ctx.save_for_backward(rows, proj, rms, out)
        ctx.eps = eps
        return out

    @staticmethod
    @backward_in_stream_precision
    def backward(ctx, grad_out: torch.Tensor):
        rows, proj, rms, out = ctx.saved_tensors
        grad_rows, grad_proj = normalized_projection_backward(grad_out, rows, proj, rms, out, ctx.eps,
                                                              ctx.needs_input_grad[:2])
        return grad_rows, grad_proj, None


def normalized_projection_backward(grad_out: torch.Tensor, rows: torch.Tensor, proj: torch.Tensor, rms: torch.Tensor,
                                   out: torch.Tensor, eps: float, needed: tuple[bool, bool] = (True, True),
                                   into: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d rows, d proj) of `out = rows proj / (rms(rows) + eps)`, each only where `needed`; d rows is added into
    `into` in place when given (a Function that sums several gradients of the rows in one buffer, as frac's)."""
    denom = rms + eps
    grad_q = grad_out / denom
    grad_rows = None
    if needed[0]:
        grad_rms = -(grad_out * out).sum(-1, keepdim=True) / denom
        scale = torch.where(rms > 0, grad_rms / (rows.shape[-1] * rms), torch.zeros_like(rms))
        grad_rows = (torch.addcmul(grad_q @ proj.t(), scale, rows) if into is None
                     else into.addmm_(grad_q, proj.t()).addcmul_(scale, rows))
    return grad_rows, rows.t() @ grad_q if needed[1] else None


class ManifoldHyperConnections(MultiStreamSite):
    """mHC: hyper-connections whose stream mix is constrained to the doubly-stochastic matrices.

        x_(l+1) = H_res x_l + H_post^T F(LN(H_pre x_l))          x_l: n streams x C channels

    The connection weights are computed per token from the flattened, RMS-normalised streams x' = RMSNorm(vec(x_l)):
    `H~_pre = a_pre (x' phi_pre) + b_pre`, `H~_post = a_post (x' phi_post) + b_post`,
    `H~_res = a_res mat(x' phi_res) + b_res`, with gates a = 0.01 at init, and then projected:
    `H_pre = sigmoid(H~_pre)`, `H_post = 2 sigmoid(H~_post)`, `H_res = SinkhornKnopp(H~_res)` (20 iterations).
    Init of the static parts (not fixed by the paper; chosen here): HC's static init read as logits,
    b_pre = e_(k mod n), b_res = I, and b_post = 0 so that H_post = 1 = HC's B; phi ~ N(0, 0.02^2). At init the
    streams stay nearly equal copies of pre-LN's stream (any doubly-stochastic mix keeps equal streams equal; only
    the small gated terms tell them apart).
    DeepSeek-AI 2025, mHC: Manifold-Constrained Hyper-Connections (arXiv 2512.24880).

    Here `read` is H_pre, `stream_mix` is H_res and `write` is H_post.
    """

    name = "mhc"
    formula = "x = H_res x + H_post^T F(LN(H_pre x))"
    paper = "DeepSeek-AI 2025, mHC: Manifold-Constrained Hyper-Connections (arXiv 2512.24880)"
    option_defaults = {**MultiStreamSite.option_defaults, "sinkhorn_iters": 20}

    decayed_parameters = ("dynamic_proj",)  # reslab.contracts: a projection of the streams, decayed like one

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        n = self.num_streams
        self.rms_eps = 1e-6
        # phi_pre | phi_post | phi_res in one matrix: (n C) x (n + n + n^2)
        self.dynamic_proj = nn.Parameter(torch.randn(n * spec.width, 2 * n + n * n) * PROJ_INIT_STD)
        self.gates = nn.Parameter(torch.full((3,), 0.01))  # a_pre, a_post, a_res
        self.read_bias = nn.Parameter(torch.eye(n)[spec.depth_index % n].clone())  # b_pre
        self.write_bias = nn.Parameter(torch.zeros(n))  # b_post
        self.mix_bias = nn.Parameter(torch.eye(n).flatten())  # b_res, flat: a bias, not decayed by AdamW
        self.sinkhorn = SinkhornKnopp(self.options["sinkhorn_iters"])

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        check_integer_option(cls.name, options, "sinkhorn_iters", 1)
        return options

    def connection_weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.num_streams
        flat = streams.movedim(0, -2).flatten(-2)  # vec(x_l) per token: (batch, seq, n C), a view (tokens first)
        if fused_path(streams):
            with stream_precision(streams):
                projected = NormalizedProjection.apply(flat.reshape(-1, flat.shape[-1]), self.dynamic_proj,
                                                       self.rms_eps)
            projected = projected.view(*flat.shape[:-1], -1)
        else:  # plain ops, which autograd differentiates (the audit's tracer, compile, torch.func)
            projected, _ = normalized_projection(flat, self.dynamic_proj, self.rms_eps)
        read_term, write_term, mix_term = projected.split([n, n, n * n], dim=-1)
        read = torch.sigmoid(self.gates[0] * read_term + self.read_bias)  # H_pre
        write = 2 * torch.sigmoid(self.gates[1] * write_term + self.write_bias)  # H_post
        stream_mix = self.sinkhorn(self.gates[2] * mix_term.unflatten(-1, (n, n)) + self.mix_bias.view(n, n))  # H_res
        return read, stream_mix, write

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sinkhorn_iters={self.sinkhorn.iterations}"
