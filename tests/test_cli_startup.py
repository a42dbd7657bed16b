"""`reslab --help` and `reslab list` start without torch; every subcommand still gets its full help."""

import argparse
import subprocess
import sys
from importlib import import_module

import pytest

from reslab.cli import COMMANDS, build_parser
from reslab.registry import MODELS, REPRODUCTIONS, SCHEMES, described

HEAVY = ("torch", "numpy", "rich", "matplotlib", "transformers")


def imported_by(*args: str) -> set[str]:
    """Top-level packages `python -X importtime -m reslab ARGS` imports (importtime lists every module, stderr)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "reslab", *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines}


@pytest.mark.parametrize("args", [["--help"], ["list"], ["info", "--help"], ["bench", "--help"], ["report", "--help"],
                                  ["train", "--help"], ["ablate", "--help"], ["sample", "--help"],
                                  ["data", "prepare", "--help"]])
def test_help_and_list_import_no_torch(args):
    loaded = imported_by(*args)
    assert "reslab" in loaded  # the parse above saw the imports
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_every_subcommand_has_its_full_help(cli):
    for name in [*COMMANDS, "info", "reproduce"]:
        code, out, _ = cli(name, "--help")
        assert code == 0 and out.startswith(f"usage: reslab {name}"), out
        assert "options:" in out or "positional arguments:" in out
    code, out, _ = cli("train", "--help")
    assert "--steps" in out and "--residual" in out and "--resume" in out
    code, out, _ = cli("reproduce", "--help")
    assert all(name in out for name in REPRODUCTIONS)


def test_declared_help_lines_are_the_modules_own():
    """COMMANDS repeats each module's help line (so `reslab --help` need not import it): they must agree."""
    commands = argparse.ArgumentParser().add_subparsers()
    for module in dict.fromkeys(module for module, _ in COMMANDS.values()):
        import_module(module).register(commands)
    declared = {name: text for name, (_, text) in COMMANDS.items()}
    assert {action.dest: action.help for action in commands._choices_actions} == declared


def test_registries_name_what_the_packages_load():
    from reslab.models import get_model_class
    from reslab.reproduce import get_reproduction
    from reslab.residual import get_scheme

    for name in SCHEMES:  # `reslab list` reads each formula from the class's source: the same as the class's own
        scheme = get_scheme(name)
        assert described("residual scheme", name) == (scheme.formula, scheme.paper), name
    assert all(get_model_class(name) for name in MODELS)
    assert all(get_reproduction(name).CLAIM for name in REPRODUCTIONS)


def test_the_parser_is_complete_once_a_subcommand_is_parsed():
    args = build_parser().parse_args(["train", "--steps", "3", "--layers", "2"])
    assert (args.command, args.steps, args.layers) == ("train", 3, 2) and callable(args.handler)
    args = build_parser().parse_args(["reproduce", "depth", "--quick"])
    assert args.name == "depth" and args.quick
