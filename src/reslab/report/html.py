"""report.html: one self-contained page per ablation (PNG plots inlined as data URIs, inline CSS, no scripts,
no external fonts or requests), readable offline and safe to mail around.

Sections: the result in words, the summary table (best first, spread over seeds), the plots, how to read them,
the schemes (formula, paper, the class docstring), every run, and the exact command and config.
Every piece of text from the ablation directory goes through html.escape.
"""

from __future__ import annotations

import base64
import datetime as _dt
import inspect
import json
import math
import re
from html import escape
from typing import Any

from reslab.ablation_summary import fewest_seeds
from reslab.io import command_line, finite_number
from reslab.metrics import seed_summaries
from reslab.report.load import Ablation
from reslab.report.plots import Plot, expected_plots, scheme_colours
from reslab.stats import ALPHA, FEW_SEEDS, LEVEL

DASH = "\u2013"


def esc(value: Any) -> str:
    return escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return f'<span class="na" title="not recorded">{DASH}</span>'
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _p(value: Any) -> str:
    return f"{value:.2g}" if finite_number(value) else _num(None)


def _code(text: str) -> str:
    """Escape, then render `backticked` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text))


def _when(timestamp: Any) -> str:
    if not isinstance(timestamp, (int, float)):
        return DASH
    return _dt.datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return DASH
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _swatch(scheme: str, colours: dict[str, str]) -> str:
    return f'<span class="swatch" style="background:{esc(colours.get(scheme, "#000000"))}"></span>'


# --- the schemes ---------------------------------------------------------------------------------------------

def scheme_info(name: str) -> dict[str, Any]:
    """Formula, paper, docstring paragraphs and flags of a registered scheme; `known` False if not registered."""
    from reslab.errors import ReslabError
    from reslab.residual import get_scheme

    try:
        cls = get_scheme(name)
    except (ReslabError, ImportError, AttributeError):
        return {"known": False, "name": name}
    doc = inspect.getdoc(cls) or ""
    paragraphs = [" ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", doc)]
    return {"known": True, "name": name, "formula": getattr(cls, "formula", ""), "paper": getattr(cls, "paper", ""),
            "paragraphs": [p for p in paragraphs if p], "has_skip": getattr(cls, "has_skip", True),
            "final_norm": getattr(cls, "final_norm", True), "options": dict(getattr(cls, "option_defaults", {}) or {})}


def _schemes_section(ablation: Ablation, colours: dict[str, str]) -> str:
    cards = []
    for name in ablation.schemes:
        info = scheme_info(name)
        if not info["known"]:
            cards.append(f'<div class="scheme">{_swatch(name, colours)}<h3>{esc(name)}</h3>'
                         "<p class=\"note\">This scheme is not registered in this version of reslab; its formula "
                         "and paper are unknown here.</p></div>")
            continue
        facts = [f"identity path: {'yes' if info['has_skip'] else 'no'}",
                 f"final norm before the head: {'yes' if info['final_norm'] else 'no'}"]
        if info["options"]:
            facts.append("options: " + ", ".join(f"{k}={v}" for k, v in info["options"].items()))
        body = "".join(f"<p>{_code(p)}</p>" for p in info["paragraphs"])
        cards.append(
            f'<div class="scheme"><h3>{_swatch(name, colours)}{esc(name)}</h3>'
            f'<p class="formula"><code>{esc(info["formula"])}</code></p>'
            f'<p class="paper">{esc(info["paper"])}</p>{body}'
            f'<p class="facts">{esc(" · ".join(facts))}</p></div>')
    return "\n".join(cards)


# --- the result and the summary table ------------------------------------------------------------------------

def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _rows(ablation: Ablation) -> list[dict[str, Any]]:
    """summary.json's rows, best first, with counts made safe to compare and format."""
    rows = [{**r, "seeds": _count(r.get("seeds")), "diverged": _count(r.get("diverged"))}
            for r in ablation.summary.get("rows", []) if isinstance(r, dict)]
    headline = "final_val_loss_mean"
    return sorted(rows, key=lambda r: (not finite_number(r.get(headline)), r.get(headline) or 0.0))


