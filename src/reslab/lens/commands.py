"""`reslab lens TARGET`: the logit lens by layer of a trained run or a built-in model, as a table, JSON or plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reslab.checks import COUNT, SEED, check_numbers
from reslab.cli_args import add_model_arguments
from reslab.errors import ReslabError

LENS_RANGES = {"tokens": COUNT, "seed": SEED, "tuned_steps": COUNT, "tuned_batch": COUNT}


def register(commands) -> None:
    lens = commands.add_parser("lens", help="what the residual stream carries, layer by layer (logit lens, "
                               "attribution)")
    lens.add_argument("target", help="a run directory, a Hugging Face save_pretrained folder, or a built-in model "
                      "name (random weights; model flags apply)")
    lens.add_argument("--prompt", help="text to read the model on")
    lens.add_argument("--data", help="a corpus name or UTF-8 text file to read the model on (default: a run's "
                      "validation split; random ids for a built-in model or a Hugging Face folder)")
    lens.add_argument("--eval-tokens", dest="tokens", type=int, default=256, metavar="N",
                      help="evaluated tokens at most (default 256)")
    lens.add_argument("--tokens", dest="tokens", type=int, default=256, help=argparse.SUPPRESS)  # the old name
    lens.add_argument("--seed", type=int, default=0, help="seed of a built-in model's random weights and ids, and of "
                      "the tuned lens's batches (default 0)")
    lens.add_argument("--tuned", action="store_true", help="also fit a tuned lens (one affine translator per layer) "
                      "on the run's training split and report it beside the logit lens")
    lens.add_argument("--tuned-steps", type=int, default=100, help="tuned lens optimisation steps (default 100)")
    lens.add_argument("--tuned-batch", type=int, default=8, help="tuned lens sequences per step (default 8)")
    lens.add_argument("--json", action="store_true", help="print the result as JSON")
    lens.add_argument("--plot", type=Path, metavar="DIR", help="write lens.png and contributions.png to DIR")
    lens.add_argument("--device", default="cpu", help="torch device the model runs on: cpu (default), auto (cuda "
                      "if present), cuda, cuda:N")
    add_model_arguments(lens)
    lens.set_defaults(handler=cmd_lens)


def lens_input(args: argparse.Namespace):
    """The model and tokens TARGET and the flags name (a run directory, a Hugging Face folder or a built-in
    transformer)."""
    from reslab.graph.commands import refuse_model_flags
    from reslab.graph.targets import LENS, Kind, load_trained, resolve_target
    from reslab.lens.inputs import builtin_input, trained_input
    from reslab.models import TRANSFORMERS
    from reslab.train.config import resolve_device

    device = resolve_device(args.device)
    unknown = (f"{args.target} is neither a run directory nor a built-in transformer ({', '.join(TRANSFORMERS)}), "
               "nor a Hugging Face folder")
    target = resolve_target(args.target, LENS, unknown)
    if target.kind is Kind.BUILTIN and args.target not in TRANSFORMERS:
        raise ReslabError(unknown)
    if args.tuned and target.kind is not Kind.RUN:
        raise ReslabError("--tuned fits on a run's training data; give a run directory as TARGET")
    if target.kind is not Kind.BUILTIN:
        refuse_model_flags(args, target)
        trained = load_trained(target, device)
        return trained_input(trained, args.prompt, args.data, args.tokens, args.seed, device, with_train=args.tuned)
    if args.model is not None and args.model != args.target:
        raise ReslabError(f"TARGET names the model; drop --model {args.model}")
    import torch

    from reslab.cli_args import model_from_args

    args.model = args.target
    torch.manual_seed(args.seed)  # the same random weights for the same flags
    model = model_from_args(args)
    return builtin_input(model, args.target, args.prompt, args.data, args.tokens, args.seed, device)


def fit_tuned(given, args: argparse.Namespace):
    """A tuned lens fitted on random windows of the run's training split (seeded by --seed)."""
    import torch

    from reslab.data import BatchSampler
    from reslab.lens.tuned import fit_tuned_lens

    generator = torch.Generator().manual_seed(args.seed)
    sampler = BatchSampler(given.train_tokens, args.tuned_batch, given.model.config.context, generator,
                           split_name="training")
    tuned, losses = fit_tuned_lens(given.model, lambda: sampler.sample()[0], args.tuned_steps, seed=args.seed)
    if not args.json:
        print(f"tuned lens: {args.tuned_steps} steps on the run's training split, summed KL {losses[0]:.4f} -> "
              f"{losses[-1]:.4f}")
    return tuned


def cmd_lens(args: argparse.Namespace) -> int:
    from reslab.lens import lens
    from reslab.lens.report import lens_notes, lens_table, plot_lens

    check_numbers(vars(args), LENS_RANGES)
    given = lens_input(args)
    tuned = fit_tuned(given, args) if args.tuned else None
    result = lens(given.model, given.inputs, given.targets, tuned=tuned)
    plots = plot_lens(result, args.plot) if args.plot else []
    if args.json:
        record = {"target": given.target, "text": given.text, **result.to_dict(), "plots": [str(p) for p in plots]}
        print(json.dumps(record, indent=2))
        return 0
    print(f"lens: {given.target}")
    print(f"on {result.tokens} tokens of {given.text}, {given.inputs.shape[0]} window(s) of "
          f"{given.inputs.shape[1]}")
    print(lens_table(result))
    if result.streams is not None:
        print(result.streams.table(result.names))
    for note in lens_notes(result):
        print(note)
    for path in plots:
        print(f"wrote {path}")
    return 0
