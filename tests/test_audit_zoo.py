"""The audit against the residuals read by hand off transformers' modeling files, on ~50 architectures.

Each model is built from a tiny config (2 layers, width 32) with random weights on CPU, with the class a user
would load (its LM or classification head), and audited once. Its expected residuals are (owner, kind) pairs
written here from the modeling file of the installed transformers (the comment names the file, line and function
that performs each add); the audit must report exactly those, and no dead module. `MISSED` lists the residuals
the code has that the audit does not find yet, with the reason: the test checks them too, so a fix shows up.

Kinds by the definitions in docs/audit.md: `normalized` when only a norm reads the sum (post-LN), `scaled` for a
scalar or per-channel factor on a side, `gated` when the branch ends in a data-dependent product, `projection`
for an affine shortcut.
"""

from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from reslab.graph import audit

transformers = pytest.importorskip("transformers")

WIDTH = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=64, vocab_size=64, max_position_embeddings=64)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
VISION = dict(WIDTH, image_size=32, patch_size=8)
ENC_DEC = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, max_position_embeddings=64)
GPT2_LIKE = dict(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64)
MAMBA = dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4, expand=2)


@dataclass
class Arch:
    family: str
    head: str  # the transformers class built from the config
    config: dict
    expected: list[tuple[str, str]]  # (owner, kind) for every residual the modeling code has
    missed: list[tuple[str, str]] = field(default_factory=list)  # of those, the ones the audit does not find


def each(prefix: str, *sites: tuple[str, str], layers=(0, 1)) -> list[tuple[str, str]]:
    """(owner, kind) of `sites` in every layer `prefix.N`: ("", kind) is an add in the layer's own forward."""
    return [(f"{prefix}.{i}{'.' + owner if owner else ''}", kind) for i in layers for owner, kind in sites]


PRE_LN = (("", "identity"), ("", "identity"))  # residual + attn(norm(x)); residual + mlp(norm(h))
POST_LN = (("", "normalized"), ("", "normalized"))
ONE = (("", "identity"),)  # parallel blocks: x + attn(ln x) + mlp(ln x) is one residual of the stream

