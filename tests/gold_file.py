"""The official BIRD gold file (`<split>_gold.sql`: one `SQL<TAB>db_id` per line), read for tests that check
it agrees with the question file (the package itself reads questions and gold SQL from the JSON)."""

from pathlib import Path


def read_gold_file(path: str | Path) -> list[tuple[str, str]]:
    """[(sql, db_id)] in file order; blank lines skipped; not splitlines(): U+2028 is no line end."""
    out = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        sql, sep, db_id = line.strip().rpartition("\t")
        assert sep, f"{path}:{lineno}: expected `SQL<TAB>db_id`"
        out.append((sql, db_id))
    return out
