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
    lens.add_argument("target", help="a run directory, a Hugging Face save_pretrained folder, a built-in model name "
                      "(random weights; model flags apply), hf:MODEL_TYPE (random weights from a small config; "
                      "--set KEY=VALUE applies), or FILE.py:CALLABLE / package.module:CALLABLE returning (model, "
                      "example_inputs)")
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
    lens.add_argument("--frozen-norm", action="store_true", help="normalise every layer's stream with the final "
                      "norm's scale on the model's own last stream instead of its own (TransformerLens' cached "
                      "scale; default: recomputed on each stream, the standard logit lens)")
    lens.add_argument("--json", action="store_true", help="print the result as JSON")
    lens.add_argument("--plot", type=Path, metavar="DIR", help="write lens.png and contributions.png to DIR")
    lens.add_argument("--device", default="cpu", help="torch device the model runs on: cpu (default), auto (cuda "
                      "if present), cuda, cuda:N")
    add_model_arguments(lens)
    lens.set_defaults(handler=cmd_lens)


def lens_input(args: argparse.Namespace):
    """The model and tokens TARGET and the flags name: a run directory or a Hugging Face folder (trained weights),
    a transformer model by name (built in or a plug-in), hf:MODEL_TYPE or FILE.py:CALLABLE (random weights, or the
    callable's)."""
    from reslab.graph.commands import refuse_model_flags
    from reslab.graph.targets import Kind, load_trained, resolve_target
    from reslab.lens.inputs import trained_input
    from reslab.models import MODELS, TRANSFORMERS
    from reslab.train.config import resolve_device

    device = resolve_device(args.device)
    model_type = unconverted_folder(args.target)
    if model_type is not None:
        return folder_input(args, Path(args.target), model_type, device)
    unknown = (f"{args.target} is neither a run directory nor a transformer model ({', '.join(TRANSFORMERS)}, or a "
               "plug-in's), nor a Hugging Face folder, hf:MODEL_TYPE or FILE.py:CALLABLE")
    target = resolve_target(args.target, tuple(Kind), unknown)
    if target.kind is Kind.BUILTIN and args.target in MODELS and args.target not in TRANSFORMERS:  # mlp
        raise ReslabError(unknown)
    if args.tuned and target.kind is not Kind.RUN:
        raise ReslabError("--tuned fits on a run's training data; give a run directory as TARGET")
    if target.kind in (Kind.HF_TYPE, Kind.CALLABLE):
        return traced_input(args, target, device)
    if target.kind is not Kind.BUILTIN:
        refuse_model_flags(args, target)
        trained = load_trained(target, device)
        return trained_input(trained, args.prompt, args.data, args.tokens, args.seed, device, with_train=args.tuned)
    if args.model is not None and args.model != args.target:
        raise ReslabError(f"TARGET names the model; drop --model {args.model}")
    import torch

    from reslab.cli_args import model_from_args
    from reslab.lens.inputs import builtin_input

    args.model = args.target
    torch.manual_seed(args.seed)  # the same random weights for the same flags
    model = model_from_args(args)
    return builtin_input(model, args.target, args.prompt, args.data, args.tokens, args.seed, device)


def traced_input(args: argparse.Namespace, target, device):
    """An hf:MODEL_TYPE model (random weights from a small config, --set applied; seeded by --seed) or the model a
    callable returns, read on the given text (character ids) or on random ids, in windows of its context (for a
    model whose config names none, the length of the callable's example inputs)."""
    import torch

    from reslab.graph.commands import target_overrides
    from reslab.graph.targets import Kind, load_target
    from reslab.lens.inputs import LensInput, random_ids, read_text, windows
    from reslab.lens.capture import model_context
    from reslab.lens.traced import refuse_meta

    overrides = target_overrides(args, target)
    torch.manual_seed(args.seed)  # the same random weights for the same --seed
    loaded = load_target(target, overrides, device="cpu")
    refuse_meta(loaded.model)
    model = loaded.model.to(device).eval()
    vocab = vocab_size(model, loaded.label)
    text, description = read_text(args.prompt, args.data)
    if text is None:
        ids, description = random_ids(vocab, args.tokens, args.seed)
    else:
        ids = char_ids(text, vocab)
    x, y = windows(ids, model_context(model) or example_length(loaded.inputs, loaded.label), args.tokens)
    weights = "random weights: an untrained model" if target.kind is Kind.HF_TYPE else "as the callable builds it"
    label = f"{loaded.label} ({type(model).__name__}), {weights}"
    converted = multi_stream_conversion(model)
    if converted is not None:  # read at its residual sites, every stream on its own
        model, label = converted.to(device), f"{label}, read as reslab's {converted_name(converted)} (logits equal)"
    return LensInput(model, x.to(device), y.to(device), label, description)


def multi_stream_conversion(model):
    """The reslab model computing what a `transformers` model computes, when reslab converts its family and the
    family carries parallel residual streams (DeepSeek-V4's [batch, seq, hc_mult, width]): the lens then decodes
    each stream at every residual site, which the traced graph (one tensor between blocks) cannot. None otherwise."""
    from reslab.interop.convert import config_from_hf, from_hf
    from reslab.residual import get_scheme

    config = getattr(model, "config", None)
    try:
        _, overrides = config_from_hf(config)
    except ReslabError:
        return None  # a family reslab does not convert (or a feature it refuses): the traced lens reads it
    if get_scheme(overrides["residual"]).streams(overrides.get("residual_options", {})) < 2:
        return None
    return from_hf(model)


