"""reslab against the libraries a user would pick instead, on nanoGPT's shakespeare-char CPU recipe, side by side.

    python benchmarks/peers.py --data ../shared/data/tinyshakespeare.txt --steps 300 --rounds 3
    python benchmarks/peers.py --data ../shared/data/tinyshakespeare.txt --steps 2000 --rounds 1  # equal loss?
    python benchmarks/peers.py ... --nanogpt ~/src/nanoGPT   # the real nanoGPT train.py from a local checkout

Every contestant is a whole training run in its own process, launched by this script, and the contestants take
turns round by round (the order rotates each round), so load from other processes hits them alike:

- reslab's default path: `reslab train --recipe nanogpt-cpu` (`--dtype auto`: bf16 autocast on a CPU with AMX or
  AVX512-BF16, fp32 elsewhere), and the same with `--dtype fp32`;
- nanoGPT: its own `train.py` with the CPU command of its README when `--nanogpt PATH` names a checkout (run from a
  scratch directory holding its `data/shakespeare_char` prepared from `--data`), else the stand-in
  `benchmarks/nanogpt_ref.py` (nanoGPT's model and loop re-created) as a script;
- x-transformers: `TransformerWrapper` + `Decoder` of the same shape (4 layers, 4 heads, width 128, context 64,
  vocabulary 65, tied embedding, no feed-forward bias) in the same nanoGPT-style loop as the stand-in.

Each reports its median ms per iteration (steady state, evaluations excluded: nanoGPT's own per-iteration log,
reslab's metrics.jsonl windows) and its final validation loss; this script adds the process's wall time. The table
gives medians over rounds and the median of per-round ratios against nanoGPT (its time / the contestant's).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
NANOGPT = "nanoGPT"
RESLAB_RECIPE = "nanogpt-cpu"


def reslab_command(*extra: str):
    """`reslab train` with the recipe, plus `extra` flags (none: reslab's defaults, --dtype auto)."""
    def command(args, out: Path, seed: int) -> list[str]:
        return [sys.executable, "-m", "reslab", "train", "--recipe", RESLAB_RECIPE, "--data", args.data,
                "--steps", str(args.steps), "--seed", str(seed), "--out", str(out / "run"), "--overwrite",
                "--eval-batches", str(args.eval_iters), "--eval-interval", str(args.eval_interval),
                "--no-progress", "--json", *extra]
    return command


def reslab_result(stdout: str, out: Path) -> dict:
    summary = json.loads(stdout[stdout.index("{"):])
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_second"] for r in records if r.get("tokens_per_second")]
    tokens = 12 * 64  # the recipe's batch x context
    return {"ms_per_iter": 1000 * statistics.median(tokens / rate for rate in rates[1:] or rates),
            "val_loss": summary["final_val_loss"], "parameters": summary["parameters"]}


def nanogpt_command(args, out: Path, seed: int) -> list[str]:
    if not args.nanogpt:
        return [sys.executable, str(HERE / "nanogpt_ref.py"), *peer_flags(args, seed)]
    checkout = Path(args.nanogpt).resolve()
    prepare_nanogpt_dir(out, checkout, args.data)
    # nanoGPT's README, "I only have a macbook": its CPU run of the shakespeare-char config.
    return [sys.executable, str(checkout / "train.py"), str(checkout / "config" / "train_shakespeare_char.py"),
            "--device=cpu", "--compile=False", f"--eval_iters={args.eval_iters}", "--log_interval=1",
            f"--eval_interval={args.eval_interval}", "--block_size=64",
            "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={args.steps}",
            f"--lr_decay_iters={args.steps}", "--dropout=0.0", f"--out_dir={out / 'out'}",
            f"--always_save_checkpoint={args.full_val}"]  # seed: always 1337


def prepare_nanogpt_dir(out: Path, checkout: Path, data: str) -> None:
    """A scratch working directory for nanoGPT's train.py: its configurator (it reads ./configurator.py) and
    data/shakespeare_char/{train,val}.bin + meta.pkl written as its prepare.py writes them, from `data`."""
    from nanogpt_ref import char_splits

    target = out / "data" / "shakespeare_char"
    target.mkdir(parents=True, exist_ok=True)
    (out / "configurator.py").symlink_to(checkout / "configurator.py")
    train, val, vocab = char_splits(data)
    train.tofile(target / "train.bin")
    val.tofile(target / "val.bin")
    chars = sorted(set(Path(data).read_text(encoding="utf-8")))
    with open(target / "meta.pkl", "wb") as handle:
        pickle.dump({"vocab_size": vocab, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}},
                    handle)


