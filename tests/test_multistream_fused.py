"""The fused multi-stream update (reslab.residual.stream_ops, mHC's projection and Sinkhorn) against a plain reference
of the formulas in docs/shared residuals.md, written here with einsum in the papers' layout (batch, seq, n, D):
forward and every gradient, static and dynamic HC and mHC, on a whole `gpt` and on a single site."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import reslab
from reslab.residual.mhc import SinkhornKnopp, sinkhorn, sinkhorn_log_space

SHAPE = {"layers": 2, "width": 16, "heads": 2, "context": 8, "vocab_size": 13}
CASES = [("hc", {}), ("hc", {"hc_dynamic": True}), ("mhc", {}), ("hc", {"streams": 3}), ("mhc", {"streams": 2})]


def hc_update(site, H, sublayer):
    """HC (arXiv 2409.19606): h = A_m^T H; H' = A_r^T H + B^T F(LN(h)); dynamic: + s tanh(norm(H) W) terms."""
    n = H.shape[-2]
    a_m, a_r, b = site.read, site.stream_mix.view(n, n).t(), site.write  # reslab stores A_r^T, flat
    a_m, a_r, b = a_m.expand(*H.shape[:-2], n), a_r.expand(*H.shape[:-2], n, n), b.expand(*H.shape[:-2], n)
    if site.dynamic:
        d = torch.tanh(site.dynamic_norm(H) @ site.dynamic_proj)  # per stream i: [A_m_i | row i of A_r | B_i]
        s_a, s_b = site.dynamic_scale
        a_m, a_r, b = a_m + s_a * d[..., 0], a_r + s_a * d[..., 1:n + 1], b + s_b * d[..., n + 1]
    h = torch.einsum("btn,btnd->btd", a_m, H)
    fx = sublayer(site.norm(h))
    return torch.einsum("btnm,btnd->btmd", a_r, H) + torch.einsum("btm,btd->btmd", b, fx)


def plain_sinkhorn(logits, iterations):
    m = logits.exp()
    for _ in range(iterations):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


def mhc_update(site, H, sublayer):
    """mHC (arXiv 2512.24880): x' = vec(x) / rms(vec(x)) (reslab adds eps to the rms), H~ = a (x' phi) + b,
    H_pre = sigmoid, H_post = 2 sigmoid, H_res = Sinkhorn(H~_res); x' = H_res x + H_post^T F(LN(H_pre x))."""
    *lead, n, width = H.shape
    flat = H.reshape(*lead, n * width)
    x = flat / (flat.pow(2).mean(-1, keepdim=True).sqrt() + site.rms_eps)
    phi_pre, phi_post, phi_res = site.dynamic_proj.split([n, n, n * n], dim=1)
    a_pre, a_post, a_res = site.gates
    h_pre = torch.sigmoid(a_pre * (x @ phi_pre) + site.read_bias)
    h_post = 2 * torch.sigmoid(a_post * (x @ phi_post) + site.write_bias)
    h_res = plain_sinkhorn(a_res * (x @ phi_res).view(*lead, n, n) + site.mix_bias.view(n, n),
                           site.options["sinkhorn_iters"])
    fx = sublayer(site.norm(torch.einsum("btn,btnd->btd", h_pre, H)))
    return torch.einsum("btij,btjd->btid", h_res, H) + torch.einsum("bti,btd->btid", h_post, fx)


def reference_logits(model, idx):
    """The gpt forward with every site replaced by the formulas above, streams summed before the final norm."""
    site = model.blocks[0].attn_residual
    update = mhc_update if site.name == "mhc" else hc_update
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1]))
    H = x.unsqueeze(-2).repeat(1, 1, site.num_streams, 1)
    for block in model.blocks:
        for s, sublayer in block.sites():
            H = update(s, H, sublayer)
    return model.head(model.norm(H.sum(-2)))


