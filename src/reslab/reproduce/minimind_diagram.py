"""MiniMind's diagram against MiniMind-shaped code: the design drew residuals the code lacks.

MiniMind (jingyaogong/minimind) published an architecture diagram with residual connections around and inside its
GQA attention and FFN blocks; its code, like Llama's, has them only around. The project's remedy was by hand:
dashed lines for what the design has and the code lacks. This reproduction does it with the tool: the published
claim, shipped as `reslab/reproduce/designs/minimind.json`, is checked against reslab's `llama` model with
MiniMind2-Small's dimensions (traced on the meta device, so no weight is allocated), and the diagram with the
missing claims dashed is written next to the design.
"""

from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path

import torch

from reslab.graph import audit, check_design, load_design
from reslab.graph.design import DesignCheck
from reslab.graph.diagram import Diagram
from reslab.io import atomic_write
from reslab.reproduce.common import print_verdict

CLAIM = "MiniMind's diagram: residuals around and inside its GQA attention and FFN blocks"
# MiniMind2-Small (the 26M model): 512 wide, 8 layers, 8 query and 2 key/value heads, a 6400-token vocabulary,
# SwiGLU hidden 1408 (8/3 of the width rounded up to 64, reslab's default), RoPE theta 1e6, tied embeddings.
MINIMIND = {"width": 512, "layers": 8, "heads": 8, "kv_heads": 2, "vocab_size": 6400, "context": 512,
            "rope_theta": 1e6, "tie_embeddings": True, "residual": "pre"}


def design_path() -> Path:
    """The shipped design file (package data)."""
    return Path(str(files("reslab.reproduce") / "designs" / "minimind.json"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", type=Path,
                        help="where to write design.json and diagram.svg (default runs/reproduce/minimind-diagram)")
    parser.add_argument("--json", action="store_true", help="print the verdict and the design check as JSON")


def check(layers: int | None = None) -> DesignCheck:
    """The shipped design checked against a MiniMind-shaped llama (`layers` overrides its depth)."""
    from reslab.models import build_model

    config = {**MINIMIND, **({"layers": layers} if layers else {})}
    with torch.device("meta"):
        model = build_model("llama", **config)
    tokens = torch.zeros(1, 8, dtype=torch.long, device="meta")
    label = (f"MiniMind-shaped llama ({config['layers']} layers, width {config['width']}, "
             f"GQA {config['heads']}/{config['kv_heads']} heads)")
    result = audit(model.eval(), (tokens,), target=label)
    return check_design(result, load_design(design_path()))


def run(args: argparse.Namespace) -> int:
    out = args.out or Path("runs") / "reproduce" / "minimind-diagram"
    result = check()
    design_file, svg = out / "design.json", out / "diagram.svg"
    atomic_write(design_file, design_path().read_bytes())
    result.design.source = str(design_file)
    atomic_write(svg, Diagram.from_audit(result.audit, design=result).svg().encode("utf-8"))
    if not args.json:
        print(result.format())
        print(f"wrote {svg}")
    done = [r for r in result.results if r.implemented]
    measured = (f"{result.audit.target} implements " + _claims(done) + "; it lacks " + _claims(result.missing) +
                (f"; {len(result.unclaimed)} residuals no claim covers" if result.unclaimed else ""))
    numbers = {**result.to_dict(), "diagram": str(svg)}
    return print_verdict(args, CLAIM, measured, result.ok, numbers)


def _claims(results) -> str:
    if not results:
        return "nothing"
    return ", ".join(f"{r.claim.text()} ({len(r.found) - len(r.lacking)} of {len(r.found)})" for r in results)
