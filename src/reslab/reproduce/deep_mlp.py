"""LLMs-from-scratch ch. 4.4: the mean absolute gradient of each weight of a 5-layer MLP, with and without
shortcuts. Without them the gradient reaching the first layer is ~1000x smaller (vanishing gradient)."""

import argparse
import json

import torch
import torch.nn as nn

from reslab.models import build_model

CLAIM = "shortcut connections keep the first layer's gradient from vanishing"
BOOK_FIRST_LAYER = {"without_shortcut": 0.00020173587836325169, "with_shortcut": 0.22169792652130127}
LAYER_SIZES = [3, 3, 3, 3, 3, 1]


def mean_abs_gradients(shortcut: bool, seed: int = 123, layer_sizes: list[int] | None = None) -> dict[str, float]:
    """The book's experiment: seed, build, one MSE backward from input [[1, 0, -1]] to target [[0]]."""
    torch.manual_seed(seed)
    model = build_model("mlp", layer_sizes=list(layer_sizes or LAYER_SIZES), shortcut=shortcut)
    x = torch.tensor([[1.0, 0.0, -1.0]])
    loss = nn.functional.mse_loss(model(x), torch.zeros(1, layer_sizes[-1] if layer_sizes else 1))
    loss.backward()
    return {name: p.grad.abs().mean().item() for name, p in model.named_parameters() if name.endswith("weight")}


def results() -> dict[str, dict[str, float]]:
    return {"with_shortcut": mean_abs_gradients(True), "without_shortcut": mean_abs_gradients(False)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the gradients as JSON")


def run(args: argparse.Namespace) -> int:
    table = results()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    out = Table(title="Mean absolute gradient per weight (LLMs-from-scratch ch. 4, seed 123)")
    out.add_column("parameter")
    out.add_column("without shortcut", justify="right")
    out.add_column("with shortcut", justify="right")
    out.add_column("ratio", justify="right")
    for name, with_grad in table["with_shortcut"].items():
        without = table["without_shortcut"][name]
        out.add_row(name, f"{without:.6g}", f"{with_grad:.6g}", f"{with_grad / without:.0f}x")
    console = Console()
    console.print(out)
    first = "layers.0.0.weight"
    agree = all(abs(table[k][first] - v) <= 1e-6 * abs(v) for k, v in BOOK_FIRST_LAYER.items())
    console.print(
        f"verdict: {CLAIM}: first-layer gradient {table['without_shortcut'][first]:.6g} without vs "
        f"{table['with_shortcut'][first]:.6g} with shortcut (book: {BOOK_FIRST_LAYER['without_shortcut']:.6g} vs "
        f"{BOOK_FIRST_LAYER['with_shortcut']:.6g}) -> {'AGREES' if agree else 'DISAGREES'}",
        highlight=False, soft_wrap=True,
    )
    return 0