def moved_model(scheme, options, dtype):
    """A gpt of the scheme with every parameter moved off its init (so no coefficient is 0, 1 or the identity)."""
    torch.manual_seed(0)
    model = reslab.build_model("gpt", residual=scheme, residual_options=options, **SHAPE).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def logits_and_grads(model, forward, idx):
    model.zero_grad(set_to_none=True)
    logits = forward(model, idx)
    F.cross_entropy(logits.flatten(0, 1).float(), idx.flatten()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def tokens():
    return torch.randint(0, SHAPE["vocab_size"], (3, SHAPE["context"]), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scheme, options", CASES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_model_forward_and_gradients_match_the_formulas(scheme, options, dtype, tol):
    model = moved_model(scheme, options, dtype)
    got, got_grads = logits_and_grads(model, lambda m, i: m(i).logits, tokens())
    expected, expected_grads = logits_and_grads(model, reference_logits, tokens())
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=tol, rtol=tol, msg=name)
    assert any("_residual." in name and g.abs().sum() > 0 for name, g in got_grads.items())


class Seen(TorchFunctionMode):
    """A do-nothing TorchFunctionMode, as the audit's tracer is one: the sites then run their plain ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scheme, options", CASES[:3])
def test_the_plain_ops_the_audit_traces_compute_the_same(scheme, options):
    model = moved_model(scheme, options, torch.float32)
    fused, fused_grads = logits_and_grads(model, lambda m, i: m(i).logits, tokens())

    def traced(m, i):
        with Seen():
            return m(i).logits

    plain, plain_grads = logits_and_grads(model, traced, tokens())
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("scheme, options", CASES[:3])
@pytest.mark.parametrize("widened", [True, False])
def test_one_site_alone_matches_the_formulas(scheme, options, widened):
    """A site called on its own: on the widened (n, batch, seq, D) stream the model passes, or on a plain
    (batch, seq, D) stream (widened and reduced by its adapter); output and gradients of input and weights."""
    model = moved_model(scheme, options, torch.float64)
    site, sublayer = model.blocks[1].sites()[1]
    n = site.num_streams
    x = torch.randn(3, 5, SHAPE["width"], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    H = (x.unsqueeze(-2) + 0.3 * torch.randn(3, 5, n, SHAPE["width"], dtype=torch.float64)).requires_grad_()
    weights = torch.randn_like(x if not widened else H)
    results = []
    for run in ("site", "reference"):
        model.zero_grad(set_to_none=True)
        H.grad = None
        if widened:
            update = site(H.movedim(-2, 0), sublayer).movedim(0, -2) if run == "site" else None
            out = update if update is not None else mhc_or_hc(site)(site, H, sublayer)
        else:
            single = H[:, :, 0]
            out = site(single, sublayer) if run == "site" else mhc_or_hc(site)(
                site, single.unsqueeze(-2).expand(*single.shape[:-1], n, single.shape[-1]), sublayer).sum(-2)
        (out * weights).sum().backward()
        results.append((out.detach(), H.grad.clone(), [p.grad.clone() for p in site.parameters()],
                        [p.grad.clone() for p in sublayer.parameters()]))
    (out, grad_in, site_grads, sub_grads), (ref, ref_in, ref_site, ref_sub) = results
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    # mHC's gradient is taken at Sinkhorn's fixed point, the reference's through its 20 iterations: they agree to the
    # iterations' convergence (about 1e-9 here)
    tol = 1e-8 if site.name == "mhc" else 1e-10
    torch.testing.assert_close(grad_in, ref_in, atol=tol, rtol=tol)
    for got, expected in zip(site_grads + sub_grads, ref_site + ref_sub, strict=True):
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def mhc_or_hc(site):
    return mhc_update if site.name == "mhc" else hc_update


def test_exp_space_sinkhorn_equals_log_space_and_falls_back_for_wide_logits():
    torch.manual_seed(0)
    logits = (torch.eye(4).unsqueeze(-1) + 0.5 * torch.randn(4, 4, 50)).double()
    torch.testing.assert_close(sinkhorn(logits, 20), sinkhorn_log_space(logits, 20), atol=1e-12, rtol=0)
    wide = 200 * torch.randn(4, 4, 30)  # exp would underflow to 0: the log-space iterations take over
    matrices = sinkhorn(wide, 20)
    assert torch.isfinite(matrices).all()
    torch.testing.assert_close(matrices, sinkhorn_log_space(wide, 20))
    torch.testing.assert_close(SinkhornKnopp(20)(wide.permute(2, 0, 1)), matrices.permute(2, 0, 1))


@pytest.mark.parametrize("scheme, options", CASES[:2])
def test_torch_func_grad_runs_and_agrees_with_autograd(scheme, options):
    """`torch.func.grad` over `functional_call` (the functorch way: per-example gradients, meta-learning) takes the
    plain ops and gives autograd's gradients of the fused path."""
    from torch.func import functional_call, grad

    model = moved_model(scheme, options, torch.float64)
    idx = tokens()

    def loss(params, m, i):
        logits = functional_call(m, params, (i,)).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), i.flatten())

    params = {name: p.detach() for name, p in model.named_parameters()}
    got = grad(loss)(params, model, idx)
    _, expected = logits_and_grads(model, lambda m, i: m(i).logits, idx)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-10, rtol=1e-10, msg=name)


def made_by_a_fused_write(tensor: torch.Tensor) -> bool:
    """Whether the autograd graph's last nodes (past views) include a fused write Function."""
    node = tensor.grad_fn
    for _ in range(3):
        if node is None:
            return False
        if type(node).__name__ in ("StaticWriteBackward", "TokenWriteBackward"):
            return True
        node = node.next_functions[0][0] if node.next_functions else None
    return False


