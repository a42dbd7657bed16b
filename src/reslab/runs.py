"""A trained run in Python: `reslab.load_run(path)` reads a run directory (or a Hugging Face folder) into a `Run`:
the model with its weights, its tokenizer, config.json, metrics.jsonl and summary.json; in a notebook it shows its
config and summary as tables, and `run.lens(...)` / `run.audit()` give what `reslab lens` / `reslab audit` print.

    run = reslab.load_run("runs/gpt-default")
    run.model(ids).logits                       # the checkpoint's weights, eval mode
    run.lens("ROMEO:")                          # LensResult, as `reslab lens runs/gpt-default --prompt ROMEO:`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from reslab.display import data_frame, html_block, html_table
from reslab.graph.targets import WEIGHTED, Kind, Trained, load_trained, resolve_target


@dataclass(repr=False)
class Run:
    """A run directory (or Hugging Face folder) loaded: `model` (eval mode, on `device`), `tokenizer`, `config` (the
    run's config.json; None for a folder), `metrics` (metrics.jsonl, one dict per logged step) and `summary`
    (summary.json; None until the run has finished)."""

    path: Path
    model: nn.Module
    tokenizer: Any
    config: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    trained: Trained  # what `reslab lens` reads (the model, its tokenizer and its data)

    def lens(self, prompt: str | None = None, *, data: str | None = None, tokens: int = 256, seed: int = 0):
        """The logit lens on `prompt` (else `data`, else the run's validation split), as `reslab lens PATH
        [--prompt ...] [--data ...] --tokens N` prints it: a `LensResult`."""
        from reslab.lens import lens
        from reslab.lens.inputs import trained_input

        device = next(self.model.parameters()).device
        given = trained_input(self.trained, prompt, data, tokens, seed, device)
        return lens(given.model, given.inputs, given.targets)

    def audit(self):
        """Where the model's residual connections are, as `reslab audit PATH` prints it: an `Audit`."""
        from reslab.graph import audit
        from reslab.graph.targets import load_target

        target = load_target(self.trained.target)
        return audit(target.model, target.inputs, target.label)

    def columns(self) -> dict[str, list[Any]]:
        """The config as a table: setting (model_config.*, train.*, ...), value."""
        flat = _flatten(self.config if self.config is not None else {"model_config": vars(self.model.config)})
        return {"setting": list(flat), "value": list(flat.values())}

    def summary_columns(self) -> dict[str, list[Any]]:
        """summary.json's numbers and words as a table: field, value (lists and tables left out)."""
        shown = {k: v for k, v in (self.summary or {}).items() if not isinstance(v, (list, dict))}
        return {"field": list(shown), "value": list(shown.values())}

    def to_pandas(self):
        """metrics.jsonl as a pandas DataFrame: one row per logged step, one column per key."""
        keys = list(dict.fromkeys(key for record in self.metrics for key in record))
        return data_frame({key: [record.get(key) for record in self.metrics] for key in keys})

    def headline(self) -> str:
        """The line `reslab train` ends with (or what the folder is)."""
        summary = self.summary or {}
        if self.config is None or not summary:
            return self.trained.describe() + ("" if self.config is None else ", no summary.json yet")
        return (f"run: {self.path}  val loss {summary.get('final_val_loss', float('nan')):.4f} "
                f"(best {summary.get('best_val_loss', float('nan')):.4f})  "
                f"{summary.get('tokens_per_second', 0):,.0f} tok/s  {summary.get('parameters', 0):,} parameters")

    def _repr_html_(self) -> str:
        tables = [html_table(self.summary_columns(), "summary.json", {"value": _value})] if self.summary else []
        return html_block(*tables, html_table(self.columns(), "config", {"value": _value}, left=("value",)),
                          notes=[self.headline()])

    def __repr__(self) -> str:
        model = self.config["model"] if self.config else type(self.model).__name__
        return (f"Run({str(self.path)!r}: {model}, {self.model.config.residual}, {len(self.metrics)} metrics "
                f"records, {'a' if self.summary else 'no'} summary)")


def load_run(path: str | Path, device: str = "cpu") -> Run:
    """A run directory written by `reslab train` (or a Hugging Face save_pretrained folder reslab converts) with
    its weights on `device` (cpu, cuda, cuda:N or auto); any problem is one ReslabError line."""
    from reslab.rundir import RunDir
    from reslab.train.config import resolve_device

    target = resolve_target(str(path), WEIGHTED)
    trained = load_trained(target, resolve_device(device))
    metrics, summary = [], None
    if target.kind is Kind.RUN:
        run = RunDir(target.path)
        metrics, summary = run.read_metrics(), run.read_summary()
    return Run(target.path, trained.model, trained.tokenizer, trained.config, metrics, summary, trained)


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _value(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
