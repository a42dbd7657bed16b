"""Data at scale: `reslab data prepare` into memory-mapped shards, training from them, the three on-disk layouts,
an interrupted prepare resumed, memory flat in corpus size, and every bad input as one line."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_corpus

from reslab.data import BatchSampler, build_tokenizer, encode_corpus, split_tokens
from reslab.data.prepare import PrepareOptions, prepare_data
from reslab.data.shards import (
    MANIFEST,
    MODDED_MAGIC,
    TokenSpan,
    dtype_for,
    fingerprint,
    open_prepared,
    open_reslab,
    read_meta_pkl,
)
from reslab.data.tokenizer import FILENAME as TOKENIZER_FILE
from reslab.data.training import training_data
from reslab.errors import ReslabError

FAST = ["--model", "tiny", "--width", "32", "--heads", "2", "--context", "16", "--batch", "8",
        "--eval-batches", "2", "--no-progress"]
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def text(tmp_path) -> Path:
    """About 30 kB with a few non-ASCII characters (multi-byte UTF-8 across chunk reads)."""
    path = make_corpus(tmp_path / "corpus.txt", chars=30_000)
    path.write_text(path.read_text().replace("queen", "quéén").replace("lord", "lörd✓"))
    return path


def small_options(**changes) -> PrepareOptions:
    """Chunks of 2 kB and shards of 4,000 tokens: many shards, windows that cross shard boundaries."""
    return PrepareOptions(**{"chunk_bytes": 2048, "shard_tokens": 4000, **changes})


def reslab_process(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "reslab", *map(str, args)], capture_output=True, text=True,
                          env=full, timeout=300)


# ------------------------------------------------------------------------------- the same tokens and batches


@pytest.mark.parametrize(("kind", "vocab"), [("char", None), ("bpe", 300)])
def test_prepared_shards_hold_the_tokens_and_split_of_the_text_in_memory(text, tmp_path, kind, vocab):
    manifest = prepare_data([text], tmp_path / "data", small_options(tokenizer=kind, vocab_size=vocab))
    assert len(manifest["shards"]) > 2 and manifest["dtype"] == "uint16"
    data = open_reslab(tmp_path / "data", verify=True)
    tokenizer = build_tokenizer(kind, text.read_text(), vocab)
    assert data.tokenizer.to_bytes() == tokenizer.to_bytes()
    train, val = split_tokens(encode_corpus(tokenizer, text.read_text()))
    assert np.array_equal(data.train.to_numpy(), train.numpy())
    assert np.array_equal(data.val.to_numpy(), val.numpy())
    assert manifest["characters"] == len(text.read_text())


def test_batches_from_shards_equal_batches_from_a_tensor(text, tmp_path):
    prepare_data([text], tmp_path / "data", small_options())
    data = open_reslab(tmp_path / "data")
    tensor = torch.from_numpy(data.train.to_numpy())
    from_shards = BatchSampler(data.train, 16, 64, torch.Generator().manual_seed(5))
    from_tensor = BatchSampler(tensor, 16, 64, torch.Generator().manual_seed(5))
    crossed = 0
    for _ in range(50):
        (xs, ys), (xt, yt) = from_shards.sample(), from_tensor.sample()
        assert torch.equal(xs, xt) and torch.equal(ys, yt)
        assert xs.dtype == torch.int64 and xs.is_contiguous() and ys.is_contiguous()
    assert torch.equal(from_tensor.generator.get_state(), from_shards.generator.get_state())  # the same draws
    bounds = data.train.bounds
    for start in range(0, len(data.train) - 65, 97):  # some windows cross from one shard into the next
        window = data.train.windows(np.array([start]), 65)[0]
        assert np.array_equal(window, tensor[start:start + 65].numpy())
        crossed += int(np.any((bounds > start) & (bounds < start + 65)))
    assert crossed > 0


def test_training_on_shards_equals_training_on_the_text(cli, text, tmp_path):
    args = [*FAST, "--steps", "12", "--log-interval", "4", "--eval-interval", "6", "--seed", "3"]
    code, _, err = cli("data", "prepare", text, "--out", tmp_path / "data", "--shard-tokens", "5000",
                       "--workers", "1", "--no-progress")
    assert code == 0, err
    assert cli("train", *args, "--data", tmp_path / "data", "--out", tmp_path / "shards")[0] == 0
    assert cli("train", *args, "--data", text, "--out", tmp_path / "text")[0] == 0

    def losses(run):
        return [{k: v for k, v in json.loads(line).items() if k in ("step", "loss", "val_loss")}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("shards") == losses("text") and len(losses("text")) == 4
    config = json.loads((tmp_path / "shards" / "config.json").read_text())
    assert config["data"]["fingerprint"] == json.loads((tmp_path / "data" / MANIFEST).read_text())["fingerprint"]


def test_in_memory_tensors_train_like_the_cached_shards(text, tmp_path):
    """The training loop itself: the same run from tensors (today's path) and from memory-mapped spans."""
    from reslab.train.trainer import prepare, train

    config = {"model": "tiny", "data": str(text), "steps": 6, "batch": 4, "eval_batches": 1, "eval_interval": 3,
              "log_interval": 3, "progress": False}
    results = []
    for name, as_tensor in (("span", False), ("tensor", True)):
        setup = prepare(config, {"width": 32, "heads": 2, "context": 16}, tmp_path / name)
        assert isinstance(setup.train_tokens, TokenSpan)
        if as_tensor:
            setup.train_tokens = torch.from_numpy(setup.train_tokens.to_numpy())
            setup.val_tokens = torch.from_numpy(setup.val_tokens.to_numpy())
        results.append(train(setup))
    assert results[0]["final_val_loss"] == results[1]["final_val_loss"]
    assert results[0]["final_train_loss"] == results[1]["final_train_loss"]


def test_a_text_file_is_prepared_once_into_the_cache(cli, text, tmp_path):
    assert cli("train", *FAST, "--steps", "1", "--data", text, "--out", tmp_path / "a")[0] == 0
    cached = list((tmp_path / "cache" / "tokens").glob("*/" + MANIFEST))
    assert len(cached) == 1
    written = cached[0].stat().st_mtime_ns
    code, _, err = cli("ablate", "--model", "tiny", "--width", "32", "--heads", "2", "--context", "16", "--batch", "4",
                       "--steps", "1", "--eval-batches", "1", "--residual", "pre,post", "--layers", "1",
                       "--seeds", "0", "--jobs", "1", "--no-report", "--data", text, "--out", tmp_path / "grid")
    assert code == 0, err
    assert list((tmp_path / "cache" / "tokens").glob("*/" + MANIFEST)) == cached
    assert cached[0].stat().st_mtime_ns == written  # read, not prepared again


# ----------------------------------------------------------------------------------------- memory, at scale


def write_synthetic(directory: Path, tokens: int, vocab: int = 64, shard_tokens: int = 1 << 22) -> None:
    """A reslab data directory of random tokens, written directly (fast): shards, tokenizer, manifest."""
    from reslab.data.tokenizer import CharTokenizer

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for index, start in enumerate(range(0, tokens, shard_tokens)):
        part = rng.integers(0, vocab, min(shard_tokens, tokens - start), dtype=np.uint16)
        name = f"shard-{index:05d}.bin"
        part.tofile(directory / name)
        shards.append({"name": name, "tokens": len(part), "sha256": hashlib.sha256(part.tobytes()).hexdigest(),
                       "max_id": int(part.max())})
    (directory / TOKENIZER_FILE).write_bytes(CharTokenizer("".join(chr(48 + i) for i in range(vocab))).to_bytes())
    train = int(tokens * 0.9)
    manifest = {"format": "reslab-tokens", "version": 1, "tokenizer": {"kind": "char", "file": TOKENIZER_FILE},
                "dtype": "uint16", "vocab_size": vocab, "tokens": tokens, "shards": shards,
                "split": {"train_fraction": 0.9, "train_tokens": train, "val_tokens": tokens - train}}
    manifest["fingerprint"] = fingerprint(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    for shard in shards:  # out of the page cache, as data on disk is: what a run maps is then what it reads
        fd = os.open(directory / shard["name"], os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
assert done.returncode == 0, done.stderr
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_memory_is_flat_in_the_corpus_size(tmp_path):
    """Peak RSS of a 2-step run on 5 MB and on 50 MB of prepared tokens: the difference is far below 45 MB."""
    peaks = {}
    for megabytes in (5, 50):
        data = tmp_path / f"data{megabytes}"
        write_synthetic(data, megabytes << 19)  # uint16: 2 bytes a token
        run = [sys.executable, "-m", "reslab", "train", *FAST, "--steps", "2", "--data", str(data), "--out",
               str(tmp_path / f"run{megabytes}")]
        done = subprocess.run([sys.executable, "-c", PEAK_RSS, *run], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr
        peaks[megabytes] = int(done.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux
    assert abs(peaks[50] - peaks[5]) < 10 << 20, peaks


# ------------------------------------------------------------------------------------------ other layouts


def write_nanogpt(directory: Path, chars: str, train: np.ndarray, val: np.ndarray, meta: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    train.astype(np.uint16).tofile(directory / "train.bin")
    val.astype(np.uint16).tofile(directory / "val.bin")
    if meta:  # as nanoGPT's prepare.py writes it
        itos = dict(enumerate(chars))
        record = {"vocab_size": len(chars), "itos": itos, "stoi": {c: i for i, c in itos.items()}}
        (directory / "meta.pkl").write_bytes(pickle.dumps(record))


def test_nanogpt_bins_with_meta_pkl_train_with_their_char_vocabulary(cli, tmp_path):
    chars = "\n !abcdefghij"
    rng = np.random.default_rng(1)
    write_nanogpt(tmp_path / "nano", chars, rng.integers(0, len(chars), 3000), rng.integers(0, len(chars), 400))
    data = open_prepared(tmp_path / "nano")
    assert data.tokenizer.kind == "char" and data.tokenizer.vocab_size == len(chars)
    assert (len(data.train), len(data.val)) == (3000, 400)
    code, _, err = cli("train", *FAST, "--steps", "2", "--data", tmp_path / "nano", "--out", tmp_path / "run")
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_config"]["vocab_size"] == len(chars) and config["data"]["format"] == "nanogpt"


def test_nanogpt_without_meta_needs_the_vocabulary(cli, tmp_path):
    rng = np.random.default_rng(2)
    write_nanogpt(tmp_path / "nano", "", rng.integers(0, 1000, 3000), rng.integers(0, 1000, 400), meta=False)
    code, _, err = cli("train", *FAST, "--steps", "1", "--data", tmp_path / "nano", "--out", tmp_path / "a")
    assert code == 2 and "--vocab-size" in err and len(err.strip().splitlines()) == 1
    data = open_prepared(tmp_path / "nano", vocab_size=1024)
    assert data.tokenizer.kind == "ids" and data.tokenizer.decode([5, 7]) == "5 7"


def test_meta_pkl_is_parsed_without_unpickling_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "x": Payload()}))
    with pytest.raises(ReslabError, match="plain-data"):
        read_meta_pkl(tmp_path / "meta.pkl")
    assert not (tmp_path / "pwned").exists()


def write_modded(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (MODDED_MAGIC, 1, len(tokens))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + tokens.astype(np.uint16).tobytes())


def test_modded_nanogpt_shards_are_read_in_order_with_their_val_file(cli, tmp_path):
    rng = np.random.default_rng(3)
    parts = [rng.integers(0, 50257, n) for n in (2000, 1500, 600)]
    write_modded(tmp_path / "fw" / "fineweb_train_000001.bin", parts[0])
    write_modded(tmp_path / "fw" / "fineweb_train_000002.bin", parts[1])
    write_modded(tmp_path / "fw" / "fineweb_val_000000.bin", parts[2])
    data = open_prepared(tmp_path / "fw")
    assert np.array_equal(data.train.to_numpy(), np.concatenate(parts[:2]))
    assert np.array_equal(data.val.to_numpy(), parts[2])
    assert data.tokenizer.vocab_size == 50257
    code, _, err = cli("data", "info", tmp_path / "fw")
    assert code == 0 and "modded-nanogpt" in _ and "3,500 train" in _, err


# ------------------------------------------------------------------------------------ interrupted prepare


def test_an_interrupted_prepare_resumes_and_keeps_its_finished_shards(text, tmp_path):
    args = ["data", "prepare", text, "--shard-tokens", "4000", "--workers", "1", "--no-progress"]
    killed = reslab_process(*args, "--out", tmp_path / "data", env={"RESLAB_FAILPOINTS": "write:shard-00002.bin=kill"})
    assert killed.returncode == -9
    assert not (tmp_path / "data" / MANIFEST).exists()
    with pytest.raises(ReslabError, match="unfinished prepare"):
        open_prepared(tmp_path / "data")
    first = {name: (tmp_path / "data" / name).stat().st_mtime_ns for name in ("shard-00000.bin", "shard-00001.bin")}
    resumed = reslab_process(*args, "--out", tmp_path / "data")
    assert resumed.returncode == 0, resumed.stderr
    assert {name: (tmp_path / "data" / name).stat().st_mtime_ns for name in first} == first  # kept, not redone
    whole = reslab_process(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    manifest = json.loads((tmp_path / "data" / MANIFEST).read_text())
    assert manifest["fingerprint"] == json.loads((tmp_path / "whole" / MANIFEST).read_text())["fingerprint"]
    assert manifest["characters"] == len(text.read_text())
    assert not list((tmp_path / "data").glob(".*.tmp")) and not (tmp_path / "data" / "prepare-state.json").exists()


def test_parallel_workers_write_the_same_shards(text, tmp_path, monkeypatch):
    import reslab.data.prepare

    monkeypatch.setattr(reslab.data.prepare, "PARALLEL_BYTES", 1)  # workers even for a small text
    one = prepare_data([text], tmp_path / "one", small_options(workers=1))
    two = prepare_data([text], tmp_path / "two", small_options(workers=2))
    assert one["fingerprint"] == two["fingerprint"]


# ---------------------------------------------------------------------------------------------- bad input


def damage(directory: Path, how: str) -> None:
    shard = directory / "shard-00001.bin"
    manifest = json.loads((directory / MANIFEST).read_text())
    if how == "empty":
        shard.write_bytes(b"")
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-2])
    elif how == "count":
        manifest["shards"][1]["tokens"] += 1
        (directory / MANIFEST).write_text(json.dumps(manifest))
    elif how == "not-json":
        (directory / MANIFEST).write_text("{")


@pytest.mark.parametrize(("how", "expected"), [("empty", "is empty"), ("truncated", "truncated"),
                                               ("count", "manifest.json: tokens is"),
                                               ("not-json", "manifest.json is not valid JSON")])
def test_a_damaged_data_directory_is_one_line_and_nothing_is_written(cli, text, tmp_path, how, expected):
    prepare_data([text], tmp_path / "data", small_options())
    damage(tmp_path / "data", how)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    code, _, err = cli("train", *FAST, "--steps", "1", "--data", tmp_path / "data", "--out", tmp_path / "run")
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before


def test_a_changed_shard_fails_its_checksum_when_verified(cli, text, tmp_path):
    prepare_data([text], tmp_path / "data", small_options())
    shard = tmp_path / "data" / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    code, _, err = cli("data", "info", tmp_path / "data", "--verify")
    assert code == 2 and "checksum" in err and "shard-00001.bin" in err


def test_token_ids_above_the_vocabulary_are_refused(cli, text, tmp_path):
    rng = np.random.default_rng(4)
    write_nanogpt(tmp_path / "nano", "abc", rng.integers(0, 3, 3000), np.full(400, 7))
    code, _, err = cli("train", *FAST, "--steps", "1", "--data", tmp_path / "nano", "--out", tmp_path / "run")
    assert code == 2 and "val.bin holds token id 7, above the vocabulary of 3" in err
    assert not (tmp_path / "run").exists()
    prepare_data([text], tmp_path / "data", small_options())  # a shard edited behind its manifest's back
    for shard in (tmp_path / "data").glob("shard-*.bin"):
        shard.write_bytes(np.full(shard.stat().st_size // 2, 60000, dtype=np.uint16).tobytes())
    code, _, err = cli("train", *FAST, "--steps", "1", "--data", tmp_path / "data", "--out", tmp_path / "run2")
    assert code == 2 and "token id 60000, above the vocabulary" in err and len(err.strip().splitlines()) == 1


def test_resuming_on_data_prepared_with_another_tokenizer_is_refused(cli, text, tmp_path):
    for name, kind in (("char", ["char"]), ("bpe", ["bpe", "--vocab-size", "300"])):
        code, _, err = cli("data", "prepare", text, "--out", tmp_path / name, "--tokenizer", *kind, "--workers", "1",
                           "--no-progress")
        assert code == 0, err
    data = tmp_path / "data"
    (tmp_path / "char").rename(data)
    code, out, err = cli("train", *FAST, "--steps", "4", "--stop-at", "2", "--data", data, "--out", tmp_path / "run")
    assert code == 0 and "stopped at step 2" in out, err
    data.rename(tmp_path / "char")
    (tmp_path / "bpe").rename(data)
    code, _, err = cli("train", "--resume", tmp_path / "run", "--no-progress")
    assert code == 2 and "another tokenizer" in err and len(err.strip().splitlines()) == 1
    data.rename(tmp_path / "bpe")
    (tmp_path / "char").rename(data)
    assert cli("train", "--resume", tmp_path / "run", "--no-progress")[0] == 0


def test_resuming_on_changed_data_is_refused(cli, text, tmp_path):
    prepare_data([text], tmp_path / "data", small_options())
    code, out, err = cli("train", *FAST, "--steps", "4", "--stop-at", "2", "--data", tmp_path / "data", "--out",
                         tmp_path / "run")
    assert code == 0, err
    for path in (tmp_path / "data").iterdir():
        path.unlink()
    prepare_data([text], tmp_path / "data", small_options(val_fraction=0.2))
    code, _, err = cli("train", "--resume", tmp_path / "run", "--no-progress")
    assert code == 2 and "changed since run" in err


@pytest.mark.parametrize("source", ["missing.txt", "nothing-*.txt", "empty.txt", "binary.txt"])
def test_bad_sources_are_one_line_and_write_nothing(cli, tmp_path, source):
    (tmp_path / "empty.txt").write_text(" \n\n")
    (tmp_path / "binary.txt").write_bytes(b"abc\x00def")
    code, _, err = cli("data", "prepare", tmp_path / source, "--out", tmp_path / "out", "--workers", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert source.split("-")[0].split(".")[0] in err or "pattern" in err
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_prepare_refuses_to_overwrite_other_data(cli, text, tmp_path):
    assert cli("data", "prepare", text, "--out", tmp_path / "out", "--workers", "1", "--no-progress")[0] == 0
    before = (tmp_path / "out" / MANIFEST).read_bytes()
    code, _, err = cli("data", "prepare", text, "--out", tmp_path / "out", "--tokenizer", "bpe", "--workers", "1")
    assert code == 2 and "already holds data" in err
    assert (tmp_path / "out" / MANIFEST).read_bytes() == before
    code, out, err = cli("data", "prepare", text, "--out", tmp_path / "out", "--workers", "1", "--no-progress")
    assert code == 0 and (tmp_path / "out" / MANIFEST).read_bytes() == before  # the same job: already done


def test_training_data_reads_a_text_source_through_the_cache(text):
    data = training_data(str(text), "char", None)
    assert data.record["sha256"] and data.record["description"].endswith(f"{len(text.read_text()):,} characters")
    assert "prepared" in data.record and Path(data.record["prepared"]).is_dir()


def test_sources_may_be_directories_and_globs_and_a_tokenizer_file(cli, text, tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second file\n" * 50)
    (tmp_path / "docs" / "a.txt").write_text("first file\n" * 50)
    bpe = build_tokenizer("bpe", text.read_text(), 300)
    bpe._hf.save(str(tmp_path / "hf-tokenizer.json"))  # a Hugging Face tokenizer.json, as PATH
    code, _, err = cli("data", "prepare", tmp_path / "docs", tmp_path / "corpus*.txt", "--out", tmp_path / "data",
                       "--tokenizer", tmp_path / "hf-tokenizer.json", "--workers", "1", "--no-progress")
    assert code == 0, err
    manifest = json.loads((tmp_path / "data" / MANIFEST).read_text())
    assert [Path(s["path"]).name for s in manifest["sources"]] == ["a.txt", "b.txt", "corpus.txt"]
    expected = np.concatenate([bpe.encode_array(p.read_text()) for p in
                               (tmp_path / "docs" / "a.txt", tmp_path / "docs" / "b.txt", text)])
    data = open_reslab(tmp_path / "data")
    assert np.array_equal(np.concatenate([data.train.to_numpy(), data.val.to_numpy()]), expected)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hub"))
    code, _, err = cli("data", "prepare", text, "--out", tmp_path / "g", "--tokenizer", "gpt2")
    assert code == 2 and "not on this machine" in err and not (tmp_path / "g").exists()


def test_a_run_on_shards_stopped_and_resumed_ends_like_an_uninterrupted_one(cli, text, tmp_path):
    prepare_data([text], tmp_path / "data", small_options(shard_tokens=3000))
    args = [*FAST, "--data", tmp_path / "data", "--steps", "16", "--log-interval", "4", "--eval-interval", "8",
            "--checkpoint-interval", "5"]
    assert cli("train", *args, "--out", tmp_path / "whole")[0] == 0
    code, out, err = cli("train", *args, "--out", tmp_path / "split", "--stop-at", "7")
    assert code == 0 and "stopped at step 7" in out, err
    assert cli("train", "--resume", tmp_path / "split", "--no-progress")[0] == 0

    def records(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_second", "train_seconds")}
                for line in lines]

    assert records("split") == records("whole") and len(records("whole")) == 4


def test_a_run_on_bpe_shards_killed_before_its_first_checkpoint_resumes(text, tmp_path):
    prepare_data([text], tmp_path / "data", small_options(tokenizer="bpe", vocab_size=300))
    args = ["train", *FAST, "--steps", "3", "--data", tmp_path / "data", "--out", tmp_path / "run"]
    killed = reslab_process(*args, env={"RESLAB_FAILPOINTS": "write:tokenizer.reslab.json@1=kill"})
    assert killed.returncode == -9 and (tmp_path / "run" / "config.json").exists()
    resumed = reslab_process("train", "--resume", tmp_path / "run", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    code = reslab_process(*args[:-2], "--out", tmp_path / "other", "--tokenizer", "char")
    assert code.returncode == 2 and "prepared with the bpe tokenizer" in code.stderr


def leases_work(path: Path) -> bool:
    """Whether this machine grants read leases on files like `path` (Linux, the file's owner, a local disk)."""
    import fcntl

    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.fcntl(descriptor, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)


def test_windows_read_with_pread_equal_the_maps_and_a_writer_breaks_the_lease_at_once(text, tmp_path):
    """Without a lease a file is read with pread: the same windows, across shard boundaries too. With one, a writer
    (here, in this very process) gets the file at once: the span turns to pread and names the file as changed; cut
    short, the file is one DataChanged line, never SIGBUS."""
    from reslab.data.tokenfiles import DataChanged

    prepare_data([text], tmp_path / "data", small_options())
    mapped, read = open_reslab(tmp_path / "data"), open_reslab(tmp_path / "data")
    for file in read.files:
        file.view = None  # as where no lease can be had
    starts = np.arange(0, len(mapped.train) - 200, 397)  # many windows cross from one 4,000-token shard to the next
    expected = mapped.train.gather(starts, 200)
    assert np.array_equal(read.train.gather(starts, 200), expected)
    assert np.array_equal(read.val.to_numpy(), mapped.val.to_numpy())
    shard = tmp_path / "data" / "shard-00002.bin"
    if not leases_work(shard):
        pytest.skip("no read leases here (not the owner, or a file system without them)")
    assert all(file.view is not None for file in mapped.files) and mapped.train.changed() == []
    started = time.monotonic()
    with open(shard, "r+b"):  # the lease breaks; its holder lets it go at once (no read in progress)
        pass
    assert time.monotonic() - started < 5 and mapped.train.changed() == [shard]
    assert np.array_equal(mapped.train.gather(starts, 200), expected)  # now read with pread
    os.truncate(shard, 10)
    with pytest.raises(DataChanged, match=f"{shard} was truncated while this run read it"):
        mapped.train.gather(starts, 200)


def test_without_read_leases_as_on_macos_every_file_is_read_with_pread(cli, text, tmp_path, monkeypatch):
    """macOS and the BSDs have fcntl but no F_SETLEASE: no lease is tried, files are read with pread, training runs."""
    from reslab.data import tokenfiles

    monkeypatch.setattr(tokenfiles, "LEASES", False)
    prepare_data([text], tmp_path / "data", small_options())
    assert all(file.view is None for file in open_reslab(tmp_path / "data").files)
    code, _, err = cli("train", *FAST, "--steps", "2", "--data", tmp_path / "data", "--out", tmp_path / "run")
    assert code == 0, err


def test_token_width_follows_the_vocabulary(tmp_path):
    assert (dtype_for(256), dtype_for(65535), dtype_for(65536), dtype_for(200_000)) == (
        "uint16", "uint16", "uint32", "uint32")
    arrays = [np.arange(70_000, 70_100, dtype=np.uint32), np.arange(70_100, 70_150, dtype=np.uint32)]
    span = TokenSpan(arrays).split(120)[0]
    assert np.array_equal(span.windows(np.array([95, 0]), 10)[0], np.arange(70_095, 70_105))
    assert len(span) == 120


def test_a_hugging_face_dataset_on_disk_is_a_source_and_resumes(cli, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"story {i}: " + "the king and the queen " * (i % 7 + 1) for i in range(400)]
    datasets.Dataset.from_dict({"text": rows, "id": list(range(400))}).save_to_disk(str(tmp_path / "ds"))
    args = ["data", "prepare", f"hf:{tmp_path / 'ds'}", "--shard-tokens", "5000", "--workers", "1", "--no-progress"]
    killed = reslab_process(*args, "--out", tmp_path / "data", env={"RESLAB_FAILPOINTS": "write:shard-00003.bin=kill"})
    assert killed.returncode == -9, killed.stderr
    assert reslab_process(*args, "--out", tmp_path / "data").returncode == 0
    code, _, err = cli(*args, "--out", tmp_path / "whole")
    assert code == 0, err
    data = open_reslab(tmp_path / "data", verify=True)
    expected = "".join(row + "\n\n" for row in rows)
    tokens = np.concatenate([data.train.to_numpy(), data.val.to_numpy()])
    assert data.tokenizer.decode(tokens) == expected
    assert data.record["fingerprint"] == open_reslab(tmp_path / "whole").record["fingerprint"]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows[:50]})})
    splits.save_to_disk(str(tmp_path / "dsd"))
    assert cli("data", "prepare", f"hf:{tmp_path / 'dsd'}:train", "--out", tmp_path / "t", "--no-progress")[0] == 0
    code, _, err = cli("data", "prepare", f"hf:{tmp_path / 'dsd'}:nosplit", "--out", tmp_path / "x")
    code2, _, err2 = cli("data", "prepare", "hf:" + str(tmp_path / "nothing"), "--out", tmp_path / "y")
    assert code == 2 and "no split 'nosplit'" in err and not (tmp_path / "x").exists()
    assert code2 == 2 and "cannot load it from this machine" in err2 and not (tmp_path / "y").exists()


def test_the_gpt2_124m_recipe_trains_at_toy_size_on_modded_nanogpt_shards(cli, tmp_path):
    """The recipe's schedule and GPT-2 shape, the shape overridden by flags, 2 steps on FineWeb-style shards."""
    rng = np.random.default_rng(4)
    write_modded(tmp_path / "fw" / "fineweb_train_000001.bin", rng.integers(0, 50257, 6000))
    write_modded(tmp_path / "fw" / "fineweb_val_000000.bin", rng.integers(0, 50257, 2000))
    code, _, err = cli("train", "--recipe", "gpt2-124m", "--layers", "2", "--heads", "2", "--width", "32",
                       "--context", "32", "--batch", "4", "--grad-accum", "2", "--steps", "2", "--eval-batches", "1",
                       "--data", tmp_path / "fw", "--out", tmp_path / "run", "--no-progress")
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    model, train = config["model_config"], config["train"]
    assert config["model"] == "gpt" and config["data"]["format"] == "modded-nanogpt"
    assert (model["layers"], model["heads"], model["width"], model["context"]) == (2, 2, 32, 32)  # the flags win
    assert (model["vocab_size"], model["bias"], model["activation"]) == (50257, True, "gelu-tanh")
    assert (train["lr"], train["min_lr"], train["warmup"], train["beta2"], train["weight_decay"]) == (
        6e-4, 0.0, 700, 0.95, 0.1)
    assert (train["batch"], train["grad_accum"], train["steps"]) == (4, 2, 2)
    code, _, err = cli("train", "--recipe", "gpt2-124m", "--batch", "65536", "--steps", "1", "--data",
                       tmp_path / "fw", "--out", tmp_path / "full", "--device", "cpu", "--no-progress")
    # The full shape is GPT-2 small exactly (nanoGPT counts 124,439,808 parameters with the tied head); the memory
    # check refuses it at a batch no machine holds (terabytes of activations), in one line.
    assert code == 2 and "124,439,808 parameters" in err and len(err.strip().splitlines()) == 1
