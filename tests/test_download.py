"""`t2s data download bird`: fetch, verify, resume and unpack, against a real local HTTP server.

No internet here: the server (http.server on 127.0.0.1, a free port, in a thread) serves small zips
shaped like the official archives (dev.zip -> dev_20240627/{dev.json, dev_databases.zip, ...}, with the
__MACOSX junk the real ones carry; train.zip -> train/{train.json, train_databases.zip, ...}).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import socket
import sqlite3
import threading
import time
import typing
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from text2sql_ray import bird, cli
from text2sql_ray.download import DOWNLOAD_MANIFEST, DownloadError, download_bird

OFFLINE_HINT = "check your connection or download manually from https://bird-bench.github.io and pass --data"


# --------------------------------------------------------------------------------------------------
# Archives shaped like the official ones
# --------------------------------------------------------------------------------------------------


def _sqlite_bytes(tmp_path: Path, db_id: str) -> bytes:
    path = tmp_path / f"{db_id}.sqlite"
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO items VALUES (1, 'a'), (2, 'b');")
    con.commit()
    con.close()
    return path.read_bytes()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def make_archive(tmp_path: Path, split: str = "dev") -> bytes:
    """A zip laid out like the official `split` archive, two questions over one database."""
    db_id = "tiny_shop"
    top = "dev_20240627" if split == "dev" else "train"
    questions = [
        {"db_id": db_id, "question": "How many items?", "evidence": "", "SQL": "SELECT COUNT(*) FROM items",
         "difficulty": "simple"},
        {"db_id": db_id, "question": "Name of item 2?", "evidence": "", "SQL": "SELECT name FROM items WHERE id = 2",
         "difficulty": "moderate"},
    ]
    if split == "dev":  # dev.json carries question_id; the official train.json does not
        questions = [dict(q, question_id=i) for i, q in enumerate(questions)]
    inner = _zip({
        f"{split}_databases/{db_id}/{db_id}.sqlite": _sqlite_bytes(tmp_path, db_id),
        f"{split}_databases/{db_id}/database_description/items.csv": b"original_column_name,column_description\r\nid,the id\r\n",
        f"__MACOSX/{split}_databases/{db_id}/._{db_id}.sqlite": b"\x00\x05\x16\x07junk",
    })
    return _zip({
        f"{top}/{split}.json": json.dumps(questions).encode(),
        f"{top}/{split}_tables.json": json.dumps([{"db_id": db_id, "table_names_original": ["items"]}]).encode(),
        f"{top}/{split}_gold.sql": "".join(f"{q['SQL']}\t{db_id}\n" for q in questions).encode(),
        f"{top}/{split}_databases.zip": inner,
        f"__MACOSX/{top}/._{split}.json": b"\x00\x05\x16\x07junk",
    })


# --------------------------------------------------------------------------------------------------
# A real HTTP server in a thread
# --------------------------------------------------------------------------------------------------


class _Quiet:
    def log_message(self, *args):  # keep pytest output clean
        pass


@contextmanager
def http_server(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def static_server(directory: Path):
    """http.server's own static file handler (it ignores Range, like many mirrors)."""

    class Handler(_Quiet, http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(directory), **kw)

    with http_server(Handler) as url:
        yield url


