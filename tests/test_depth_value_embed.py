"""Value embeddings (`value-embed`, reslab/residual/depth/value_embed.py): token-indexed tables mixed into attention's
values, `v = l0 v + l1 ve_b[token]`, banks shared in U-net order (bank min(i, L-1-i)) or at the ends (0 1 2 ... 0 1
2). Checked against the attention computed by hand from the model's own weights, on gpt, llama (GQA), deepseek (MLA)
and tiny, and through the CLI."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import reslab
from reslab.contracts import parameter_groups
from reslab.errors import ReslabError

VOCAB = 65
GPT = {"width": 32, "heads": 2, "layers": 4, "vocab_size": VOCAB, "context": 16}
KEY = "value_embed"  # the connection's key in a composed site's `connections`


def build(model: str = "gpt", residual: str = "value-embed", **config):
    torch.manual_seed(0)
    return reslab.build_model(model, **{**GPT, **config, "residual": residual})


def tokens(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def connection(model, layer: int):
    return model.blocks[layer].attn_residual.connections[KEY]


def spy(model) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> (values before the mix, after it), recorded around each attention's `value_mix` hook."""
    seen = {}
    for layer, block in enumerate(model.blocks):
        mix = block.attn.value_mix
        if mix is not None:
            def recorded(v, layer=layer, mix=mix):
                seen[layer] = (v, mix(v))
                return seen[layer][1]
            block.attn.value_mix = recorded
    return seen


