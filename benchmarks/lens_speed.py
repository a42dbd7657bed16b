"""The lens on any model, end to end (issue 28 item 7): how long `reslab lens hf:gpt2` takes on a 12-layer
GPT-2-small-shaped model with random weights over 256 tokens, start-up included, and how much memory it holds
beside one plain forward of the same model on the same number of tokens.

    python benchmarks/lens_speed.py                 # the issue's shape, 3 runs of each child (minutes)
    python benchmarks/lens_speed.py --quick         # a tiny shape, one run of each (seconds; what the test runs)
    python benchmarks/lens_speed.py --profile       # also: where the lens's time goes (cProfile, -X importtime)
    python benchmarks/lens_speed.py --json          # every figure as JSON
    python benchmarks/lens_speed.py --src /tmp/src  # time the reslab package under /tmp/src (a proposed change)

Each measurement is a fresh child process, what a user waits for:
- the lens: the exact `python -m reslab lens hf:gpt2 --set ... --eval-tokens N` command (COMMAND in the output);
- the forward: a child that imports what the lens imports, builds the same model the same way
  (`reslab.graph.targets.load_target`, seed 0) and runs one forward on N random ids, nothing else.
Wall time is the parent's clock around the child; CPU time (user + system) and peak resident memory (`ru_maxrss`)
are the child's own, from `os.wait4`. CPU time is the steadier figure on a shared machine: the load average is
printed beside the results. The two kinds of child alternate, so a change of load hits both.

Targets (issue 28 item 7): the lens under 10 s wall; its peak memory within 2x the forward child's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}  # GPT-2 small
QUICK_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64, "vocab_size": 512}
TOKENS, QUICK_TOKENS = 256, 32
TARGET_SECONDS, TARGET_MEMORY_RATIO = 10.0, 2.0
ENTRY = re.compile(r"^(embed|transformer\.h\.\d+)\s")  # a row of the lens's table


def lens_command(shape: dict[str, int], tokens: int) -> list[str]:
    """The lens as a user types it (after `python -m`)."""
    sets = [part for key, value in shape.items() for part in ("--set", f"{key}={value}")]
    return ["reslab", "lens", "hf:gpt2", *sets, "--eval-tokens", str(tokens)]


SOURCE = {"src": ROOT / "src"}  # the reslab the children import: this tree's, or --src


def child_env() -> dict[str, str]:
    """The source tree first on the path, so the children run the code beside this script (or --src's)."""
    path = os.pathsep.join(filter(None, [str(SOURCE["src"]), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def measure(command: list[str]) -> dict:
    """Run `command` as a child: its wall seconds, CPU seconds (user + system), peak RSS in MiB and stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, env=child_env(), cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {child.returncode}: {stderr.strip()[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_mib": usage.ru_maxrss / 1024,
            "stdout": stdout, "stderr": stderr}


def forward_child(shape: dict[str, int], tokens: int) -> None:
    """The baseline: build the lens's model as the lens builds it, run one forward on `tokens` ids, print the
    peak RSS once built and the weights' size (MiB) as JSON."""
    import torch
    import transformers  # noqa: F401 - what the lens imports, in both children

    from reslab.graph.targets import load_target

    torch.manual_seed(0)  # as `reslab lens --seed 0`
    model = load_target("hf:gpt2", shape, device="cpu").model.eval()
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = torch.randint(0, shape["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, tokens, shape["vocab_size"])
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(json.dumps({"built_rss_mib": built, "weights_mib": weights}))


def run_pairs(shape: dict[str, int], tokens: int, runs: int) -> tuple[list[dict], list[dict]]:
    """`runs` lens children and `runs` forward children, alternated."""
    lens = [sys.executable, "-m", *lens_command(shape, tokens)]
    forward = [sys.executable, str(Path(__file__).resolve()), "--forward-child", json.dumps(shape), str(tokens)]
    lenses, forwards = [], []
    for _ in range(runs):
        lenses.append(measure(lens))
        forwards.append(measure(forward))
        forwards[-1].update(json.loads(forwards[-1]["stdout"]))
    return lenses, forwards


def summary(measured: list[dict], keys: tuple[str, ...]) -> dict:
    """Each figure's values over the runs and their median."""
    record = {}
    for key in keys:
        values = [m[key] for m in measured]
        record[key] = [round(v, 3) for v in values]
        record[f"median_{key}"] = round(statistics.median(values), 3)
    return record


def verdicts(lens: dict, forward: dict) -> dict:
    """The issue's two targets against the medians; `extra_mib`: the lens's peak above the forward's (what the
    lens holds beyond running the model once), also as a fraction of the model's weights."""
    ratio = lens["median_maxrss_mib"] / forward["median_maxrss_mib"]
    extra = lens["median_maxrss_mib"] - forward["median_maxrss_mib"]
    return {"seconds": TARGET_SECONDS, "seconds_met": lens["median_wall_s"] < TARGET_SECONDS,
            "memory_ratio": round(ratio, 3), "memory_ratio_target": TARGET_MEMORY_RATIO,
            "memory_met": ratio <= TARGET_MEMORY_RATIO, "extra_mib": round(extra, 1),
            "extra_of_weights": round(extra / forward["median_weights_mib"], 3)}


def import_times(stderr: str, top: int = 6) -> list[tuple[str, float]]:
    """The slowest top-level imports of a `python -X importtime` child: (package, cumulative seconds)."""
    found = []
    for line in stderr.splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and not parts[2].startswith("  "):
            if parts[1].strip().isdigit():
                found.append((parts[2].strip(), int(parts[1]) / 1e6))
    return sorted(found, key=lambda item: -item[1])[:top]


def profile(shape: dict[str, int], tokens: int, top: int = 12) -> dict:
    """One lens child under cProfile and -X importtime: its slowest imports, the functions with the most time of
    their own, and reslab's functions by cumulative time (the profiler's overhead inflates every figure)."""
    import pstats

    with tempfile.TemporaryDirectory() as scratch:
        stats_file = Path(scratch) / "lens.prof"
        command = [sys.executable, "-X", "importtime", "-m", "cProfile", "-o", str(stats_file), "-m",
                   *lens_command(shape, tokens)]
        measured = measure(command)
        stats = pstats.Stats(str(stats_file)).stats

    def rows(key: int, keep) -> list[dict]:
        picked = sorted(((f, s) for f, s in stats.items() if keep(f)), key=lambda item: -item[1][key])[:top]
        return [{"function": f"{Path(f[0]).name}:{f[1]}({f[2]})", "calls": s[1], "own_s": round(s[2], 3),
                 "cumulative_s": round(s[3], 3)} for f, s in picked]
    return {"wall_s": round(measured["wall_s"], 3), "imports": import_times(measured["stderr"]),
            "own_time": rows(2, lambda f: True), "reslab": rows(3, lambda f: f"{os.sep}reslab{os.sep}" in f[0])}


def measure_all(quick: bool, runs: int, with_profile: bool) -> dict:
    """Every figure of one benchmark: the machine, both children's runs and medians, the verdicts."""
    shape, tokens = (QUICK_SHAPE, QUICK_TOKENS) if quick else (SHAPE, TOKENS)
    load_before = os.getloadavg()
    lenses, forwards = run_pairs(shape, tokens, runs)
    lens = {**summary(lenses, ("wall_s", "cpu_s", "maxrss_mib")),
            "entries": len([line for line in lenses[0]["stdout"].splitlines() if ENTRY.match(line)])}
    forward = summary(forwards, ("wall_s", "cpu_s", "maxrss_mib", "built_rss_mib", "weights_mib"))
    record = {"command": "python -m " + " ".join(lens_command(shape, tokens)), "shape": shape, "tokens": tokens,
              "runs": runs, "quick": quick, "src": str(SOURCE["src"]),
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                          "load_before": [round(x, 2) for x in load_before],
                          "load_after": [round(x, 2) for x in os.getloadavg()]},
              "lens": lens, "forward": forward, "targets": verdicts(lens, forward)}
    if with_profile:
        record["profile"] = profile(shape, tokens)
    return record


def report(record: dict) -> None:
    """The figures as text."""
    machine, lens, forward, targets = record["machine"], record["lens"], record["forward"], record["targets"]
    print(f"command: {record['command']} (reslab from {record['src']})")
    print(f"{machine['cpus']} CPUs, Python {machine['python']}, load average {machine['load_before'][0]} before, "
          f"{machine['load_after'][0]} after; {record['runs']} run(s) of each child, alternated")
    print(f"{'child':<10}{'wall s (median)':>17}{'CPU s (median)':>16}{'peak RSS MiB':>14}   runs (wall s)")
    for name, row in (("lens", lens), ("forward", forward)):
        print(f"{name:<10}{row['median_wall_s']:>17.2f}{row['median_cpu_s']:>16.2f}{row['median_maxrss_mib']:>14.0f}"
              f"   {', '.join(f'{v:.2f}' for v in row['wall_s'])}")
    print(f"lens entries: {lens['entries']}; the model's weights: {forward['median_weights_mib']:.0f} MiB; the "
          f"forward child's peak once the model is built: {forward['median_built_rss_mib']:.0f} MiB")
    print(f"target: under {targets['seconds']:g} s wall: {'met' if targets['seconds_met'] else 'NOT MET'} "
          f"({lens['median_wall_s']:.2f} s)")
    print(f"target: peak memory within {targets['memory_ratio_target']:g}x the forward's: "
          f"{'met' if targets['memory_met'] else 'NOT MET'} ({targets['memory_ratio']:.2f}x; the lens holds "
          f"{targets['extra_mib']:.0f} MiB more, {targets['extra_of_weights']:.2f}x the weights)")
    if "profile" in record:
        found = record["profile"]
        print(f"profile (one child under cProfile, {found['wall_s']:.1f} s): slowest imports "
              + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in found["imports"]))
        for title, rows in (("most own time", found["own_time"]), ("reslab by cumulative time", found["reslab"])):
            print(f"  {title}:")
            for row in rows:
                print(f"    {row['own_s']:>8.2f} own {row['cumulative_s']:>8.2f} cum {row['calls']:>7}x "
                      f"{row['function']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny shape, one run of each child")
    parser.add_argument("--runs", type=int, help="runs of each child (default 3; 1 with --quick)")
    parser.add_argument("--profile", action="store_true", help="also profile one lens child")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the directory holding the reslab package "
                        "the children run (default: this tree's src)")
    parser.add_argument("--forward-child", nargs=2, metavar=("SHAPE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.forward_child:
        forward_child(json.loads(args.forward_child[0]), int(args.forward_child[1]))
        return 0
    runs = args.runs or (1 if args.quick else 3)
    if runs < 1:
        parser.error("--runs must be at least 1")
    if not (args.src / "reslab" / "__init__.py").is_file():
        parser.error(f"--src {args.src} holds no reslab package (reslab/__init__.py)")
    SOURCE["src"] = args.src.resolve()
    record = measure_all(args.quick, runs, args.profile)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        report(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
