"""Audit of a 7B-parameter Llama configuration on the meta device: time and peak memory (issue 5's target: under
10 s and 2 GiB).

    python benchmarks/audit_meta_7b.py              # reslab's llama and hf:llama, 3 fresh processes each
    python benchmarks/audit_meta_7b.py --repeat 5 --json

The configuration: hidden 4096, 32 layers, 32 heads, 8 kv-heads, FFN 14336, vocabulary 32000 (Mistral-7B's shape
with untied embeddings: 7.2 B parameters, 29 GB in fp32 if they were allocated).

Each measurement runs in a fresh Python process, so its peak resident memory (ru_maxrss) is that audit's alone:
- `worker`: the process imports reslab (and transformers), builds the model on the meta device, traces one forward
  and analyses it, timing each phase;
- `cli`: the whole `reslab audit TARGET --json` command, as a user meets it: wall clock, CPU time (user + system,
  which a busy machine inflates less than the wall clock) and peak memory.
Reported: the median over `--repeat` runs, and the machine's load average (the figures are CPU-bound and shift on
a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 4096, 32, 32, 8, 14336, 32000
TARGETS = {
    "reslab llama": ["llama", "--width", WIDTH, "--layers", LAYERS, "--heads", HEADS, "--kv-heads", KV_HEADS,
                     "--ffn-hidden", FFN, "--context", 4096, "--set", f"vocab_size={VOCAB}"],
    "hf:llama": ["hf:llama", "--set", f"hidden_size={WIDTH}", "--set", f"num_hidden_layers={LAYERS}",
                 "--set", f"num_attention_heads={HEADS}", "--set", f"num_key_value_heads={KV_HEADS}",
                 "--set", f"intermediate_size={FFN}", "--set", f"vocab_size={VOCAB}"],
}
REPO = Path(__file__).resolve().parents[1]


def worker(name: str) -> dict:
    """Runs in a fresh process: time each phase of one audit."""
    started = time.perf_counter()
    import torch  # noqa: F401

    from reslab.cli import build_parser
    from reslab.graph.audit import audit_trace
    from reslab.graph.commands import target_overrides
    from reslab.graph.targets import load_target
    from reslab.graph.trace import trace_model

    args = build_parser().parse_args(["audit", *map(str, TARGETS[name])])
    overrides = target_overrides(args)
    if args.target.startswith("hf:"):
        import transformers  # noqa: F401
    imported = time.perf_counter()
    target = load_target(args.target, overrides, "meta")
    built = time.perf_counter()
    trace = trace_model(target.model, target.inputs)
    traced = time.perf_counter()
    result = audit_trace(trace, target.label)
    done = time.perf_counter()
    return {
        "parameters": sum(p.numel() for p in target.model.parameters()),
        "allocated_bytes": sum(p.untyped_storage().nbytes() for p in target.model.parameters()
                               if p.device.type != "meta"),
        "residuals": len(result.residuals), "blocks": len(result.blocks), "nodes": len(trace.nodes),
        "import_s": imported - started, "build_s": built - imported, "trace_s": traced - built,
        "analyse_s": done - traced, "audit_s": done - imported,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_process(argv: list[str]) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak RSS MiB, stdout) of one child process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, text=True, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage, unlike RUSAGE_CHILDREN
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{' '.join(argv)} failed: {err.read().strip()[-500:]}")
        return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out.read()


def measure(name: str, repeat: int) -> dict:
    workers, clis = [], []
    for _ in range(repeat):
        workers.append(json.loads(run_process([sys.executable, __file__, "--worker", name])[3]))
        wall, cpu, peak, out = run_process([sys.executable, "-m", "reslab", "audit", *map(str, TARGETS[name]),
                                            "--json"])
        clis.append({"cli_wall_s": wall, "cli_cpu_s": cpu, "cli_peak_rss_mib": peak,
                     "cli_residuals": json.loads(out)["summary"]["residual_count"]})
    median = {key: statistics.median(w[key] for w in workers) for key in workers[0]}
    median.update({key: statistics.median(c[key] for c in clis) for key in clis[0]})
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=list(TARGETS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    results = {name: measure(name, args.repeat) for name in TARGETS}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.json:
        print(json.dumps({"load_average": load, "cpus": os.cpu_count(), "results": results}, indent=2))
        return
    print(f"7B Llama configuration on the meta device; median of {args.repeat} fresh processes; "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{'target':<14} {'params':>7} {'import':>7} {'build':>6} {'trace':>6} {'analyse':>8} {'audit':>6} "
          f"{'peak RSS':>9} | {'CLI wall':>8} {'CLI CPU':>7} {'CLI peak':>9}")
    for name, r in results.items():
        print(f"{name:<14} {r['parameters'] / 1e9:>6.2f}B {r['import_s']:>6.2f}s {r['build_s']:>5.2f}s "
              f"{r['trace_s']:>5.2f}s {r['analyse_s']:>7.2f}s {r['audit_s']:>5.2f}s {r['peak_rss_mib']:>5.0f} MiB | "
              f"{r['cli_wall_s']:>7.2f}s {r['cli_cpu_s']:>6.2f}s {r['cli_peak_rss_mib']:>5.0f} MiB")
        assert r["allocated_bytes"] == 0 and r["residuals"] == r["cli_residuals"] == 2 * LAYERS


if __name__ == "__main__":
    main()
