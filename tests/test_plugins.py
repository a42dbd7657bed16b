"""A residual scheme from a separate installed package (entry-point group `reslab.schemes`) is used like a built-in
one by `reslab list`, `train`, `ablate`, `audit` and `lens`, with no edit to reslab; so is a model (`reslab.models`),
by name as a TARGET too. The package is written into
tmp_path with its `.dist-info/entry_points.txt` and put on PYTHONPATH for real `python -m reslab` processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCHEME = '''
import torch
import torch.nn as nn

from reslab.residual import ResidualSite, SiteSpec


class HalfResidual(ResidualSite):
    """x = x + s * F(LN(x)): pre-LN with the branch scaled by s (default 0.5)."""

    name = "half"
    formula = "x = x + s * F(LN(x)),  s = 0.5"
    paper = "a test plug-in"
    option_defaults = {"scale": 0.5}

    def __init__(self, spec: SiteSpec):
        super().__init__(spec)
        self.norm = spec.make_norm(spec.width)

    def forward(self, x: torch.Tensor, sublayer: nn.Module) -> torch.Tensor:
        fx = self.options["scale"] * sublayer(self.norm(x))
        out = x + fx
        self.observe(x, fx, out)
        return out
'''
MODEL = '''
from reslab.models.gpt import GPT


class ShortGPT(GPT):
    """reslab's GPT under another name: a plug-in model, held to the same contract at build."""
'''
SMALL = ["--model", "gpt", "--layers", "1", "--width", "32", "--heads", "2", "--context", "16"]
TRAIN = ["--steps", "3", "--batch", "4", "--eval-interval", "3", "--eval-batches", "1", "--log-interval", "1",
         "--device", "cpu", "--dtype", "fp32"]


def install(site: Path, entry_points: str) -> Path:
    """A package `halfplugin` with its distribution metadata, as pip would leave it in site-packages."""
    (site / "halfplugin").mkdir(parents=True)
    (site / "halfplugin" / "__init__.py").write_text(SCHEME)
    (site / "halfplugin" / "model.py").write_text(MODEL)
    info = site / "halfplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: halfplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return site


def reslab(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "reslab", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.fixture
def site(tmp_path) -> Path:
    return install(tmp_path / "site", "[reslab.schemes]\nhalf = halfplugin:HalfResidual\n")


def test_a_plugin_scheme_is_listed_trained_audited_and_read(site, tmp_path, corpus):
    listed = reslab(site, "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "half" in listed.stdout and "x = x + s * F(LN(x)),  s = 0.5" in listed.stdout
    assert "pre " in listed.stdout  # the built-in schemes are still there

    run = tmp_path / "run"
    trained = reslab(site, "train", *SMALL, *TRAIN, "--residual", "half", "--set", "scale=0.25", "--data", corpus,
                     "--no-progress", "--out", run, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["model_config"]["residual"] == "half"
    assert config["model_config"]["residual_options"] == {"scale": 0.25}

    audited = reslab(site, "audit", run, "--json", cwd=tmp_path)
    assert audited.returncode == 0, audited.stderr
    audit = json.loads(audited.stdout)
    # around attention and around the MLP, each the plug-in's scaled skip (a built-in pre-LN's would be "identity")
    assert [(r["owner"], r["kind"]) for r in audit["residuals"]] == [("blocks.0.attn_residual", "scaled"),
                                                                      ("blocks.0.ffn_residual", "scaled")]

    lens = reslab(site, "lens", run, "--json", "--tokens", "16", cwd=tmp_path)
    assert lens.returncode == 0, lens.stderr
    record = json.loads(lens.stdout)
    assert record["scheme"] == "half" and len(record["layers"]) >= 2


def test_a_plugin_model_is_a_target_by_name_and_by_run(tmp_path, corpus):
    """`audit`, `lens`, `diagram` and `info` take a plug-in model's name as TARGET (random weights, as a built-in's),
    and its trained run; `lens` still refuses a built-in model that is no transformer (mlp)."""
    site = install(tmp_path / "site", "[reslab.models]\nshortgpt = halfplugin.model:ShortGPT\n")
    audited = reslab(site, "audit", "shortgpt", "--set", "layers=2", "--json", cwd=tmp_path)
    assert audited.returncode == 0, audited.stderr
    assert [r["kind"] for r in json.loads(audited.stdout)["residuals"]] == ["identity"] * 4
    lens = reslab(site, "lens", "shortgpt", "--set", "layers=2", "--json", "--tokens", "16", cwd=tmp_path)
    assert lens.returncode == 0, lens.stderr
    record = json.loads(lens.stdout)
    assert record["target"].startswith("shortgpt (pre)") and len(record["layers"]) >= 4
    drawn = reslab(site, "diagram", "shortgpt", "--set", "layers=1", "-o", tmp_path / "d.svg", cwd=tmp_path)
    assert drawn.returncode == 0 and (tmp_path / "d.svg").stat().st_size > 0, drawn.stderr
    run = tmp_path / "run"
    trained = reslab(site, "train", "--model", "shortgpt", "--layers", "1", "--width", "32", "--heads", "2",
                     "--context", "16", *TRAIN, "--data", corpus, "--no-progress", "--out", run, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    for command in (["audit", run], ["lens", run, "--tokens", "16"], ["info", run]):
        done = reslab(site, *command, cwd=tmp_path)
        assert done.returncode == 0, (command, done.stderr)
    refused = reslab(site, "lens", "mlp", cwd=tmp_path)
    assert refused.returncode == 2 and "transformer model" in refused.stderr, refused.stderr


def test_a_plugin_scheme_runs_in_an_ablation(site, tmp_path, corpus):
    out = tmp_path / "ablation"
    result = reslab(site, "ablate", *SMALL, *TRAIN, "--residual", "half,pre", "--seeds", "0", "--jobs", "1",
                    "--data", corpus, "--no-report", "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (out / "runs" / "half-L1-s0" / "summary.json").is_file(), sorted(p.name for p in (out / "runs").iterdir())


@pytest.mark.parametrize("entry_points, args, phrase", [
    ("[reslab.schemes]\nbroken = halfplugin.missing:Nothing\n", ["info", "--residual", "broken"],
     "plug-in residual scheme 'broken' (halfplugin.missing:Nothing) failed to load"),
    ("[reslab.schemes]\npre = halfplugin:HalfResidual\n", ["list"], "registers residual scheme 'pre', a built-in name"),
    ("[reslab.schemes]\nhalf = halfplugin:HalfResidual\n", ["info", "--residual", "half", "--set", "scal=1"],
     "valid --set keys:"),
])
def test_a_broken_or_shadowing_plugin_is_one_line(tmp_path, entry_points, args, phrase):
    site = install(tmp_path / "site", entry_points)
    result = reslab(site, *args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert phrase in result.stderr


def test_a_builtin_name_never_reads_the_plugins(tmp_path):
    """Loading is lazy: a shadowing plug-in is refused only where plug-ins are read, and `--residual pre` is not."""
    site = install(tmp_path / "site", "[reslab.schemes]\npre = halfplugin:HalfResidual\n")
    result = reslab(site, "info", "--model", "gpt", "--residual", "pre", "--layers", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "pre: x = x + F(LN(x))" in result.stdout
