"""`torchrun -m reslab train --fsdp`: FSDP2 (fully_shard) on CPU with gloo follows one process, across a resume.

Tied embeddings (gpt) exercise the gathered checkpoint: the shared weight is stored once, as by one process. The
first half runs under DDP and the second resumes under FSDP2: checkpoints are full tensors whatever wrote them.
"""

import time

from torchrun import TINY, assert_same_run, metrics, one_process_run, torchrun

GPT = ["--model", "gpt", "--layers", "2"]


def test_fsdp_follows_one_process_after_resuming_a_ddp_checkpoint(tmp_path):
    corpus, reference = one_process_run(tmp_path / "one", *GPT)
    run = tmp_path / "two"
    started = time.perf_counter()
    torchrun(*TINY, *GPT, "--data", corpus, "--steps", "20", "--stop-at", "10", "--out", run)
    assert len(metrics(run)) == 10
    torchrun("--resume", run, "--no-progress", "--fsdp", "--grad-accum", "2")  # sharded, 2 micro-batches per rank
    print(f"2 processes, 2 launches: {time.perf_counter() - started:.1f} s")
    assert_same_run(reference, run)