ZOO = {
    # --- decoder-only, sequential pre-LN blocks ---------------------------------------------------------------
    # modeling_gpt2.py:285 `attn_output + residual`, :310 `residual + feed_forward_hidden_states` (GPT2Block);
    # its MLP's gelu_new (`x + 0.044715 * x**3`) is no residual
    "gpt2": Arch("decoder", "AutoModelForCausalLM", GPT2_LIKE, each("transformer.h", *PRE_LN)),
    # modeling_gpt_neo.py:345, :351 (GPTNeoBlock.forward)
    "gpt_neo": Arch("decoder", "AutoModelForCausalLM",
                    dict(hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
                         vocab_size=64, max_position_embeddings=64), each("transformer.h", *PRE_LN)),
    # modeling_gpt_bigcode.py:303, :328 (GPTBigCodeBlock.forward; :323 is cross-attention, not built)
    "gpt_bigcode": Arch("decoder", "AutoModelForCausalLM", GPT2_LIKE, each("transformer.h", *PRE_LN)),
    # modeling_llama.py:308, :314 (LlamaDecoderLayer.forward)
    "llama": Arch("decoder", "AutoModelForCausalLM", WIDTH, each("model.layers", *PRE_LN)),
    # modeling_mistral.py:235, :241
    "mistral": Arch("decoder", "AutoModelForCausalLM", WIDTH, each("model.layers", *PRE_LN)),
    # modeling_qwen2.py:285, :291
    "qwen2": Arch("decoder", "AutoModelForCausalLM", WIDTH, each("model.layers", *PRE_LN)),
    # modeling_qwen3.py:310, :316
    "qwen3": Arch("decoder", "AutoModelForCausalLM", dict(WIDTH, head_dim=16), each("model.layers", *PRE_LN)),
    # modeling_gemma.py:319, :325
    "gemma": Arch("decoder", "AutoModelForCausalLM", dict(WIDTH, head_dim=16), each("model.layers", *PRE_LN)),
    # modeling_gemma2.py:321, :327: sandwich norms, the post-norm on the branch, the sum travels on
    "gemma2": Arch("decoder", "AutoModelForCausalLM", dict(WIDTH, head_dim=16), each("model.layers", *PRE_LN)),
    # modeling_gemma3.py:395, :401 (Gemma3DecoderLayer.forward)
    "gemma3_text": Arch("decoder", "AutoModelForCausalLM", dict(WIDTH, head_dim=16),
                        each("model.layers", *PRE_LN)),
    # modeling_phi3.py:312, :317 `residual + self.resid_attn_dropout(hidden_states)`
    "phi3": Arch("decoder", "AutoModelForCausalLM", dict(WIDTH, pad_token_id=0), each("model.layers", *PRE_LN)),
    # modeling_opt.py:229, :250 `(residual + hidden_states).view(hidden_states_shape)`
    "opt": Arch("decoder", "AutoModelForCausalLM",
                dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32,
                     vocab_size=64, max_position_embeddings=64), each("model.decoder.layers", *PRE_LN)),
    # modeling_olmo.py:306, :312
    "olmo": Arch("decoder", "AutoModelForCausalLM", WIDTH, each("model.layers", *PRE_LN)),
    # modeling_olmo2.py:310, :316: the norm is on the branch's output (post_attention_layernorm(attn(x)))
    "olmo2": Arch("decoder", "AutoModelForCausalLM", WIDTH, each("model.layers", *PRE_LN)),
    # modeling_starcoder2.py:238, :244
    "starcoder2": Arch("decoder", "AutoModelForCausalLM", WIDTH, each("model.layers", *PRE_LN)),
    # modeling_granite.py:275, :280 `residual + hidden_states * self.residual_multiplier`: a scalar on the branch
    "granite": Arch("decoder", "AutoModelForCausalLM", WIDTH,
                    each("model.layers", ("", "scaled"), ("", "scaled"))),
    # modeling_persimmon.py:336, :344
    "persimmon": Arch("decoder", "AutoModelForCausalLM", WIDTH, each("model.layers", *PRE_LN)),
    # modeling_biogpt.py:293, :303
    "biogpt": Arch("decoder", "AutoModelForCausalLM", WIDTH, each("biogpt.layers", *PRE_LN)),
    # modeling_nemotron.py:327, :333
    "nemotron": Arch("decoder", "AutoModelForCausalLM", WIDTH, each("model.layers", *PRE_LN)),
    # modeling_xglm.py:317, :341 (:332 is cross-attention, not built)
    "xglm": Arch("decoder", "AutoModelForCausalLM",
                 dict(d_model=32, num_layers=2, attention_heads=2, ffn_dim=64, vocab_size=64,
                      max_position_embeddings=64), each("model.layers", *PRE_LN)),
    # modeling_bloom.py:310 `dropout_add(output_tensor, residual, ...)` at the end of BloomAttention.forward, :340
    # at the end of BloomMLP.forward (BloomBlock hands them the residual)
    "bloom": Arch("decoder", "AutoModelForCausalLM", dict(hidden_size=32, n_layer=2, n_head=2, vocab_size=64),
                  each("transformer.h", ("self_attention", "identity"), ("mlp", "identity"))),
    # modeling_mpt.py:205 `self.resid_attn_dropout(attn_outputs) + residual` (MptBlock), :155 `output + residual`
    # at the end of MptMLP.forward
    "mpt": Arch("decoder", "AutoModelForCausalLM",
                dict(d_model=32, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=64, vocab_size=64),
                each("transformer.blocks", ("", "identity"), ("ffn", "identity"))),
    # modeling_gemma3n.py, Gemma3nTextDecoderLayer.forward and the AltUp it calls: :1028 `predictions +=
    # hidden_states` (AltUp.predict, a learned mix of the streams added to them), :934 `hidden_states +
    # normed_laurel_hidden_states` (Gemma3nTextLaurelBlock), :1299 `active_prediction + attn`, :1304 `attn_laurel +
    # attn_ffw_norm`, :1059 `corrected += predictions` (AltUp.correct: the innovation times data-dependent
    # coefficients, gated), :1318 `corrected_predictions[1:] += first_prediction` (into a slice of the streams).
    # `(attn_gated + laurel_output) / sqrt(2)` (:1300) sums two branches of the same stream: no residual.
    "gemma3n_text": Arch("decoder", "AutoModelForCausalLM",
                         dict(WIDTH, num_key_value_heads=1, head_dim=16, vocab_size_per_layer_input=64,
                              hidden_size_per_layer_input=8, num_kv_shared_layers=0, laurel_rank=4,
                              altup_num_inputs=2, layer_types=["sliding_attention", "full_attention"],
                              sliding_window=16, activation_sparsity_pattern=[0.0, 0.0]),
                         each("model.layers", ("", "identity"), ("laurel", "identity"), ("", "identity"),
                              ("", "identity"), ("", "gated"), ("", "identity"))),
    # --- parallel attention and MLP ---------------------------------------------------------------------------
    # modeling_gptj.py:239 `attn_output + feed_forward_hidden_states + residual` (GPTJBlock.forward)
    "gptj": Arch("parallel", "AutoModelForCausalLM", dict(GPT2_LIKE, rotary_dim=8), each("transformer.h", *ONE)),
    # modeling_codegen.py:238, as GPT-J
    "codegen": Arch("parallel", "AutoModelForCausalLM", dict(GPT2_LIKE, rotary_dim=8),
                    each("transformer.h", *ONE)),
    # modeling_gpt_neox.py:263 `mlp_output + attn_output + hidden_states` (use_parallel_residual, the default)
    "gpt_neox": Arch("parallel", "AutoModelForCausalLM", WIDTH, each("gpt_neox.layers", *ONE)),
    # modeling_phi.py:288 `attn_outputs + feed_forward_hidden_states + residual` (PhiDecoderLayer.forward)
    "phi": Arch("parallel", "AutoModelForCausalLM", WIDTH, each("model.layers", *ONE)),
    # modeling_cohere.py:338 `residual + hidden_states_attention + hidden_states_mlp`
    "cohere": Arch("parallel", "AutoModelForCausalLM", WIDTH, each("model.layers", *ONE)),
    # modeling_stablelm.py:364 `residual + self_attn_output + mlp_output` (use_parallel_residual=True)
    "stablelm": Arch("parallel", "AutoModelForCausalLM", dict(WIDTH, use_parallel_residual=True),
                     each("model.layers", *ONE)),
    # modeling_falcon.py:617-621 `mlp_output += attention_output`, then `dropout_add(mlp_output, residual, ...)`
    # (parallel_attn, the default)
    "falcon": Arch("parallel", "AutoModelForCausalLM",
                   dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=64),
                   each("transformer.h", *ONE)),
    # --- mixture of experts: routed experts + shared expert is the branch, not a residual of its own -----------
    # modeling_mixtral.py:362, :366
    "mixtral": Arch("moe", "AutoModelForCausalLM", dict(WIDTH, num_local_experts=4, num_experts_per_tok=2),
                    each("model.layers", *PRE_LN)),
    # modeling_qwen2_moe.py:391, :397; Qwen2MoeSparseMoeBlock adds a sigmoid-gated shared expert to the experts
    "qwen2_moe": Arch("moe", "AutoModelForCausalLM",
                      dict(WIDTH, **MOE, num_experts=4, shared_expert_intermediate_size=64),
                      each("model.layers", *PRE_LN)),
    # modeling_qwen3_moe.py:343, :349
    "qwen3_moe": Arch("moe", "AutoModelForCausalLM", dict(WIDTH, **MOE, head_dim=16, num_experts=4),
                      each("model.layers", *PRE_LN)),
    # modeling_olmoe.py:387, :393
    "olmoe": Arch("moe", "AutoModelForCausalLM", dict(WIDTH, num_experts=4, num_experts_per_tok=2),
                  each("model.layers", *PRE_LN)),
    # modeling_phimoe.py:554, :558
    "phimoe": Arch("moe", "AutoModelForCausalLM", dict(WIDTH, num_local_experts=4, num_experts_per_tok=2),
                   each("model.layers", *PRE_LN)),
    # modeling_granitemoe.py:359, :363, scaled by residual_multiplier as in Granite
    "granitemoe": Arch("moe", "AutoModelForCausalLM", dict(WIDTH, num_local_experts=4, num_experts_per_tok=2),
                       each("model.layers", ("", "scaled"), ("", "scaled"))),
    # modeling_deepseek_v3.py:524, :530; layer 1 is DeepseekV3MoE (routed experts + shared_experts)
    "deepseek_v3": Arch("moe", "AutoModelForCausalLM",
                        dict(WIDTH, **MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                             kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                             v_head_dim=16, n_group=1, topk_group=1), each("model.layers", *PRE_LN)),
    # modeling_qwen3_next.py:926, :935; layer 0 gated delta net, layer 1 attention; MoE with a shared expert
    "qwen3_next": Arch("hybrid", "AutoModelForCausalLM",
                       dict(WIDTH, **MOE, head_dim=16, num_experts=4, shared_expert_intermediate_size=32,
                            layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                            linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
                       each("model.layers", *PRE_LN)),
    # --- state-space and recurrent -----------------------------------------------------------------------------
    # modeling_mamba.py:530 `residual + hidden_states` (MambaBlock); :271 `scan_output + hidden_states *
    # D[None, :, None]` in mamba_selective_scan, called by MambaMixer.forward: the D skip, a per-channel scale
    "mamba": Arch("ssm", "AutoModelForCausalLM", MAMBA,
                  each("backbone.layers", ("mixer", "scaled"), ("", "identity"))),
    # modeling_falcon_mamba.py:569, :286 as Mamba
    "falcon_mamba": Arch("ssm", "AutoModelForCausalLM", MAMBA,
                         each("backbone.layers", ("mixer", "scaled"), ("", "identity"))),
    # modeling_mamba2.py:649 (Mamba2Block); :353 `output + D_residual` in the chunked scan, D_residual =
    # D[..., None] * pad(x) (:289). Missed: x reaches the output only through einsums with data (B, C, exp(A dt));
    # the learned parameters enter on the side (dt, A_log), so no op on the path from x uses a parameter.
    "mamba2": Arch("ssm", "AutoModelForCausalLM",
                   dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=8, num_heads=4, head_dim=16,
                        expand=2, n_groups=1),
                   each("backbone.layers", ("mixer", "scaled"), ("", "identity")),
                   missed=each("backbone.layers", ("mixer", "scaled"))),
    # modeling_rwkv.py:345 `hidden + attention`, :348 `hidden + feed_forward`; the feed-forward branch ends in
    # `receptance * value` (:322), receptance = sigmoid(...) of the data: gated
    "rwkv": Arch("ssm", "AutoModelForCausalLM",
                 dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, attention_hidden_size=32,
                      intermediate_size=64, context_length=64),
                 each("rwkv.blocks", ("", "identity"), ("", "gated"))),
    # modeling_reformer.py:1567 `prev_attn_output + attn_output` (Y1 = X1 + f(X2)), :1578 `hidden_states +
    # self.feed_forward(attn_output)` (Y2 = X2 + g(Y1)); X1, X2 = chunk(cat([h, h])) (:1791, :1679)
    "reformer": Arch("ssm", "AutoModelForCausalLM",
                     dict(hidden_size=32, num_attention_heads=2, attention_head_size=16, attn_layers=["local", "local"],
                          feed_forward_size=64, vocab_size=64, axial_pos_embds=False, max_position_embeddings=64,
                          local_attn_chunk_length=8, is_decoder=True),
                     each("reformer.encoder.layers", *PRE_LN)),
    # --- hybrids -------------------------------------------------------------------------------------------
    # modeling_jamba.py:797, :801 (JambaMambaDecoderLayer, layer 0), :763, :767 (JambaAttentionDecoderLayer, layer
    # 1, with the MoE); :432 the Mamba D skip in layer 0's mixer
    "jamba": Arch("hybrid", "AutoModelForCausalLM",
                  dict(WIDTH, num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                       expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_expand=2,
                       mamba_dt_rank=4, use_mamba_kernels=False),
                  [("model.layers.0.mamba", "scaled")] + each("model.layers", *PRE_LN)),
    # modeling_zamba2.py:1016 `residual + hidden_states` after the Mamba-2 mixer (Zamba2MambaDecoderLayer, layer 0
    # and the hybrid layer's mamba_decoder); :1004 `hidden_states + transformer_hidden_states` adds the shared
    # transformer's output (through `linear`) to the hybrid layer's input, read only by input_layernorm:
    # normalized. The shared transformer's LoRA adapters (`linear_q(x) + adapter(x)`) are no residuals. Missed: the
    # Mamba-2 D skips, as in mamba2.
    "zamba2": Arch("hybrid", "AutoModelForCausalLM",
                   dict(WIDTH, mamba_d_state=8, mamba_headdim=8, n_mamba_heads=8, layers_block_type=["mamba", "hybrid"],
                        num_mem_blocks=1, use_shared_attention_adapter=True, adapter_rank=8),
                   [("model.layers.0.mamba", "scaled"), ("model.layers.0", "identity"),
                    ("model.layers.1.mamba_decoder", "normalized"), ("model.layers.1.mamba_decoder.mamba", "scaled"),
                    ("model.layers.1.mamba_decoder", "identity")],
                   missed=[("model.layers.0.mamba", "scaled"), ("model.layers.1.mamba_decoder.mamba", "scaled")]),
    # --- encoders ------------------------------------------------------------------------------------------
    # modeling_bert.py:293 `LayerNorm(hidden_states + input_tensor)` (BertSelfOutput), :352 (BertOutput)
    "bert": Arch("encoder", "AutoModelForMaskedLM", WIDTH,
                 each("bert.encoder.layer", ("attention.output", "normalized"), ("output", "normalized"))),
    # modeling_roberta.py:338, :397
    "roberta": Arch("encoder", "AutoModelForMaskedLM", WIDTH,
                    each("roberta.encoder.layer", ("attention.output", "normalized"), ("output", "normalized"))),
    # modeling_electra.py:302, :364
    "electra": Arch("encoder", "AutoModelForMaskedLM", dict(WIDTH, embedding_size=32),
                    each("electra.encoder.layer", ("attention.output", "normalized"), ("output", "normalized"))),
    # modeling_distilbert.py:252 `sa_layer_norm(attention_output + hidden_states)`, :256 (TransformerBlock)
    "distilbert": Arch("encoder", "AutoModelForMaskedLM",
                       dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=64, max_position_embeddings=64),
                       each("distilbert.transformer.layer", *POST_LN)),
    # modeling_albert.py:198 `LayerNorm(hidden_states + attn_output)` (AlbertAttention), :231 (AlbertLayer); one
    # shared layer run num_hidden_layers (2) times; the MLM head's gelu_new is no residual
    "albert": Arch("encoder", "AutoModelForMaskedLM", dict(WIDTH, embedding_size=16),
                   each("albert.encoder.albert_layer_groups.0.albert_layers", ("attention", "normalized"),
                        ("", "normalized"), layers=(0, 0))),
    # --- encoder-decoder ---------------------------------------------------------------------------------------
    # modeling_t5.py:403 (T5LayerSelfAttention), :435 (T5LayerCrossAttention), :141 (T5LayerFF)
    "t5": Arch("encoder-decoder", "AutoModelForSeq2SeqLM",
               dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, vocab_size=64),
               [(f"encoder.block.{i}.layer.{j}", "identity") for i in (0, 1) for j in (0, 1)]
               + [(f"decoder.block.{i}.layer.{j}", "identity") for i in (0, 1) for j in (0, 1, 2)]),
    # modeling_bart.py:293, :301 (BartEncoderLayer), :364, :379, :388 (BartDecoderLayer), all post-LN
    "bart": Arch("encoder-decoder", "AutoModelForSeq2SeqLM", ENC_DEC,
                 each("model.encoder.layers", *POST_LN)
                 + each("model.decoder.layers", *POST_LN, ("", "normalized"))),
    # modeling_mbart.py:307, :315 (MBartEncoderLayer), :389, :404, :413 (MBartDecoderLayer), pre-LN
    "mbart": Arch("encoder-decoder", "AutoModelForSeq2SeqLM", ENC_DEC,
                  each("model.encoder.layers", *PRE_LN) + each("model.decoder.layers", *PRE_LN, ("", "identity"))),
    # --- vision --------------------------------------------------------------------------------------------
    # modeling_vit.py:277, :284 (ViTLayer.forward)
    "vit": Arch("vision", "AutoModelForImageClassification", VISION, each("vit.layers", *PRE_LN)),
    # modeling_deit.py:282, :289
    "deit": Arch("vision", "DeiTForImageClassification", VISION, each("deit.layers", *PRE_LN)),
    # modeling_convnext.py:150-153 `layer_scale_parameter * features`, `residual + self.drop_path(features)`
    "convnext": Arch("vision", "AutoModelForImageClassification",
                     dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32),
                     [(f"convnext.encoder.stages.{i}.layers.0", "scaled") for i in (0, 1)]),
    # modeling_resnet.py:133-134 `residual = self.shortcut(residual)`, `hidden_state += residual` (ResNetBasicLayer):
    # stage 0 keeps 16 channels (nn.Identity shortcut), stage 1 goes 16 -> 32 with stride 2 (ResNetShortCut: 1x1
    # conv + batch norm)
    "resnet": Arch("vision", "AutoModelForImageClassification",
                   dict(hidden_sizes=[16, 32], depths=[1, 1], embedding_size=16, layer_type="basic"),
                   [("resnet.encoder.stages.0.layers.0", "identity"),
                    ("resnet.encoder.stages.1.layers.0", "projection")]),
    # modeling_poolformer.py:142, :148 `hidden_states + self.drop_path(scaled_op)`, scaled_op =
    # layer_scale.unsqueeze(-1).unsqueeze(-1) * op: a per-channel scale on the channels-first axis
    "poolformer": Arch("vision", "AutoModelForImageClassification",
                       dict(hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2, patch_sizes=[7, 3],
                            strides=[4, 2], padding=[2, 1], num_attention_heads=[1, 1], mlp_ratio=2.0),
                       each("poolformer.encoder.block", ("0", "scaled"), ("0", "scaled"))),
}