def nanogpt_result(stdout: str, out: Path) -> dict:
    if stdout.lstrip().startswith("{"):  # the stand-in prints its JSON line
        return json.loads(stdout)
    times = [float(t) for t in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", stdout, re.M)]
    evals = re.findall(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", stdout, re.M)
    params = re.search(r"number of parameters: ([\d.]+)M", stdout)
    return {"ms_per_iter": statistics.median(times[10:] or times), "val_loss": float(evals[-1][2]),
            "parameters": float(params.group(1)) * 1e6 if params else None}


def xtransformers_command(args, out: Path, seed: int) -> list[str]:
    return [sys.executable, __file__, "--worker", *peer_flags(args, seed)]


def peer_flags(args, seed: int) -> list[str]:
    """The flags of `nanogpt_ref.run_arguments`, for the stand-in and the x-transformers worker."""
    return ["--data", args.data, "--steps", str(args.steps), "--seed", str(seed), "--eval-iters",
            str(args.eval_iters), "--eval-interval", str(args.eval_interval)]


def json_result(stdout: str, out: Path) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def xtransformers_worker() -> None:
    """x-transformers' decoder of nanoGPT's CPU shape, trained by the stand-in's nanoGPT loop; prints JSON."""
    import torch
    import torch.nn.functional as F
    from nanogpt_ref import RECIPE, char_splits, plain_training_run, recipe_of, run_arguments
    from x_transformers import Decoder, TransformerWrapper

    args = run_arguments("x-transformers as a peer of benchmarks/peers.py").parse_args(sys.argv[2:])

    torch.manual_seed(args.seed)
    train, val, vocab = char_splits(args.data)
    model = TransformerWrapper(num_tokens=vocab, max_seq_len=RECIPE["context"], tie_embedding=True,
                               attn_layers=Decoder(dim=128, depth=4, heads=4, attn_dim_head=32, attn_flash=True,
                                                   ff_no_bias=True))

    def loss_fn(x, y):
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    print(json.dumps(plain_training_run(loss_fn, model, (train, val), args.steps, args.seed, recipe_of(args))))


CONTESTANTS = {  # name -> (command(args, scratch dir, seed), result(stdout, scratch dir))
    "reslab default (--dtype auto)": (reslab_command(), reslab_result),
    "reslab --dtype fp32": (reslab_command("--dtype", "fp32"), reslab_result),
    "reslab --compile (--dtype auto)": (reslab_command("--compile"), reslab_result),
    NANOGPT: (nanogpt_command, nanogpt_result),
    "x-transformers": (xtransformers_command, json_result),
}
KEYS = {"auto": "reslab default (--dtype auto)", "fp32": "reslab --dtype fp32",
        "compile": "reslab --compile (--dtype auto)", "x-transformers": "x-transformers"}
DEFAULT = "auto,fp32,x-transformers"


def run_contestant(name: str, args, seed: int) -> dict:
    """One whole training run in its own process: its own figures plus the process's wall time."""
    command, parse = CONTESTANTS[name]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="peers-") as scratch:
        out = Path(scratch)
        started = time.perf_counter()
        done = subprocess.run(command(args, out, seed), cwd=out, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        result = {**parse(done.stdout, out), "wall_seconds": wall}
        if args.full_val:
            result["full_val_loss"] = full_val_loss(name, args, out)
        return result


def full_val_loss(name: str, args, out: Path) -> float | None:
    """The final model's cross-entropy on the whole validation split (the last 10% of the text, nanoGPT's split, in
    consecutive windows of the context), the same windows for every contestant: no evaluation-draw noise. Only for
    the contestants that leave a model behind: reslab's runs, and nanoGPT's train.py (made to save at every
    evaluation) when --steps is a multiple of --eval-interval, so that its last save is the final model."""
    import torch

    if name.startswith("reslab"):
        text = Path(args.data).read_text(encoding="utf-8")
        val_text = text[int(0.9 * len(text)):]  # nanoGPT's split: the last 10% of the characters
        from reslab.data.tokenizer import load_tokenizer
        from reslab.train.checkpoint import load_run_model

        model, _ = load_run_model(out / "run")
        ids, forward = load_tokenizer(out / "run").encode(val_text), lambda x: model(x).logits
    elif name == NANOGPT and args.nanogpt:
        path = out / "out" / "ckpt.pt"  # saved at evaluations only: it must be the model after the last step
        checkpoint = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else {}
        if checkpoint.get("iter_num") != args.steps:
            return None
        if str(Path(args.nanogpt).resolve()) not in sys.path:
            sys.path.insert(0, str(Path(args.nanogpt).resolve()))
        from model import GPT, GPTConfig  # nanoGPT's model.py

        model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()})
        model.eval()
        from nanogpt_ref import char_splits

        ids, forward = char_splits(args.data)[1].astype("int64"), lambda x: model(x, x)[0]  # its val.bin
    else:
        return None
    return windowed_loss(forward, torch.as_tensor(ids), context=64)


