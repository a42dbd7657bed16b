"""A flag either changes what is built or is refused: every model x every model and scheme flag of `reslab info`.

The table is read from the parser (the flags of its "model" group, their types and help) and the registries (models,
schemes and the options each scheme declares), so a new flag, model or scheme is covered without editing this file.
"Changes what is built" is measured, not declared: the parameters (names, shapes, values), the training-mode forward
pass (logits and weighted auxiliary losses) under a fixed seed, and the context a run trains on.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch

import reslab.memory
import reslab.models
from reslab.cli import build_parser
from reslab.models import MODELS, get_model_class
from reslab.residual import SCHEMES, get_scheme

REFUSED = ("applies only with", "does not apply")
REFERENCES: dict[tuple[str, str | None], dict] = {}


def model_flags() -> list[argparse.Action]:
    """The flags of `reslab info`'s model group, except --model itself and --set (tested below)."""
    info = build_parser()._subparsers._group_actions[0].choices["info"]
    info.format_help()  # its flags are added on first use
    group = next(g for g in info._action_groups if g.title == "model")
    return [action for action in group._group_actions if action.dest not in ("model", "sets")]


def default(model: str, residual: str | None, dest: str):
    """The value the flag's field (or scheme option) has when the flag is not given."""
    config = get_model_class(model).config_class()
    if hasattr(config, dest):
        return getattr(config, dest)
    scheme = residual or getattr(config, "residual", None)
    return get_scheme(scheme).option_defaults.get(dest) if scheme else None


