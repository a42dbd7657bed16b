"""How far one `reslab train` call travels before its first optimizer step: the reslab modules whose functions it
enters (imports not counted), and the calls that cross from one module into another (as distinct caller -> callee
module pairs, and in all: the step-0 evaluation's loop over batches repeats some of them).

    python benchmarks/train_path.py                     # this working tree
    python benchmarks/train_path.py --before d7d2176    # and the source of that commit, side by side
    python benchmarks/train_path.py --before a8ac529 11df8fe   # several commits

A profiler hook (`sys.setprofile`) records every reslab function entered while `reslab train --model tiny --steps 1`
runs in this process, from `reslab.cli.main` to the first `TrainStep.__call__`; calls made while a module is being
imported are left out (they happen once per process, not per run). Modules that build the model (`models.*`,
`nn.*`, `residual.*`) are counted apart from the plumbing around them.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
MODEL_PARTS = ("reslab.models", "reslab.nn", "reslab.residual")


def importing(frame) -> bool:
    """Whether a reslab module's body is on the stack (the call is part of an import)."""
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__", "").startswith("reslab"):
            return True
        frame = frame.f_back
    return False


def trace_path(out: Path) -> dict:
    from reslab import cli

    modules: collections.Counter = collections.Counter()
    crossings: collections.Counter = collections.Counter()
    reached = []

    def hook(frame, event, arg):
        name = frame.f_globals.get("__name__", "")
        if reached or event != "call" or not name.startswith("reslab") or importing(frame):
            return
        modules[name] += 1
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back is not None else ""
        if caller.startswith("reslab") and caller != name:
            crossings[(caller, name)] += 1
        if name == "reslab.train.step" and frame.f_code.co_name == "__call__":
            reached.append(True)

    sys.setprofile(hook)
    try:
        cli.main(["train", "--model", "tiny", "--steps", "1", "--no-progress", "--data", str(DATA),
                  "--out", str(out / "run")])
    finally:
        sys.setprofile(None)
    model = [m for m in modules if m.startswith(MODEL_PARTS)]
    return {"modules": len(modules), "model_modules": len(model), "plumbing_modules": len(modules) - len(model),
            "crossings": sum(crossings.values()), "edges": len(crossings),
            "plumbing": sorted(m for m in modules if m not in model)}


def measure(src: Path | None) -> dict:
    """Trace in a fresh interpreter (imports cold, nothing cached from an earlier trace)."""
    with tempfile.TemporaryDirectory() as tmp:
        env_path = f"import sys; sys.path.insert(0, {str(src)!r}); " if src else ""
        code = (f"{env_path}import json, pathlib, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                f"import train_path; print(json.dumps(train_path.trace_path(pathlib.Path({tmp!r}))))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", nargs="+", default=[], help="also trace the source of these git commits")
    args = parser.parse_args()
    rows = {"this tree": measure(None)}
    for commit in args.before:
        with tempfile.TemporaryDirectory() as tmp:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], check=True,
                                     capture_output=True)
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            rows[commit] = measure(Path(tmp) / "src")
    print(f"{'':12} {'modules':>8} {'model':>6} {'plumbing':>9} {'module pairs':>13} {'cross-module calls':>19}")
    for label, row in rows.items():
        print(f"{label:12} {row['modules']:>8} {row['model_modules']:>6} {row['plumbing_modules']:>9} "
              f"{row['edges']:>13} {row['crossings']:>19}")
    for label, row in rows.items():
        print(f"{label} plumbing: {', '.join(m.removeprefix('reslab.') for m in row['plumbing'])}")


if __name__ == "__main__":
    main()
