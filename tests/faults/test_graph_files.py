"""The files `reslab audit` and `reslab diagram` write and read, as real processes: a write that fails (the file size
limit, as a full disk) keeps the old file whole and names it in one line; a design or expected-audit file nested
100,000 deep is one line too, not a RecursionError."""

import pytest

from faults.helpers import file_size_limit, one_line_error, reslab_process

OLD = b"an older version, to be kept whole\n"
LIMIT = 16  # bytes: every diagram, design and expected audit is longer
# command -> its arguments, OUT standing for the file it writes (on cpu: a small model traces faster there than on
# meta, whose first use loads torch's decompositions)
WRITERS = {
    "diagram -o": ["diagram", "mlp", "--device", "cpu", "-o", "OUT.svg"],
    "audit --write-design": ["audit", "mlp", "--device", "cpu", "--write-design", "OUT.json"],
    "audit --write-expect": ["audit", "mlp", "--device", "cpu", "--write-expect", "OUT.json"],
}


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_write_that_fails_keeps_the_old_file_and_names_it(tmp_path, command):
    args = WRITERS[command]
    target = tmp_path / args[-1].replace("OUT", "old")
    target.write_bytes(OLD)
    done = reslab_process([*args[:-1], target], preexec_fn=file_size_limit(LIMIT))
    one_line_error(done.returncode, done.stderr)
    assert str(target) in done.stderr and "file size limit" in done.stderr, done.stderr
    assert target.read_bytes() == OLD
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temp file, no empty file


@pytest.mark.parametrize("flag", ["--design", "--expect"])
def test_json_nested_100000_deep_is_one_line(tmp_path, flag):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    done = reslab_process(["audit", "mlp", flag, deep])
    one_line_error(done.returncode, done.stderr)
    assert str(deep) in done.stderr and "deep" in done.stderr, done.stderr
    assert done.stdout == ""  # refused before the model is traced
