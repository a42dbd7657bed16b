"""Every wrapper in `reslab._torch_compat` runs on the pinned torch and agrees with its public spelling: a torch
upgrade that moves a private name fails here, in one place, instead of deep inside a training step."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from reslab import _torch_compat as compat


def pairs():
    torch.manual_seed(0)
    return [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]


def check_foreach_norm():
    tensors, _ = pairs()
    for got, tensor in zip(compat.foreach_norm(tensors), tensors, strict=True):
        torch.testing.assert_close(got, tensor.norm())


def check_foreach_mul_():
    tensors, _ = pairs()
    want = [t * 0.5 for t in tensors]
    compat.foreach_mul_(tensors, torch.tensor(0.5))
    torch.testing.assert_close(tensors, want)


def check_foreach_add_():
    tensors, others = pairs()
    want = [t - 2.0 * o for t, o in zip(tensors, others, strict=True)]
    compat.foreach_add_(tensors, others, alpha=-2.0)
    torch.testing.assert_close(tensors, want)


def check_foreach_lerp_():
    starts, ends = pairs()
    want = [torch.lerp(s, e, 0.25) for s, e in zip(starts, ends, strict=True)]
    compat.foreach_lerp_(starts, ends, 0.25)
    torch.testing.assert_close(starts, want)


def check_foreach_lerp():
    starts, ends = pairs()
    want = [torch.lerp(s, e, 0.75) for s, e in zip(starts, ends, strict=True)]
    torch.testing.assert_close(compat.foreach_lerp(starts, ends, 0.75), want)


def check_torch_function_mode_enabled():
    assert compat.torch_function_mode_enabled() is False
    with TorchFunctionMode():
        assert compat.torch_function_mode_enabled() is True


def check_functorch_transforms_active():
    assert compat.functorch_transforms_active() is False
    seen = []

    def f(x):
        seen.append(compat.functorch_transforms_active())
        return x.sum()

    torch.func.grad(f)(torch.ones(2))
    assert seen == [True]


def check_is_batched_gradient():
    assert compat.is_batched_gradient(torch.ones(2)) is False
    seen = []
    x = torch.ones(3, requires_grad=True)
    y = x * 2

    y.register_hook(lambda grad: seen.append(compat.is_batched_gradient(grad)))
    torch.autograd.grad(y, x, torch.eye(3), is_grads_batched=True)
    assert seen == [True]


def check_view_base():
    whole = torch.zeros(4, 3)
    assert compat.view_base(whole) is None and compat.view_base(whole[1:]) is whole


def check_mkldnn_bf16_supported():
    assert isinstance(compat.mkldnn_bf16_supported(), bool)
    torch.ops.mkldnn._is_mkldnn_bf16_supported()  # present: the wrapper's False is the CPU's answer, not a rename


def check_bf16_supported():
    """The CPU's answer is oneDNN's; a device with no bf16 path (meta) is refused rather than guessed."""
    assert compat.bf16_supported(torch.device("cpu")) is compat.mkldnn_bf16_supported()
    assert compat.bf16_supported(torch.device("meta")) is False


def check_cpu_bf16_flags():
    assert compat.cpu_bf16_flags() <= {"amx_bf16", "avx512_bf16"}
    for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):  # present, as above
        assert callable(getattr(torch.cpu, check))


def check_load_inductor():
    compat.load_inductor()  # on the pinned torch (CPU wheels included) inductor imports


def check_initialisers_skipped():
    """Inside, a model builds on the meta device without its initialisers (and without importing torch._dynamo,
    checked in a fresh process); after, torch.nn.init is as it was and initialises again."""
    import subprocess
    import sys

    before = torch.nn.init.normal_
    with compat.initialisers_skipped(), torch.device("meta"):
        layer = torch.nn.Embedding(10, 4)
        assert torch.nn.init.normal_ is not before
    assert layer.weight.is_meta and torch.nn.init.normal_ is before
    assert torch.nn.Embedding(10, 4).weight.std() > 0
    code = ("import sys, torch; from reslab._torch_compat import initialisers_skipped\n"
            "with initialisers_skipped(), torch.device('meta'): torch.nn.Embedding(10, 4)\n"
            "print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


CHECKS = {name.removeprefix("check_"): check for name, check in globals().items() if name.startswith("check_")}


def test_every_wrapper_has_a_check():
    assert set(CHECKS) == set(compat.__all__)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_the_wrapper_runs_on_the_pinned_torch(name):
    CHECKS[name]()
