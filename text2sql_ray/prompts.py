"""The one prompt template (convert, synthesize, train, evaluate) and SQL extraction from model output.

A conversation is a list of chat messages::

    system     instruction: answer with SQL only, or reason step by step and end with one ```sql block
    user       Database schema: <schema text>  /  External Knowledge: <evidence>  /  Question: <question>
    assistant  ```sql\\n<SQL>\\n```   or   <chain of thought>\\n\\n```sql\\n<SQL>\\n```

Variants (CoT on/off, evidence on/off, schema style) are `PromptConfig` fields, never copies of the
template. The synthesize stage's teacher prompt (`teacher_messages`) uses the same user block, so a
teacher's answer can become the assistant turn of a training conversation unchanged.
`extract_sql` takes the **last** SQL block of an answer (the final one of a chain of thought).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .config import PromptConfig

SQL_FENCE_LANGS = ("sql", "sqlite", "sqlite3", "postgresql", "postgres", "mysql", "duckdb", "tsql", "plsql")
"""Fence info strings read as SQL by extract_sql (case-insensitive)."""

_SQL_START = re.compile(
    r"^\s*(\(\s*)*(select|with|insert|update|delete|replace|create|drop|alter|pragma|values|explain)\b", re.IGNORECASE
)


def _task(cfg: PromptConfig) -> str:
    given = "a database schema, external knowledge and a question" if cfg.evidence else "a database schema and a question"
    return f"You are a SQLite expert. Given {given}, write one SQLite query that answers the question."


def system_prompt(cfg: PromptConfig) -> str:
    """The system instruction of the student model (train and evaluate)."""
    if cfg.cot:
        return (
            _task(cfg) + " Think step by step: find the tables, columns, joins, filters and aggregations the "
            "question needs, then give the final query in exactly one ```sql code block at the end of your answer."
        )
    return _task(cfg) + " Answer with the query only, in one ```sql code block."


def user_prompt(schema_text: Any, question: str, evidence: str, cfg: PromptConfig) -> str:
    """The user turn: schema, then evidence ("External Knowledge", when cfg.evidence and non-empty), then question."""
    schema = getattr(schema_text, "text", schema_text)  # a schema.SchemaText or a str
    parts = [f"Database schema:\n{str(schema).strip()}"]
    if cfg.evidence and (evidence or "").strip():
        parts.append(f"External Knowledge: {evidence.strip()}")
    parts.append(f"Question: {question.strip()}")
    return "\n\n".join(parts)


def format_answer(sql: str, cot: str | None = None) -> str:
    """The assistant turn: the SQL in a ```sql fence, after the chain of thought when one is given.

    A chain of thought that already ends with a ```sql block has that block replaced, so the answer
    always ends with exactly one final block holding `sql`.

    >>> format_answer("SELECT 1;")
    '```sql\\nSELECT 1\\n```'
    >>> format_answer("SELECT 1", cot="The table has one row.")
    'The table has one row.\\n\\n```sql\\nSELECT 1\\n```'
    >>> format_answer("SELECT 2", cot="Reasoning.\\n```sql\\nSELECT 1\\n```")
    'Reasoning.\\n\\n```sql\\nSELECT 2\\n```'
    """
    block = f"```sql\n{strip_sql(sql)}\n```"
    if not cot or not cot.strip():
        return block
    reasoning = cot.rstrip()
    last = _last_fence(reasoning)
    if last is not None and last[2] == len(reasoning) and last[0] in SQL_FENCE_LANGS:
        reasoning = reasoning[: last[1]].rstrip()
    return f"{reasoning}\n\n{block}" if reasoning else block


def build_messages(schema_text: Any, question: str, evidence: str, cfg: PromptConfig, answer: str | None = None) -> list[dict]:
    """Chat messages [system, user] (+ assistant when `answer` is given) in the one template.

    `schema_text` is a `schema.SchemaText` or a str. `answer` is the assistant content; bare SQL (no
    ``` fence in it) is fenced with `format_answer`.

    >>> [m["role"] for m in build_messages("CREATE TABLE t (a INT);", "How many?", "", PromptConfig(), "SELECT COUNT(*) FROM t")]
    ['system', 'user', 'assistant']
    """
    messages = [
        {"role": "system", "content": system_prompt(cfg)},
        {"role": "user", "content": user_prompt(schema_text, question, evidence, cfg)},
    ]
    if answer is not None:
        content = answer if "```" in answer else format_answer(answer)
        messages.append({"role": "assistant", "content": content})
    return messages


def prompt_record(cfg: PromptConfig, tokenizer: str) -> dict:
    """What a stage output records about its prompts: the template options and the schema-budget tokenizer."""
    import dataclasses

    return {"config": dataclasses.asdict(cfg), "tokenizer": tokenizer,
            "schema_budget_unit": f"tokens of {tokenizer}" if tokenizer else "chars/4"}


def recorded_prompt(path: str | Path) -> dict | None:
    """The prompt record of a stage output dir: its manifest's `prompt` section, else the one of the run its
    `input` came from (train -> synthesize -> convert), plus `manifest`: the manifest that first recorded it. None when
    no manifest on the way records one."""
    from .common import read_manifest

    here = Path(path)
    for _ in range(4):
        manifest = read_manifest(here)
        if manifest is None:
            return None
        if manifest.get("prompt"):
            return {"manifest": str(here / "manifest.json"), **manifest["prompt"]}  # a carried record keeps its source
        source = manifest.get("input") or (manifest.get("data") or {}).get("input") if manifest.get("stage") != "convert" else None
        if not source:
            return None
        here = Path(source) if Path(source).is_dir() else Path(source).parent
    return None


TEACHER_SYSTEM = (
    "You are a SQLite expert who teaches how to write SQL. Given a database schema, external knowledge and a "
    "question, reason step by step about how to answer the question with one SQLite query: which tables and "
    "columns it needs, how they join, which filters, groupings, orderings and aggregations apply, and what "
    "the external knowledge says about values and formulas. Then write the final query."
)


def teacher_messages(schema_text: Any, question: str, evidence: str, cfg: PromptConfig, mode: str = "blind",
                     gold_sql: str | None = None) -> list[dict]:
    """The synthesize stage's teacher prompt: reasoning that ends in exactly one ```sql block.

    mode 'blind': the teacher works from the question alone (its SQL is verified by execution later).
    mode 'hinted': the gold SQL is shown as a reference that may be wrong (as OmniSQL does), never as
    "the answer" (the seed's way, which yields post-hoc rationalisations); the teacher is told not to
    mention it, since the student will not see it.
    """
    return _teacher(user_prompt(schema_text, question, evidence, cfg), mode, gold_sql)


def teacher_messages_for(messages: list[dict], mode: str = "blind", gold_sql: str | None = None) -> list[dict]:
    """The teacher prompt for a conversation row of `t2s convert`: its user turn, unchanged, plus the teacher's
    instructions (so the teacher sees exactly what the student will see)."""
    user = next((m["content"] for m in messages if m["role"] == "user"), None)
    if user is None:
        raise ValueError("teacher_messages_for: the conversation has no user turn.")
    return _teacher(user, mode, gold_sql)


def prompt_turns(messages: list[dict]) -> list[dict]:
    """The student's prompt of a conversation row of `t2s convert`: every turn but the answer (what train and
    evaluate show the student; SFT rows and DPO pairs put a new answer after it; on-policy sampling sends it)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "assistant"]


def _teacher(user_block: str, mode: str, gold_sql: str | None) -> list[dict]:
    if mode not in ("blind", "hinted"):
        raise ValueError(f"teacher_messages: mode={mode!r} is not 'blind' or 'hinted'.")
    parts = [user_block]
    if mode == "hinted":
        if not gold_sql or not gold_sql.strip():
            raise ValueError("teacher_messages: mode='hinted' needs gold_sql (the reference query shown as a hint).")
        parts.append(
            "A reference query, which may be wrong, is:\n"
            f"```sql\n{strip_sql(gold_sql)}\n```\n"
            "Use it only as a hint: check every table, column, join, condition and value against the schema, "
            "the external knowledge and the question, and fix anything wrong. Do not mention the reference "
            "query in your answer; reason as if you were writing the query yourself."
        )
    parts.append(
        "Think step by step, then end your answer with the final SQLite query in exactly one ```sql code "
        "block, with nothing after it."
    )
    return [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------


def strip_sql(sql: str) -> str:
    """Whitespace and trailing semicolons removed (the statement itself is kept as written)."""
    sql = (sql or "").strip()
    while sql.endswith(";"):
        sql = sql[:-1].rstrip()
    return sql


def _fences(text: str) -> list[tuple[str, int, int, str]]:
    """Fenced blocks as (language lower-cased, start of opening fence, end of closing fence, body).

    An opening fence without a closing one runs to the end of the text (a generation cut short).
    """
    out = []
    pos = 0
    while True:
        start = text.find("```", pos)
        if start < 0:
            return out
        body_start = start + 3
        close = text.find("```", body_start)
        end = len(text) if close < 0 else close + 3
        content = text[body_start : close if close >= 0 else len(text)]
        info, nl, rest = content.partition("\n")
        inline_lang = None if nl else re.match(r"\s*(sql|sqlite)\s+", content, re.IGNORECASE)
        if nl and re.fullmatch(r"\s*[A-Za-z0-9_+.-]*\s*", info):
            lang, body = info.strip().lower(), rest
        elif inline_lang:  # ```sql SELECT 1```
            lang, body = inline_lang.group(1).lower(), content[inline_lang.end() :]
        else:  # an inline block without language: ```SELECT 1```
            lang, body = "", content
        out.append((lang, start, end, body))
        if close < 0:
            return out
        pos = end


def _last_fence(text: str) -> tuple[str, int, int] | None:
    fences = _fences(text)
    return (fences[-1][0], fences[-1][1], fences[-1][2]) if fences else None


_STATEMENT_KEYWORDS = {
    "select", "from", "where", "join", "inner", "left", "right", "full", "cross", "outer", "on", "and", "or",
    "group", "order", "having", "limit", "offset", "union", "intersect", "except", "with", "as", "case",
    "when", "then", "else", "end", "not", "in", "between", "like", "is", "exists", "natural", "using",
}


def _statement_end(text: str, start: int) -> int:
    """Where an unfenced statement starting at `start` ends: ';', a blank line, '. ' + capital, or a fence."""
    i, n, quote = start, len(text), None
    while i < n:
        ch = text[i]
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"`":
            quote = ch
        elif ch == ";" or text.startswith("```", i) or ch == "\n" and re.match(r"\n[ \t]*\n", text[i:]) or ch == "." and re.match(r"\.\s+[A-Z]", text[i:]) and not text[i - 1 : i].isdigit():
            return i
        i += 1
    return n


def _drop_trailing_prose(sql: str) -> str:
    """Drop trailing lines that read as prose (start with a non-SQL word and end with '.' or ':')."""
    lines = sql.rstrip().split("\n")
    while len(lines) > 1:
        last = lines[-1].strip()
        first = re.match(r"[A-Za-z]+", last)
        if last and last[-1] in ".:" and first and first.group(0).lower() not in _STATEMENT_KEYWORDS:
            lines.pop()
        else:
            break
    return "\n".join(lines)


def _parses(sql: str) -> bool:
    """Whether sqlglot reads `sql` as SQLite (used to tell 'select name from t' from 'Select the right table')."""
    import sqlglot
    from sqlglot.errors import ParseError, TokenError

    try:
        return any(s is not None for s in sqlglot.parse(strip_sql(sql), read="sqlite"))
    except (ParseError, TokenError):
        return False


def _unfenced_candidates(text: str) -> list[tuple[int, int]]:
    """(start, end) of statements in running text: after 'SQL:', or SELECT/WITH at a line start or in capitals.

    A statement whose keyword is not in capitals must also parse with sqlglot, so that a sentence
    starting with "Select ..." or "With ..." is not taken for SQL.
    """
    starts: dict[int, bool] = {}  # start -> needs a parse check
    for m in re.finditer(r"\bSQL(?:\s+query)?\s*:\s*", text, re.IGNORECASE):
        if _SQL_START.match(text, m.end()):
            starts[m.end()] = False
    for m in re.finditer(r"\b(select|with)\b", text, re.IGNORECASE):
        word, p = m.group(1), m.start()
        at_line_start = text[text.rfind("\n", 0, p) + 1 : p].strip() == ""
        if not (at_line_start or word.isupper() or text[:p].rstrip().endswith(":")):
            continue
        if word.lower() == "with" and not re.match(
            r"with\s+(recursive\s+)?[\w\"`\[\]]+\s*(\([^)]*\)\s*)?as\s*\(", text[p:], re.IGNORECASE
        ):
            continue
        if word.lower() == "select" and not re.match(r"select\s+\S", text[p:], re.IGNORECASE):
            continue
        starts.setdefault(p, not word.isupper())
    spans = []
    for s in sorted(starts):
        if spans and s < spans[-1][1]:  # inside the previous statement (a subquery)
            continue
        end = _statement_end(text, s)
        if starts[s] and not _parses(_drop_trailing_prose(text[s:end])):
            continue
        spans.append((s, end))
    return spans


def extract_sql(text: str) -> str:
    """The final SQL of a model answer: the **last** SQL block, with fallbacks for unfenced answers.

    Order: the last non-empty ```sql block (any case, also ```sqlite; an unclosed final fence counts);
    else the last unlabelled ``` block that starts like SQL; else the last statement in the running
    text outside fences (after "SQL:", or a SELECT/WITH at a line start or in capitals; one not in
    capitals must also parse with sqlglot), cut at ';', a blank line or trailing prose. The SQL is
    returned as written, less surrounding whitespace and trailing semicolons. "" when nothing
    SQL-like is found.

    >>> extract_sql("```sql\\nSELECT 1;\\n```")
    'SELECT 1'
    >>> extract_sql("First try:\\n```sql\\nSELECT a FROM t\\n```\\nBetter:\\n```sql\\nSELECT b FROM t\\n```")
    'SELECT b FROM t'
    >>> extract_sql("Let me think. 1. The table is t.\\nFinally:\\n```SQL\\nSELECT COUNT(*) FROM t\\n```")
    'SELECT COUNT(*) FROM t'
    >>> extract_sql("```\\nSELECT name FROM users\\n```")
    'SELECT name FROM users'
    >>> extract_sql("The answer is SELECT name FROM users WHERE id = 3; this returns one row.")
    'SELECT name FROM users WHERE id = 3'
    >>> extract_sql("SQL: select max(score) from exams")
    'select max(score) from exams'
    >>> extract_sql("SELECT name\\nFROM users\\n\\nThis query lists every user.")
    'SELECT name\\nFROM users'
    >>> extract_sql("I cannot answer that question.")
    ''
    """
    text = text or ""
    fences = _fences(text)
    for lang, _, _, body in reversed(fences):
        if lang in SQL_FENCE_LANGS and strip_sql(body):
            return strip_sql(body)
    for lang, _, _, body in reversed(fences):
        if lang == "" and _SQL_START.match(body) and strip_sql(body):
            return strip_sql(body)
    # Running text only: the bodies of other fenced blocks (```python, output tables) are blanked out.
    masked = list(text)
    for lang, start, end, _ in fences:
        masked[start:end] = " " * (end - start)
    spans = _unfenced_candidates("".join(masked))
    if not spans:
        return ""
    s, e = spans[-1]
    sql = strip_sql(_drop_trailing_prose(text[s:e]))
    if sql.endswith(".") and not re.search(r"\d\.$", sql):
        sql = sql[:-1].rstrip()
    return sql
