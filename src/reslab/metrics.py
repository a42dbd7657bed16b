"""Every metric reslab logs, declared once: what it is, where it comes from, and where it goes.

A `Metric` names a key of a metrics.jsonl record. Everything downstream iterates these declarations: the schema of
metrics.jsonl (`rundir.METRIC_KEYS`), TensorBoard (`tensorboard_scalars`), the run's summary.json
(`run_summary`), the ablation's aggregation over seeds (`seed_summaries`, `point_values`), the plots (`in_figure`,
`figures`) and the report's table. Adding a metric is its computation plus one declaration here:

    register(Metric("weight_rms", unit="", description="RMS of all weights", source="the model, on log steps",
                    compute=lambda model, result: ...,  # only for a metric no built-in source writes
                    tensorboard="weight_rms", summaries=(Summary("final_weight_rms", "last", seeds=VALUE),),
                    plot=Plotted("weight_rms", "weight RMS")))

Torch-free (the CLI's `--help` and the report read it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

# shapes of a metric's value in a record
SCALAR = "scalar"
PER_BLOCK = "per_block"  # a list, one value per block (0 = next to the embedding)
PER_SUBLAYER = "per_sublayer"  # per block, a list of [attention, FFN]
BY_NAME = "by_name"  # an object of scalars by name
OTHER = "other"  # anything else (nested lists): logged, not plotted or sent to TensorBoard
SUBLAYERS = ("attention", "ffn")  # a PER_SUBLAYER value's sublayers, in order (TensorBoard's TAG/blockN/attention)

# reductions over steps (of one run's records) and over seeds (of a grid point's runs)
LAST, BEST, MEAN, RUN = "last", "best", "mean", "run"
VALUE, LAST_BLOCK = "value", "last_block"
SEED_STATS = ("mean", "std", "ci_low", "ci_high", "min", "max")  # ci: the 95% Student-t interval of the mean


@dataclass(frozen=True)
class Summary:
    """One field of a run's summary.json made from a metric. `over_steps`: LAST (the last record with the metric),
    BEST (the lowest), MEAN (of every value, lists flattened) or RUN (the trainer's own figure for the whole run).
    `seeds`: None (not aggregated), VALUE or LAST_BLOCK (a per-block list's block next to the head); aggregated as
    `<key>_mean/std/ci_low/ci_high/min/max` in the ablation's summary and shown in its tables as `column` with
    `digits`."""

    key: str
    over_steps: str
    seeds: str | None = None
    column: str = ""
    digits: int = 3


@dataclass(frozen=True)
class Plotted:
    """How the report plots a metric: in `figure` (plots/<figure>.png, shared with other metrics of that figure;
    a name no built-in figure has gets a figure of its own, value vs step), labelled `label`. `expected`: the report
    names the figure as not plotted when no run recorded it (False for metrics only some schemes log). `reference`:
    the value a dotted line marks in the panels that plot each metric on its own (e.g. 1 for a gain), if any."""

    figure: str
    label: str
    log: bool = False
    expected: bool = True
    reference: float | None = None


@dataclass(frozen=True)
class Metric:
    name: str  # its key in metrics.jsonl
    unit: str
    description: str
    source: str  # where it is computed
    shape: str = SCALAR
    tensorboard: str | None = None  # its tag for the trackers (a prefix for per-block, per-sublayer, by-name values)
    summaries: tuple[Summary, ...] = ()
    plot: Plotted | None = None
    timing: bool = False  # differs between two runs of the same config
    compute: Callable[[Any, Any], Any] | None = None  # (model, step result) -> value, on log steps


NATS = "nats / token"
_SUMS_SOURCE = "residual/multistream.py connection_sums"
_ON_SITES = (" (multi-stream schemes: each site's weights averaged over the tokens of the probed forward, then over "
             "ranks; H_res multiplies the streams, H_pre reads the sublayer's input, H_post writes its output)")
_CONNECTION_SUMS = (  # mHC's notation (arXiv 2512.24880): x' = H_res x + H_post^T F(H_pre x), row sum = forward gain
    Metric("h_res_row_sum_dev", "|sum - 1|", "largest |row sum - 1| of H_res over the sites and rows: how far one "
           "site's skip mix scales an output stream's signal; 0 for a doubly-stochastic mix (mhc)" + _ON_SITES,
           _SUMS_SOURCE, tensorboard="connection_sums/h_res_row_dev",
           plot=Plotted("connection_sums", "H_res: largest |row sum - 1|", expected=False, reference=0.0)),
    Metric("h_res_col_sum_dev", "|sum - 1|", "largest |column sum - 1| of H_res over the sites and columns: the "
           "same for the gradient flowing back into an input stream" + _ON_SITES, _SUMS_SOURCE,
           tensorboard="connection_sums/h_res_col_dev",
           plot=Plotted("connection_sums", "H_res: largest |column sum - 1|", expected=False, reference=0.0)),
    Metric("h_res_sum_mean", "sum", "mean row sum of H_res over the sites (equal to its mean column sum); 1 for the "
           "identity (gated-hc, which has no stream mix) and any doubly-stochastic mix" + _ON_SITES, _SUMS_SOURCE,
           tensorboard="connection_sums/h_res_mean",
           plot=Plotted("connection_sums", "H_res: mean row (= column) sum", expected=False, reference=1.0)),
    Metric("h_pre_sum_mean", "sum", "mean over the sites of the sum of H_pre, the read weights (gated-hc: its read "
           "gate's mean over streams and channels; frac: per fraction; altup: row 0 of I + C)" + _ON_SITES,
           _SUMS_SOURCE, tensorboard="connection_sums/h_pre_mean",
           plot=Plotted("connection_sums", "H_pre: mean sum", expected=False)),
    Metric("h_post_sum_mean", "sum", "mean over the sites of the sum of H_post, the write weights (n for HC's init; "
           "gated-hc: its injection weights; frac: per fraction; altup: the correction scales c)" + _ON_SITES,
           _SUMS_SOURCE, tensorboard="connection_sums/h_post_mean",
           plot=Plotted("connection_sums", "H_post: mean sum", expected=False)),
)
_BUILT_IN = (
    Metric("step", "steps", "optimizer steps completed (every record)", "the trainer"),
    Metric("val_loss", NATS, "validation loss on fixed batches (eval steps)", "the evaluator", tensorboard="val_loss",
           summaries=(Summary("final_val_loss", LAST, VALUE, "final val loss", 4),
                      Summary("best_val_loss", BEST, VALUE, "best\nval loss", 4)),
           plot=Plotted("loss", "validation loss")),
    Metric("train_loss_eval", NATS, "training loss on fixed batches (eval steps)", "the evaluator",
           tensorboard="train_loss_eval", summaries=(Summary("final_train_loss", LAST),)),
    Metric("loss", NATS, "mean training loss (cross-entropy) over the steps since the previous log record",
           "the trainer's log window", tensorboard="loss", plot=Plotted("loss", "training loss (log-window mean)")),
    Metric("lr", "", "learning rate of the logged step", "the schedule", tensorboard="lr"),
    Metric("grad_norms", "", "gradient norm of every parameter, by name", "probe/grads.py", OTHER),
    Metric("grad_norm_total", "", "global gradient norm, before clipping", "probe/grads.py",
           tensorboard="grad_norm_total"),
    Metric("block_grad_norms", "gradient L2 norm", "gradient norm of each block's parameters", "probe/grads.py",
           PER_BLOCK, tensorboard="block_grad_norms", plot=Plotted("grads", "gradient L2 norm", log=True)),
    Metric("first_layer_grad_share", "", "first block's gradient norm over the last block's", "probe/grads.py",
           tensorboard="first_layer_grad_share",
           summaries=(Summary("first_layer_grad_share", LAST, VALUE, "grad share\nL0 / Llast"),)),
    Metric("stream_rms", "RMS", "RMS of the residual stream after each block", "probe/stream.py", PER_BLOCK,
           tensorboard="stream_rms",
           summaries=(Summary("final_stream_rms", LAST, LAST_BLOCK, "stream RMS\nlast block"),),
           plot=Plotted("profile", "stream RMS after the block", log=True)),
    Metric("drift", "cosine similarity", "cosine between the stream entering and leaving each block",
           "probe/stream.py", PER_BLOCK, tensorboard="drift",
           summaries=(Summary("final_drift", LAST), Summary("mean_drift", MEAN, VALUE, "mean\ndrift")),
           plot=Plotted("profile", "drift: cos(block input, output)")),
    Metric("update_ratio", "ratio", "per block, |F(x)| / |x| of each sublayer", "probe/stream.py", PER_SUBLAYER,
           tensorboard="update_ratio", plot=Plotted("profile", "update ratio ||F(x)|| / ||x||", log=True)),
    Metric("amax_gain_forward", "Amax gain", "hyper-connections: largest gain of the composed stream mixing, forward "
           "(Amax)", "residual/multistream.py scheme_metrics", tensorboard="amax_gain/forward",
           plot=Plotted("amax", "forward: largest row sum", log=True, expected=False, reference=1.0)),
    Metric("amax_gain_backward", "Amax gain", "hyper-connections: the same for the backward pass",
           "residual/multistream.py scheme_metrics", tensorboard="amax_gain/backward",
           plot=Plotted("amax", "backward: largest column sum", log=True, expected=False, reference=1.0)),
    *_CONNECTION_SUMS,
    Metric("attnres_weights", "", "attention residuals: mean depth-attention weight of each source, per sublayer",
           "residual/attnres.py scheme_metrics", OTHER),
    Metric("dual_stream_rms", "RMS", "resi-dual: RMS of the un-normalised dual stream d after each block",
           "residual/resi_dual.py scheme_metrics", PER_BLOCK, tensorboard="dual_stream_rms"),
    Metric("depth_coefficients", "", "connections across depth: each one's learned coefficients (residual scales, "
           "x0 and skip weights, gates, the depth-weight matrix), connection -> name -> one value per site",
           "residual/depth/base.py scheme_metrics", OTHER),  # drawn as a matrix: report/plots.py plot_depth_weights
    Metric("aux_losses", NATS, "each auxiliary loss of the model (ModelOutput.aux_losses), unweighted, on log steps",
           "the model's forward", BY_NAME, tensorboard="aux"),
    Metric("model_metrics", "", "the model's own metrics (ModelOutput.metrics), on log steps", "the model's forward",
           OTHER),
    Metric("tokens_per_second", "tokens / s",
           "training throughput over the log window (timing: differs between runs)", "the trainer's log window",
           tensorboard="tokens_per_second", timing=True,
           summaries=(Summary("tokens_per_second", RUN, VALUE, "tokens / s", 0),)),
    Metric("train_seconds", "s", "training time so far, evaluations excluded (timing: differs between runs)",
           "the trainer", timing=True, summaries=(Summary("train_seconds", RUN),)),
)

# The registry, in declaration order (the order of summaries and table columns). Looked up at use, so a metric
# registered later (a plug-in, a test) is seen everywhere.
METRICS: dict[str, Metric] = {metric.name: metric for metric in _BUILT_IN}


def register(metric: Metric) -> Metric:
    """Add a metric (a name already declared is refused: one declaration per fact)."""
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is already declared")
    METRICS[metric.name] = metric
    return metric


def declared() -> list[Metric]:
    return list(METRICS.values())


def computed(model: Any, result: Any) -> dict[str, Any]:
    """The values of the metrics that bring their own computation, for a log step's record."""
    return {m.name: m.compute(model, result) for m in declared() if m.compute is not None}


# -- TensorBoard -------------------------------------------------------------------------------------------------

def tensorboard_scalars(record: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) of every scalar a record holds for the trackers (TensorBoard, W&B): per block as TAG/blockN, per
    sublayer as TAG/blockN/attention and TAG/blockN/ffn, by name as TAG/NAME. Every plotted metric has a tag."""
    for metric in declared():
        value = record.get(metric.name)
        if metric.tensorboard is None or value is None:
            continue
        if metric.shape == SCALAR:
            yield metric.tensorboard, value
        elif metric.shape == PER_BLOCK:
            yield from ((f"{metric.tensorboard}/block{layer}", v) for layer, v in enumerate(value))
        elif metric.shape == BY_NAME:
            yield from ((f"{metric.tensorboard}/{name}", v) for name, v in value.items())
        elif metric.shape == PER_SUBLAYER:
            yield from ((f"{metric.tensorboard}/block{layer}/{_sublayer(i)}", v)
                        for layer, values in enumerate(value) for i, v in enumerate(values))


def _sublayer(index: int) -> str:
    return SUBLAYERS[index] if index < len(SUBLAYERS) else f"sublayer{index}"


# -- summaries over steps (one run) and over seeds (a grid point) --------------------------------------------------

def run_summary(records: Iterable[dict[str, Any]], totals: dict[str, Any]) -> dict[str, Any]:
    """The summary.json fields made from metrics: each declared `Summary` reduced over the run's records (`totals`:
    the trainer's figures for the whole run, for RUN)."""
    records = list(records)
    fields: dict[str, Any] = {}
    for metric in declared():
        values = [r[metric.name] for r in records if metric.name in r]
        for summary in metric.summaries:
            fields[summary.key] = totals.get(summary.key) if summary.over_steps == RUN else _over_steps(
                values, summary.over_steps)
    return fields


def _over_steps(values: list[Any], how: str) -> Any:
    if how == LAST:
        return values[-1] if values else None
    if how == BEST:  # the lowest, as the evaluator keeps it (a non-finite value never replaces a kept one)
        best = None
        for value in values:
            if value is not None and (best is None or value < best):
                best = value
        return best
    if how == MEAN:
        flat = [v for value in values for v in (value if isinstance(value, list) else [value]) if v is not None]
        return sum(flat) / len(flat) if flat else None
    raise ValueError(f"unknown reduction over steps {how!r}")


def seed_summaries() -> list[Summary]:
    """The summary fields aggregated over seeds, in declaration order (the first is the headline)."""
    return [s for metric in declared() for s in metric.summaries if s.seeds is not None]


def point_values(summary: dict[str, Any]) -> dict[str, float | None]:
    """One run's scalar of each field aggregated over seeds."""
    values = {}
    for field in seed_summaries():
        value = summary.get(field.key)
        values[field.key] = (value[-1] if value else None) if field.seeds == LAST_BLOCK else value
    return values


def seed_stats(values: list[float | None]) -> dict[str, float | None]:
    """mean, std (sample), the 95% interval of the mean (reslab.stats), min and max of the finite values; None
    where there are too few."""
    from reslab.stats import interval

    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return dict.fromkeys(SEED_STATS)
    spread = interval(values)
    return {"mean": spread.mean, "std": spread.std, "ci_low": spread.low, "ci_high": spread.high,
            "min": min(values), "max": max(values)}


# -- plots ---------------------------------------------------------------------------------------------------------

def in_figure(figure: str) -> list[Metric]:
    return [m for m in declared() if m.plot is not None and m.plot.figure == figure]


def figures(expected_only: bool = False) -> list[str]:
    """Every figure a declaration names, in declaration order."""
    names = [m.plot.figure for m in declared() if m.plot is not None and (m.plot.expected or not expected_only)]
    return list(dict.fromkeys(names))
