"""Mixture-of-experts feed-forward layers: a top-k router, stacked SwiGLU experts, optional shared experts.

Two shapes, one module:
- DeepSeekMoE (Dai et al. 2024, arXiv 2401.06066): fine-grained routed experts plus always-on shared experts; in
  DeepSeek-V3 (arXiv 2412.19437, section 2.1.2) with sigmoid affinities, top-k chosen on `s + b` (a per-expert bias
  used only for the choice), gates the chosen `s` normalised to sum 1 and scaled by the routed scaling factor,
  optionally group-limited (the top `top_groups` of `groups` expert groups, each scored by its best two), and the
  **auxiliary-loss-free balancing** of Wang et al. 2024 (arXiv 2408.15664): after each optimizer step
  `b += rate * sign(mean_load - load)`, plus a small sequence-wise balance loss.
- MiniMind / Switch (Fedus et al. 2021, arXiv 2101.03961): softmax router, top-k, the auxiliary loss
  `E * sum_i f_i P_i` (f_i: share of the routed assignments that went to expert i, P_i: mean router probability),
  over the batch (Switch) or per sequence and averaged (MiniMind's `seq_aux`, DeepSeek-V3's sequence-wise loss).

Routing is sort-and-group: the (token, slot) assignments are sorted by expert and each expert runs one matmul on
its contiguous slice; no loop over tokens. Experts are stacked 3-D parameters (experts, out, in), HF's layout; an
expert that receives no token runs on an empty slice, so every expert weight is in the graph and gets a (zero)
gradient: DDP needs no `find_unused_parameters`.

The balance bias is a buffer (saved in checkpoints) changed only by `update_bias`, which the trainer calls through
`LanguageModel.update_balance()` after each optimizer step with the step's summed counts (over micro-batches and,
via `reduce`, over ranks). Why a hook and not an update inside the forward: a forward cannot tell the last
micro-batch of a step from the others, evaluation and probing forwards would move it, and ranks would drift apart;
the hook runs once per optimizer step with the global counts, as the paper prescribes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from reslab.errors import ReslabError
from reslab.nn.ffn import SwiGLU, swiglu

# router scoring by name: logits (tokens, experts) -> affinities. sqrtsoftplus: DeepSeek-V4's `scoring_func`
# (transformers 5.25 `SqrtSoftplusActivation`, sqrt(softplus(x)))
SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda logits: logits.softmax(dim=-1),
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda logits: F.softplus(logits).sqrt(),
}
SCORING = tuple(SCORES)


class Routing(NamedTuple):
    scores: torch.Tensor  # (tokens, experts) affinities: softmax probabilities or sigmoids, fp32
    experts: torch.Tensor  # (tokens, k) chosen expert ids
    gates: torch.Tensor  # (tokens, k) the weights of the chosen experts' outputs, fp32


class TopKRouter(nn.Module):
    """`s = score(x W_g^T)`; top-k of `s (+ bias)`, within the best `top_groups` groups; gates from `s`."""

    learned_choice = True  # the experts are chosen from the scores, so the balance loss can move the choice

    def __init__(self, width: int, experts: int, top_k: int, scoring: str = "softmax", normalize: bool = True,
                 scale: float = 1.0, groups: int = 1, top_groups: int = 1, balance_bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(width, experts, bias=False)
        self.experts, self.top_k, self.scoring, self.normalize, self.scale = experts, top_k, scoring, normalize, scale
        self.groups, self.top_groups = groups, top_groups
        self.register_buffer("bias", torch.zeros(experts) if balance_bias else None)

    def forward(self, x: torch.Tensor) -> Routing:
        scores = self.scores(x)
        choice = scores if self.bias is None else scores + self.bias
        if self.groups > 1:
            choice = self.limit_groups(choice)
        return self.route(scores, choice.topk(self.top_k, dim=-1).indices)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The affinities of tokens `x` (tokens, width) for each expert, in fp32 (as DeepSeek-V3 and HF route)."""
        return SCORES[self.scoring](F.linear(x.float(), self.gate.weight.float()))

    def route(self, scores: torch.Tensor, chosen: torch.Tensor) -> Routing:
        """The gates of the `chosen` experts: their scores, normalised to sum 1 if asked, times the scale."""
        gates = scores.gather(1, chosen)
        if self.normalize:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(scores, chosen, gates * self.scale)

    def extra_repr(self) -> str:
        groups = f", top {self.top_groups} of {self.groups} groups" if self.groups > 1 else ""
        bias = ", balance bias" if self.bias is not None else ""
        return (f"{self.scoring}, top-{self.top_k} of {self.experts}{groups}, normalised={self.normalize}, "
                f"scale={self.scale}{bias}")

    def limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (DeepSeek-V3): keep the `top_groups` groups whose two best scores sum highest."""
        grouped = choice.view(choice.shape[0], self.groups, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
        kept = group_scores.topk(self.top_groups, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        return grouped.masked_fill(~mask.unsqueeze(-1), float("-inf")).view_as(choice)


class HashRouter(TopKRouter):
    """DeepSeek-V4's hash routing (transformers 5.25 `DeepseekV4HashRouter`; the paper's hash-MoE bootstrap): a
    frozen table `tid2eid` (vocab, k) chooses each token's experts from its id alone; the learned scores still
    weigh the chosen experts' outputs (normalised to sum 1, times the scale, as `TopKRouter`).

    The model hands the token ids over before each forward (`tokens`, set by `bind_tokens`): a sublayer sees only
    the normalised stream. reslab fills the table with a fixed pseudo-random choice of k distinct experts per token
    (seeded, so every build and rank agrees); a converted V4 checkpoint brings its own table."""

    learned_choice = False

    def __init__(self, width: int, experts: int, top_k: int, vocab_size: int, scoring: str = "sqrtsoftplus",
                 normalize: bool = True, scale: float = 1.0):
        super().__init__(width, experts, top_k, scoring, normalize, scale)
        generator = torch.Generator().manual_seed(vocab_size * 1_000_003 + experts)
        table = torch.rand(vocab_size, experts, generator=generator).argsort(dim=-1)[:, :top_k]
        self.register_buffer("tid2eid", table)
        self.tokens: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> Routing:
        tokens = self.tokens
        if tokens is None or tokens.numel() != x.shape[0]:
            raise ReslabError("a hash router needs the token ids of its input; the model passes them with "
                             "bind_tokens(idx) before running its blocks")
        return self.route(self.scores(x), self.tid2eid[tokens.reshape(-1)].long())

    def extra_repr(self) -> str:
        return f"hash of the token id, {self.scoring}, top-{self.top_k} of {self.experts}, scale={self.scale}"


def bind_tokens(model: nn.Module, idx: torch.Tensor) -> None:
    """Give every hash router of `model` the token ids `idx` (batch, seq) of the forward about to run."""
    for module in model.modules():
        if isinstance(module, HashRouter):
            module.tokens = idx


class StackedExperts(nn.Module):
    """`experts` SwiGLU FFNs stored as (experts, 2 hidden, width) and (experts, width, hidden) stacks; `limit`:
    DeepSeek-V4's clamp of the pre-activations (`reslab.nn.ffn.swiglu`)."""

    stacked_matrices = ("gate_up", "down")  # reslab.contracts: each [e] is a matrix (decay, Muon, init)

    def __init__(self, experts: int, width: int, hidden: int, top_k: int, limit: float | None = None):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(experts, 2 * hidden, width))
        self.down = nn.Parameter(torch.empty(experts, width, hidden))
        self.top_k, self.limit = top_k, limit
        nn.init.normal_(self.gate_up, 0.0, 0.02)
        nn.init.normal_(self.down, 0.0, 0.02)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x (tokens, width) -> sum over each token's k experts of gate * expert(x)."""
        flat = routing.experts.flatten()
        order = flat.argsort(stable=True)  # assignments grouped by expert, tokens in order within each
        tokens = order // self.top_k
        counts = torch.bincount(flat, minlength=self.gate_up.shape[0]).tolist()
        outputs = []
        for e, xs in enumerate(x[tokens].split(counts)):
            outputs.append(F.linear(swiglu(F.linear(xs, self.gate_up[e]), self.limit), self.down[e]))
        weighted = torch.cat(outputs) * routing.gates.flatten()[order].unsqueeze(-1).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, weighted)

    def extra_repr(self) -> str:
        experts, hidden, width = self.down.shape[0], self.down.shape[2], self.down.shape[1]
        return f"{experts} SwiGLU experts, {width} -> {hidden} -> {width}, top-{self.top_k}"

    def active_weights(self) -> int:
        """Matmul weights one token uses (FLOP counting): k experts' matrices."""
        return self.top_k * (self.gate_up[0].numel() + self.down[0].numel())


