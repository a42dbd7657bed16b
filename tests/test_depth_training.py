"""Every connection across depth trains as any scheme does: 2 processes (DDP) equal 1, and a run killed with
kill -9 mid-step resumes to the run that was never interrupted, bit for bit. MUDD and the residual scales both
replace pre-LN's update, so no one composition holds both: the DDP run leaves out the scales (a parameter per
sublayer, reduced over ranks like x0's), the kill -9 runs take two compositions."""

import pytest
from faults.helpers import RUN, final, metrics, reslab_process
from torchrun import TINY, assert_same_run, one_process_run, torchrun

ALL_BUT_MUDD = "pre+scales+x0+unet+long-skip+value-embed+backout+denseformer"
WITH_MUDD = "pre+x0+long-skip+value-embed+mudd"
ALL_BUT_SCALES = "pre+x0+unet+long-skip+value-embed+backout+denseformer+mudd"  # one torchrun launch for all
COMPOSITIONS = [ALL_BUT_MUDD, WITH_MUDD]
DEPTH = ["--layers", "4"]


@pytest.mark.parametrize("residual", [ALL_BUT_SCALES], ids=["all-but-scales"])
def test_two_processes_train_every_connection_as_one_does(tmp_path, residual):
    flags = [*DEPTH, "--residual", residual]
    corpus, reference = one_process_run(tmp_path / "one", *flags)
    torchrun(*TINY, *flags, "--data", corpus, "--steps", "20", "--out", tmp_path / "two")
    assert_same_run(reference, tmp_path / "two")
    records = metrics(tmp_path / "two")
    assert any("depth_coefficients" in r for r in records)  # every rank took part in the coefficients' metric


@pytest.mark.parametrize("residual", COMPOSITIONS, ids=["all-but-mudd", "mudd"])
def test_killed_mid_step_every_connection_resumes_to_the_uninterrupted_run(cli, tmp_path, residual):
    from conftest import make_corpus

    corpus = make_corpus(tmp_path / "corpus.txt")
    args = [*RUN, *DEPTH, "--residual", residual, "--data", corpus]
    code, _, err = cli("train", *args, "--out", tmp_path / "reference")
    assert code == 0, err
    run = tmp_path / "run"
    killed = reslab_process(["train", *args, "--out", run], env={"RESLAB_FAILPOINTS": "step@13=kill"})
    assert killed.returncode == -9, killed.stderr
    code, _, err = cli("train", "--resume", run, "--no-progress")
    assert code == 0, err
    assert metrics(run) == metrics(tmp_path / "reference")
    assert final(run) == final(tmp_path / "reference")
