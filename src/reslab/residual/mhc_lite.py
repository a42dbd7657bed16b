"""mHC-lite (`--residual mhc-lite`): mHC's doubly-stochastic stream mix built exactly, with no Sinkhorn iterations.

mHC (`mhc.py`) projects a per-token matrix onto the doubly-stochastic matrices with Sinkhorn-Knopp, which only
converges in the limit. mHC-lite uses Birkhoff-von Neumann instead: every doubly-stochastic matrix is a convex
combination of permutation matrices, so the site predicts softmax weights over all n! permutations of the n streams
and sums them. The mix is then doubly stochastic to rounding, in one small matrix product per token.

Facts (Yang et al. 2026, arXiv 2601.05732; FFTYYY/mhc-lite `hyper_conn/mhc_lite.py` @ea19775, restated in
/work/shared/reference/residuals-2026.md section 6):
- `x~ = RMSNorm_(1+gamma)(vec(H))` over all n D channels of a token, gamma init 0, as `F.normalize(v) sqrt(nD)`
  (the norm floored at 1e-12, no epsilon added; lines 109-116, 246);
- `a = softmax(s_res (x~ W_res) + b_res)` over the permutations in `itertools.permutations` order, the identity
  first; `b_res` = 0 for the identity, -8 for the others (lines 261-264, 361-363);
- `H_pre = sigmoid(s_pre (x~ W_pre) + b_pre)`, `H_post = 2 sigmoid(s_post (x~ W_post) + b_post)`, both biases +1 on
  stream `layer_index mod n` and -1 elsewhere (lines 261-262, 288-289, 367-387);
- the W init 0 and the scales s init 0.01 (lines 273-281, 300-302).
The reference's nanoGPT passes no `layer_index`, so there each site picks its +1 stream at random (line 236); here
it is the sublayer's depth index mod n, the rule the module applies when it is given one (as `hc` and `mhc` do).
"""

from collections.abc import Mapping
from itertools import permutations
from math import factorial
from typing import Any, ClassVar

import torch
from torch import nn

from reslab.errors import ReslabError
from reslab.residual.base import SiteSpec, check_number_option
from reslab.residual.multistream import MultiStreamSite

MAX_STREAMS = 6  # H_res is weighted over n! permutations: 720 at n = 6, 5040 at n = 7
GATE_INIT = 0.01  # s_pre, s_post, s_res (reference lines 280-281, 302)
NORM_FLOOR = 1e-12  # F.normalize's floor on the L2 norm, the reference's only guard against a zero stream


def permutation_matrices(n: int) -> torch.Tensor:
    """The n! permutation matrices as (n!, n, n), identity first, in the reference's order (`itertools`), each
    transposed from the reference's `eye[perm]` to the matrix that multiplies the streams: `Q_r = eye[:, perm_r]`
    moves stream s to stream perm_r(s). The reference mixes with `sum_r a_r P_r` applied from the right
    (`'... f1 s f2 t, ... f1 s d'`, line 389), which is `(sum_r a_r P_r)^T H` = `(sum_r a_r Q_r) H`."""
    order = torch.tensor(list(permutations(range(n))), dtype=torch.long)
    return torch.eye(n)[:, order].permute(1, 0, 2).contiguous()