def _best_by_depth(rows: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    best: dict[Any, dict[str, Any]] = {}
    for row in rows:
        if finite_number(row.get("final_val_loss_mean")):
            best.setdefault(row.get("layers"), row)  # rows are sorted best-first
    return best


def _comparisons(ablation: Ablation, metric: str = "final_val_loss") -> list[dict[str, Any]]:
    """summary.json's paired comparisons against the baseline on one field (reslab.ablation_summary)."""
    tests = ablation.summary.get("comparisons")
    return [t for t in tests if isinstance(t, dict) and t.get("metric") == metric] if isinstance(tests, list) else []


def _interval(low: Any, high: Any, digits: int = 4, signed: bool = False) -> str:
    if not (finite_number(low) and finite_number(high)):
        return _num(None)
    sign = "+" if signed else ""
    return f"[{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def _verdict_text(test: dict[str, Any], colours: dict[str, str]) -> str:
    """One scheme against the baseline, in words, from the paired test (never from the means alone)."""
    name = f"{_swatch(str(test.get('residual')), colours)}<b>{esc(test.get('residual'))}</b>"
    if not finite_number(test.get("diff")):
        return f"{name}: no seed finished alongside the baseline"
    verdict = str(test.get("verdict"))
    p = f", p = {test['p_holm']:.2g} (Holm)" if finite_number(test.get("p_holm")) else ""
    needed = (f"; about {test['seeds_needed']} seeds would resolve a difference this size"
              if verdict == "no difference at this n" and isinstance(test.get("seeds_needed"), int) else "")
    return (f'{name} <span class="verdict {esc(verdict.split()[0])}">{esc(verdict)}</span> '
            f"({test['diff']:+.3f}, {LEVEL:.0%} interval {_interval(test.get('low'), test.get('high'), 3, True)}, "
            f"{_plural(_count(test.get('n')), 'seed')}{p}{needed})")


def _result_section(ablation: Ablation, rows: list[dict[str, Any]], colours: dict[str, str]) -> str:
    if not rows:
        return '<p class="note">No grid point has finished yet, so there is no result to state. The runs below ' \
               "show how far each one got.</p>"
    baseline, tests, items = ablation.summary.get("baseline"), _comparisons(ablation), []
    for depth in sorted({r.get("layers") for r in rows}, key=lambda d: (not isinstance(d, int), d)):
        top = _best_by_depth(rows).get(depth)
        parts = ["no scheme finished without diverging" if top is None else
                 f"lowest mean: {_swatch(top['residual'], colours)}<b>{esc(top['residual'])}</b> "
                 f"{top['final_val_loss_mean']:.3f} ({_plural(top.get('seeds', 0), 'seed')})"]
        parts += [_verdict_text(t, colours) for t in tests if t.get("layers") == depth]
        parts += [f"<b>{esc(r['residual'])}</b>: {_plural(r['diverged'], 'run')} diverged" for r in rows
                  if r.get("layers") == depth and r.get("diverged")]
        items.append(f"<li><b>{esc(_plural(depth, 'block') if isinstance(depth, int) else depth)}:</b> "
                     + "; ".join(parts) + ".</li>")
    against = (f"<p>Each scheme against <b>{esc(baseline)}</b> on final validation loss, paired by seed (the same "
               f"initialisation seed and data order), with a paired t-test Holm-corrected over the grid at alpha "
               f"{ALPHA:g}; held equal: {esc(', '.join(map(str, ablation.summary.get('held_equal') or [])))}.</p>"
               if baseline else "<p>No baseline scheme in this grid, so no paired comparison.</p>")
    return against + _few_seeds_note(rows) + "<ul class=\"result\">" + "\n".join(items) + "</ul>"


def _few_seeds_note(rows: list[dict[str, Any]]) -> str:
    fewest = fewest_seeds(rows)
    if fewest >= FEW_SEEDS:
        return ""
    return (f'<p class="warn">With {_plural(fewest, "seed")} at some grid point the {LEVEL:.0%} intervals are wide '
            f"(with two seeds the Student-t factor is 12.7) and a paired test can rarely separate two schemes: run at "
            f"least {FEW_SEEDS} seeds (<code>--seeds 0,1,2</code>) before reading a small difference as real.</p>")


def _summary_table(rows: list[dict[str, Any]], colours: dict[str, str]) -> str:
    if not rows:
        return '<p class="note">summary.json has no rows yet.</p>'
    best = _best_by_depth(rows)
    others = seed_summaries()[1:]  # after the headline (final val loss): every other field aggregated over seeds
    head = ("<tr><th>#</th><th class=\"left\">scheme</th><th>depth</th><th>seeds</th><th>final val loss<br>"
            f"mean</th><th>final val loss<br>{LEVEL:.0%} interval</th><th>Δ vs best<br>of its depth</th>"
            + "".join(f"<th>{esc(field.column).replace(chr(10), '<br>')}</th>" for field in others) + "</tr>")
    body = []
    for rank, row in enumerate(rows, 1):
        mean, seeds = row.get("final_val_loss_mean"), row.get("seeds", 0)
        final = _num(mean)
        span = _interval(row.get("final_val_loss_ci_low"), row.get("final_val_loss_ci_high"))
        top = best.get(row.get("layers"))
        if top is row:
            versus = '<span class="best">best</span>'
        elif top is None or not finite_number(mean):
            versus = _num(None)
        else:
            versus = f"{mean - top['final_val_loss_mean']:+.4f}"
        seeds_text = esc(seeds) + (f' <span class="warn">+{esc(row["diverged"])} diverged</span>'
                                   if row.get("diverged") else "")
        classes = ' class="top"' if top is row else ""
        body.append(
            f"<tr{classes}><td>{rank}</td><td class=\"left\">{_swatch(row.get('residual', ''), colours)}"
            f"{esc(row.get('residual', '?'))}</td><td>{esc(row.get('layers', '?'))}</td><td>{seeds_text}</td>"
            f"<td>{final}</td><td>{span}</td><td>{versus}</td>"
            + "".join(f"<td>{_num(row.get(f'{field.key}_mean'), field.digits)}</td>" for field in others) + "</tr>")
    return f'<div class="scroll"><table class="summary">{head}\n' + "\n".join(body) + "</table></div>"


COMPARED = {"final_val_loss": "final val loss", "best_val_loss": "best val loss",
            "val_loss_at_matched_time": "val loss at matched wall time", "seconds_to_target": "seconds to target loss"}


def _comparison_table(ablation: Ablation) -> str:
    """Every paired comparison summary.json holds: each scheme against the baseline, on each compared field."""
    tests = [t for t in ablation.summary.get("comparisons") or [] if isinstance(t, dict)]
    if not tests:
        return ""
    summary = ablation.summary
    budgets = sorted({(r.get("layers"), r.get("matched_seconds"), r.get("target_loss")) for r in _rows(ablation)
                      if finite_number(r.get("matched_seconds")) and finite_number(r.get("target_loss"))}, key=str)
    budget = ("Per depth, the matched wall time is the shortest run's training time (each run's last evaluation at "
              "or before it counts, so evaluate often, --eval-interval, to use it) and the target loss the highest "
              "final val loss unless given (every run reaches it): "
              + "; ".join(f"{layers} blocks: {seconds:.1f} s, {loss:.3f}" for layers, seconds, loss in budgets)
              if budgets else "")
    head = ("<tr><th class=\"left\">field</th><th class=\"left\">scheme</th><th>depth</th><th>seeds</th>"
            f"<th>difference</th><th>{LEVEL:.0%} interval</th><th>p</th><th>p (Holm)</th><th class=\"left\">verdict"
            "</th><th>seeds needed</th></tr>")
    body = [f"<tr><td class=\"left\">{esc(COMPARED.get(t.get('metric'), t.get('metric')))}</td>"
            f"<td class=\"left\">{esc(t.get('residual'))}</td><td>{esc(t.get('layers'))}</td>"
            f"<td>{esc(t.get('n'))}</td><td>{_num(t.get('diff'))}</td>"
            f"<td>{_interval(t.get('low'), t.get('high'), signed=True)}</td><td>{_p(t.get('p'))}</td>"
            f"<td>{_p(t.get('p_holm'))}</td><td class=\"left\"><span class=\"verdict "
            f"{esc(str(t.get('verdict')).split()[0])}\">{esc(t.get('verdict'))}</span></td>"
            f"<td>{esc(t.get('seeds_needed') if t.get('seeds_needed') is not None else DASH)}</td></tr>"
            for t in tests]
    return (f"<h3>Against {esc(summary.get('baseline'))}, paired by seed</h3><p class=\"small\">Difference = scheme "
            f"minus baseline on the same seeds (lower loss and fewer seconds are better). {esc(budget)}. "
            "<i>Seeds needed</i>: how many seeds a paired t-test needs for 80% power at the observed difference and "
            f'spread. Every number is in <code>comparisons.csv</code>.</p><div class="scroll"><table class="summary">'
            f"{head}\n" + "\n".join(body) + "</table></div>")


# --- runs, command, config -----------------------------------------------------------------------------------

def _runs_table(ablation: Ablation, colours: dict[str, str]) -> str:
    if not ablation.runs:
        return '<p class="note">No run directories under runs/ yet.</p>'
    steps = ablation.steps
    body = []
    for run in sorted(ablation.runs, key=lambda r: (r.layers, ablation.schemes.index(r.residual)
                                                    if r.residual in ablation.schemes else 99, r.seed)):
        summary = run.summary or {}
        status = esc(run.status)
        if run.status == "diverged":
            status = f'<span class="warn" title="{esc(run.message)}">diverged</span>'
        elif run.status == "incomplete":
            status = f"stopped at step {esc(run.last_step)}" + (f" of {esc(steps)}" if steps else "")
        last_val = run.last_with("val_loss")
        body.append(
            f"<tr><td class=\"left\"><code>{esc(run.name)}</code></td><td class=\"left\">"
            f"{_swatch(run.residual, colours)}{esc(run.residual)}</td><td>{esc(run.layers)}</td>"
            f"<td>{esc(run.seed)}</td>"
            f"<td class=\"left\">{status}</td><td>{esc(run.last_step)}</td>"
            f"<td>{_num(summary.get('final_val_loss', last_val.get('val_loss') if last_val else None))}</td>"
            f"<td>{_num(summary.get('best_val_loss'))}</td><td>{_num(summary.get('parameters'), 0)}</td>"
            f"<td>{_num(summary.get('train_seconds'), 1)}</td>"
            f"<td>{_num(summary.get('tokens_per_second'), 0)}</td></tr>")
    diverged = [r for r in ablation.runs if r.status == "diverged" and r.message]
    notes = "".join(f"<li><code>{esc(r.name)}</code>: {esc(r.message)}</li>" for r in diverged)
    return ('<div class="scroll"><table><tr><th class="left">run directory</th><th class="left">scheme</th>'
            "<th>depth</th><th>seed</th><th class=\"left\">status</th><th>last step</th><th>final val loss</th>"
            "<th>best val loss</th><th>parameters</th><th>train s</th><th>tokens / s</th></tr>\n"
            + "\n".join(body) + "</table></div>" + (f"<ul class=\"small\">{notes}</ul>" if notes else ""))


def _config_section(ablation: Ablation) -> str:
    meta = ablation.meta
    command = meta.get("command")
    if isinstance(command, list) and command:
        command_text = command_line(*command)
    else:
        command_text = "(not recorded)"
    rows = [("model", meta.get("model")),
            ("model overrides", json.dumps(meta.get("model_overrides") or {})),
            ("grid: residual", ", ".join(map(str, (meta.get("grid") or {}).get("residual") or []))),
            ("grid: layers", ", ".join(map(str, (meta.get("grid") or {}).get("layers") or []))),
            ("grid: seeds", ", ".join(map(str, (meta.get("grid") or {}).get("seeds") or [])))]
    data = next((run.config.get("data") for run in ablation.runs if isinstance(run.config.get("data"), dict)), None)
    if data:
        rows.append(("data", f"{data.get('description', data.get('source', '?'))}: {data.get('tokens', '?'):,} tokens "
                             f"({data.get('train_tokens', '?'):,} train, {data.get('val_tokens', '?'):,} validation), "
                             f"sha256 {str(data.get('sha256', ''))[:16]}"
                     if isinstance(data.get("tokens"), int) and isinstance(data.get("train_tokens"), int)
                     and isinstance(data.get("val_tokens"), int) else json.dumps(data)))
    model_config = next((run.config.get("model_config") for run in ablation.runs
                         if isinstance(run.config.get("model_config"), dict)), None)
    if model_config:
        shown = {k: v for k, v in model_config.items() if k not in ("residual", "layers")}
        rows.append(("model config (besides the grid)", json.dumps(shown)))
    rows += [("started", _when(meta.get("started"))),
             ("finished", _when(meta.get("finished")) if meta.get("finished") else
              "not finished (interrupted, or still running)"),
             ("wall time", _duration(meta.get("wall_seconds")))]
    train = meta.get("train") or {}
    train_rows = "".join(f"<div><code class=\"key\">{esc(k)}</code> <code>{esc(json.dumps(v))}</code></div>"
                         for k, v in train.items())
    meta_rows = "".join(f"<tr><th class=\"left\">{esc(k)}</th><td class=\"left\">{esc(v)}</td></tr>" for k, v in rows)
    return (f"<h3>Command</h3><pre class=\"command\">{esc(command_text)}</pre>"
            f"<p class=\"small\">Re-running the same command into the same directory skips finished grid points and "
            f"resumes stopped ones. Rebuild this page with <code>{esc(command_line('reslab', 'report', ablation.path))}"
            f"</code>.</p><h3>Experiment</h3><table class=\"kv\">{meta_rows}</table>"
            f"<h3>Training config</h3><p class=\"small\">The same for every grid point, except <code>seed</code>, "
            f"which each run takes from the grid.</p><div class=\"cfg\">{train_rows}</div>"
            f"<details><summary>ablation.json as written</summary><pre>{esc(json.dumps(meta, indent=2))}</pre>"
            "</details>")


# --- the page --------------------------------------------------------------------------------------------------

HOW_TO_READ = """
<dl>
<dt>Validation loss</dt><dd>Cross-entropy on held-out text in nats per token; lower is better. The same validation
batches are used at every evaluation, so curves are comparable step to step. A model that guesses uniformly scores
ln(vocabulary size){uniform}. Each line is the mean over seeds; the band is the 95% Student-t interval of that mean.
The table's interval is the same for the final value. Whether a scheme is better than the baseline is decided by a
paired t-test over seeds (Holm-corrected over the grid), never by the means alone: two curves whose bands overlap
can still differ when every seed moves the same way, and two apart by more than the seed noise can fail to with
too few seeds. The forest plot shows each difference with its interval: an interval that crosses zero is "no
difference at this n".</dd>
<dt>Gradient norm per block</dt><dd>The L2 norm of all gradients inside one transformer block, before clipping.
With a residual path the gradient reaches block 0 (next to the embedding) through the identity; without one it must
pass through every sublayer's Jacobian and can shrink block by block: lines fanning out on the log scale are
vanishing (or exploding) gradients.</dd>
<dt>First-layer gradient share (grad share L0 / L<sub>last</sub>)</dt><dd>Gradient norm of block 0 divided by that of
the last block. About 1 means the bottom of the network gets as much training signal as the top; far below 1
means the signal dies on its way down; above 1 means the bottom gets more.</dd>
<dt>Stream RMS</dt><dd>The root-mean-square of the residual stream after each block (before the final norm).
Post-LN normalises after every sublayer, so its stream stays near 1; pre-LN adds each block's output to the stream,
which usually grows with depth. A stream that grows without bound makes later blocks' contributions relatively
small.</dd>
<dt>Drift</dt><dd>The cosine similarity between a block's input stream and its output stream, averaged over
positions. 1 means the block left the direction of the stream unchanged (it adds a small correction, as residual
blocks do); 0 means the output is unrelated to the input (the block replaces the stream, as happens without a skip).
The table's <i>mean drift</i> averages over blocks and all logged steps.</dd>
<dt>Update ratio</dt><dd>||F(x)|| / ||x|| for each sublayer (attention, FFN): how much a sublayer writes relative to
the stream it reads. Small ratios with drift near 1 are the residual regime; ratios near or above 1 mean the
sublayer dominates the stream.</dd>
</dl>
"""

CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #dfe3ea; --soft: #f5f7fa; --accent: #1f5fbf; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #ffffff;
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Liberation Sans",
    sans-serif; }
