"""The typed configs of the built-in models, free of torch (as Hugging Face keeps `configuration_*.py` apart from
`modeling_*.py`): each field's type, default, admissible range, help and command-line flag are declared here once
(`reslab.checks.option`), and `reslab --help`, the generated model flags and `--set` read them without building
anything. Each model file (`gpt.py`, ...) names its config as `config_class`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from reslab.checks import BETA, NON_NEGATIVE, POSITIVE, OnlyWith, check_declared, check_positive, option
from reslab.errors import ReslabError, unknown


@dataclass
class ModelConfig:
    """Base for every model config: validation and (de)serialisation to plain JSON-able dicts.

    Every field is checked against its type annotation (so `--set layers=abc` or `layers=64.0` is one error line)
    and its declared range (`option(range=...)`, inherited by the classes that redeclare its default).
    """

    # fields that matter only when another is set (`moe_top_k` needs `moe_experts`): a flag given for one of them
    # alone is refused, not ignored (reslab.cli_args)
    ONLY_WITH: ClassVar[dict[str, OnlyWith]] = {}

    def validate(self) -> None:
        pass

    @classmethod
    def declared(cls, name: str) -> dict[str, Any]:
        """A class-level declaration (`ONLY_WITH`) merged over the class hierarchy, subclasses last."""
        merged: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get(name, {}))
        return merged

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - names)
        if bad:
            raise ReslabError(f"{cls.__name__} has no field {bad[0]!r}; its fields: {', '.join(sorted(names))}")
        config = cls(**check_declared(values, cls, spelled=str))
        check_declared(config.to_dict(), cls, spelled=str)  # the defaults too
        config.validate()
        return config


@dataclass
class TransformerConfig(ModelConfig):
    """Fields every transformer in reslab understands. Shapes come from here, never from constants in code."""

    vocab_size: int = 65
    context: int = option(64, help="context length in tokens", flag=True)
    width: int = option(64, help="model (residual stream) width", flag=True)
    layers: int = option(1, help="number of transformer blocks", flag=True)
    heads: int = option(2, help="attention heads", flag=True)
    dropout: float = option(0.0, help="dropout probability", range=BETA, flag=True)
    residual: str = option("pre", help="residual scheme (see `reslab list`); default: the model's own", flag=True)
    residual_options: dict[str, Any] = field(default_factory=dict)  # the scheme's options (`--set NAME=VALUE`)
    init_std: float = option(0.02, range=NON_NEGATIVE)

    def validate(self) -> None:
        from reslab.residual import get_scheme

        check_positive(vocab_size=self.vocab_size, context=self.context, width=self.width, layers=self.layers,
                       heads=self.heads)
        if self.width % self.heads:
            raise ReslabError(f"width {self.width} is not divisible by heads {self.heads}; "
                              f"choose heads among {divisors(self.width)}")
        get_scheme(self.residual).resolve_options(self.residual_options)


def divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


@dataclass
class TinyConfig(TransformerConfig):
    residual: str = "post"
    ffn_mult: int = 2
    bias: bool = option(True, help="biases in linear layers and norms", flag=True)


@dataclass
class GPTConfig(TransformerConfig):
    width: int = 128
    layers: int = 4
    heads: int = 4
    residual: str = "pre"
    bias: bool = False
    tie_embeddings: bool = option(True, help="share the token embedding with the LM head", flag=True)
    scaled_init: bool = True
    norm_eps: float = option(1e-5, range=POSITIVE)
    activation: str = option("gelu-tanh", flag=True, help="MLP activation: gelu-tanh (GPT-2, default), gelu "
                             "(nanoGPT), relu, relu2 (modded-nanogpt)")

    def validate(self) -> None:
        from reslab.nn import ACTIVATIONS

        super().validate()
        if self.activation not in ACTIVATIONS:
            raise unknown("activation", self.activation, ACTIVATIONS)


@dataclass
class LlamaConfig(TransformerConfig):
    width: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = option(2, help="key/value heads for grouped-query attention", flag=True)
    head_dim: int | None = option(None, help="per-head dimension (default width/heads)", flag=True)
    # None: 8/3 * width rounded up to a multiple of 64 (MiniMind, Llama)
    ffn_hidden: int | None = option(None, help="SwiGLU hidden size", flag=True)
    rope_theta: float = option(10000.0, help="RoPE base", range=POSITIVE, flag=True)
    qk_norm: bool = option(False, help="per-head RMSNorm of queries and keys, as in Qwen3", flag=True)
    tie_embeddings: bool = False
    norm_eps: float = option(1e-6, range=POSITIVE)
    residual: str = "pre"
    moe_experts: int = option(0, help="routed experts per MoE layer (llama: 0 = dense FFN)", flag=True)
    moe_top_k: int = option(2, help="experts each token is routed to", flag=True)
    moe_shared: int = option(0, help="always-on shared experts", flag=True)
    # MiniMind's aux_loss_alpha
    moe_aux_weight: float = option(0.01, help="weight of the MoE load-balancing loss", range=NON_NEGATIVE, flag=True)
    moe_norm_top_k: bool = True  # renormalise the chosen probabilities to sum 1 (MiniMind, Mixtral)

    ONLY_WITH: ClassVar[dict[str, OnlyWith]] = {name: OnlyWith("moe_experts") for name in
                                                ("moe_top_k", "moe_shared", "moe_aux_weight", "moe_norm_top_k")}

    def validate(self) -> None:
        super().validate()
        check_positive(kv_heads=self.kv_heads, head_dim=self.head_dim, ffn_hidden=self.ffn_hidden,
                       rope_theta=self.rope_theta, moe_top_k=self.moe_top_k)
        if self.moe_experts < 0 or self.moe_shared < 0:
            raise ReslabError("moe_experts and moe_shared must be >= 0")
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise ReslabError(f"moe_top_k {self.moe_top_k} exceeds the {self.moe_experts} experts; "
                              "choose moe_top_k <= moe_experts")
        if self.heads % self.kv_heads:
            choices = ", ".join(str(d) for d in range(1, self.heads + 1) if self.heads % d == 0)
            raise ReslabError(f"heads {self.heads} is not divisible by kv_heads {self.kv_heads}; "
                              f"choose kv_heads among {choices}")
        if (self.head_dim or self.width // self.heads) % 2:
            raise ReslabError(f"RoPE needs an even head dimension, got {self.head_dim or self.width // self.heads}; "
                              "change width, heads or head_dim")

    @property
    def hidden(self) -> int:
        return self.ffn_hidden or 64 * ((8 * self.width // 3 + 63) // 64)


@dataclass
class DeepSeekConfig(TransformerConfig):
    width: int = 128
    layers: int = 4
    heads: int = 4
    q_lora_rank: int | None = 64  # None: queries straight from the stream (DeepSeek-V2-Lite)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16  # 0: no RoPE at all
    v_head_dim: int = 32
    rope_theta: float = option(10000.0, range=POSITIVE)
    rope_interleave: bool = True  # DeepSeek's pair layout (2i, 2i+1); False: Llama's half-split
    ffn_hidden: int = 256  # the dense SwiGLU of the first `first_k_dense` blocks
    first_k_dense: int = 1
    moe_experts: int = 8  # routed experts
    moe_top_k: int = 2
    moe_shared: int = 1  # shared experts (always on)
    moe_hidden: int = 64  # hidden size of each expert
    moe_aux_weight: float = option(0.0001, range=NON_NEGATIVE)  # the sequence-wise balance loss (V3's alpha)
    router_scoring: str = "sigmoid"
    norm_top_k: bool = True  # normalise the chosen gates to sum 1
    routed_scale: float = option(1.0, range=POSITIVE)  # routed scaling factor (2.5 in V3)
    expert_groups: int = 1  # group-limited routing: groups of experts ...
    top_groups: int = 1  # ... of which each token may use this many
    # the bias update speed gamma of auxiliary-loss-free balancing (0: off)
    balance_rate: float = option(0.001, range=NON_NEGATIVE)
    tie_embeddings: bool = False
    norm_eps: float = option(1e-6, range=POSITIVE)

    ONLY_WITH: ClassVar[dict[str, OnlyWith]] = {"ffn_hidden": OnlyWith("first_k_dense"),  # the dense blocks' FFN
                                                "rope_theta": OnlyWith("qk_rope_head_dim"),
                                                "rope_interleave": OnlyWith("qk_rope_head_dim")}

    def validate(self) -> None:
        from reslab.nn.moe import SCORING

        super().validate()
        check_positive(q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank, v_head_dim=self.v_head_dim,
                       qk_nope_head_dim=self.qk_nope_head_dim, ffn_hidden=self.ffn_hidden, moe_experts=self.moe_experts,
                       moe_top_k=self.moe_top_k, moe_hidden=self.moe_hidden, expert_groups=self.expert_groups,
                       top_groups=self.top_groups)
        if self.router_scoring not in SCORING:
            raise unknown("router scoring", self.router_scoring, SCORING)
        if self.qk_rope_head_dim < 0 or self.qk_rope_head_dim % 2:
            raise ReslabError(f"qk_rope_head_dim must be even and >= 0, got {self.qk_rope_head_dim}")
        if self.first_k_dense < 0 or self.moe_shared < 0:
            raise ReslabError("first_k_dense and moe_shared must be >= 0")
        check_routing(self.moe_experts, self.moe_top_k, self.expert_groups, self.top_groups)


@dataclass
class DeepSeekV4Config(TransformerConfig):
    """DeepSeek-V4 at lab size (`reslab.models.deepseek_v4`); each field's V4 name in transformers' DeepseekV4Config
    is in its comment. V4-Flash itself: width 4096, 43 layers, 64 heads of 512, q_lora_rank 1024, rope 64, 8 output
    groups of rank 1024, window 128, 256 experts top-6 of 2048, 3 hash layers, 4 streams."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    head_dim: int = option(32, help="per-head dimension of queries and the shared key-value head", flag=True)
    q_lora_rank: int = 64
    rope_dim: int = 8  # the rotated tail of each head (qk_rope_head_dim = head_dim * partial_rotary_factor)
    rope_theta: float = option(10000.0, range=POSITIVE)  # rope_parameters["main"]["rope_theta"]
    out_groups: int = 2  # o_groups: heads are projected out in this many groups ...
    out_rank: int = 32  # ... each to o_lora_rank
    window: int = option(128, help="sliding-window attention: the keys each query sees, itself included", flag=True)
    moe_experts: int = option(8, help="routed experts per MoE layer", flag=True)  # n_routed_experts
    moe_top_k: int = option(2, help="experts each token is routed to", flag=True)  # num_experts_per_tok
    moe_hidden: int = 64  # moe_intermediate_size: each routed expert's and the shared expert's hidden size
    hash_layers: int = option(1, help="the first N MoE layers route by a hash of the token id", flag=True)
    router_scoring: str = "sqrtsoftplus"  # scoring_func
    routed_scale: float = option(1.5, range=POSITIVE)  # routed_scaling_factor
    swiglu_limit: float = option(10.0, range=POSITIVE)  # the experts' pre-activation clamp
    moe_aux_weight: float = option(0.0001, range=NON_NEGATIVE)  # the sequence-wise balance loss
    balance_rate: float = option(0.001, range=NON_NEGATIVE)  # auxiliary-loss-free balancing (e_score_correction_bias)
    tie_embeddings: bool = False
    norm_eps: float = option(1e-6, range=POSITIVE)
    residual: str = "mhc-v4"

    def validate(self) -> None:
        from reslab.nn.moe import SCORING

        super().validate()
        check_positive(head_dim=self.head_dim, q_lora_rank=self.q_lora_rank, out_groups=self.out_groups,
                       out_rank=self.out_rank, window=self.window, moe_experts=self.moe_experts,
                       moe_top_k=self.moe_top_k, moe_hidden=self.moe_hidden)
        if self.router_scoring not in SCORING:
            raise unknown("router scoring", self.router_scoring, SCORING)
        if self.rope_dim < 0 or self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ReslabError(f"rope_dim must be even and within 0..head_dim {self.head_dim}, got {self.rope_dim}")
        if (self.heads * self.head_dim) % self.out_groups:  # V4 groups the heads' channels, not whole heads
            raise ReslabError(f"the {self.heads * self.head_dim} attention channels (heads x head_dim) cannot form "
                              f"{self.out_groups} output groups; choose out_groups among "
                              f"{divisors(self.heads * self.head_dim)}")
        if not 0 <= self.hash_layers <= self.layers:
            raise ReslabError(f"hash_layers {self.hash_layers} is outside 0..layers {self.layers}; choose hash_layers "
                              f"<= {self.layers}")
        check_routing(self.moe_experts, self.moe_top_k)


