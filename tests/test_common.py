"""The JSONL/JSON writers and readers of common.py: whatever a row holds, it is written and read back intact."""

from __future__ import annotations

import json

import pytest

from text2sql_ray.common import iter_jsonl, json_dumps, read_jsonl, write_json, write_jsonl

# Strings that broke the old pair: a lone surrogate (valid JSON as an escape, not encodable as UTF-8),
# and the line breaks str.splitlines() splits on beside \n and \r.
AWKWARD = [
    "SELECT '\ud800'",
    "SELECT 'a\udfffb'",
    "SELECT 'x\u2028y'",
    "SELECT 'x\u2029y'",
    "SELECT 'x\x85y'",
    "SELECT 'x\x0by\x0cz\x1c\x1d\x1e'",
    "SELECT 'a\r\nb\rc\nd'",
    "SELECT '\U0001f600 caf\u00e9 \u4e2d\u6587'",
    "",
]


def test_every_awkward_string_round_trips_through_write_jsonl_and_read_jsonl(tmp_path):
    rows = [{"question_id": i, "sql": s, "nested": {"k\u2028": [s]}} for i, s in enumerate(AWKWARD)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert read_jsonl(path) == rows
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == len(rows)  # one physical line per row for any line splitter
    assert "\u2028" not in text and "\x85" not in text and "\ud800" not in path.read_bytes().decode("utf-8", "replace")


def test_write_json_accepts_lone_surrogates_and_reads_back(tmp_path):
    obj = {"0": "SELECT '\ud800'\t----- bird -----\tdb"}
    path = write_json(tmp_path / "p.json", obj)
    assert json.loads(path.read_text(encoding="utf-8")) == obj


def test_json_dumps_keeps_ordinary_unicode_readable():
    assert json_dumps({"q": "caf\u00e9 \u4e2d"}) == '{"q": "caf\u00e9 \u4e2d"}'


def test_iter_jsonl_names_the_line_of_bad_json_and_of_non_utf8_bytes(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not valid JSON"):
        list(iter_jsonl(p))
    p.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: not UTF-8"):
        read_jsonl(p)


def test_a_manifest_records_the_sqlite_version_its_verdicts_came_from(tmp_path):
    """Execution verdicts can depend on SQLite (3.43+ sums floats with compensation: an AVG's last bit), so every
    stage's manifest says which one ran."""
    import sqlite3

    from text2sql_ray.common import read_manifest, write_manifest

    write_manifest(tmp_path, "evaluate", {"x": 1}, 0.0, counts={"n": 2})
    m = read_manifest(tmp_path)
    assert m["sqlite_version"] == sqlite3.sqlite_version and m["stage"] == "evaluate" and m["counts"] == {"n": 2}
