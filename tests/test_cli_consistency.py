"""One CLI: every subcommand's --help ends with an example and shows its defaults, and `--out`, `--tokens` and
`--device` mean one thing wherever they appear (a flag that meant something else was renamed; its old name still
parses, hidden)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from reslab.cli import build_parser, main


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser, filled: `reslab NAME`, `reslab data ACTION`, `reslab reproduce NAME`."""
    found = {}
    for name, parser in build_parser()._subparsers._group_actions[0].choices.items():
        parser.format_help()
        found[name] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child, sub in action.choices.items():
                    sub.format_help()
                    found[f"{name} {child}"] = sub
    return found


PARSERS = subcommands()
# what each shared flag means: every subcommand that has it says so in its help, with the same metavar
MEANINGS = {"--out": ("a directory to write", "DIR"), "--device": ("cpu", "DEVICE"),
            "--tokens": ("tokens to generate", "TOKENS")}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_subcommand_help_has_an_example(name):
    text = PARSERS[name].format_help()
    assert f"example: reslab {name.split()[0]}" in text, f"reslab {name} --help has no example line"


def visible(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    action = parser._option_string_actions.get(flag)
    return None if action is None or action.help == argparse.SUPPRESS else action


@pytest.mark.parametrize("flag", sorted(MEANINGS))
def test_shared_flags_have_one_meaning(flag):
    phrase, metavar = MEANINGS[flag]
    having = {name: visible(parser, flag) for name, parser in PARSERS.items()}
    having = {name: action for name, action in having.items() if action is not None}
    assert having, flag
    for name, action in having.items():
        if name.startswith("reproduce ") and flag == "--out":  # every reproduction writes a directory
            assert action.type is Path, name
            continue
        text = " ".join(action.help.split())
        meaning = "directory" if flag == "--out" else phrase
        assert meaning in text and (action.metavar or action.dest.upper()) == metavar, (name, flag, text)
        if action.default is not None:
            assert "default" in action.help, (name, flag)


def test_renamed_flags_keep_their_old_names(tmp_path):
    report = PARSERS["report"].parse_args([str(tmp_path), "--out", "x.html"])
    assert report.out == Path("x.html") == PARSERS["report"].parse_args([str(tmp_path), "-o", "x.html"]).out
    assert PARSERS["lens"].parse_args(["gpt", "--tokens", "7"]).tokens == 7
    assert PARSERS["lens"].parse_args(["gpt", "--eval-tokens", "7"]).tokens == 7


def test_help_shows_defaults_where_the_help_does_not_say_them():
    from reslab.cli import ArgumentParser

    parser = ArgumentParser(prog="x")
    parser.add_argument("--n", type=int, default=3, help="how many")
    parser.add_argument("--m", type=int, default=3, help="how many (default: three)")
    parser.add_argument("--k", type=int, help="how many")
    parser.add_argument("--flag", action="store_true", help="a switch")
    text = " ".join(parser.format_help().split())
    assert "how many (default 3)" in text and "(default: three)" in text and text.count("default") == 2


def test_info_lists_the_models_default_shape(capsys):
    assert main(["info", "--model", "gpt"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("config"))
    config = dict(line.split(None, 1) for line in lines[start + 1:])
    assert {"layers", "width", "heads", "context", "vocab_size"} <= set(config) and config["layers"] == "4"
    assert main(["info", "gpt", "--layers", "2"]) == 0  # TARGET still names the model; flags change the shape
    assert "  layers            2" in capsys.readouterr().out
