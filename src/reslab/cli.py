"""The `reslab` command line. Each subcommand is a small function; user errors end as one line with exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from reslab.errors import Interrupted, ReslabError

# Subcommands defined in other modules: name -> (module, the help line of `reslab --help`). The module's
# `register(commands)` adds a subcommand's arguments and handler when that subcommand is used, so `reslab --help` and
# `reslab list` import none of them (nor torch). A new subcommand is one module plus one line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("reslab.train.commands", "train a model; writes a run directory"),
    "sample": ("reslab.train.commands", "generate text from a trained run"),
    "ablate": ("reslab.ablate.commands", "train a grid of residual schemes x depths x seeds and compare them"),
    "bench": ("reslab.bench", "measure training speed (ms/iter, tokens/s, GFLOP/s vs peak)"),
    "report": ("reslab.report.commands", "draw the plots and write report.html for an ablation directory"),
    "audit": ("reslab.graph.commands", "where a model's residual connections really are, from its traced computation"),
    "diagram": ("reslab.graph.commands", "draw a model from its traced computation (.svg, .mmd, .dot)"),
    "lens": ("reslab.lens.commands", "what the residual stream carries, layer by layer (logit lens, attribution)"),
    "data": ("reslab.data.commands", "prepare a corpus into memory-mapped token shards, or inspect one"),
    "export": ("reslab.interop.commands", "write a run as a Hugging Face folder that transformers loads as it is"),
}
# One example per subcommand, shown as the epilog of its --help (tests/test_cli_consistency.py keeps one for each).
EXAMPLES: dict[str, str] = {
    "info": "reslab info --model gpt --layers 6        # the model, its parameter count and its config (shape)",
    "list": "reslab list",
    "reproduce": "reslab reproduce depth --quick",
    "train": "reslab train --model gpt --layers 4 --steps 500 --data text.txt --out runs/gpt4",
    "sample": "reslab sample runs/gpt4 --prompt \"ROMEO:\" --tokens 200 --top-k 20",
    "ablate": "reslab ablate --residual pre,post,none --layers 2,4 --seeds 0,1,2 --steps 300",
    "bench": "reslab bench --model gpt --layers 4 --batch 12",
    "report": "reslab report runs/ablation --baseline pre",
    "audit": "reslab audit gpt --layers 4 --residual none",
    "diagram": "reslab diagram gpt --layers 12 -o gpt12.svg",
    "lens": "reslab lens runs/gpt4 --prompt \"ROMEO:\" --plot lens/",
    "data": "reslab data prepare corpus/ --tokenizer bpe --vocab-size 4096 --out data/corpus",
    "export": "reslab export runs/gpt4 --hf hf/gpt4",
}
# Subcommands that train in this process: the `reslab` command's own process then keeps freed memory in its heap for
# the next step (reslab.heap).
TRAINING_COMMANDS = ("train", "bench", "ablate", "reproduce")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default appended where its help does not already say it (a default of
    None or False is no value, and is not shown)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS)
                or text == argparse.SUPPRESS):
            return text
        return f"{text} (default %(default)s)" if text else "default %(default)s"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example: "):  # a command line to paste: never wrapped
            return indent + text
        return super()._fill_text(text, width, indent)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the problem and `--help`), exit code 2; and a subcommand's arguments
    can be added on first use (`fill`): when it is parsed or its help is shown. Help shows defaults (HelpFormatter)."""

    def __init__(self, *args, fill: Callable[[], None] | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.fill = fill

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        self._fill()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._fill()
        return super().format_usage()

    def format_help(self) -> str:
        self._fill()
        return super().format_help()

    def _fill(self) -> None:
        fill, self.fill = self.fill, None
        if fill is not None:
            fill()


class _Declared:
    """The `commands` a module's `register` is given: `add_parser(name)` hands back the parser already declared for
    that name (its help line is the one in COMMANDS) instead of adding another."""

    def __init__(self, commands: argparse._SubParsersAction):
        self.commands = commands

    def add_parser(self, name: str, **kwargs) -> ArgumentParser:
        parser = self.commands.choices[name]
        parser.fill = None  # being filled by the caller
        return parser


def build_parser() -> ArgumentParser:
    from reslab import __version__

    parser = ArgumentParser(prog="reslab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"reslab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    info = commands.add_parser("info", help="build a model and print its structure, parameter count and config",
                               epilog=_example("info"))
    info.fill = lambda: _add_model_arguments(info)
    info.set_defaults(handler=cmd_info)

    listing = commands.add_parser("list", help="list models, residual schemes and reproductions",
                                  epilog=_example("list"))
    listing.set_defaults(handler=cmd_list)

    reproduce = commands.add_parser("reproduce", help="re-run an experiment behind a published claim",
                                    epilog=_example("reproduce"))
    reproduce.fill = lambda: add_reproductions(reproduce)
    for name, (module, text) in COMMANDS.items():
        commands.add_parser(name, help=text, epilog=_example(name),
                            fill=lambda module=module: _register(module, commands))
    return parser


def _example(command: str) -> str:
    return f"example: {EXAMPLES[command]}"


def _add_model_arguments(parser: ArgumentParser) -> None:
    from reslab.cli_args import add_model_arguments

    parser.add_argument("target", nargs="?", metavar="TARGET", help="a model name (as --model), a run directory or "
                        "a Hugging Face save_pretrained folder (default: --model)")
    add_model_arguments(parser)


def _register(module: str, commands: argparse._SubParsersAction) -> None:
    from importlib import import_module

    import_module(module).register(_Declared(commands))


def add_reproductions(reproduce: ArgumentParser) -> None:
    """One subcommand per reproduction (this imports them all: they need torch)."""
    from reslab.reproduce import get_reproduction, list_reproductions

    reproductions = reproduce.add_subparsers(dest="name", required=True, parser_class=ArgumentParser)
    for name in list_reproductions():
        module = get_reproduction(name)
        sub = reproductions.add_parser(name, help=module.CLAIM)
        module.add_arguments(sub)
        quick = " --quick" if "--quick" in sub._option_string_actions else ""
        sub.epilog = f"example: reslab reproduce {name}{quick}"
        sub.set_defaults(handler=module.run)


def cmd_info(args: argparse.Namespace) -> int:
    from reslab.cli_args import model_from_args
    from reslab.graph.commands import refuse_model_flags
    from reslab.graph.targets import INFO, Kind, build_saved, resolve_target

    target = resolve_target(args.target, INFO) if args.target is not None else None
    if target is not None and target.kind is not Kind.BUILTIN:
        refuse_model_flags(args, target)
        model = build_saved(target)
    else:
        if target is not None and args.model not in (None, args.target):
            raise ReslabError(f"TARGET names the model; drop --model {args.model}")
        args.model = args.target or args.model
        model = model_from_args(args)
    print(model)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    print_config(model.config)
    return 0


def print_config(config) -> None:
    """The model's config, one field a line: its shape (the model's defaults, under the flags and --set given).
    A run trains with the vocabulary of its data, whatever `vocab_size` says here."""
    import json

    values = config.to_dict()
    width = max(len(name) for name in values)
    print(f"config ({type(config).__name__}; any field is settable with --set NAME=VALUE):")
    for name, value in values.items():
        print(f"  {name:<{width}}  {json.dumps(value) if isinstance(value, (dict, list, str)) else value}")


def cmd_list(args: argparse.Namespace) -> int:
    """The models, schemes (formula and paper) and reproductions, built in and from plug-ins: only a plug-in scheme
    is imported, for its formula."""
    from reslab.registry import described, names

    formulas = {name: described("residual scheme", name) for name in names("residual scheme")}
    print("models:       " + ", ".join(names("model")))
    print("schemes:")
    name_width = max(len(name) for name in formulas)
    formula_width = max(48, *(len(formula) for formula, _ in formulas.values()))
    for name, (formula, paper) in formulas.items():
        print(f"  {name:<{name_width}} {formula:<{formula_width}} {paper}")
    print("reproduce:    " + ", ".join(names("reproduction")))
    return 0


def _empty_option(argv: list[str]) -> str | None:
    """The first option given an empty value (`--out ""`, `--design=`): as a path it would mean the current
    directory, as a name nothing; either way not what was meant."""
    for before, value in zip(["", *argv], argv):
        if value == "" and before.startswith("-") and not before.startswith("--no-"):
            return before
        if value.startswith("--") and value.endswith("="):
            return value[:-1]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    own_process = argv is None  # the console script or `python -m reslab`, not a program calling main([...])
    argv = list(sys.argv[1:] if argv is None else argv)
    empty = _empty_option(argv)
    if empty is not None:
        parser.exit(2, f"reslab: error: {empty} was given an empty value; give a value or drop the option\n")
    try:
        args = parser.parse_args(argv)
    except ReslabError as error:  # a plug-in that fails to load while its subcommand's flags are added
        print(f"reslab: error: {_one_line(error)}", file=sys.stderr)
        return 2
    args.argv = ["reslab", *argv]  # the command as given, recorded in run and ablation directories
    if own_process:
        sys.stdout = StandardOutput(sys.stdout)
    if args.command in TRAINING_COMMANDS and own_process:
        from reslab.heap import tune_malloc

        tune_malloc()
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # here, where an error is reported, not by the interpreter at exit
        return code
    except ReslabError as error:
        print(f"reslab: error: {_one_line(error)}", file=sys.stderr)
        return 130 if isinstance(error, Interrupted) else 2
    except BrokenPipeError:  # `reslab ... | head`: the reader has what it wanted
        _silence_stdout()
        return 141
    except OSError as error:  # the machine's, not reslab's: a full disk, a read-only or missing path, permissions
        if error.filename == StandardOutput.name:
            _silence_stdout()
        print(f"reslab: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("reslab: error: out of memory; make the model or --batch smaller", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reslab: interrupted; the last checkpoint (if any) is kept", file=sys.stderr)
        return 130


class StandardOutput:
    """sys.stdout, whose write errors name it: `reslab ... > FILE` on a full disk is one line like any other write."""

    name = "standard output"

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as error:
            raise type(error)(error.errno, error.strerror, self.name) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as error:
            raise type(error)(error.errno, error.strerror, self.name) from None

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _silence_stdout() -> None:
    """Standard output failed: send what is left to /dev/null, so the interpreter's flush at exit adds nothing."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _one_line(error: BaseException) -> str:
    """The message's lines joined by spaces; spaces inside a line stay (a quoted path in it names that path)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


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
