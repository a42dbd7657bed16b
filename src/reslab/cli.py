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
    "reslab.data.commands",
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
        print(f"reslab: error: {_one_line(error)}", file=sys.stderr)
        return 130 if type(error).__name__ == "Interrupted" else 2
    except OSError as error:  # the machine's, not reslab's: a full disk, a read-only or missing path, permissions
        print(f"reslab: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("reslab: error: out of memory; make the model or --batch smaller", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reslab: interrupted; the last checkpoint (if any) is kept", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def describe_os_error(error: OSError) -> str:
    """One line for an operating-system error, naming the file and the fix where there is an obvious one."""
    import errno

    where = f" ({error.filename})" if error.filename else ""
    fixes = {errno.ENOSPC: "free some disk space, then run the same command again (a run continues with --resume)",
             errno.EDQUOT: "free some disk space (quota), then run the same command again",
             errno.EFBIG: "the file size limit (ulimit -f) was reached; raise it, then run the same command again",
             errno.EROFS: "the file system is read-only; choose a writable path",
             errno.EACCES: "permission denied; choose a path you can write",
             errno.ENOENT: "no such file or directory; check the path",
             errno.ELOOP: "a symlink loop; check the path",
             errno.ENOTDIR: "a path component is a file, not a directory; check the path",
             errno.EEXIST: "a file is in the way of a directory to create; check the path",
             errno.EISDIR: "that is a directory; give a file path"}
    fix = fixes.get(error.errno, "check the path and the disk")
    return f"{error.strerror or error}{where}: {fix}"


if __name__ == "__main__":
    sys.exit(main())