def build(model_type: str, arch: Arch):
    config = transformers.AutoConfig.for_model(model_type, **arch.config)
    head = getattr(transformers, arch.head)
    torch.manual_seed(0)
    model = (head.from_config(config) if hasattr(head, "from_config") else head(config)).eval()
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return model, {"pixel_values": torch.randn(1, config.num_channels, 32, 32)}
    inputs = {"input_ids": torch.randint(0, 64, (1, 8))}
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(0, 64, (1, 8))
    return model, inputs


def test_the_zoo_spans_every_family():
    assert len(ZOO) >= 40
    assert {a.family for a in ZOO.values()} == {"decoder", "parallel", "moe", "ssm", "hybrid", "encoder",
                                               "encoder-decoder", "vision"}


@pytest.mark.parametrize("model_type", list(ZOO))
def test_audit_finds_the_residuals_of_the_modeling_code(model_type):
    arch = ZOO[model_type]
    transformers.logging.set_verbosity_error()
    model, inputs = build(model_type, arch)
    result = audit(model, inputs, model_type)
    found = Counter((r.owner, r.kind) for r in result.residuals)
    expected = Counter(arch.expected) - Counter(arch.missed)
    assert found == expected, (f"{model_type}: + {sorted((found - expected).elements())} "
                               f"- {sorted((expected - found).elements())}")
    assert result.dead == []
