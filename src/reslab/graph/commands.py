"""The `reslab audit` and `reslab diagram` subcommands (declared in `reslab.cli.COMMANDS`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from reslab.errors import ReslabError

TARGET_HELP = ("a model name (with model flags), a run directory, a Hugging Face save_pretrained folder, "
               "hf:MODEL_TYPE (with --set KEY=VALUE), or FILE.py:CALLABLE / package.module:CALLABLE returning "
               "(model, example_inputs)")


def register(commands) -> None:
    audit = commands.add_parser("audit", help="where a model's residual connections really are, from its traced "
                                              "computation")
    _add_target_arguments(audit)
    audit.add_argument("--json", action="store_true", help="print the audit as JSON")
    audit.add_argument("--expect", metavar="FILE", help="compare with a saved audit; exit 1 and show the "
                                                        "differences when the residual structure differs")
    audit.add_argument("--write-expect", metavar="FILE", help="save this audit as the expected one")
    audit.add_argument("--design", metavar="FILE", help="check a design file ({\"residuals\": [{\"around\": "
                                                        "\"layers.*.mlp\"}, ...]}) against the code; exit 1 on any "
                                                        "difference")
    audit.add_argument("--write-design", metavar="FILE", help="write the design that matches the code")
    audit.set_defaults(handler=cmd_audit)

    diagram = commands.add_parser("diagram", help="draw a model from its traced computation (.svg, .mmd, .dot)")
    _add_target_arguments(diagram)
    diagram.add_argument("-o", "--output", required=True, metavar="FILE",
                         help="output file; its suffix picks the format: .svg, .mmd (Mermaid) or .dot")
    diagram.add_argument("--depth", type=int, default=1,
                         help="open module calls nested less than N deep (default 1: the model's children); "
                              "blocks and modules that hold a residual are always open")
    diagram.add_argument("--unroll", action="store_true", help="draw every block instead of folding equal ones")
    diagram.add_argument("--engine", choices=("builtin", "dot"), default="builtin",
                         help="who draws the SVG: reslab itself (default) or Graphviz's dot, if installed")
    diagram.add_argument("--design", metavar="FILE", help="draw a design's claims the code lacks as dashed red "
                                                          "skips and highlight residuals no claim covers")
    diagram.set_defaults(handler=cmd_diagram)


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    from reslab.cli_args import add_model_arguments

    parser.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    add_model_arguments(parser)
    for action in parser._actions:  # the TARGET names the model: hide the shared --model flag
        if action.dest == "model":
            action.help, action.default = argparse.SUPPRESS, None
    parser.add_argument("--device", default="meta", choices=("meta", "cpu"), metavar="DEVICE",
                        help="torch device the model runs on while traced (built-in, run-directory and hf: models): "
                             "meta (default: no weights allocated) or cpu (for a forward that reads tensor values)")


def load(args: argparse.Namespace):
    """The audit of the TARGET the arguments name."""
    from reslab.graph import audit
    from reslab.graph.targets import load_target, resolve_target
    from reslab.graph.trace import TraceError

    named = resolve_target(args.target)  # the one place its kind is worked out
    target = load_target(named, target_overrides(args, named), args.device)
    try:
        return audit(target.model, target.inputs, target.label)
    except TraceError as error:  # on meta, it says so and suggests cpu; a model traced on cpu is not on meta
        raise ReslabError(f"tracing {target.label} failed: {error}") from None


def target_overrides(args: argparse.Namespace, target) -> dict:
    """The config fields the arguments set: model flags and `--set` for a built-in model, `--set` alone (as the
    target's own config keys) for the others."""
    from reslab.cli_args import model_overrides
    from reslab.graph.targets import Kind, parse_sets

    if args.model is not None and args.model != args.target:
        raise ReslabError(f"the TARGET names the model; drop --model {args.model}")
    if target.kind is Kind.BUILTIN:  # --set checked like a flag: a field of the model or its scheme's option
        return model_overrides(args, model=args.target)
    refuse_model_flags(args, target, but=("--set",), fix="use --set KEY=VALUE")
    return parse_sets(args.sets)


def refuse_model_flags(args: argparse.Namespace, target, but: tuple[str, ...] = (), fix: str = "") -> None:
    """One line for a model flag given with a TARGET that is not a built-in model (which the flags configure)."""
    from reslab.cli_args import model_flags_given

    given = [flag for flag in model_flags_given(args) if flag not in but]
    if given:
        fix = f"; for {target} {fix}" if fix else f"; drop {given[0]}"
        raise ReslabError(f"{given[0]} applies to built-in models only, not to {target.kind.value}{fix}")


def cmd_audit(args: argparse.Namespace) -> int:
    from reslab.graph.design import check_design, design_from_audit, load_design, write_design
    from reslab.graph.expect import load_expected, write_expected

    design = load_design(args.design) if args.design else None  # a malformed design fails before the trace
    expected = load_expected(args.expect) if args.expect else None  # so does a malformed expected audit
    result = load(args)
    check = check_design(result, design) if design is not None else None
    if args.json:
        print(json.dumps({**result.to_dict(), **({"design": check.to_dict()} if check else {})}, indent=2))
    else:
        print(result.format())
    stream = sys.stderr if args.json else sys.stdout
    if args.write_expect:
        path = write_expected(result.to_dict(), args.write_expect)
        print(f"wrote {path}", file=stream)
    if args.write_design:
        print(f"wrote {write_design(design_from_audit(result), args.write_design)}", file=stream)
    code = _compare_expected(args.expect, expected, result, stream)
    if check is not None:
        if not args.json:
            print(check.format())
        code = code or (0 if check.ok else 1)
    return code


def _compare_expected(source: str | None, expected: dict | None, result, stream) -> int:
    from reslab.graph.expect import differences

    if expected is None:
        return 0
    lines = differences(expected, result.to_dict())
    if lines:
        print(f"residual structure differs from {source}:", file=stream)
        print("\n".join(lines), file=stream)
        return 1
    print(f"matches {source}", file=stream)
    return 0


def cmd_diagram(args: argparse.Namespace) -> int:
    from reslab.graph.design import check_design, load_design
    from reslab.graph.diagram import Diagram

    started = time.perf_counter()
    design = load_design(args.design) if args.design else None
    result = load(args)
    check = check_design(result, design) if design is not None else None
    drawing = Diagram.from_audit(result, depth=args.depth, unroll=args.unroll, design=check)
    path = drawing.save(args.output, engine=args.engine)
    print(f"wrote {path} ({len(result.residuals)} residuals, {len(result.dead)} dead; "
          f"{time.perf_counter() - started:.1f}s)")
    if check is not None:
        print(check.format())
    return 0