def range_handler(payload: bytes, cut_first_after: int | None = None):
    """Serves /dev.zip honouring `Range: bytes=N-`; the first response can stop after `cut_first_after` bytes."""

    class Handler(_Quiet, http.server.BaseHTTPRequestHandler):
        ranges: typing.ClassVar[list] = []
        cut = cut_first_after

        def do_GET(self):
            if self.path != "/dev.zip":
                self.send_error(404)
                return
            rng = self.headers.get("Range")
            Handler.ranges.append(rng)
            start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
            body = payload[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if Handler.cut is not None:  # the connection drops mid-transfer
                self.wfile.write(body[: Handler.cut])
                Handler.cut = None
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connecting is refused at once
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def served_dev(tmp_path):
    """(base URL, archive bytes) of a static server holding a dev.zip shaped like the official one."""
    site = tmp_path / "site"
    site.mkdir()
    payload = make_archive(tmp_path, "dev")
    (site / "dev.zip").write_bytes(payload)
    with static_server(site) as url:
        yield url, payload


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_dev_archive_unpacks_both_zip_levels_into_a_split_load_split_reads(tmp_path, served_dev):
    url, _ = served_dev
    out = tmp_path / "bird"
    path = download_bird("dev", out, base_url=url, progress=False)
    assert path == out / "dev"
    split = bird.load_split(path)
    assert split.name == "dev" and [q["question_id"] for q in split.questions] == [0, 1]
    assert split.db_path("tiny_shop") == path / "dev_databases" / "tiny_shop" / "tiny_shop.sqlite"
    assert split.missing_dbs() == [] and "tiny_shop" in split.tables
    assert bird.read_descriptions(split.db_dir("tiny_shop"))["items"][0]["column_description"] == "the id"
    con = sqlite3.connect(f"file:{split.db_path('tiny_shop')}?mode=ro", uri=True)
    assert con.execute("SELECT COUNT(*) FROM items").fetchone() == (2,)
    con.close()
    # the inner zip, the macOS junk, the archive and every temp dir are gone
    assert not (path / "dev_databases.zip").exists()
    assert not list(out.rglob("__MACOSX"))
    assert leftovers(out) == ["dev"]


def test_unpinned_download_records_and_prints_the_computed_sha256(tmp_path, served_dev, capsys):
    url, payload = served_dev
    path = download_bird("dev", tmp_path / "bird", base_url=url, progress=False)
    digest = hashlib.sha256(payload).hexdigest()
    manifest = json.loads((path / DOWNLOAD_MANIFEST).read_text())
    assert manifest["sha256"] == digest and manifest["sha256_verified"] is False
    assert manifest["release"] == "dev_20240627" and manifest["questions"] == 2 and manifest["databases_present"] == 1
    assert f"--sha256 {digest}" in capsys.readouterr().out


def test_pinned_matching_sha256_is_marked_verified(tmp_path, served_dev):
    url, payload = served_dev
    digest = hashlib.sha256(payload).hexdigest()
    path = download_bird("dev", tmp_path / "bird", base_url=url, sha256=digest.upper(), progress=False)
    assert json.loads((path / DOWNLOAD_MANIFEST).read_text())["sha256_verified"] is True


def test_wrong_sha256_fails_clearly_and_leaves_no_partial_output(tmp_path, served_dev):
    url, _ = served_dev
    out = tmp_path / "bird"
    with pytest.raises(DownloadError, match=r"sha256 mismatch .* expected 0{64}, got [0-9a-f]{64}.*nothing was unpacked"):
        download_bird("dev", out, base_url=url, sha256="0" * 64, progress=False)
    assert leftovers(out) == []  # no .part, no archive, no temp dir, no dev/


def test_unreachable_server_gives_the_offline_error_quickly(tmp_path):
    url = closed_port_url()
    out = tmp_path / "bird"
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download_bird("dev", out, base_url=url, timeout=5, progress=False)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert msg.startswith(f"cannot reach {url}/dev.zip") and OFFLINE_HINT in msg
    assert leftovers(out) == []


def test_missing_archive_on_the_server_names_the_http_status(tmp_path):
    empty = tmp_path / "site"
    empty.mkdir()
    with static_server(empty) as url, pytest.raises(DownloadError, match=r"answered HTTP 404.*--base-url"):
        download_bird("dev", tmp_path / "bird", base_url=url, progress=False)


def test_interrupted_download_keeps_its_part_and_resumes_with_a_range_request(tmp_path):
    payload = make_archive(tmp_path, "dev")
    cut = len(payload) // 3
    handler = range_handler(payload, cut_first_after=cut)
    out = tmp_path / "bird"
    with http_server(handler) as url:
        with pytest.raises(DownloadError, match="run the same command again to resume"):
            download_bird("dev", out, base_url=url, progress=False)
        assert (out / "dev.zip.part").stat().st_size == cut
        path = download_bird("dev", out, base_url=url, sha256=hashlib.sha256(payload).hexdigest(), progress=False)
    assert handler.ranges == [None, f"bytes={cut}-"]
    assert len(bird.load_split(path).questions) == 2
    assert leftovers(out) == ["dev"]


def test_a_server_that_ignores_range_restarts_the_download_from_zero(tmp_path, served_dev, capsys):
    url, payload = served_dev
    out = tmp_path / "bird"
    out.mkdir()
    (out / "dev.zip.part").write_bytes(b"stale bytes from an older attempt")
    path = download_bird("dev", out, base_url=url, sha256=hashlib.sha256(payload).hexdigest(), progress=False)
    assert "does not resume downloads; starting again" in capsys.readouterr().err
    assert len(bird.load_split(path).questions) == 2 and leftovers(out) == ["dev"]


def test_existing_split_is_kept_without_contacting_the_server(tmp_path, served_dev):
    url, _ = served_dev
    out = tmp_path / "bird"
    first = download_bird("dev", out, base_url=url, progress=False)
    again = download_bird("dev", out, base_url=closed_port_url(), progress=False)  # would fail if it connected
    assert again == first and len(bird.load_split(again).questions) == 2


def test_not_a_bird_archive_is_rejected_and_cleaned_up(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "dev.zip").write_bytes(_zip({"something/else.txt": b"hello"}))
    out = tmp_path / "bird"
    with static_server(site) as url, pytest.raises(DownloadError, match=r"holds no dev.json"):
        download_bird("dev", out, base_url=url, progress=False)
    assert leftovers(out) == []


def test_cli_downloads_both_splits_and_reports_where_they_are(tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    (site / "dev.zip").write_bytes(make_archive(tmp_path, "dev"))
    (site / "train.zip").write_bytes(make_archive(tmp_path, "train"))
    out = tmp_path / "bird"
    with static_server(site) as url:
        rc = cli.main(["data", "download", "bird", "--split", "both", "--out", str(out), "--base-url", url])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"pass --data {out / 'dev'}" in printed and f"pass --data {out / 'train'}" in printed
    train = bird.load_split(out / "train")
    assert train.name == "train" and [q["question_id"] for q in train.questions] == [0, 1]
    assert train.db_path("tiny_shop") is not None
    assert leftovers(out) == ["dev", "train"]


def test_cli_offline_exits_1_with_the_offline_message(tmp_path, capsys):
    rc = cli.main(["data", "download", "bird", "--out", str(tmp_path / "bird"), "--base-url", closed_port_url()])
    assert rc == 1
    assert OFFLINE_HINT in capsys.readouterr().err


def test_cli_sha256_with_both_splits_is_a_usage_error(tmp_path, capsys):
    rc = cli.main(["data", "download", "bird", "--split", "both", "--sha256", "ab", "--out", str(tmp_path)])
    assert rc == 2 and "one archive" in capsys.readouterr().err
