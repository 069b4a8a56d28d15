"""`t2s data download bird [--split dev|train|both] [--out DIR]`: fetch, verify and unpack the official BIRD archives.

The official archives, as the seed recipe's data/download_{dev,train}_unzip.sh fetch them:
  dev.zip   -> dev_20240627/{dev.json, dev_gold.sql, dev_tables.json, dev_databases.zip, ...}
  train.zip -> train/{train.json, train_gold.sql, train_tables.json, train_databases.zip}
Each holds a second zip with the SQLite databases; both levels are unpacked. The result is
<out>/dev and <out>/train, the layout `--data` and $T2S_BIRD_DATA expect.
Steps: download to <archive>.part (resumed with an HTTP Range request when the server allows),
verify the sha256, rename to <archive>, unpack into a hidden temp dir beside the target, validate
with `bird.load_split`, rename into place. A failure at any step leaves no half-written <out>/<split>.
"""

from __future__ import annotations

import json
from pathlib import Path

from .bird import load_split

BIRD_BASE_URL = "https://bird-bench.oss-cn-beijing.aliyuncs.com"
BIRD_HOME = "https://bird-bench.github.io"
BIRD_ARCHIVES = {"dev": "dev.zip", "train": "train.zip"}
BIRD_RELEASES = {"dev": "dev_20240627", "train": "train"}
# Expected sha256 of each official archive. Honest state: None = not pinned. These archives could not
# be downloaded where this code was written (no internet), so no hash was ever measured here. Until one
# is filled in, the download prints the hash it computed so you can pin it (`--sha256 HASH` on the next
# download, or here). A pinned hash that does not match fails the download and deletes the file.
BIRD_SHA256: dict[str, str | None] = {"dev": None, "train": None}
DOWNLOAD_MANIFEST = "download.json"
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download could not be fetched, verified or unpacked; the message says what to do."""


def _offline_message(url: str, reason: object) -> str:
    return (
        f"cannot reach {url} ({reason}): check your connection or download manually from {BIRD_HOME} "
        "and pass --data."
    )


def _sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress(total: int | None, desc: str, enabled: bool, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, mininterval=1.0)


def _fetch(url: str, part: Path, timeout: float, progress: bool, _retry_416: bool = True) -> None:
    """Download `url` into `part`, resuming from its current size when the server honours Range."""
    import http.client
    import re
    import sys
    import urllib.error
    import urllib.request

    from . import __version__

    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"User-Agent": f"text2sql_ray/{__version__}"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have and _retry_416:  # a stale or already-complete .part: start over
            part.unlink()
            return _fetch(url, part, timeout, progress, _retry_416=False)
        raise DownloadError(
            f"{url} answered HTTP {e.code} {e.reason}; the archive may have moved: check {BIRD_HOME} for the "
            "current link (pass it with --base-url) or download manually and pass --data."
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, DNS, timeout, TLS
        raise DownloadError(_offline_message(url, getattr(e, "reason", e))) from None
    with resp:
        start = 0
        if have and resp.status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            start = have if m and int(m.group(1)) == have else 0
        if start == 0 and have:
            print(f"{url}: the server does not resume downloads; starting again from byte 0.", file=sys.stderr)
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        with open(part, "ab" if start else "wb") as f, _progress(total, part.name[: -len(".part")], progress, start) as bar:
            try:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                f.flush()
                raise DownloadError(
                    f"download of {url} was interrupted after {f.tell()} bytes ({e}); run the same command "
                    f"again to resume from {part}."
                ) from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(
            f"download of {url} ended early ({size} of {total} bytes); run the same command again to resume "
            f"from {part}."
        )


def _extract_zip(archive: Path, dest: Path, progress: bool) -> None:
    """Unpack a zip (member names are sanitised by zipfile: no absolute paths, no '..')."""
    import zipfile

    with zipfile.ZipFile(archive) as z:
        members = z.infolist()
        with _progress(sum(m.file_size for m in members), f"unzip {archive.name}", progress) as bar:
            for m in members:
                z.extract(m, dest)
                bar.update(m.file_size)


def _remove_macosx(root: Path) -> None:
    import shutil

    for junk in [p for p in root.rglob("__MACOSX") if p.is_dir()]:
        shutil.rmtree(junk, ignore_errors=True)


def _find_split_root(tmp: Path, split: str) -> Path:
    found = sorted(
        (p.parent for p in tmp.rglob(f"{split}.json") if "__MACOSX" not in p.parts),
        key=lambda p: len(p.parts),
    )
    if not found:
        raise DownloadError(f"the archive holds no {split}.json: it is not the official BIRD {split} archive.")
    return found[0]


def _unpack(archive: Path, split: str, target: Path, manifest: dict, keep_archive: bool, progress: bool) -> None:
    """archive -> hidden temp dir beside target (both zip levels) -> validated -> renamed to target."""
    import os
    import shutil
    import tempfile
    import zipfile

    tmp = Path(tempfile.mkdtemp(prefix=f".{split}.unpack-", dir=target.parent))
    try:
        try:
            _extract_zip(archive, tmp, progress)
            if not keep_archive:  # verified and unpacked: free its space before the big inner zip
                archive.unlink()
            root = _find_split_root(tmp, split)
            nested = root / f"{split}_databases.zip"
            db_dir = root / f"{split}_databases"
            if nested.is_file():
                if not db_dir.exists():
                    inner = root / f".{split}_databases.unpack"
                    _extract_zip(nested, inner, progress)
                    _remove_macosx(inner)
                    entries = list(inner.iterdir())
                    if len(entries) == 1 and entries[0].is_dir() and entries[0].name == db_dir.name:
                        os.replace(entries[0], db_dir)
                        inner.rmdir()
                    else:
                        os.replace(inner, db_dir)
                nested.unlink()
        except zipfile.BadZipFile as e:
            if archive.is_file():
                archive.unlink()
            raise DownloadError(
                f"could not unpack {archive.name} ({e}); it was deleted: run the same command again, or unzip it "
                f"yourself (unzip {archive.name}; then unzip {split}_databases.zip inside) and pass --data."
            ) from None
        _remove_macosx(tmp)
        loaded = load_split(root)  # the unpacked tree must load like any --data directory
        manifest.update(questions=len(loaded.questions), databases=len(loaded.db_ids),
                        databases_present=len(loaded.db_ids) - len(loaded.missing_dbs()))
        (root / DOWNLOAD_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # --force: swap, then delete the old copy
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(root, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(root, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_bird(
    split: str,
    out_dir: str | Path,
    base_url: str = BIRD_BASE_URL,
    sha256: str | None = None,
    force: bool = False,
    keep_archive: bool = False,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Fetch, verify and unpack the official BIRD `split` ('dev' or 'train') into <out_dir>/<split>.

    `sha256` pins the archive's hash (default: BIRD_SHA256[split], None = not pinned: the computed hash
    is printed). An existing <out_dir>/<split> with its question file is kept unless `force`.
    Raises DownloadError with what to do when the server is unreachable, a hash differs or unpacking fails.
    """
    import os
    import time

    if split not in BIRD_ARCHIVES:
        raise ValueError(f"split {split!r} is not one of {', '.join(BIRD_ARCHIVES)}.")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / split
    if (target / f"{split}.json").is_file() and not force:
        print(f"{target} already holds BIRD {split}; nothing to download (--force downloads it again).")
        return target
    name = BIRD_ARCHIVES[split]
    url = f"{base_url.rstrip('/')}/{name}"
    archive, part = out_dir / name, out_dir / f"{name}.part"
    expected = (sha256 or BIRD_SHA256.get(split) or "").strip().lower() or None
    if archive.is_file():
        print(f"reusing the downloaded {archive} (verifying it)")
        source = archive
    else:
        _fetch(url, part, timeout, progress)
        source = part
    digest = _sha256_file(source)
    if expected and digest != expected:
        source.unlink()
        raise DownloadError(
            f"sha256 mismatch for {url}: expected {expected}, got {digest}. The file was deleted and nothing "
            "was unpacked. If BIRD republished the archive, check the hash and pass it with --sha256."
        )
    if source is part:
        os.replace(part, archive)
    if not expected:
        print(f"sha256 {digest}  {name}  (not pinned: pass --sha256 {digest} next time to verify it)")
    manifest = {
        "dataset": "bird",
        "split": split,
        "release": BIRD_RELEASES[split],
        "url": url,
        "sha256": digest,
        "sha256_verified": bool(expected),
        "archive_bytes": archive.stat().st_size,
        "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _unpack(archive, split, target, manifest, keep_archive, progress)
    if archive.is_file() and not keep_archive:
        archive.unlink()
    return target


def download_main(argv: list[str] | None = None) -> int:
    """`t2s data download bird [--split dev|train|both] [--out DIR]`; returns the exit code."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="t2s data", description="Fetch datasets.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="download")
    dl = sub.add_parser(
        "download",
        help="fetch and unpack an official dataset",
        description=(
            f"Fetch the official BIRD archives from {BIRD_BASE_URL} (as the seed recipe does), verify their "
            "sha256, unpack both zip levels into OUT/dev and OUT/train, the layout --data expects "
            "(T2S_BIRD_DATA=OUT for the tests). Interrupted downloads resume. Space: dev needs a few GB; "
            "train needs about 45 GB free while unpacking (9 GB archive, 9 GB inner zip, 33 GB databases)."
        ),
    )
    dl.add_argument("dataset", choices=["bird"], help="dataset to fetch")
    dl.add_argument("--split", choices=["dev", "train", "both"], default="dev", help="which split (default: dev)")
    dl.add_argument("--out", default="~/bird", help="directory receiving <split>/ (default: ~/bird)")
    dl.add_argument("--sha256", default="", help="expected sha256 of the archive (one split at a time)")
    dl.add_argument("--force", action="store_true", help="download again even if OUT/<split> exists")
    dl.add_argument("--keep-archive", action="store_true", help="keep the .zip after unpacking")
    dl.add_argument("--base-url", default=BIRD_BASE_URL, help="mirror holding dev.zip and train.zip")
    dl.add_argument("--timeout", type=float, default=60.0, help="seconds before a stalled connection fails")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)
    splits = ["dev", "train"] if args.split == "both" else [args.split]
    if args.sha256 and len(splits) > 1:
        print("t2s data: --sha256 pins one archive; use it with --split dev or --split train.", file=sys.stderr)
        return 2
    for split in splits:
        try:
            path = download_bird(split, args.out, base_url=args.base_url, sha256=args.sha256 or None,
                                 force=args.force, keep_archive=args.keep_archive, timeout=args.timeout)
        except DownloadError as e:
            print(f"t2s data: error: {e}", file=sys.stderr)
            return 1
        loaded = load_split(path)
        missing = len(loaded.missing_dbs())
        print(f"BIRD {split}: {len(loaded.questions)} questions, {len(loaded.db_ids) - missing}/{len(loaded.db_ids)} "
              f"databases in {path}; pass --data {path}")
    return 0
