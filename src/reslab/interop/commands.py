"""`reslab export RUN --hf DIR` (declared in `reslab.cli.COMMANDS`): a run as a Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands) -> None:
    export = commands.add_parser("export", help="write a run as a Hugging Face folder that transformers loads as it "
                                                "is")
    export.add_argument("run", metavar="RUN", help="a run directory whose model has a Hugging Face equivalent: gpt "
                        "(GPT-2), llama (Llama, Qwen3, Mixtral, Qwen3-MoE) or deepseek (DeepSeek-V3) with residual "
                        "pre, or deepseek-v4 (DeepSeek-V4) with its residual mhc-v4")
    export.add_argument("--hf", required=True, type=Path, metavar="DIR", help="the folder to write (config.json, "
                        "model.safetensors, tokenizer.json, tokenizer_config.json); written whole or not at all")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR (a folder "
                        "holding only files an export writes)")
    export.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from reslab.graph.targets import Kind, load_trained, resolve_target
    from reslab.interop.export import CHECK_TOKENS, export_hf

    trained = load_trained(resolve_target(args.run, (Kind.RUN,)), "cpu")
    done = export_hf(trained.model, trained.tokenizer, args.hf, overwrite=args.overwrite)
    print(f"wrote {done.directory}: {done.model_type}, logits within {done.logit_difference:.1e} of the run's "
          f"(fp32, {CHECK_TOKENS} positions); tokenizer: {done.tokenizer}")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(done.directory)!r}) and "
          "AutoTokenizer.from_pretrained(...)")
    return 0
