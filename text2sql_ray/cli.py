"""`t2s <stage> --config jobs/x.yaml --train.lr 1e-4 ...`: one table of subcommands.

Every option of a stage's config dataclass is a flag: `--out DIR`, `--max-steps 5`, `--engine.model M`,
`--train.lr 1e-4` (the stage prefix is optional). A boolean flag given alone means true (`--strict`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import typing
from pathlib import Path

from .config import STAGE_CONFIGS, ConfigError, build_config, field_docs

# `t2s pipeline` without --config: the bundled demo, SmolLM2, LoRA, sized for a 2-core laptop.
LAPTOP_PIPELINE = Path(__file__).parent / "demo" / "pipeline_laptop.yaml"

# subcommand -> (module whose run(cfg) executes it, one-line help)
SUBCOMMANDS = {
    "convert": ("text2sql_ray.convert", "BIRD split -> conversation dataset (Ray Data)"),
    "synthesize": ("text2sql_ray.synthesize", "teacher CoT samples, verified by execution (Ray Data)"),
    "train": ("text2sql_ray.train", "LoRA or DeepSpeed full fine-tuning (Ray Train)"),
    "serve": ("text2sql_ray.serve", "OpenAI-compatible API for a model (Ray Serve)"),
    "evaluate": ("text2sql_ray.evaluate", "BIRD execution accuracy on parallel SQLite actors"),
    "pipeline": ("text2sql_ray.pipeline", "every stage in order under one run directory"),
    "ask": ("text2sql_ray.ask", "a question about your SQLite/DuckDB/PostgreSQL database: SQL and first rows"),
}


def available() -> dict[str, tuple[str, str]]:
    return {k: v for k, v in SUBCOMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def _usage() -> str:
    lines = ["usage: t2s <stage> [--config FILE.yaml] [--option value ...]", "", "stages:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in available().items()]
    lines += [f"  {'data':<11} download BIRD: `t2s data download bird [--split dev|train|both] [--out DIR]`"]
    lines += ["", "`t2s <stage> --help` lists every option of a stage."]
    return "\n".join(lines)


def _options_help(cls: type, prefix: str = "") -> list[str]:
    lines = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            lines += _options_help(typ, f"{prefix}{f.name}.")
            continue
        flag = f"--{prefix}{f.name.replace('_', '-')}"
        default = getattr(defaults, f.name)
        lines.append(f"  {flag:<30} {docs.get(f.name, '')} [default: {default!r}]")
    return lines


def parse_overrides(tokens: list[str], cls: type) -> list[tuple[str, str | bool]]:
    """Turn `--a.b value` / `--flag` tokens into (dotted key, raw value) pairs."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, str | bool]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}; options look like --name value.")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            out.append((key, value))
            i += 1
            continue
        top = key.replace("-", "_").split(".")[0]
        is_bool = hints.get(top) is bool
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if nxt is None or (nxt.startswith("--") and len(nxt) > 2):
            if not is_bool and "." not in key:
                raise ConfigError(f"option --{key} needs a value.")
            out.append((key, True))
            i += 1
        else:
            if key.replace("-", "_") == "compare" or top == "compare":
                # --compare A B takes two values
                vals = []
                i += 1
                while i < len(tokens) and not tokens[i].startswith("--"):
                    vals.append(tokens[i])
                    i += 1
                out.append((key, ",".join(vals)))
                continue
            out.append((key, nxt))
            i += 2
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage == "data":
        from .download import download_main

        return download_main(rest)
    if stage == "ask":  # not a stage: one question, its own flags (`t2s ask --help`)
        from .ask import main as ask_main

        return ask_main(rest)
    cmds = available()
    if stage not in cmds:
        print(f"t2s: unknown stage {stage!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    cls = STAGE_CONFIGS[stage]
    if "-h" in rest or "--help" in rest:
        print(f"usage: t2s {stage} [--config FILE.yaml] [--option value ...]\n\n{cls.__doc__}\n\noptions:")
        print(f"  --config FILE.yaml             job YAML; its `{stage}:` section is read")
        if stage == "pipeline":
            print(f"                                 (default: {LAPTOP_PIPELINE}, the embedded laptop run)")
        print("\n".join(_options_help(cls)))
        return 0
    config_path = None
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            print("t2s: --config needs a file path.", file=sys.stderr)
            return 2
        config_path = rest[i + 1]
        rest = rest[:i] + rest[i + 2 :]
    if stage == "pipeline" and config_path is None:
        config_path = str(LAPTOP_PIPELINE)  # the embedded laptop run
    try:
        cfg = build_config(stage, config_path, parse_overrides(rest, cls))
    except ConfigError as e:
        print(f"t2s {stage}: config error: {e}", file=sys.stderr)
        return 2
    from .common import setup_logging

    setup_logging()
    module = importlib.import_module(cmds[stage][0])
    try:
        out = module.run(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"t2s {stage}: error: {e}", file=sys.stderr)
        return 1
    if out is not None:
        print(f"t2s {stage}: done -> {out}")
    return 0
