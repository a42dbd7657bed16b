"""The one JSON reader every file format goes through: depth measured without recursion, schemas, confined paths."""

from __future__ import annotations

import json

import pytest

from reslab.errors import ReslabError
from reslab.io import Field, check_schema, confined_path, nesting_depth, parse_json, read_json_file


@pytest.mark.parametrize("value", [1, "x", [], {}, [[1], {"a": [2, {"b": 3}]}], {"s": "[[[{{{"}, ["\\\"[[[", [[]]]])
def test_nesting_depth_is_json_depth(value):
    def depth(v):
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        return 0

    assert nesting_depth(json.dumps(value)) == depth(value)


def test_deep_json_is_one_line_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ReslabError, match=r"deep.json nests 100000 levels deep.*; write it again") as caught:
        read_json_file(path, "write it again")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text", ["{", '{"a": NaN}', '{"a": Infinity}', "\ufeff{}"])
def test_malformed_json_names_the_source(text):
    with pytest.raises(ReslabError, match="src is not valid JSON"):
        parse_json(text, "src", "fix it")


def test_binary_and_missing_files(tmp_path):
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ReslabError, match="cannot read manifest .*bin.json"):
        read_json_file(tmp_path / "bin.json", "fix", what="manifest")
    with pytest.raises(ReslabError, match="no manifest .*none.json; fix"):
        read_json_file(tmp_path / "none.json", "fix", what="manifest")
    with pytest.raises(ReslabError, match="is a directory"):
        read_json_file(tmp_path, "fix")


SCHEMA = {"dtype": Field(str, choices=("uint16", "uint32")), "tokens": Field(int, minimum=1),
          "rate": Field(float, required=False, maximum=1.0),
          "shards": Field(list, items={"name": Field(str, minimum=1), "tokens": Field(int, minimum=1)})}


@pytest.mark.parametrize("record, message", [
    ({"tokens": 1, "shards": []}, r"m.json: dtype is missing"),
    ({"dtype": "int8", "tokens": 1, "shards": []}, r'dtype must be one of "uint16", "uint32", got "int8"'),
    ({"dtype": "uint16", "tokens": True, "shards": []}, r"tokens must be an integer, got true"),
    ({"dtype": "uint16", "tokens": 0, "shards": []}, r"tokens must be an integer >= 1, got 0"),
    ({"dtype": "uint16", "tokens": 1, "rate": 2, "shards": []}, r"rate must be a number <= 1, got 2"),
    ({"dtype": "uint16", "tokens": 1, "shards": [7]}, r"shards\[0\] must be an object, got 7"),
    ({"dtype": "uint16", "tokens": 1, "shards": [{"name": "a", "tokens": "9"}]},
     r'shards\[0\].tokens must be an integer, got "9"'),
    ([], r"the file must be an object, got a list"),
])
def test_schema_violations_name_file_key_and_fix(record, message):
    with pytest.raises(ReslabError, match=message + ".*; redo$"):
        check_schema(record, SCHEMA, "m.json", "redo")


def test_schema_accepts_a_valid_record():
    check_schema({"dtype": "uint32", "tokens": 5, "rate": 0, "shards": [{"name": "s", "tokens": 5}]}, SCHEMA,
                 "m.json", "redo")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "~/x", "", None, 3, "a\x00b"])
def test_names_leading_out_are_refused(tmp_path, name):
    with pytest.raises(ReslabError, match="m.json: shards"):
        confined_path(tmp_path, name, "m.json", "shards[0].name", "redo")


def test_symlink_out_is_refused_and_inside_is_kept(tmp_path):
    inside, outside = tmp_path / "data", tmp_path / "secret"
    inside.mkdir()
    outside.write_text("x")
    (inside / "own").write_text("y")
    (inside / "out").symlink_to(outside)
    (inside / "alias").symlink_to(inside / "own")
    with pytest.raises(ReslabError, match="symlink to .*secret, outside"):
        confined_path(inside, "out", "m.json", "tokenizer.file", "redo")
    assert confined_path(inside, "alias", "m.json", "k", "redo") == inside / "alias"
    assert confined_path(inside, "sub/own", "m.json", "k", "redo") == inside / "sub/own"