class MoEStats(NamedTuple):
    balance_loss: torch.Tensor  # scalar, with gradient
    load: torch.Tensor  # (experts,) share of the routed assignments per expert, detached
    entropy: torch.Tensor  # scalar, mean router entropy over tokens (of the normalised scores), detached


class MoEFeedForward(nn.Module):
    """Shared experts (always on) plus routed experts: `y = shared(x) + sum_{i in topk} g_i expert_i(x)`.

    The sublayer of a residual site like any FFN; after each forward it holds its balance loss and diagnostics
    until the model collects them (`collect_moe`). `per_sequence` balance loss: f and P per sequence, averaged
    (DeepSeek-V3's sequence-wise loss, MiniMind's `seq_aux`); otherwise over the whole batch (Switch).
    """

    is_moe = True  # reslab.contracts.MoELayer: the trainer calls `update_bias` after each optimizer step
    not_for_muon = ("router",)  # reslab.contracts: the router's rows are per-expert scores, not a hidden matrix

    def __init__(self, width: int, hidden: int, experts: int, top_k: int, shared: int, router: TopKRouter,
                 per_sequence: bool = False, balance_rate: float = 0.0, dropout: float = 0.0,
                 limit: float | None = None):
        super().__init__()
        self.router = router
        self.experts = StackedExperts(experts, width, hidden, top_k, limit)
        # n shared experts = one n times wider
        self.shared = SwiGLU(width, shared * hidden, limit=limit) if shared else None
        self.dropout = nn.Dropout(dropout)
        self.per_sequence, self.balance_rate = per_sequence, balance_rate
        self.counts: torch.Tensor | None = None  # assignments per expert since the last update_bias (not a buffer)
        self.stats: MoEStats | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        flat = x.reshape(-1, width)
        routing = self.router(flat)
        y = self.experts(flat, routing).view_as(x)
        if self.shared is not None:
            y = y + self.shared(x)
        self.record(routing, batch)
        return self.dropout(y)

    def record(self, routing: Routing, batch: int) -> None:
        counts = torch.bincount(routing.experts.flatten(), minlength=self.router.experts).float()
        if self.training and torch.is_grad_enabled() and self.router.bias is not None:
            self.counts = counts if self.counts is None else self.counts + counts
        probs = routing.scores / routing.scores.sum(dim=-1, keepdim=True)
        entropy = -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1).mean()
        if self.router.learned_choice:
            loss = balance_loss(probs, routing.experts, batch if self.per_sequence else 1)
        else:  # a fixed choice (hash routing): nothing to balance, as DeepSeek-V4 leaves its hash layers out
            loss = probs.new_zeros(())
        self.stats = MoEStats(loss, counts / counts.sum(), entropy.detach())

    @torch.no_grad()
    def update_bias(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Auxiliary-loss-free balancing: `b += rate * sign(mean_load - load)` from this step's counts."""
        if self.router.bias is None or self.counts is None:
            return
        counts = reduce(self.counts) if reduce is not None else self.counts
        self.router.bias += self.balance_rate * torch.sign(counts.mean() - counts)
        self.counts = None

    @property
    def output_projection(self) -> nn.Module:
        """The shared expert's down-projection (the routed experts' `down` stack is in `branch_weights`)."""
        return self.shared.down if self.shared is not None else _Stack(self.experts.down)

    def branch_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Every expert matrix, one 2-D view per expert (the router is not part of the branch's function)."""
        routed = [("ffn", w[e]) for w in (self.experts.gate_up, self.experts.down) for e in range(w.shape[0])]
        return routed + (self.shared.branch_weights() if self.shared is not None else [])


class _Stack(NamedTuple):
    weight: torch.Tensor  # what scaled init reads of an output projection


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor, groups: int) -> torch.Tensor:
    """`E * sum_i f_i P_i`, averaged over `groups` equal runs of tokens (sequences; 1 = the whole batch).

    f_i: share of the group's (token, slot) assignments routed to expert i; P_i: mean normalised score of expert i.
    Uniform routing gives 1. Switch Transformer (arXiv 2101.03961) eq. 4; DeepSeek-V3 eqs. 17-20 (per sequence).
    """
    experts = probs.shape[-1]
    assigned = F.one_hot(chosen, experts).sum(dim=1).float().view(groups, -1, experts)  # (groups, tokens, experts)
    share = assigned.sum(dim=1) / assigned.sum(dim=(1, 2)).unsqueeze(-1)
    mean_prob = probs.view(groups, -1, experts).mean(dim=1)
    return experts * (share * mean_prob).sum(dim=-1).mean()


def collect_moe(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(aux losses, metrics) of the MoE layers' last forward, taken from them: the balance loss summed over layers
    (DeepSeek-V3, MiniMind), and per layer the expert load, router entropy and balance bias."""
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward) and m.stats is not None]
    if not layers:
        return {}, {}
    stats = [m.stats for m in layers]
    for m in layers:
        m.stats = None  # hold no graph between forwards
    metrics = {"moe_load": torch.stack([s.load for s in stats]),
               "router_entropy": torch.stack([s.entropy for s in stats])}
    biases = [m.router.bias for m in layers if m.router.bias is not None]
    if biases:
        metrics["balance_bias"] = torch.stack(biases).clone()
    return {"moe_balance": torch.stack([s.balance_loss for s in stats]).sum()}, metrics
