"""Data files that cannot lie (issue 23), through the CLI with real processes: every defect of manifest.json and of a
tokenizer file is one line naming the file and the key (exit 2, no traceback) in `data info`, `data info --verify` and
`train --data`; names that lead out of the data directory are refused; an edited manifest fails its own fingerprint;
a shard changed between a stop and `--resume` is refused by name; a shard truncated or opened for writing under a
running training stops it in one line with a checkpoint (never SIGBUS); and a prepare killed with SIGKILL takes
every process it started with it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_corpus
from test_shards import leases_work

from faults.helpers import RUN, final, metrics, one_line_error, reslab_process, tree
from reslab.data.shards import MANIFEST, PREPARE_STATE, fingerprint
from reslab.data.tokenizer import FILENAME as TOKENIZER_FILE

BATCH = """
import contextlib, io, json, sys
from reslab.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def cli_batch(commands: list[list], timeout: float = 300) -> list[tuple[int, str]]:
    """Each command through `reslab.cli.main` in one fresh process (one start-up for many refusals): (exit, stderr).
    A traceback escaping the CLI ends that process, and the assertion here shows it."""
    done = subprocess.run([sys.executable, "-c", BATCH, json.dumps([[str(a) for a in c] for c in commands])],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [tuple(result) for result in json.loads(done.stdout.splitlines()[-1])]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A reslab data directory of 5 shards (about 20 kB of text), prepared by the CLI."""
    text = make_corpus(tmp_path_factory.mktemp("text") / "corpus.txt", chars=20_000)
    out = tmp_path_factory.mktemp("prepared") / "data"
    done = reslab_process(["data", "prepare", text, "--out", out, "--shard-tokens", "4000", "--workers", "1",
                           "--no-progress"])
    assert done.returncode == 0, done.stderr
    return out


def edited(manifest: dict, change) -> str:
    """The manifest after `change(manifest)`, its fingerprint recomputed where it still can be (so that only the
    edit itself is wrong), as JSON text."""
    change(manifest)
    try:
        manifest["fingerprint"] = fingerprint(manifest)
    except (KeyError, TypeError, AttributeError):
        pass
    return json.dumps(manifest)


def setitem(path: str, value):
    """A change that sets the key at dotted `path` (list indices as numbers) to `value`, or deletes it (None)."""
    def change(record):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for key in parents:
            record = record[key]
        if value is None:
            del record[last]
        else:
            record[last] = value
    return change


# (name, manifest change or JSON text transform, a phrase the one line must contain)
SCHEMA = [
    ("shard-not-object", setitem("shards.1", "shard-00001.bin"), "shards[1] must be an object"),
    ("bogus-dtype", setitem("dtype", "float32"), 'dtype must be one of "uint16", "uint32", got "float32"'),
    ("no-train-tokens", setitem("split.train_tokens", None), "split.train_tokens is missing"),
    ("string-count", setitem("shards.0.tokens", "4000"), 'shards[0].tokens must be an integer, got "4000"'),
    ("float-count", setitem("tokens", 20000.0), "tokens must be an integer"),
    ("negative-count", setitem("shards.2.tokens", -4000), "shards[2].tokens must be an integer >= 1"),
    ("bool-vocab", setitem("vocab_size", True), "vocab_size must be an integer"),
    ("zero-vocab", setitem("vocab_size", 0), "vocab_size must be an integer in [1"),
    ("train-over-tokens", setitem("split.train_tokens", 10**9), "is more than the"),
    ("val-disagrees", setitem("split.val_tokens", 1), "split.val_tokens is not tokens - split.train_tokens"),
    ("sum-disagrees", setitem("tokens", 12345), "tokens is 12,345 but its shards list"),
    ("no-shards", setitem("shards", []), "shards must be a list of length >= 1"),
    ("shards-object", setitem("shards", {"name": "x"}), "shards must be a list"),
    ("checksum-not-hex", setitem("shards.0.sha256", "z" * 64), "shards[0].sha256 must be a sha256"),
    ("max-id-above-vocab", setitem("shards.0.max_id", 10**6), "shards[0].max_id 1000000 is not below vocab_size"),
    ("shard-twice", lambda m: m["shards"].__setitem__(1, dict(m["shards"][0])), "lists 'shard-00000.bin' twice"),
    ("no-tokenizer-file", setitem("tokenizer.file", None), "tokenizer.file is missing"),
    ("characters-string", setitem("characters", "many"), "characters must be an integer"),
    ("format", setitem("format", "other"), 'format must be one of "reslab-tokens"'),
    ("version", setitem("version", 2), "version must be one of 1"),
    ("empty-object", lambda m: m.clear(), "format is missing"),
    ("not-object", "[1, 2]", "the file must be an object, got a list"),
    ("nan", lambda text: text.replace('"tokens": 20000', '"tokens": NaN'), "is not valid JSON"),
    ("deep", "[" * 100_000 + "]" * 100_000, "nests 100000 levels deep"),
    ("not-utf8", b"\xff\xfe{", "cannot read manifest"),
    ("edited-dtype", "UNSIGNED", "does not match its own fingerprint"),
    ("edited-split", "UNSIGNED-SPLIT", "does not match its own fingerprint"),
]
# names that lead out of the data directory: (name, how, phrase)
TRAVERSAL = [
    ("dotdot-shard", setitem("shards.0.name", "../outside.bin"), "shards[0].name is '../outside.bin', which leads "
                                                                "outside"),
    ("absolute-shard", setitem("shards.0.name", "/etc/passwd"), "shards[0].name is '/etc/passwd', which leads"),
    ("dotdot-tokenizer", setitem("tokenizer.file", "../outside.json"), "tokenizer.file is '../outside.json'"),
    ("symlink-shard", "SYMLINK:shard-00000.bin", "shards[0].name 'shard-00000.bin' is a symlink to"),
    ("symlink-tokenizer", "SYMLINK:" + TOKENIZER_FILE, f"tokenizer.file '{TOKENIZER_FILE}' is a symlink to"),
]


def make_variant(prepared: Path, where: Path, how) -> Path:
    """A copy of the prepared directory with one defect; files outside it hold exactly the bytes a name that leads
    out would find, so only the confinement can refuse them."""
    shutil.copytree(prepared, where)
    manifest_path = where / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for name in ("outside.bin", "outside.json"):
        source = "shard-00000.bin" if name.endswith(".bin") else TOKENIZER_FILE
        shutil.copy(prepared / source, where.parent / name)
    if isinstance(how, bytes):
        manifest_path.write_bytes(how)
    elif how == "UNSIGNED":  # a hand edit that keeps every number valid, fingerprint left as it was
        manifest_path.write_text(json.dumps({**manifest, "dtype": "uint32"}))
    elif how == "UNSIGNED-SPLIT":
        manifest["split"]["train_tokens"] -= 1
        manifest["split"]["val_tokens"] += 1
        manifest_path.write_text(json.dumps(manifest))
    elif isinstance(how, str) and how.startswith("SYMLINK:"):
        target = where.parent / ("outside.bin" if how.endswith(".bin") else "outside.json")
        (where / how[8:]).unlink()
        (where / how[8:]).symlink_to(target)
    elif isinstance(how, str):
        manifest_path.write_text(how)
    elif how.__code__.co_varnames[:1] == ("text",):
        manifest_path.write_text(how(json.dumps(manifest)))
    else:
        manifest_path.write_text(edited(manifest, how))
    return where


def test_every_manifest_defect_is_one_line_in_data_info_and_train(prepared, tmp_path):
    """27 defects of types, ranges, sums, structure, depth and hand edits: one line each naming manifest.json and the
    key, in `data info` and `data info --verify`; a sample of them in `train --data`, which writes nothing."""
    variants = {name: (make_variant(prepared, tmp_path / name / "data", how), phrase) for name, how, phrase in SCHEMA}
    commands = [[*prefix, folder] for folder, _ in variants.values() for prefix in (["data", "info"],
                                                                                   ["data", "info", "--verify"])]
    results = cli_batch(commands)
    for index, (name, (folder, phrase)) in enumerate(variants.items()):
        for result in results[2 * index:2 * index + 2]:
            one_line_error(*result)
            assert phrase in result[1] and f"{folder / MANIFEST}" in result[1], (name, result[1])
            assert "prepare the data again" in result[1], (name, result[1])
    trained = ["shard-not-object", "bogus-dtype", "no-train-tokens", "string-count", "deep", "edited-dtype"]
    before = {name: tree(variants[name][0]) for name in trained}
    results = cli_batch([["train", *RUN, "--data", variants[name][0], "--out", tmp_path / name / "run"]
                         for name in trained])
    for name, result in zip(trained, results):
        one_line_error(*result)
        assert variants[name][1] in result[1], (name, result[1])
        assert not (tmp_path / name / "run").exists() and tree(variants[name][0]) == before[name]


def test_names_that_lead_out_of_the_data_directory_are_refused(prepared, tmp_path):
    """`../x`, an absolute path, a symlink out: for shards and the tokenizer file, in all three commands, although
    the files they lead to hold exactly the right bytes (so --verify's checksums alone would pass them)."""
    variants = [(make_variant(prepared, tmp_path / name / "data", how), phrase) for name, how, phrase in TRAVERSAL]
    commands = []
    for folder, _ in variants:
        commands += [["data", "info", folder], ["data", "info", "--verify", folder],
                     ["train", *RUN, "--data", folder, "--out", folder.parent / "run"]]
    results = cli_batch(commands)
    for index, (folder, phrase) in enumerate(variants):
        for result in results[3 * index:3 * index + 3]:
            one_line_error(*result)
            assert phrase in result[1] and str(folder / MANIFEST) in result[1], result[1]
        assert not (folder.parent / "run").exists()


def test_a_damaged_tokenizer_file_is_one_line_naming_it(prepared, tmp_path):
    """The tokenizer file reads through the same reader: depth, schema, its own rules, and its checksum in the
    manifest (an edit that keeps it a valid tokenizer of the same size)."""
    good = json.loads((prepared / TOKENIZER_FILE).read_text())
    cases = [("deep", "[" * 100_000 + "]" * 100_000, "nests 100000 levels deep"),
             ("kind", {**good, "kind": "wordpiece"}, 'kind must be one of "char", "bpe", "ids"'),
             ("chars-string", {**good, "chars": "abc"}, "chars must be a list"),
             ("chars-long", {**good, "chars": ["ab", *good["chars"][1:]]}, "chars[0] must be a string of length"),
             ("unsorted", {**good, "chars": good["chars"][::-1]}, "must be sorted"),
             ("edited", {**good, "chars": [*good["chars"][:-1], "\u2603"]}, "does not match the checksum"),
             ("format", {**good, "format": "1"}, 'format must be an integer, got "1"')]
    folders = []
    for name, content, _ in cases:
        folder = tmp_path / name
        shutil.copytree(prepared, folder)
        (folder / TOKENIZER_FILE).write_text(content if isinstance(content, str) else json.dumps(content))
        folders.append(folder)
    for (name, _, phrase), folder, result in zip(cases, folders, cli_batch([["data", "info", f] for f in folders])):
        one_line_error(*result)
        assert phrase in result[1] and str(folder / TOKENIZER_FILE) in result[1], (name, result[1])


def test_the_fingerprint_covers_everything_that_decides_the_tokens(prepared):
    manifest = json.loads((prepared / MANIFEST).read_text())
    assert fingerprint(manifest) == manifest["fingerprint"]
    changes = [("dtype", "uint32"), ("vocab_size", 99), ("split.train_tokens", 1), ("shards.1.name", "x.bin"),
               ("shards.1.tokens", 3), ("shards.1.sha256", "0" * 64), ("tokenizer.file", "t.json"),
               ("tokenizer.sha256", "0" * 64), ("tokenizer.kind", "bpe")]
    for path, value in changes:
        copy = json.loads(json.dumps(manifest))
        setitem(path, value)(copy)
        assert fingerprint(copy) != manifest["fingerprint"], path


def test_a_shard_changed_between_stop_and_resume_is_refused_by_name(cli, prepared, tmp_path):
    """Same size, other bytes: the resume names the shard. The bytes put back and the directory copied elsewhere
    (every shard's ctime new: each hashed, and equal), the run resumes from there to the end."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(prepared, data)
    stopped = reslab_process(["train", *RUN, "--data", data, "--out", run, "--stop-at", "5"])
    assert stopped.returncode == 0, stopped.stderr
    shard = data / "shard-00001.bin"
    original = shard.read_bytes()
    shard.write_bytes(original[2:] + original[:2])  # the same tokens, rotated: same size, same ids, other bytes
    refused = reslab_process(["train", "--resume", run])
    one_line_error(refused.returncode, refused.stderr)
    assert f"{shard} does not match the checksum in its manifest: changed since run {run} started" in refused.stderr
    shard.write_bytes(original)
    shutil.copytree(data, tmp_path / "moved")
    code, _, err = cli("train", "--resume", run, "--no-progress", "--data", tmp_path / "moved")
    assert code == 0 and json.loads((run / "summary.json").read_text())["steps"] == 24, err


def cache_shard(cache: Path) -> Path:
    found = sorted(cache.glob("tokens/*/shard-00000.bin"))
    assert len(found) == 1, found
    return found[0]


def run_until_checkpointed(fault_corpus: Path, run: Path, cache: Path, writer=None) -> subprocess.Popen:
    """Start the fault suite's run in the background; once its first checkpoint is on disk, stop it (SIGSTOP)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESLAB_CACHE": str(cache)}
    process = subprocess.Popen([sys.executable, "-m", "reslab", "train", *RUN, "--data", str(fault_corpus), "--out",
                                str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               pass_fds=(writer,) if writer is not None else ())
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.safetensors").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    process.send_signal(signal.SIGSTOP)
    if process.poll() is not None or not (run / "checkpoint.safetensors").exists():
        process.kill()
        pytest.fail(f"the run ended or never checkpointed: {process.communicate()}")
    return process


def stopped_for_data(process: subprocess.Popen, run: Path, shard: Path, phrase: str) -> int:
    """The run's one line, exit 2, naming the shard; the checkpoint is at the step the line names."""
    _, err = process.communicate(timeout=120)
    one_line_error(process.returncode, err)
    assert phrase in err and str(shard) in err and "checkpointed" in err and f"reslab train --resume {run}" in err, err
    assert "for writing while this run read it" in err or "was truncated while this run read it" in err, err
    step = int(err.split("stopped at step ")[1].split(",")[0])
    assert json.loads((run / "state.json").read_text())["step"] == step
    return step


def test_a_shard_opened_for_writing_under_a_run_stops_it_checkpointed(cli, fault_corpus, reference, tmp_path,
                                                                     monkeypatch):
    """A leased shard: the truncation waits for the end of the run's step, the run stops in one line, checkpointed
    (before: SIGBUS, exit 135, the steps since the last checkpoint lost); with the shard put back, --resume ends
    exactly like the uninterrupted run. (Stopped between two steps, the run lets the lease go at once: then its
    next read finds the shard cut short, the same stop.)"""
    (tmp_path / "probe").write_bytes(b"x")
    if not leases_work(tmp_path / "probe"):
        pytest.skip("no read leases here (a file system without them): the pread test below covers this machine")
    run, cache = tmp_path / "run", tmp_path / "cache"
    process = run_until_checkpointed(fault_corpus, run, cache)
    shard = cache_shard(cache)
    original = shard.read_bytes()
    truncate = subprocess.Popen([sys.executable, "-c", f"import os; os.truncate({str(shard)!r}, 100)"])
    try:
        time.sleep(0.2)
        assert truncate.poll() is None  # held back by the run's lease
        process.send_signal(signal.SIGCONT)
        step = stopped_for_data(process, run, shard, "")
        assert truncate.wait(timeout=60) == 0 and shard.stat().st_size == 100  # done once the step ended
    finally:
        truncate.kill()
        process.kill()
    assert step < 24
    monkeypatch.setenv("RESLAB_CACHE", str(cache))
    code, _, err = cli("train", "--resume", run, "--no-progress")
    assert code == 2 and str(shard) in err and "truncated" in err
    shard.write_bytes(original)
    code, _, err = cli("train", "--resume", run, "--no-progress")
    assert code == 0, err
    assert metrics(run) == reference["metrics"] and final(run) == reference["final"]


def test_a_shard_truncated_under_a_run_without_a_lease_stops_it_checkpointed(fault_corpus, tmp_path, monkeypatch):
    """A shard open for writing elsewhere cannot be leased, so the run reads it with pread: truncated under the
    run, the next read comes up short, and the run stops in one line with a checkpoint of its last step."""
    from reslab.data.training import training_data

    run, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("RESLAB_CACHE", str(cache))
    training_data(str(fault_corpus), "char", None)  # the text prepared into the cache, as the run will find it
    shard = cache_shard(cache)
    writer = os.open(shard, os.O_RDWR)  # held open for writing: the run cannot lease the shard
    process = run_until_checkpointed(fault_corpus, run, cache)
    try:
        os.ftruncate(writer, 0)
        process.send_signal(signal.SIGCONT)
        step = stopped_for_data(process, run, shard, "was truncated while this run read it")
    finally:
        os.close(writer)
        process.kill()
    assert 5 <= step < 24


# ---------------------------------------------------------------------------------------------- orphans


def group_members(group: int) -> list[tuple[int, str]]:
    """(pid, command) of every live process in process group `group`, from /proc (zombies are dead: left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append((int(stat.parent.name), command))
    return found


SMALL_PARALLEL = ("import sys\nfrom reslab.data import prepare\nprepare.PARALLEL_BYTES = 65536\n"
                  "from reslab.cli import main\nsys.exit(main(['data', 'prepare', *sys.argv[1:]]))")


@pytest.fixture(scope="module")
def big_text(tmp_path_factory) -> Path:
    """4 MB of play-like text with a few non-ASCII characters (the slower, decoding branch of the char path)."""
    folder = tmp_path_factory.mktemp("big")
    base = make_corpus(folder / "base.txt", chars=500_000).read_text()
    (folder / "text.txt").write_text(base.replace("queen", "quéén") * 8)
    return folder / "text.txt"


@pytest.mark.parametrize("path", ["char", "bpe"])
def test_a_prepare_killed_with_sigkill_leaves_no_process_and_writes_nothing_more(big_text, tmp_path, path):
    """Both paths (charprep's workers, and the general path's pool): SIGKILL the prepare mid-work; within a few
    seconds nothing of its process group lives on (workers, multiprocessing's resource tracker), and no shard
    appears in --out afterwards."""
    extra = ["--shard-tokens", "20000"] if path == "char" else ["--tokenizer", "bpe", "--vocab-size", "300",
                                                                 "--bpe-sample-mb", "0.2", "--shard-tokens", "20000"]
    out = tmp_path / "data"
    process = subprocess.Popen([sys.executable, "-c", SMALL_PARALLEL, str(big_text), "--out", str(out),
                                "--workers", "2", "--no-progress", *extra], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            workers = [pid for pid, command in group_members(process.pid) if "spawn_main" in command]
            if len(workers) == 2 and (out / PREPARE_STATE).exists() and any(out.glob("shard-*.bin")):
                break
            time.sleep(0.002)
        assert process.poll() is None, "the prepare ended before it could be killed"
        process.kill()
        process.wait()
        deadline = time.monotonic() + 5
        while group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_members(process.pid) == []
        written = sorted(p.name for p in out.iterdir())
        time.sleep(1.0)
        assert sorted(p.name for p in out.iterdir()) == written and not (out / MANIFEST).exists()
    finally:
        for pid, _ in group_members(process.pid):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------- a hostile user, round 3


def test_hostile_files_in_a_data_directory_are_one_line_never_a_hang(prepared, tmp_path):
    """What a third hostile round found, each refused in one line naming the file (before: a FIFO meta.pkl or
    modded-nanogpt .bin hung `data info` and `train` forever, a symlink loop for a shard or tokenizer name was a
    RuntimeError traceback, a vocab_size of True in meta.pkl was refused without naming meta.pkl)."""
    import pickle

    import numpy as np

    def nanogpt(name: str, meta) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for split in ("train", "val"):
            (folder / f"{split}.bin").write_bytes(np.arange(300, dtype=np.uint16).tobytes())
        if meta == "fifo":
            os.mkfifo(folder / "meta.pkl")
        else:
            (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
        return folder

    def modded(name: str, extra: str, count: int = 300) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        header = np.zeros(256, np.int32)
        header[:3] = 20240520, 1, count
        (folder / "b_train.bin").write_bytes(header.tobytes() + np.arange(300, dtype=np.uint16).tobytes())
        if extra == "fifo":
            os.mkfifo(folder / "a.bin")
        elif extra == "dir":
            (folder / "a.bin").mkdir()
        return folder

    def looped(name: str, link: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(prepared, folder)
        (folder / link).unlink()
        (folder / link).symlink_to(link)
        return folder

    cases = [(nanogpt("meta-fifo", "fifo"), "meta.pkl is not a regular file"),
             (nanogpt("meta-bool", {"vocab_size": True}), "meta.pkl has no vocab_size that is an integer"),
             (nanogpt("meta-zero", {"vocab_size": 0}), "meta.pkl has no vocab_size that is an integer"),
             (modded("modded-fifo", "fifo"), "a.bin is not a regular file"),
             (modded("modded-dir", "dir"), "a.bin is not a regular file"),
             (modded("modded-count", "", count=0), "b_train.bin: its header counts 0 tokens"),
             (looped("loop-shard", "shard-00001.bin"), "shards[1].name 'shard-00001.bin' is a symlink loop"),
             (looped("loop-tokenizer", TOKENIZER_FILE), f"tokenizer.file '{TOKENIZER_FILE}' is a symlink loop")]
    results = cli_batch([["data", "info", folder] for folder, _ in cases], timeout=60)  # a hang fails in a minute
    for (folder, phrase), result in zip(cases, results):
        one_line_error(*result)
        assert phrase in result[1] and str(folder) in result[1], result[1]


def test_prepare_never_writes_over_what_it_cannot_vouch_for(tmp_path):
    """A prepare-state.json reslab cannot use (reslab writes it atomically, so damaged means edited or not reslab's)
    beside a user's files: refused, every byte kept (before: the prepare started afresh and overwrote the user's
    shard-00000.bin and tokenizer.reslab.json). Flags that crashed: --bpe-sample-mb inf (OverflowError traceback),
    a BPE --vocab-size of 10^12 (the tokenizers library aborted the process)."""
    text = make_corpus(tmp_path / "corpus.txt", chars=3000)
    users = []
    for name, state in (("garbage", "not json"), ("hand-names", json.dumps({
            "job": {}, "shards": [{"name": "../x.bin", "tokens": 1, "sha256": "0" * 64}], "position": [0, 0, 0],
            "characters": 0, "text_seen": True}))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / PREPARE_STATE).write_text(state)
        (folder / "shard-00000.bin").write_text("the user's own")
        (folder / TOKENIZER_FILE).write_text("the user's own")
        users.append((folder, tree(folder)))
    results = cli_batch([["data", "prepare", text, "--out", folder, "--no-progress"] for folder, _ in users] + [
        ["data", "prepare", text, "--out", tmp_path / "inf", "--tokenizer", "bpe", "--bpe-sample-mb", "inf"],
        ["data", "prepare", text, "--out", tmp_path / "huge", "--tokenizer", "bpe", "--vocab-size", 10**12]])
    for (folder, before), result in zip(users, results):
        one_line_error(*result)
        assert str(folder / PREPARE_STATE) in result[1] and "nothing was changed" in result[1], result[1]
        assert tree(folder) == before
    for result, phrase in zip(results[2:], ["--bpe-sample-mb must be a positive number", "is too large for a BPE"]):
        one_line_error(*result)
        assert phrase in result[1], result[1]
    assert not (tmp_path / "inf").exists() and not (tmp_path / "huge").exists()


def test_a_second_prepare_into_the_same_out_is_refused_while_the_first_runs(big_text, tmp_path):
    """Two prepares into one --out (before: both exited 0, and the directory's manifest listed shards the other one
    had overwritten; or the second died on a shard the first renamed away). The first, stopped mid-prepare with
    SIGSTOP, holds --out: a second one (other options, or the same) is refused in one line and changes nothing; the
    first, continued, finishes with a directory that verifies."""
    out = tmp_path / "data"
    first = subprocess.Popen([sys.executable, "-m", "reslab", "data", "prepare", str(big_text), "--out", str(out),
                              "--shard-tokens", "20000", "--workers", "1", "--no-progress"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (out / PREPARE_STATE).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None and (out / PREPARE_STATE).exists(), "the prepare ended before it was stopped"
        before = tree(out)
        results = cli_batch([["data", "prepare", big_text, "--out", out, "--shard-tokens", shards, "--workers", "1",
                              "--no-progress"] for shards in ("30000", "20000")])
        for result in results:
            one_line_error(*result)
            assert f"--out {out} is being written by another reslab data prepare" in result[1], result[1]
        assert tree(out) == before
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        first.kill()
    (result,) = cli_batch([["data", "info", "--verify", out]])
    assert result[0] == 0, result


def test_a_shard_truncated_during_an_evaluation_keeps_the_resume_exact(cli, fault_corpus, reference, tmp_path,
                                                                      monkeypatch):
    """Read with pread (a writer holds the shard open: no lease), the shard cut back to its training tokens: the
    next evaluation's read comes up short after the step's update. The run stops without checkpointing that half
    step (before: it checkpointed step N without N's evaluation and log record, and the resumed metrics.jsonl lacked
    them); with the shard put back, the resume equals the uninterrupted run."""
    from reslab.data.training import training_data

    run, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("RESLAB_CACHE", str(cache))
    training_data(str(fault_corpus), "char", None)
    shard = cache_shard(cache)
    original = shard.read_bytes()
    train_tokens = json.loads((shard.parent / MANIFEST).read_text())["split"]["train_tokens"]
    writer = os.open(shard, os.O_RDWR)
    process = run_until_checkpointed(fault_corpus, run, cache)
    try:
        os.ftruncate(writer, 2 * train_tokens)  # every training window still reads; no validation window does
        process.send_signal(signal.SIGCONT)
        _, err = process.communicate(timeout=120)
    finally:
        os.close(writer)
        process.kill()
    one_line_error(process.returncode, err)
    assert "was truncated while this run read it" in err and "stopped during step " in err, err
    step = int(err.split("stopped during step ")[1].split(";")[0])
    kept = json.loads((run / "state.json").read_text())["step"]
    assert step % 8 == 0 and kept < step and f"the last checkpoint (step {kept}) is kept" in err, err
    shard.write_bytes(original)
    code, _, err = cli("train", "--resume", run, "--no-progress")
    assert code == 0, err
    assert metrics(run) == reference["metrics"] and final(run) == reference["final"]


@pytest.mark.parametrize("args, phrase", [
    (["data", "prepare", "TEXT", "--out", "OUT", "--vocab-size", "300"], "--vocab-size applies only with --tokenizer"),
    (["data", "prepare", "TEXT", "--out", "OUT", "--bpe-sample-mb", "1"], "--bpe-sample-mb applies only with"),
    (["data", "info", "DATA", "--vocab-size", "300"], "--vocab-size does not apply to"),
    (["train", "--steps", "1", "--data", "DATA", "--vocab-size", "300", "--out", "OUT"], "--vocab-size does not apply"),
    (["train", "--steps", "1", "--data", "DATA", "--tokenizer", "bpe", "--vocab-size", "300", "--out", "OUT"],
     "--tokenizer bpe does not apply to --data"),
    (["train", "--steps", "1", "--data", "TEXT", "--vocab-size", "300", "--out", "OUT"],
     "--vocab-size applies only with --tokenizer bpe"),
])
def test_data_flags_that_would_be_ignored_are_refused(cli, prepared, fault_corpus, tmp_path, args, phrase):
    """A data flag the data would not use (a char tokenizer's vocabulary, a prepared directory's tokenizer) was
    silently ignored; it is refused in one line, before anything is written."""
    places = {"TEXT": fault_corpus, "DATA": prepared, "OUT": tmp_path / "out"}
    before = tree(prepared)
    code, _, err = cli(*[places.get(arg, arg) for arg in args])
    one_line_error(code, err)
    assert phrase in err and not (tmp_path / "out").exists() and tree(prepared) == before