def set_known(model, seed: int = 2) -> None:
    """Distinct lambdas per layer and random table rows, far from the init, so a wrong bank or lambda shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in range(len(model.blocks)):
            c = connection(model, layer)
            if c.lambdas is not None:
                c.lambdas.copy_(torch.tensor([0.6 + 0.1 * layer, -0.4 - 0.3 * layer]))
            if c.table is not None:
                c.table.copy_(torch.randn(c.table.shape, generator=g))


def heads(rows: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(batch, seq, kv_size) -> (batch, kv_heads, seq, head_dim), the attention's layout of values."""
    batch, seq, size = rows.shape
    return rows.view(batch, seq, kv_heads, size // kv_heads).transpose(1, 2)


def test_gpt_values_are_l0_v_plus_l1_ve_of_the_u_net_bank_by_hand():
    """Layers 0 and 3 share bank 0 (owned by layer 0), 1 and 2 share bank 1: the values after the mix, and each
    attention's output, computed by hand from its input, its weights, the lambdas and the table rows set here."""
    model = build()
    set_known(model)
    assert [connection(model, i).table is not None for i in range(4)] == [True, True, False, False]
    inputs, outputs = {}, {}

    def record(module, args, out):
        inputs[module], outputs[module] = args[0], out

    for block in model.blocks:
        block.attn.register_forward_hook(record)
    seen = spy(model)
    idx = tokens()
    with torch.no_grad():
        model(idx)
        for layer, block in enumerate(model.blocks):
            attn, (l0, l1) = block.attn, connection(model, layer).lambdas
            table = connection(model, min(layer, 3 - layer)).table
            q, k, v = (heads(t, 2) for t in attn.qkv(inputs[attn]).split(attn.split_sizes, dim=-1))
            before, after = seen[layer]
            assert torch.equal(before, v)
            expected = l0 * v + l1 * heads(table[idx], 2)
            assert (after - expected).abs().max() <= 1e-6
            y = F.scaled_dot_product_attention(q, k, expected, is_causal=True)
            y = attn.out(y.transpose(1, 2).reshape(*idx.shape, -1))
            assert (outputs[attn] - y).abs().max() <= 1e-5


def test_banks_are_shared_in_u_net_order_on_six_blocks():
    """Banks 0 1 2 2 1 0: each layer's value embedding, recovered from its values, is its bank owner's table rows."""
    model = build(layers=6)
    assert [connection(model, i).bank for i in range(6)] == [0, 1, 2, 2, 1, 0]
    assert [connection(model, i).table is not None for i in range(6)] == [True] * 3 + [False] * 3
    set_known(model)
    seen, idx = spy(model), tokens()
    with torch.no_grad():
        model(idx)
        for layer in range(6):
            l0, l1 = connection(model, layer).lambdas
            ve = (seen[layer][1] - l0 * seen[layer][0]) / l1
            owner = connection(model, min(layer, 5 - layer))
            assert (ve - heads(owner.table[idx], 2)).abs().max() <= 1e-5


def test_ends_layout_uses_banks_0_1_2_at_both_ends_and_leaves_the_middle_alone():
    """Record #17's 012 ... 012: on 8 blocks, layers 0-2 own banks 0-2, layers 5-7 read them in the same order."""
    model = build(layers=8, residual_options={"value_embed_layers": "ends"})
    assert [connection(model, i).bank for i in range(8)] == [0, 1, 2, None, None, 0, 1, 2]
    assert [b.attn.value_mix is None for b in model.blocks] == [False] * 3 + [True] * 2 + [False] * 3
    assert [connection(model, i).coefficients() == {} for i in range(8)] == [False] * 3 + [True] * 2 + [False] * 3
    set_known(model)
    seen, idx = spy(model), tokens()
    with torch.no_grad():
        model(idx)
    for layer in (5, 6, 7):
        c, owner = connection(model, layer), connection(model, layer - 5)
        expected = c.lambdas[0] * seen[layer][0] + c.lambdas[1] * heads(owner.table[idx], 2)
        assert (seen[layer][1] - expected).abs().max() <= 1e-5


def test_gradients_reach_every_table_and_lambda_and_a_shared_table_through_its_reader():
    model = build()
    with torch.no_grad():
        connection(model, 0).lambdas[1] = 0.0  # bank 0 now reaches the loss through layer 3 only
    idx = tokens()
    model(idx).logits.logsumexp(-1).mean().backward()
    for layer in range(4):
        assert connection(model, layer).lambdas.grad.abs().min() > 0
    for layer in (0, 1):
        grad = connection(model, layer).table.grad
        used = torch.zeros(VOCAB, dtype=torch.bool)
        used[idx.flatten()] = True
        assert grad[used].abs().sum(-1).min() > 0 and grad[~used].abs().max() == 0


def test_defaults_and_coefficients():
    """Lambdas start at (0.5, 0.5) (record #15), tables at 0.01 N(0, 1) (HEAD), and are reported per site."""
    model = build(layers=12, width=64, heads=4)
    tables = [connection(model, i).table for i in range(12) if connection(model, i).table is not None]
    assert len(tables) == 6 and all(t.shape == (VOCAB, 64) for t in tables)
    std = torch.cat([t.flatten() for t in tables]).std().item()
    assert 0.009 < std < 0.011
    assert [connection(model, i).coefficients() for i in range(12)] == [{"l0": 0.5, "l1": 0.5}] * 12
    assert all(model.blocks[i].ffn_residual.connections[KEY].coefficients() == {} for i in range(12))
    groups = parameter_groups(model)  # a table is decayed like nn.Embedding weights, never Muon's; lambdas: no decay
    assert {id(t) for t in tables} <= {id(p) for p in groups.decay} - {id(p) for p in groups.muon}
    assert id(connection(model, 0).lambdas) in {id(p) for p in groups.no_decay}


def test_llama_gqa_table_has_the_kv_size_and_trains():
    model = build("llama", heads=4, kv_heads=2)  # head_dim 8: kv size 16, half the width
    assert connection(model, 0).table.shape == (VOCAB, 16)
    seen, idx = spy(model), tokens()
    model(idx).logits.logsumexp(-1).mean().backward()
    assert seen[0][0].shape == (2, 2, 12, 8)
    assert connection(model, 0).table.grad.abs().sum() > 0 and connection(model, 3).lambdas.grad.abs().sum() > 0


def test_deepseek_mla_values_get_the_value_embedding():
    model = build("deepseek", layers=2, heads=2, v_head_dim=16, moe_experts=4)
    assert connection(model, 0).table.shape == (VOCAB, 2 * 16) and connection(model, 1).table is None
    set_known(model)
    seen, idx = spy(model), tokens()
    model(idx).logits.logsumexp(-1).mean().backward()
    c = connection(model, 1)  # reads bank 0
    expected = c.lambdas[0] * seen[1][0] + c.lambdas[1] * heads(connection(model, 0).table[idx], 2)
    assert (seen[1][1] - expected).abs().max() <= 1e-5
    assert connection(model, 0).table.grad.abs().sum() > 0


def test_one_block_has_one_bank_used_by_its_one_layer():
    """The U-net pairing of one block pairs it with itself: bank 0, owned and used by block 0, kept in no stream."""
    model = build("tiny", layers=1)
    c = connection(model, 0)
    assert c.bank == 0 and c.table is not None and not c.shared
    idx = tokens()
    with torch.no_grad():
        reference = model(idx).logits
        c.table.add_(1.0)
        assert not torch.equal(model(idx).logits, reference)


def test_a_site_called_alone_has_no_token_ids_and_leaves_the_values_unchanged():
    model = build()
    site, attn = model.blocks[0].attn_residual, model.blocks[0].attn
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        out = site(x, attn)
        attn.value_mix = None
        assert torch.equal(out, x + attn(site.norm(x)))


def test_no_activation_is_held_between_forwards_and_the_stream_carries_the_shared_rows():
    model = build()
    idx = tokens()
    keys = []
    model.blocks[3].attn_residual.register_forward_pre_hook(lambda m, args: keys.extend(args[0].saved))
    model(idx)
    assert "value_embed:bank0" in keys and "value_embed:bank1" in keys
    assert all(connection(model, i)._values is None for i in range(4))


def test_meta_build_and_autocast():
    with torch.device("meta"):
        model = reslab.build_model("llama", **GPT, residual="value-embed")
    assert connection(model, 0).table.device.type == "meta"
    assert model(torch.zeros(1, 8, dtype=torch.long, device="meta")).logits.shape == (1, 8, VOCAB)
    model = build("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens()).logits
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("residual, options, message", [
    ("value-embed", {"value_embed_layers": "middle"}, "value_embed_layers must be all or ends, got 'middle'"),
    ("value-embed", {"value_embed_layers": "ends"}, "--value-embed-layers ends does not apply to a model of 4 blocks"),
    ("value-residual+value-embed", {}, "'value-residual' carries its own stream"),
])
def test_refusals_are_one_line(residual, options, message):
    with pytest.raises(ReslabError, match=re.escape(message)) as error:
        build(residual=residual, residual_options=options)
    assert "\n" not in str(error.value)


TINY = ["--width", "32", "--heads", "2", "--context", "16", "--batch", "4", "--eval-batches", "1", "--no-progress",
        "--layers", "4", "--log-interval", "1"]


def test_cli_trains_two_steps_and_logs_the_lambdas(cli, corpus, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("train", "--model", "gpt", *TINY, "--steps", "2", "--residual", "pre+value-embed",
                       "--data", corpus, "--out", run)
    assert code == 0, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    lambdas = [m["depth_coefficients"]["value-embed"] for m in metrics if "depth_coefficients" in m]
    assert lambdas and len(lambdas[-1]["l0"]) == len(lambdas[-1]["l1"]) == 4


def test_cli_bad_layout_is_one_line_exit_2(cli, corpus, tmp_path):
    code, _, err = cli("train", "--model", "gpt", *TINY, "--steps", "2", "--residual", "pre+value-embed",
                       "--set", "value_embed_layers=middle", "--data", corpus, "--out", tmp_path / "run")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "value_embed_layers" in err
    assert "Traceback" not in err