@pytest.mark.parametrize("scheme, options", CASES[:3])
def test_under_bf16_autocast_the_fused_update_keeps_an_fp32_stream(scheme, options):
    """`--dtype auto` trains in bf16 autocast on CPUs with AMX and on Ampere+ GPUs: the fused update runs there too,
    in the stream's fp32 (the site's output stays fp32), and the model agrees with its fp32 forward and gradients
    within bf16's precision."""
    model = moved_model(scheme, options, torch.float32)
    outputs = []
    model.blocks[0].attn_residual.register_forward_hook(lambda module, args, out: outputs.append(out))

    def autocast(m, i):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(i).logits

    got, got_grads = logits_and_grads(model, autocast, tokens())
    expected, expected_grads = logits_and_grads(model, lambda m, i: m(i).logits, tokens())
    assert outputs[0].dtype == torch.float32 and made_by_a_fused_write(outputs[0])
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)
    error = sum(((got_grads[k] - g) ** 2).sum() for k, g in expected_grads.items()).sqrt()
    assert error <= 0.02 * sum((g ** 2).sum() for g in expected_grads.values()).sqrt()  # measured: 0.6% (plain: 0.8%)


def test_the_streams_gradient_passes_from_site_to_site_without_a_copy(monkeypatch):
    """Static HC's backward writes the stream's gradient into rows 1..n of an (n+1)-row buffer, and the previous
    site fills row 0 with its dh instead of concatenating: every site but the last takes that path."""
    from reslab.residual import stream_ops

    taken = []
    original = stream_ops.with_spare_row
    monkeypatch.setattr(stream_ops, "with_spare_row", lambda rows: taken.append(original(rows)) or taken[-1])
    model = moved_model("hc", {}, torch.float32)
    F.cross_entropy(model(tokens()).logits.flatten(0, 1), tokens().flatten()).backward()
    assert [found is not None for found in taken] == [False] + [True] * (2 * SHAPE["layers"] - 1)


def test_a_gradient_buffer_reslab_did_not_make_is_never_written():
    """The stream reaches a site as rows 1..n of someone else's (n+1)-row tensor, whose row 0 holds another
    input's gradient: the site must concatenate, not fill that row (its gradients equal the plain ops')."""
    model = moved_model("hc", {}, torch.float32)
    (first, sub1), (second, sub2) = model.blocks[0].sites()
    n, width = first.num_streams, SHAPE["width"]
    H = torch.randn(n, 2, 5, width, generator=torch.Generator().manual_seed(3))
    results = []
    for mode in (contextlib.nullcontext(), Seen()):
        extra = torch.randn(1, 2 * 5 * width, generator=torch.Generator().manual_seed(4)).requires_grad_()
        with mode:
            joined = torch.cat([extra, first(H, sub1).reshape(n, -1)])  # (n + 1, tokens D)
            out = second(joined[1:].reshape(n, 2, 5, width), sub2)
            (out.square().sum() + 3.0 * joined[0].sum()).backward()
        results.append(extra.grad)
    assert torch.equal(results[0], torch.full_like(results[0], 3.0))
    torch.testing.assert_close(results[0], results[1])


def mlp_sites_chain(model, H):
    """The static-HC MLP sites of every block, chained on H (attention's CPU kernel has no double backward)."""
    for block in model.blocks:
        site, sublayer = block.sites()[1]
        H = site(H, sublayer)
    return H


def test_double_backward_through_static_hc_matches_the_plain_ops():
    """A gradient penalty (create_graph=True, then backward again) through the fused static sites."""
    model = moved_model("hc", {}, torch.float64)
    H = torch.randn(4, 2, 5, SHAPE["width"], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = [p for block in model.blocks for p in block.sites()[1][0].parameters()]
    results = []
    for context in (contextlib.nullcontext(), Seen()):  # the fused Functions, then the plain ops
        model.zero_grad(set_to_none=True)
        leaf = H.clone().requires_grad_()
        with context:
            grads = torch.autograd.grad(mlp_sites_chain(model, leaf).square().sum(), [leaf, *params],
                                        create_graph=True)
            sum(g.square().sum() for g in grads).backward()
        results.append([p.grad.clone() for p in params])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_batched_gradients_through_static_hc_match_one_at_a_time():
    """`autograd.grad(..., is_grads_batched=True)` (what `jacobian(vectorize=True)` uses) through the fused sites."""
    model = moved_model("hc", {}, torch.float64)
    H = torch.randn(4, 1, 3, SHAPE["width"], dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    H.requires_grad_()
    out = mlp_sites_chain(model, H)
    seeds = torch.randn(3, *out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    batched, = torch.autograd.grad(out, H, seeds, is_grads_batched=True, retain_graph=True)
    for seed, got in zip(seeds, batched):
        expected, = torch.autograd.grad(out, H, seed, retain_graph=True)
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