class MHCLite(MultiStreamSite):
    """mHC-lite: hyper-connections whose stream mix is a convex combination of the n! permutation matrices.

        x_(l+1) = H_res x_l + H_post^T F(LN(H_pre x_l)),     H_res = sum_r a_r Q_r,   a = softmax(.)

    From the token's flattened, RMS-normalised streams `x~` (with a learned gain 1 + gamma over its n C channels):
    `H_pre = sigmoid(s_pre x~ W_pre + b_pre)`, `H_post = 2 sigmoid(s_post x~ W_post + b_post)`,
    `a = softmax(s_res x~ W_res + b_res)`. H_res is doubly stochastic by construction (Birkhoff-von Neumann), so
    products of the mixes keep an Amax gain of 1 (the skips alone neither grow nor shrink the signal).
    Init (the reference's): W = 0, s = 0.01, gamma = 0; b_pre = b_post = +1 on stream k mod n (k the sublayer's
    depth index), -1 elsewhere, so H_pre = sigmoid(+-1) and H_post = 2 sigmoid(+-1); b_res = 0 for the identity and
    `mhc_lite_perm_logit` (-8) for every other permutation, so the identity has weight 1 / (1 + (n! - 1) e^-8),
    0.992 at n = 4. Yang et al. 2026 (arXiv 2601.05732).

    Here `read` is H_pre, `stream_mix` is H_res and `write` is H_post. One projection matrix holds
    [W_pre | W_post | W_res] (n C x (2n + n!)); `gates` are (s_pre, s_post, s_res).
    """

    name = "mhc-lite"
    formula = "x = (sum_r a_r P_r) x + H_post^T F(LN(H_pre x)),  a = softmax over the n! permutations P_r"
    paper = "Yang et al. 2026, mHC-lite: You Don't Need 20 Sinkhorn-Knopp Iterations (arXiv 2601.05732)"
    option_defaults: ClassVar[dict[str, Any]] = {**MultiStreamSite.option_defaults, "mhc_lite_perm_logit": -8.0}

    decayed_parameters = ("dynamic_proj",)  # reslab.contracts: a projection of the streams, decayed like one

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        n, count = self.num_streams, factorial(self.num_streams)
        signs = torch.full((n,), -1.0)
        signs[spec.depth_index % n] = 1.0
        self.norm_gain = nn.Parameter(torch.zeros(n * spec.width))  # gamma of RMSNorm_(1+gamma)(vec(H))
        self.dynamic_proj = nn.Parameter(torch.zeros(n * spec.width, 2 * n + count))  # [W_pre | W_post | W_res]
        self.gates = nn.Parameter(torch.full((3,), GATE_INIT))  # s_pre, s_post, s_res
        self.read_bias = nn.Parameter(signs.clone())  # b_pre
        self.write_bias = nn.Parameter(signs.clone())  # b_post
        perm_bias = torch.full((count,), float(self.options["mhc_lite_perm_logit"]))
        perm_bias[0] = 0.0  # the identity permutation
        self.perm_bias = nn.Parameter(perm_bias)  # b_res
        # constants, rebuilt at construction rather than saved: (n!, n n), so H_res = a @ permutations
        self.register_buffer("permutations", permutation_matrices(n).flatten(1), persistent=False)

    @classmethod
    def resolve_options(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        options = super().resolve_options(given)
        if options["streams"] > MAX_STREAMS:
            raise ReslabError(f"residual scheme {cls.name!r}: streams must be at most {MAX_STREAMS} (H_res weighs "
                              f"all n! permutations, {factorial(options['streams'])} at n = {options['streams']}), "
                              f"got {options['streams']}; lower --streams")
        check_number_option(cls.name, options, "mhc_lite_perm_logit", -50.0, 0.0,
                            " (the initial logit of each non-identity permutation; the identity's is 0)")
        return options

    def connection_weights(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.num_streams
        flat = streams.movedim(0, -2).flatten(-2)  # vec(x_l) per token: (batch, seq, n C), stream-major
        # RMSNorm_(1+gamma)(v) W == (v W') sqrt(nC) / |v| with W' = diag(1 + gamma) W: normalising after the
        # product (a few columns) saves a normalised copy of the n C-wide stream
        scale = flat.shape[-1] ** 0.5 / torch.linalg.vector_norm(flat, dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
        projected = (flat @ ((1 + self.norm_gain).unsqueeze(-1) * self.dynamic_proj)) * scale
        read_term, write_term, perm_term = projected.split([n, n, self.permutations.shape[0]], dim=-1)
        read = torch.sigmoid(self.gates[0] * read_term + self.read_bias)  # H_pre
        write = 2 * torch.sigmoid(self.gates[1] * write_term + self.write_bias)  # H_post
        weights = torch.softmax(self.gates[2] * perm_term + self.perm_bias, dim=-1)  # a, one per permutation
        stream_mix = (weights @ self.permutations.to(weights.dtype)).unflatten(-1, (n, n))  # H_res
        return read, stream_mix, write

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, permutations={self.permutations.shape[0]}"