def converted_name(model) -> str:
    from reslab.interop.registry import adapter_for_model

    return adapter_for_model(model).reslab_model


def unconverted_folder(text: str) -> str | None:
    """The model_type of a Hugging Face folder (config.json with a model_type, not a reslab run) of a family reslab
    does not convert: the lens loads it with transformers and reads it traced. None for anything else."""
    from reslab.interop import supported_types
    from reslab.io import read_json_file
    from reslab.rundir import CONFIG, MARKER

    path = Path(text)
    if not (path / CONFIG).is_file() or (path / MARKER).exists():
        return None
    try:
        config = read_json_file(path / CONFIG, "")
    except ReslabError:
        return None
    model_type = config.get("model_type") if isinstance(config, dict) and "model" not in config else None
    return model_type if isinstance(model_type, str) and model_type not in supported_types() else None


def folder_input(args: argparse.Namespace, path: Path, model_type: str, device):
    """A Hugging Face folder reslab does not convert, loaded with transformers (its causal LM class, local files
    only) and its tokenizer.json (else ids as numbers), read on the given text or on random ids."""
    from reslab.graph.commands import refuse_model_flags
    from reslab.graph.targets import Kind, TargetSpec
    from reslab.interop import folder_tokenizer
    from reslab.interop.base import quiet_transformers
    from reslab.lens.inputs import LensInput, random_ids, read_text, windows
    from reslab.lens.capture import model_context

    refuse_model_flags(args, TargetSpec(Kind.HF_FOLDER, str(path), path, model_type))
    try:
        from transformers import AutoModelForCausalLM

        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device).eval()
    except Exception as error:  # noqa: BLE001 - whatever transformers raises on a folder it cannot load
        raise ReslabError(f"cannot load {path} ({model_type}) with transformers: {type(error).__name__}: "
                          f"{str(error).strip().splitlines()[-1][:200] if str(error).strip() else ''}") from None
    vocab = vocab_size(model, str(path))
    text, description = read_text(args.prompt, args.data)
    if text is None:
        ids, description = random_ids(vocab, args.tokens, args.seed)
    else:
        from reslab.data import encode_corpus

        ids = encode_corpus(folder_tokenizer(path, vocab), text)
    x, y = windows(ids, model_context(model) or args.tokens, args.tokens)  # no context named: one window
    return LensInput(model, x.to(device), y.to(device), f"Hugging Face folder {path} ({model_type}, "
                     f"{type(model).__name__} loaded with transformers: reslab does not convert it)", description)


def vocab_size(model, label: str) -> int:
    """The model's vocabulary: its config's `vocab_size`, else the rows of its first embedding table."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int):
        return size
    import torch.nn as nn

    table = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if table is None:
        raise ReslabError(f"{label} has no config.vocab_size and no nn.Embedding: the lens cannot tell which token "
                          "ids it reads; give it a config with vocab_size")
    return table.num_embeddings


def example_length(inputs, label: str) -> int:
    """The positions of a callable's example token ids: the windows the lens reads such a model in."""
    import torch

    values = inputs.values() if isinstance(inputs, dict) else (inputs,) if isinstance(inputs, torch.Tensor) else inputs
    ids = [v for v in values if isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.dim() >= 1]
    if not ids:
        raise ReslabError(f"{label}'s example inputs hold no token ids and its config names no context; return "
                          "(model, (ids,)) with ids of the longest window it reads")
    return ids[0].shape[-1]


def char_ids(text: str, vocab: int):
    """The text as character ids, refused when it has more distinct characters than the model's vocabulary."""
    from reslab.data import CharTokenizer, encode_corpus

    tokenizer = CharTokenizer.train(text)
    if tokenizer.vocab_size > vocab:
        raise ReslabError(f"the text has {tokenizer.vocab_size} distinct characters but the model's vocabulary "
                          f"has {vocab}; give a shorter text or a trained run")
    return encode_corpus(tokenizer, text)


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
    from reslab.lens.inputs import check_fits
    from reslab.lens.report import lens_notes, lens_table, plot_lens
    from reslab.lens.result import RECOMPUTED

    check_numbers(vars(args), LENS_RANGES)
    given = lens_input(args)
    check_fits(given.inputs.numel(), vocab_size(given.model, given.target), given.inputs.device)
    tuned = fit_tuned(given, args) if args.tuned else None
    result = lens(given.model, given.inputs, given.targets, tuned=tuned, frozen_norm=args.frozen_norm)
    plots = plot_lens(result, args.plot) if args.plot else []
    if args.json:
        record = {"target": given.target, "text": given.text, **result.to_dict(), "plots": [str(p) for p in plots]}
        print(json.dumps(record, indent=2))
        return 0
    print(f"lens: {given.target}")
    print(f"on {result.tokens} tokens of {given.text}, {given.inputs.shape[0]} window(s) of "
          f"{given.inputs.shape[1]}")
    print(f"final norm: {result.norm} on each layer's stream" if result.norm == RECOMPUTED else
          "final norm: FROZEN at the scale of the model's own last stream (--frozen-norm)")
    print(lens_table(result))
    if result.streams is not None:
        print(result.streams.table(result.names))
    for note in lens_notes(result):
        print(note)
    for path in plots:
        print(f"wrote {path}")
    return 0