main { max-width: 1220px; margin: 0 auto; padding: 28px 32px 60px; }
header { border-bottom: 3px solid var(--ink); padding-bottom: 12px; margin-bottom: 8px; }
h1 { font-size: 28px; margin: 0 0 4px; letter-spacing: -0.01em; }
h2 { font-size: 21px; margin: 38px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 6px; }
p { margin: 6px 0 10px; }
.sub { color: var(--muted); margin: 0; }
nav { margin: 10px 0 0; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 16px; }
code, pre { font-family: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 0.92em; }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
  overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
pre.command { font-size: 14px; }
table { border-collapse: collapse; font-size: 14px; margin: 8px 0; }
th, td { padding: 5px 9px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
th { background: var(--soft); font-weight: 600; white-space: nowrap; line-height: 1.25; vertical-align: bottom; }
td { font-variant-numeric: tabular-nums; white-space: nowrap; }
.left { text-align: left; }
tr.top td { background: #eef5ff; }
table.kv td, table.kv th { white-space: normal; }
table.kv th { width: 240px; }
.scroll { overflow-x: auto; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 6px;
  vertical-align: baseline; }
.pm { color: var(--muted); }
.na { color: #9aa1ad; }
.best { color: #1a7f37; font-weight: 600; }
.warn { color: #b42318; font-weight: 600; }
.verdict { font-weight: 600; padding: 0 .3em; border-radius: 3px; }
.verdict.better { background: #dcfae6; color: #067647; }
.verdict.worse { background: #fee4e2; color: #b42318; }
.verdict.no, .verdict.too, .verdict.no { background: #f2f4f7; color: #475467; }
.note { color: var(--muted); font-style: italic; }
.small { font-size: 13.5px; color: var(--muted); }
ul.result { padding-left: 20px; }
ul.result li { margin: 4px 0; }
figure { margin: 18px 0 26px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { font-size: 14px; color: var(--muted); margin-top: 6px; max-width: 1000px; }
.schemes { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 14px; }
.scheme { border: 1px solid var(--line); border-radius: 8px; padding: 4px 16px 8px; background: #fcfdfe; }
.scheme h3 { margin-top: 12px; }
.scheme .formula { font-size: 16px; }
.scheme .paper { color: var(--muted); font-size: 14px; }
.scheme .facts { color: var(--muted); font-size: 13px; border-top: 1px dashed var(--line); padding-top: 6px; }
dl dt { font-weight: 600; margin-top: 10px; }
dl dd { margin: 2px 0 8px 0; }
.cfg { columns: 3 300px; column-gap: 28px; font-size: 14px; margin: 8px 0 14px; }
.cfg div { break-inside: avoid; padding: 3px 0; border-bottom: 1px solid var(--line); }
.cfg .key { display: inline-block; min-width: 150px; color: var(--muted); }
details summary { cursor: pointer; color: var(--accent); margin: 8px 0; }
footer { margin-top: 40px; color: var(--muted); font-size: 13px; border-top: 1px solid var(--line); padding-top: 10px; }
"""


def _figure_html(plot: Plot) -> str:
    data = base64.b64encode(plot.path.read_bytes()).decode("ascii")
    return (f'<figure id="plot-{esc(plot.path.stem)}"><img src="data:image/png;base64,{data}" alt="{esc(plot.title)}">'
            f"<figcaption><b>{esc(plot.title)}.</b> {esc(plot.caption)}</figcaption></figure>")


def _plots_section(plots: list[Plot]) -> str:
    """The figures, and a note naming what could not be plotted for want of data."""
    if not plots:
        return '<p class="note">No metrics were logged, so there is nothing to plot.</p>'
    missing = [name for name in expected_plots() if name not in {p.name for p in plots}]
    note = (f'<p class="note">Not plotted, because no run recorded the data: {esc(", ".join(missing))} '
            "(runs trained with <code>--no-diagnostics</code> log no gradient or stream probes).</p>"
            if missing else "")
    return "".join(_figure_html(plot) for plot in plots) + note


def render(ablation: Ablation, plots: list[Plot]) -> str:
    """The whole report as one HTML string."""
    from reslab import __version__

    colours = scheme_colours(ablation.schemes)
    rows = _rows(ablation)
    meta = ablation.meta
    model = str(meta.get("model") or ablation.summary.get("model") or "?")
    grid = (f"{_plural(len(ablation.schemes), 'scheme')} × {_plural(len(ablation.depths), 'depth')} × "
            f"{_plural(len(ablation.seeds), 'seed')}")
    title = f"Residual ablation: {model}, {', '.join(ablation.schemes) or 'no schemes'}"
    statuses = {s: sum(1 for r in ablation.runs if r.status == s)
                for s in ("finished", "diverged", "incomplete", "new")}
    run_line = ", ".join(f"{n} {s}" for s, n in statuses.items() if n) or "no runs"
    steps = ablation.steps
    uniform = (f" = {math.log(ablation.vocab_size):.2f} here (vocabulary {ablation.vocab_size})"
               if ablation.vocab_size else "")
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>",
        f"<header><h1>{esc(title)}</h1>",
        f'<p class="sub">{esc(grid)} · {esc(steps if steps is not None else "?")} training steps per run · '
        f"{esc(run_line)} · <code>{esc(ablation.path)}</code></p>",
        '<nav><a href="#result">Result</a><a href="#summary">Summary table</a><a href="#plots">Plots</a>'
        '<a href="#how-to-read">How to read this</a><a href="#schemes">Schemes</a><a href="#runs">Runs</a>'
        '<a href="#config">Command and config</a></nav></header>',
        '<h2 id="result">Result</h2>',
        _result_section(ablation, rows, colours),
        '<h2 id="summary">Summary table</h2>',
        '<p class="small">Per scheme and depth, the mean over seeds of each run\'s numbers at the end of training, '
        "best final validation loss first (the best of each depth is shaded), with the 95% interval of the mean "
        "over seeds (Student t; summary.csv has the standard deviation, min and max too). "
        "Grad share, stream RMS and drift are defined under "
        '<a href="#how-to-read">How to read this</a>.</p>',
        _summary_table(rows, colours),
        _comparison_table(ablation),
        '<h2 id="plots">Plots</h2>',
        _plots_section(plots),
        '<h2 id="how-to-read">How to read this</h2>',
        HOW_TO_READ.replace("{uniform}", esc(uniform)),
        '<h2 id="schemes">Schemes</h2>',
        '<p class="small"><code>x</code> is the residual stream entering a sublayer, <code>F</code> the sublayer '
        "(attention or FFN), <code>LN</code> the block's norm, <code>L</code> the number of blocks.</p>",
        f'<div class="schemes">{_schemes_section(ablation, colours)}</div>',
        f'<h2 id="runs">Runs</h2><details{" open" if len(ablation.runs) <= 12 else ""}><summary>'
        f"{len(ablation.runs)} run director{'y' if len(ablation.runs) == 1 else 'ies'} "
        f"under <code>runs/</code> ({esc(run_line)})</summary>{_runs_table(ablation, colours)}</details>",
        '<h2 id="config">Command and config</h2>',
        _config_section(ablation),
        f"<footer>Written by reslab {esc(__version__)} on {esc(generated)}. This file is self-contained: the plots "
        "are embedded, and it loads nothing from the network.</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"
