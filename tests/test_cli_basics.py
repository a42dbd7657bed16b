"""The CLI as a user meets it: subprocesses, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest

from reslab.reproduce.deep_mlp import BOOK_FIRST_LAYER


def reslab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reslab", *args], capture_output=True, text=True, timeout=120)


def test_reproduce_deep_mlp_gradients_json():
    result = reslab("reproduce", "deep-mlp-gradients", "--json")
    assert result.returncode == 0, result.stderr
    table = json.loads(result.stdout)
    assert set(table) == {"with_shortcut", "without_shortcut"}
    for key, values in table.items():
        assert list(values) == [f"layers.{i}.0.weight" for i in range(5)]
        assert all(isinstance(v, float) and v > 0 for v in values.values())
        assert values["layers.0.0.weight"] == pytest.approx(BOOK_FIRST_LAYER[key], rel=1e-6)


def test_reproduce_deep_mlp_gradients_table():
    result = reslab("reproduce", "deep-mlp-gradients")
    assert result.returncode == 0, result.stderr
    assert "layers.4.0.weight" in result.stdout and "AGREES" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--model", "nope"], "unknown model 'nope'"),
        (["info", "--model", "gpt", "--residual", "nope"], "unknown residual scheme 'nope'; choose one of:"),
        (["info", "--model", "gpt", "--width", "100", "--heads", "3"], "width 100 is not divisible by heads 3"),
        (["info", "--model", "llama", "--kv-heads", "3"], "heads 4 is not divisible by kv_heads 3"),
        (["info", "--model", "gpt", "--layers", "0"], "layers must be positive"),
        (["info", "--model", "gpt", "--width", "-4"], "width must be positive"),
        (["info", "--model", "gpt", "--kv-heads", "2"], "--kv-heads does not apply to model 'gpt'"),
        (["info", "--model", "llama", "--activation", "gelu"], "--activation does not apply to model 'llama'"),
        (["info", "--layers", "two"], "invalid int value: 'two'"),
        (["reproduce", "nothing"], "invalid choice: 'nothing'"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, args, message):
    code, _, err = cli(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0]


def test_bad_input_from_a_real_process_has_no_traceback():
    result = reslab("info", "--model", "llama", "--kv-heads", "3")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "reslab: error: heads 4 is not divisible by kv_heads 3; choose kv_heads among 1, 2, 4"
    )


@pytest.mark.parametrize("model", ["tiny", "gpt", "llama"])
def test_residual_flag_accepts_every_scheme(cli, model):
    from reslab.residual import SCHEMES

    for name in SCHEMES:
        code, out, err = cli("info", "--model", model, "--residual", name, "--layers", "2")  # 2: connections need 2
        assert code == 0, err
        assert f"{name}:" in out and "parameters:" in out