def check_routing(experts: int, top_k: int, groups: int = 1, top_groups: int = 1) -> None:
    """One line for a top-k or grouping that cannot route."""
    if top_k > experts:
        raise ReslabError(f"moe_top_k {top_k} exceeds the {experts} experts; choose moe_top_k <= moe_experts")
    if experts % groups or top_groups > groups:
        raise ReslabError(f"{experts} experts cannot form {groups} equal groups with {top_groups} used; "
                          "choose expert_groups dividing moe_experts and top_groups <= expert_groups")
    if top_k > top_groups * experts // groups:
        raise ReslabError(f"moe_top_k {top_k} exceeds the experts of {top_groups} groups; raise top_groups")


@dataclass
class MLPConfig(ModelConfig):
    layer_sizes: list[int] = field(default_factory=lambda: [3, 3, 3, 3, 3, 1])
    shortcut: bool = True

    def validate(self) -> None:
        if len(self.layer_sizes) < 2:
            raise ReslabError(f"layer_sizes needs at least an input and an output size, got {self.layer_sizes}")
        check_positive(**{f"layer_sizes[{i}]": size for i, size in enumerate(self.layer_sizes)})


# model name -> its config, for the built-in models (a test keeps them equal to each model's `config_class`)
CONFIGS: dict[str, type[ModelConfig]] = {"mlp": MLPConfig, "tiny": TinyConfig, "gpt": GPTConfig,
                                         "llama": LlamaConfig, "deepseek": DeepSeekConfig,
                                         "deepseek-v4": DeepSeekV4Config}
