"""The `reslab` command line. Each subcommand is a small function; user errors end as one line with exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reslab.errors import ReslabError

# Modules that add subcommands: each has `register(commands)`, which adds its parsers with `set_defaults(handler=...)`.
# A new subcommand is one module plus one line here.
COMMAND_MODULES: list[str] = [
    "reslab.train.commands",
    "reslab.ablate.commands",
    "reslab.bench",
    "reslab.report.commands",
    "reslab.graph.commands",
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the problem and `--help`), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> ArgumentParser:
    from reslab import __version__

    parser = ArgumentParser(prog="reslab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"reslab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    info = commands.add_parser("info", help="build a model and print its structure and parameter count")
    from reslab.cli_args import add_model_arguments

    add_model_arguments(info)
    info.set_defaults(handler=cmd_info)

    listing = commands.add_parser("list", help="list models, residual schemes and reproductions")
    listing.set_defaults(handler=cmd_list)

    reproduce = commands.add_parser("reproduce", help="re-run an experiment behind a published claim")
    reproductions = reproduce.add_subparsers(dest="name", required=True, parser_class=ArgumentParser)
    from reslab.reproduce import REPRODUCTIONS, get_reproduction

    for name in REPRODUCTIONS:
        module = get_reproduction(name)
        sub = reproductions.add_parser(name, help=module.CLAIM)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)

    from importlib import import_module

    for name in COMMAND_MODULES:
        import_module(name).register(commands)
    return parser


def cmd_info(args: argparse.Namespace) -> int:
    from reslab.cli_args import model_from_args

    model = model_from_args(args)
    print(model)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from reslab.models import MODELS
    from reslab.reproduce import REPRODUCTIONS
    from reslab.residual import SCHEMES, get_scheme

    print("models:       " + ", ".join(MODELS))
    print("schemes:")
    name_width = max(len(name) for name in SCHEMES)
    formula_width = max(48, *(len(get_scheme(name).formula) for name in SCHEMES))
    for name in SCHEMES:
        scheme = get_scheme(name)
        print(f"  {name:<{name_width}} {scheme.formula:<{formula_width}} {scheme.paper}")
    print("reproduce:    " + ", ".join(REPRODUCTIONS))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = ["reslab", *argv]  # the command as given, recorded in run and ablation directories
    try:
        return int(args.handler(args) or 0)
    except ReslabError as error:
        print(f"reslab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reslab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
