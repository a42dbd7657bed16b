"""The flags are generated from the typed configs, and the command lines users already have keep working: every flag
reslab had before (tests/fixtures/cli_flags.json: name and kind, per command), every command line of the README,
and `--set KEY=VALUE` checked by the same declarations as the flags."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from test_flags_apply import refused_before_anything_is_written

from reslab.cli import build_parser
from reslab.registry import SCHEME_OPTIONS, SCHEMES

ROOT = Path(__file__).resolve().parents[1]


def subcommand(name: str):
    parser = build_parser()._subparsers._group_actions[0].choices[name]
    parser.format_help()  # fills a lazily declared subcommand
    return parser


def flags_of(name: str) -> dict[str, str]:
    """Each flag of subcommand `name`: "switch" or the type its value converts to."""
    return {flag: "switch" if action.nargs == 0 else getattr(action.type, "__name__", "str")
            for action in subcommand(name)._actions for flag in action.option_strings if flag not in ("-h", "--help")}


def readme_commands() -> list[list[str]]:
    """The arguments of every `reslab ...` command in the README's code blocks (after `reslab`, comments dropped)."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    found = []
    for line in "\n".join(blocks).splitlines():
        match = re.search(r"(?:^|[\s/])reslab\s+(.*)", line)
        if match:
            found.append(shlex.split(match.group(1), comments=True))
    return found


@pytest.mark.parametrize("command", sorted(json.loads((ROOT / "tests/fixtures/cli_flags.json").read_text())))
def test_every_flag_reslab_had_is_still_there_and_takes_the_same_value(command):
    before = json.loads((ROOT / "tests/fixtures/cli_flags.json").read_text())[command]
    now = flags_of(command)
    assert {flag: now.get(flag) for flag in before} == before


def test_the_readme_command_lines_parse():
    commands = readme_commands()
    assert len(commands) >= 30 and ["list"] in commands  # the README was read
    for args in commands:
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit as exit_:
            pytest.fail(f"reslab {shlex.join(args)} does not parse (exit {exit_.code})")
        assert callable(parsed.handler), args


def test_training_flags_come_from_the_train_config():
    from reslab.checks import declarations
    from reslab.train.config import TrainConfig

    flags = flags_of("train")
    declared = declarations(TrainConfig)
    assert flags["--min-lr"] == "float" and flags["--stop-at"] == "int" and flags["--no-diagnostics"] == "switch"
    assert all(field.flag in flags for field in declared.values() if field.flag)
    text = subcommand("train").format_help()
    assert "(default 2000)" in text and "(default 1337)" in text  # defaults read from the dataclass


def test_scheme_flags_are_the_builtin_schemes_options():
    """SCHEME_OPTIONS (torch-free, for --help) names exactly the built-in schemes' options, with their types."""
    from reslab.residual import get_scheme

    defaults = {option: value for name in SCHEMES for option, value in get_scheme(name).option_defaults.items()}
    assert set(SCHEME_OPTIONS) == set(defaults)
    for option, (kind, _) in SCHEME_OPTIONS.items():
        assert defaults[option] is None or isinstance(defaults[option], kind), option


def test_the_model_configs_are_the_models_own():
    from reslab.models import MODELS, get_model_class
    from reslab.models.configs import CONFIGS

    assert {name: get_model_class(name).config_class for name in MODELS} == CONFIGS


@pytest.mark.parametrize("args, phrase", [
    (["info", "--model", "gpt", "--set", "layers=abc"], "layers must be an integer, got 'abc'"),
    (["info", "--model", "gpt", "--set", "dropout=1.5"], "dropout must be a finite number >= 0 and < 1"),
    (["info", "--model", "gpt", "--set", "norm_eps=-1"], "norm_eps must be a finite number > 0"),
    (["info", "--model", "gpt", "--set", "depth=3"],
     "valid --set keys: activation, altup_coef_clip, altup_streams, attnres_block, backout_from, backout_init, bias,"),
    (["info", "--model", "gpt", "--residual", "hc", "--set", "streams=two"], "--streams must be an integer"),
    (["info", "--model", "gpt", "--set", "layers"], "--set takes KEY=VALUE"),
    (["train", "--set", "widht=64", "--steps", "1"], "TinyConfig has no field 'widht'"),
    (["ablate", "--set", "layers=2", "--steps", "1"], "--set layers: the grid's layers are --layers A,B"),
    (["lens", "gpt", "--set", "init_std=-1"], "init_std must be a finite number >= 0"),
])
def test_set_is_checked_by_the_declarations(cli, tmp_path, monkeypatch, args, phrase):
    refused_before_anything_is_written(cli, tmp_path, monkeypatch, args, phrase)


def test_set_reaches_the_model_and_its_scheme(cli):
    code, out, err = cli("info", "--model", "gpt", "--layers", "1", "--residual", "hc", "--set", "streams=2",
                         "--set", "width=64", "--set", "hc_dynamic=true")
    assert code == 0, err
    assert "Embedding(65, 64)" in out and "hc: h = A_m^T H" in out
    code, flag_out, err = cli("info", "--model", "gpt", "--layers", "1", "--residual", "hc", "--streams", "2",
                              "--width", "64", "--hc-dynamic")
    assert code == 0, err
    assert out == flag_out  # --set k=v and the flag build the same model
    code, static, err = cli("info", "--model", "gpt", "--layers", "1", "--residual", "hc", "--set", "streams=2",
                            "--set", "width=64")
    assert code == 0 and static != out, err  # hc_dynamic=true was applied


def test_a_set_value_nested_100000_deep_is_one_line(cli):
    code, _, err = cli("info", "--set", "layers=" + "[" * 100_000)
    assert code == 2 and "nests 100000 levels deep" in err and len(err.strip().splitlines()) == 1