def windowed_loss(forward, ids, context: int, batch: int = 256) -> float:
    """Mean next-token cross-entropy over consecutive, non-overlapping windows of `context` tokens."""
    import torch
    import torch.nn.functional as F

    windows = (len(ids) - 1) // context
    x = ids[:windows * context].view(windows, context)
    y = ids[1:windows * context + 1].view(windows, context)
    total = 0.0
    with torch.no_grad():
        for start in range(0, windows, batch):
            logits = forward(x[start:start + batch]).float()
            total += F.cross_entropy(logits.flatten(0, 1), y[start:start + batch].flatten(), reduction="sum").item()
    return total / y.numel()


def table(results: dict[str, list[dict]]) -> list[str]:
    """Medians over rounds, and the median of per-round ratios against nanoGPT (its time / the contestant's)."""
    reference = results[NANOGPT]
    full = any(r.get("full_val_loss") is not None for runs in results.values() for r in runs)
    lines = ["| contestant | ms/iter (median) | rounds | speed vs nanoGPT, ms/iter (median of per-round ratios) | "
             "wall s (median) | speed vs nanoGPT, wall | val loss (rounds) |" + (" whole val split |" if full else ""),
             "| --- | ---: | --- | ---: | ---: | ---: | --- |" + (" --- |" if full else "")]
    for name, runs in results.items():
        ms, losses = [r["ms_per_iter"] for r in runs], [r["val_loss"] for r in runs]
        ratio = statistics.median(ref["ms_per_iter"] / r["ms_per_iter"] for ref, r in zip(reference, runs))
        wall = statistics.median(ref["wall_seconds"] / r["wall_seconds"] for ref, r in zip(reference, runs))
        whole = ", ".join("n/a" if r.get("full_val_loss") is None else f"{r['full_val_loss']:.4f}" for r in runs)
        lines.append(f"| {name} | {statistics.median(ms):.1f} | {', '.join(f'{t:.1f}' for t in ms)} | "
                     f"{ratio:.2f}x | {statistics.median(r['wall_seconds'] for r in runs):.1f} | {wall:.2f}x | "
                     f"{', '.join(f'{v:.4f}' for v in losses)} |" + (f" {whole} |" if full else ""))
    return lines


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return xtransformers_worker()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"),
                        help="the text to train on (default ../shared/data/tinyshakespeare.txt)")
    parser.add_argument("--steps", type=int, default=300, help="iterations per run (the recipe's 2000 for loss)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1337, help="seed of round 1; round r uses seed + r - 1")
    parser.add_argument("--nanogpt", help="a local nanoGPT checkout: run its train.py instead of the stand-in")
    parser.add_argument("--only", default=DEFAULT, help=f"contestants besides nanoGPT, from {', '.join(KEYS)} "
                        f"(default {DEFAULT})")
    parser.add_argument("--json", help="write every run's figures here")
    parser.add_argument("--eval-iters", type=int, default=20, help="batches per evaluation (the recipe's 20)")
    parser.add_argument("--eval-interval", type=int, default=250, help="steps between evaluations (default 250)")
    parser.add_argument("--full-val", action="store_true",
                        help="also score each final model on the whole validation split, the same windows for all")
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve())  # contestants run in scratch directories
    unknown = set(args.only.split(",")) - set(KEYS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(KEYS)}")
    names = [NANOGPT] + [KEYS[key] for key in args.only.split(",")]
    if "x-transformers" in names and importlib.util.find_spec("x_transformers") is None:
        parser.error("x-transformers is not installed: pip install x-transformers, or leave it out with --only")
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            result = run_contestant(name, args, args.seed + round_)
            results[name].append(result)
            full = (f", whole val split {result['full_val_loss']:.4f}" if result.get("full_val_loss") is not None
                    else "")
            print(f"round {round_ + 1} {name}: {result['ms_per_iter']:.1f} ms/iter, {result['wall_seconds']:.1f} s, "
                  f"val {result['val_loss']:.4f}{full}", flush=True)
    print(f"\n{args.steps} iterations of nanoGPT's CPU recipe, nanoGPT = "
          f"{args.nanogpt or 'the stand-in benchmarks/nanogpt_ref.py'}, load average {os.getloadavg()[0]:.2f}\n")
    print("\n".join(table(results)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