def candidates(action: argparse.Action, current) -> list[list[str]]:
    """Values to try for a flag, each different from `current`; the first the model accepts is compared."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # a switch: --x (store_true), or --x / --no-x
        switches = action.option_strings if len(action.option_strings) > 1 else [flag]
        return [[s] for s in switches if (not s.startswith("--no-")) != bool(current)]
    if flag == "--residual":
        return [[flag, name] for name in SCHEMES if name != current]
    if action.type in (None, str):  # a string flag names its values in its help
        words = dict.fromkeys(re.findall(r"[a-z][a-z0-9-]*", action.help))
        return [[flag, word] for word in words if word != current]
    base = current if isinstance(current, (int, float)) and not isinstance(current, bool) and current else 1
    numbers = [base * 2, base + 1, base / 2, 1, 2, 4, 0.1, 0.5, 0]
    values = dict.fromkeys(action.type(v) for v in numbers if action.type is float or v == int(v))
    return [[flag, str(v)] for v in values if v != current]


def cases() -> list:
    """(model, residual or None for the model's own, flag): every flag on every model's own scheme, and each
    scheme option again on each transformer with every scheme that declares it."""
    rows = []
    for action in model_flags():
        flag = action.option_strings[0]
        owners = [name for name in SCHEMES if action.dest in get_scheme(name).option_defaults]
        for model in MODELS:
            rows.append((model, None, flag))
            if "residual" in get_model_class(model).config_class.__dataclass_fields__:
                rows += [(model, scheme, flag) for scheme in owners]
    return rows


@pytest.fixture
def built(monkeypatch):
    """The models `build_model` returned during the test, last one last. (The memory check, which builds each model
    once more on the meta device, is skipped: these models are small.)"""
    monkeypatch.setattr(reslab.memory, "check_fits", lambda *args, **kwargs: None)
    models = []
    original = reslab.models.build_model

    def record(name, **overrides):
        models.append(original(name, **overrides))
        return models[-1]

    monkeypatch.setattr(reslab.models, "build_model", record)
    return models


def fingerprint(model) -> dict:
    """What a run would see of the model: parameters, a seeded training-mode forward, aux weights, context."""
    config = model.config
    torch.manual_seed(0)
    if hasattr(config, "vocab_size"):
        inputs = torch.randint(0, config.vocab_size, (2, min(8, config.context)))
    else:
        inputs = torch.randn(2, config.layer_sizes[0])
    model.train()
    with torch.no_grad():
        out = model(inputs)
    weights = dict(getattr(model, "aux_loss_weights", {}))
    logits = out.logits if hasattr(out, "logits") else out
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    trained = forward_moved(model, inputs)  # a flag that acts only once weights move (a tanh on zero-init gates)
    aux = sum((v * weights.get(k, 1.0) for k, v in getattr(out, "aux_losses", {}).items()), torch.zeros(()))
    return {"context": getattr(config, "context", None), "weights": weights, "parameters": parameters,
            "logits": logits, "aux": aux, "trained": trained}


@torch.no_grad()
def forward_moved(model, inputs) -> torch.Tensor:
    """The output after every parameter moved by the same seeded noise (the model is discarded afterwards)."""
    generator = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p))
    torch.manual_seed(0)
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def same(a: dict, b: dict) -> bool:
    if (a["context"], a["weights"]) != (b["context"], b["weights"]) or a["parameters"].keys() != b["parameters"].keys():
        return False
    tensors = [(a["logits"], b["logits"]), (a["aux"], b["aux"]), (a["trained"], b["trained"])]
    tensors += [(a["parameters"][n], b["parameters"][n]) for n in a["parameters"]]
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in tensors)


@pytest.mark.parametrize("model, residual, flag", cases(), ids=lambda v: str(v))
def test_a_flag_changes_the_model_or_is_refused(cli, built, model, residual, flag):
    action = next(a for a in model_flags() if a.option_strings[0] == flag)
    # a scheme's options are tried on 4 blocks: connections across depth need several to connect anything
    base = ["info", "--model", model, *(["--residual", residual, "--layers", "4"] if residual else [])]
    if (model, residual) not in REFERENCES:  # the model without the flag, built once per model and scheme
        torch.manual_seed(0)
        code, _, err = cli(*base)
        assert code == 0, err
        REFERENCES[model, residual] = fingerprint(built[-1])
    reference = REFERENCES[model, residual]
    tried = []
    for value in candidates(action, default(model, residual, action.dest)):
        torch.manual_seed(0)
        code, _, err = cli(*base, *value)
        tried.append((value, "changed nothing" if code == 0 else err.strip()))
        if code == 0 and not same(fingerprint(built[-1]), reference):
            return
        if code == 0:  # a value past where it matters (more Sinkhorn iterations than converge): try another
            continue
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        if any(phrase in lines[0] for phrase in REFUSED):
            assert value[0] in lines[0], lines[0]
            return
    pytest.fail(f"{flag} was neither refused nor changed the model; tried {tried}")


def test_the_table_covers_every_model_and_flag():
    flags = {a.option_strings[0] for a in model_flags()}
    assert {"--moe-top-k", "--streams", "--activation", "--qk-norm", "--residual"} <= flags
    rows = [getattr(row, "values", row) for row in cases()]
    assert {(model, flag) for model, residual, flag in rows if residual is None} == \
        {(model, flag) for model in MODELS for flag in flags}
    assert ("deepseek", "mhc", "--sinkhorn-iters") in rows


@pytest.mark.parametrize("args, phrase", [
    (["info", "--model", "llama", "--moe-top-k", "4"], "--moe-top-k applies only with --moe-experts"),
    (["info", "--model", "llama", "--moe-experts", "0", "--moe-aux-weight", "0.1"],
     "--moe-aux-weight applies only with --moe-experts"),
    (["info", "--model", "gpt", "--streams", "2"], "--streams applies only with --residual hc or mhc"),
    (["info", "--model", "llama", "--residual", "mhc", "--hc-dynamic"], "--hc-dynamic applies only with --residual hc"),
    (["info", "--model", "mlp", "--rezero-init", "1"], "--rezero-init does not apply to model 'mlp'"),
    (["train", "--muon-lr", "0.05", "--steps", "1"], "--muon-lr applies only with --optimizer muon"),
    (["train", "--model", "llama", "--moe-shared", "1", "--steps", "1"], "--moe-shared applies only with"),
    (["ablate", "--residual", "hc,pre", "--streams", "2", "--steps", "1"], "(--residual is 'pre' here)"),
    (["ablate", "--muon-lr", "0.05", "--steps", "1"], "--muon-lr applies only with --optimizer muon"),
    (["info", "--model", "llama", "--set", "moe_top_k=4"], "--moe-top-k applies only with --moe-experts"),
    (["info", "--model", "gpt", "--set", "streams=2"], "--streams applies only with --residual hc or mhc"),
    (["info", "--model", "deepseek", "--set", "qk_rope_head_dim=0", "--set", "rope_interleave=false"],
     "--set rope_interleave applies only with --set qk_rope_head_dim"),
    (["train", "--model", "llama", "--set", "moe_shared=1", "--steps", "1"], "--moe-shared applies only with"),
    (["ablate", "--residual", "hc,pre", "--set", "streams=2", "--steps", "1"], "(--residual is 'pre' here)"),
    (["lens", "gpt", "--set", "sinkhorn_iters=3"], "--sinkhorn-iters applies only with --residual mhc"),
])
def test_refused_in_one_line_before_anything_is_written(cli, tmp_path, monkeypatch, args, phrase):
    refused_before_anything_is_written(cli, tmp_path, monkeypatch, args, phrase)


def refused_before_anything_is_written(cli, tmp_path, monkeypatch, args, phrase) -> None:
    """`reslab ARGS` run in an empty tmp_path: exit 2, one line holding `phrase`, and nothing made there."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert phrase in err
    assert list(tmp_path.iterdir()) == []  # refused before a run or ablation directory is made
