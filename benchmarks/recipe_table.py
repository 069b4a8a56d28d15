"""The recipe's results table on real models: baselines, no-CoT SFT, CoT SFT (blind chains; hinted chains), CoT +
no-CoT SFT (with either), CoT SFT + DPO (teacher pairs; on-policy pairs), maj@8 where it matters, on BIRD dev and
Spider dev.

    python benchmarks/recipe_table.py --config jobs/recipe_small_gpu.yaml \\
        --student <0.5B .gguf or dir> --teacher <1.5B .gguf or dir> \\
        --bird /work/shared/data/bird --spider /work/shared/data/spider [--engine hf|vllm] [--out DIR] [--results STEM]

A thin driver over the stages (each step is the stage's own `run(cfg)`, built from the job file's sections with
the fields below replaced; `--set stage.field=value` overrides any field of a section first):

1. convert BIRD train and Spider train twice each: no-CoT prompts (gold SQL as the answer) and CoT prompts
   (the synthesis input); the job file's `convert:` section, `prompt.cot` set per use;
2. synthesize on Spider train (it has databases: every chain is verified by execution); `synthesize:`; and, for
   the hinted row only, when it first runs: synthesize on BIRD train with the teacher shown the gold SQL (the
   seed's way; `--hinted-samples`, `--hinted-limit`), a chain kept when its final SQL equals the gold after sqlglot
   canonicalisation (BIRD train has no databases here; `canonical_match`, counted apart) or executes to its result;
3. train from the student (`train:` section, same hyper-parameters every time): no-CoT SFT on the gold SQL of
   BIRD train + Spider train; CoT SFT on the execution-verified chains; CoT SFT on the hinted BIRD chains + those
   chains; CoT SFT on chains written by rule from the gold SQL of every BIRD train + Spider train question (no
   teacher: the schema linking spelt out, `synthesize.gold_chain`); CoT + no-CoT SFT on both sets at once (each row with its own system turn), with the Spider chains or
   with the hinted BIRD chains added (`--hinted-synthesis` reuses an earlier hinted synthesis); each when the first
   row that needs it runs (its `merged/` model is what gets evaluated, if written);
4. evaluate nine models x two benchmarks (`evaluate:`), rows in `--rows` order (so a GPU budget goes to the rows
   that matter first; rows left out read "not run", or, with `--earlier`, what an earlier table says): the
   student with the seed's prompt (bare DDL, SQL only), the student with our prompt (rich schema, SQL only), the
   no-CoT SFT model (SQL only), the CoT SFT models and the CoT + no-CoT SFT models (CoT prompt), the CoT SFT + DPO model
   (a new LoRA on the merged CoT SFT model, trained on pairs from the synthesis' verdicts, `--dpo-*`; CoT prompt,
   greedy), the CoT + no-CoT SFT, hinted chains + on-policy DPO model (the same on pairs of that SFT model's own
   samples of Spider train, drawn with its own CoT prompt: `synthesize.student_prompt`, `--onpolicy-samples`), the
   CoT SFT, hinted chains + on-policy DPO model (the same from the hinted CoT SFT model, with pairs on BIRD train too:
   BIRD train has no databases here, so chosen = a final SQL equal to the gold after sqlglot canonicalisation,
   rejected = one that does not compile against the schema, synthesize's `schema_error`); the
   SFT rows greedy and maj@k from one run (`--maj-k`, temperature `--maj-temperature`; with vllm one engine
   execution); `--nocot-engine` picks another backend for the greedy-only SQL rows (the baselines); `--benchmarks`
   limits the dev sets;
5. the table: `<results>.md` (+ `<results>.json`, `<results>.png`) and every row's predictions in the official
   predict_dev.json format as `<results>/<row>_<bird|spider>_predict_dev.json` (all questions of the file, in
   order; questions whose database is absent, or that a row could not answer, hold an empty SQL and score 0).

Every step writes under `--out` and records a fingerprint of its config in `<out>/recipe_state.json`; a rerun
skips steps whose fingerprint and manifest are there (a killed run resumes; a changed option reruns that step
and the steps after it that read it). `--lanes` runs groups of rows at the same time (one process and local Ray
instance each, sharing the GPU) after the shared steps, then writes the table. Nothing trains or selects on BIRD
dev or Spider dev.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from text2sql_ray import convert, dpo, evaluate, synthesize, train
from text2sql_ray.common import log, read_manifest, setup_logging, write_json, write_parquet, write_text
from text2sql_ray.config import build_config
from text2sql_ray.pipeline import clear_stale_checkpoints, fingerprint, write_mix

BENCHMARKS = ("bird", "spider")


@dataclasses.dataclass
class Row:
    """One line of the table: which model, with which prompt, and what it was trained on."""

    name: str
    label: str
    model: str
    """'student', 'sft_nocot' or 'sft_cot'."""
    prompt: dict
    """PromptConfig fields replaced in the job file's evaluate.prompt."""
    training: str
    maj: bool = False
    """Also report maj@k (from the same evaluation run) as the next line."""


ROWS = (
    Row("base_seed", "baseline, seed prompt", "student", {"schema_style": "ddl", "cot": False},
        "none (bare CREATE TABLEs, SQL only: the seed's prompt)"),
    Row("base_ours", "baseline, our prompt", "student", {"cot": False},
        "none (rich schema: keys, sample values, descriptions; SQL only)"),
    Row("sft_nocot", "no-CoT SFT", "sft_nocot", {"cot": False}, "LoRA on gold SQL of BIRD train + Spider train",
        maj=True),
    Row("sft_cot", "CoT SFT", "sft_cot", {"cot": True},
        "LoRA on execution-verified teacher chains (Spider train)", maj=True),
    Row("sft_cot_hinted", "CoT SFT, hinted chains", "sft_cot_hinted", {"cot": True},
        "LoRA on teacher chains written with the gold SQL shown (the seed's way) for BIRD train (final SQL equal to "
        "the gold after sqlglot canonicalisation where no database exists, else execution-verified) + the verified "
        "Spider train chains", maj=True),
    Row("sft_cot_gold", "CoT SFT, chains written from the gold SQL (no teacher)", "sft_cot_gold", {"cot": True},
        "LoRA on every BIRD train + Spider train question with a chain written by rule from its gold SQL (tables and "
        "joins, each column under its table, conditions, grouping, order, what is returned; then the gold SQL): the "
        "schema linking spelt out, no teacher", maj=True),
    Row("sft_mix", "CoT + no-CoT SFT", "sft_mix", {"cot": True},
        "LoRA on the verified chains and the gold SQL of BIRD train + Spider train at once (each with its own "
        "system turn)", maj=True),
    Row("sft_mix_hinted", "CoT + no-CoT SFT, hinted chains", "sft_mix_hinted", {"cot": True},
        "LoRA on the hinted BIRD train chains + the verified Spider train chains and the gold SQL of BIRD train + "
        "Spider train at once (each with its own system turn)", maj=True),
    Row("sft_cot_dpo", "CoT SFT + DPO", "sft_cot_dpo", {"cot": True},
        "DPO (a new LoRA on the merged CoT SFT model, the reference) on teacher pairs: verified vs wrong or "
        "failing chains of the same Spider train question"),
    Row("sft_mix_hinted_dpo", "CoT + no-CoT SFT, hinted chains + on-policy DPO", "sft_mix_hinted_dpo", {"cot": True},
        "DPO (a new LoRA on the merged CoT + no-CoT SFT, hinted chains model, the reference) on that model's own "
        "pairs: k samples per Spider train question with its own CoT prompt, verified vs wrong or failing"),
    Row("sft_cot_hinted_dpo", "CoT SFT, hinted chains + on-policy DPO, Spider + BIRD pairs", "sft_cot_hinted_dpo",
        {"cot": True},
        "DPO (a new LoRA on the merged CoT SFT, hinted chains model, the reference) on that model's own pairs: k samples "
        "per Spider train and BIRD train question with its own CoT prompt; Spider: verified vs wrong or failing; BIRD "
        "train (no databases here): final SQL equal to the gold after sqlglot canonicalisation vs SQL that does not "
        "compile against the schema (schema_error)"),
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "jobs" / "recipe_small_gpu.yaml"), help="job file (stage sections)")
    p.add_argument("--student", required=True,
                   help="student model (.gguf file, dir or hub name; \"\" = the embedded SmolLM2): train.model")
    p.add_argument("--teacher", required=True, help="teacher model (same forms): synthesize.engine.model")
    p.add_argument("--bird", default="",
                   help="folder holding BIRD train/ and dev/ (or give --bird-train/--bird-dev); 'demo' = the bundled demo")
    p.add_argument("--bird-train", default="", help="BIRD train split dir (text only is enough: no-CoT SFT)")
    p.add_argument("--bird-dev", default="", help="BIRD dev split dir")
    p.add_argument("--spider", required=True, help="Spider dir (train_spider.json, dev.json, tables.json, database/)")
    p.add_argument("--engine", choices=("hf", "vllm"), default=None,
                   help="generation backend of synthesize and evaluate (default: the job file's engine.backend)")
    p.add_argument("--nocot-engine", choices=("hf", "vllm"), default=None,
                   help="backend of the greedy-only SQL (no-CoT) evaluations, the baselines (default: as --engine; "
                        "maj@k rows keep --engine). On one H200 the hf engine scored 432 short BIRD answers in less "
                        "wall time than a fresh vLLM engine takes to start")
    p.add_argument("--rows", default=",".join(r.name for r in ROWS),
                   help="rows to run, in this order (a row's model is trained when first needed; rows left out "
                        "show 'not run'). Default: every row, table order")
    p.add_argument("--lanes", default="",
                   help="run groups of rows at the same time, one process each sharing the GPU, e.g. "
                        "'sft_cot,sft_cot_dpo;sft_nocot,base_ours,base_seed' (';' between lanes, ',' between a lane's "
                        "rows, run in that order). The shared steps (conversions, synthesis) run first, the table "
                        "after every lane. Each lane is its own local Ray instance: give vLLM a share of the GPU "
                        "(--set evaluate.engine.gpu_memory_utilization=0.3 --set evaluate.engine.kv_cache_gb=24). "
                        "Replaces --rows; rows that train the same model must share a lane")
    p.add_argument("--maj-k", type=int, default=8, help="samples per question for the maj@k row")
    p.add_argument("--no-maj", default="",
                   help="rows (comma-separated) evaluated greedy only this run: their maj@k line is left out (k "
                        "samples per question cost ~2 more GPU minutes per row and benchmark on an H200)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                   help="the dev sets the rows are evaluated on, of bird,spider (the others read 'not run')")
    p.add_argument("--maj-temperature", type=float, default=0.8, help="sampling temperature of the maj@k row")
    p.add_argument("--synthesis", default="",
                   help="an earlier `t2s synthesize` output dir (its sft.parquet and manifest) to use instead of the "
                        "synthesis step, e.g. the committed benchmarks/results/recipe_small_gpu_synthesis")
    p.add_argument("--hinted-synthesis", default="",
                   help="an earlier hinted `t2s synthesize` output on BIRD train (mode hinted) to use instead of the "
                        "hinted rows' teacher step, e.g. the committed benchmarks/results/recipe_small_gpu_hinted_synthesis")
    p.add_argument("--hinted-samples", type=int, default=1,
                   help="CoT SFT, hinted chains row: teacher samples per BIRD train question (shown the gold SQL)")
    p.add_argument("--hinted-limit", type=int, default=0,
                   help="CoT SFT, hinted chains row: BIRD train questions given to the teacher (0 = all)")
    p.add_argument("--dpo-lr", type=float, default=2e-5, help="DPO row: learning rate (cosine, 10%% warmup)")
    p.add_argument("--dpo-beta", type=float, default=0.1, help="DPO row: beta")
    p.add_argument("--dpo-epochs", type=float, default=1.0, help="DPO row: epochs over the pairs")
    p.add_argument("--dpo-sft-weight", type=float, default=0.0,
                   help="DPO rows: train.dpo_sft_weight, an NLL term on the chosen answer (RPO); 0 = plain DPO, the "
                        "committed rows' setting")
    p.add_argument("--dpo-max-length-gap", type=float, default=0.0,
                   help="DPO rows: train.dpo_max_length_gap, pair answers whose lengths differ by at most this fraction "
                        "of the longer one (closest first); 0 = no limit, the committed rows' setting")
    p.add_argument("--dpo-lora-r", type=int, default=64, help="DPO row: rank of the new LoRA (alpha = 2 r)")
    p.add_argument("--dpo-pairs-per-question", type=int, default=2, help="DPO row: pairs per question at most")
    p.add_argument("--onpolicy-samples", type=int, default=4,
                   help="on-policy DPO rows: samples per training question (Spider train; BIRD train too for "
                        "sft_cot_hinted_dpo) from its SFT model itself "
                        "(its own prompt, synthesize.engine's temperature; the questions of synthesize.limit)")
    p.add_argument("--earlier", default="",
                   help="an earlier table's STEM.json (its predictions beside it in STEM/): rows not run now are taken "
                        "from it, predictions copied and the row marked as earlier, e.g. the committed "
                        "benchmarks/results/recipe_small_gpu.json to add rows without rerunning the others")
    p.add_argument("--out", default="runs/recipe_small_gpu", help="run directory (every step's output)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "recipe_small_gpu"),
                   help="results stem: STEM.md, STEM.json, STEM.png and STEM/ (predictions)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override a field of a job-file section, e.g. --set train.epochs=2 (repeatable)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.lanes:
        args.lane_rows = parse_lanes(args.lanes)
        args.rows = ",".join(n for lane in args.lane_rows for n in lane)
    if args.bird == "demo":  # the bundled demo (BIRD format) in place of BIRD: the CPU profile
        from text2sql_ray.bird import resolve_data

        args.bird_train, args.bird_dev = resolve_data("", "train"), resolve_data("", "dev")
    args.bird_train = args.bird_train or (str(Path(args.bird) / "train") if args.bird else "")
    args.bird_dev = args.bird_dev or (str(Path(args.bird) / "dev") if args.bird else "")
    if not (args.bird_train and args.bird_dev):
        p.error("give --bird DIR (holding train/ and dev/) or both --bird-train and --bird-dev")
    args.benchmarks = tuple(b for b in (x.strip() for x in args.benchmarks.split(",")) if b)
    if not args.benchmarks or set(args.benchmarks) - set(BENCHMARKS):
        p.error(f"--benchmarks: a comma-separated list of {', '.join(BENCHMARKS)}")
    args.no_maj = {n for n in (x.strip() for x in args.no_maj.split(",")) if n}
    unknown = sorted(args.no_maj - {r.name for r in ROWS})
    if unknown:
        raise SystemExit(f"--no-maj: unknown row(s) {', '.join(unknown)}; rows are {', '.join(r.name for r in ROWS)}")
    args.started = time.time()  # steps that finish from now on are this run's (the table's times say which)
    return args


# the DPO rows: the SFT model each starts from (its reference model)
DPO_START = {"sft_cot_dpo": {"sft_cot"}, "sft_mix_hinted_dpo": {"sft_mix_hinted"},
             "sft_cot_hinted_dpo": {"sft_cot_hinted"}}
# the on-policy DPO rows: the training splits their SFT model samples (with its own CoT prompt) for pairs. BIRD train
# has no databases here: its chosen answers are canonical matches with the gold, its rejected ones schema errors
ONPOLICY_SOURCES = {"sft_mix_hinted_dpo": ("spider_train",), "sft_cot_hinted_dpo": ("spider_train", "bird_train")}
# the summary key of each DPO row's pair counts, and the words the table says whose samples they are
DPO_PAIR_KEYS = {
    "sft_cot_dpo": ("dpo_pairs", "DPO pairs (teacher samples of the synthesis)"),
    "sft_mix_hinted_dpo": ("dpo_pairs_onpolicy", ("On-policy DPO pairs (the SFT model's own samples on Spider "
                                                  "train, its own CoT prompt)")),
    "sft_cot_hinted_dpo": ("dpo_pairs_onpolicy_cot_hinted",
                           ("On-policy DPO pairs of the CoT SFT, hinted chains model (its own samples on Spider train "
                            "and BIRD train, its own CoT prompt; BIRD: canonical match vs schema error)")),
}


def merge_pairs(parts: dict[str, dpo.Pairs]) -> dpo.Pairs:
    """The pairs of several training splits as one set: each pair tagged with its split (`source`; question ids
    repeat across splits), the question outcomes, samples and unused reasons summed. One split: its pairs as built."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    pairs, unused, questions, by_reason = [], [], {}, {}
    for src, b in parts.items():
        pairs += [{**p, "source": src} for p in b.pairs]
        unused += [{**u, "source": src} for u in b.unused]
        for k, v in b.questions.items():
            questions[k] = questions.get(k, 0) + v
        for k, v in b.unused_by_reason.items():
            by_reason[k] = by_reason.get(k, 0) + v
    return dpo.Pairs(pairs, unused, questions, samples=sum(b.samples for b in parts.values()),
                     unused_by_reason=by_reason)


def parse_lanes(text: str) -> list[list[str]]:
    """'a,b;c' -> [['a', 'b'], ['c']], checked: known rows, each once, and the rows that train (or start from) the
    same model in one lane (two processes must not train one model at once)."""
    by_name = {r.name: r for r in ROWS}
    lanes = [[n.strip() for n in lane.split(",") if n.strip()] for lane in text.split(";")]
    lanes = [lane for lane in lanes if lane]
    names = [n for lane in lanes for n in lane]
    unknown = sorted({n for n in names if n not in by_name})
    if unknown or not lanes:
        raise SystemExit(f"--lanes {text!r}: unknown row(s) {', '.join(unknown) or '(none given)'}; rows are "
                         f"{', '.join(by_name)}")
    if len(set(names)) != len(names):
        raise SystemExit(f"--lanes {text!r}: a row is named twice")
    owner: dict[str, int] = {}
    for i, lane in enumerate(lanes):
        for n in lane:
            # DPO starts from the CoT SFT model; the hinted rows share one teacher step (the hinted synthesis)
            needs = {f"the {m} model" for m in {by_name[n].model} | DPO_START.get(n, set()) if m != "student"} | (
                {"the hinted teacher chains"} if "_hinted" in n else set())
            for m in sorted(needs):
                if owner.setdefault(m, i) != i:
                    raise SystemExit(f"--lanes {text!r}: rows needing {m} are in lanes {owner[m] + 1} and "
                                     f"{i + 1}; put them in one lane (made once, by one process)")
    return lanes


def lane_argv(argv: list[str], rows: list[str], results: Path) -> list[str]:
    """This run's arguments for one lane: --lanes, --rows and --results replaced."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in ("--lanes", "--rows", "--results"):
            skip = "=" not in a
            continue
        out.append(a)
    return out + ["--rows", ",".join(rows), "--results", str(results)]


def run_lanes(args) -> dict:
    """The shared steps once, then one process per lane at the same time (rows in lane order), then the table of
    every row in this process (each row's steps are up to date by then; a lane that failed has its remaining steps
    run here, one after another)."""
    import subprocess

    run_dir = Path(args.out)
    lanes_dir = run_dir / "lanes"
    lanes_dir.mkdir(parents=True, exist_ok=True)
    run_recipe(argparse.Namespace(**{**vars(args), "rows": "", "results": str(lanes_dir / "shared_steps")}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    procs = []
    for i, rows in enumerate(args.lane_rows, 1):
        argv = lane_argv(args.argv, rows, lanes_dir / f"lane{i}")
        log_path = lanes_dir / f"lane{i}.log"
        log.info("recipe: lane %d (%s) starts; log %s", i, ",".join(rows), log_path)
        with open(log_path, "w") as f:
            procs.append((i, rows, log_path, time.time(), subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), *argv], stdout=f, stderr=subprocess.STDOUT, env=env)))
    lanes = {}
    for i, rows, log_path, t0, proc in procs:
        rc = proc.wait()
        lanes[f"lane{i}"] = {"rows": rows, "rc": rc, "seconds": round(time.time() - t0, 1), "log": str(log_path)}
        if rc != 0:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            log.error("recipe: lane %d (%s) failed (rc %d); its remaining steps run now, one after another. "
                      "Last lines of %s:\n%s", i, ",".join(rows), rc, log_path, "\n".join(tail))
    summary = run_recipe(args)
    summary["lanes"] = lanes
    write_json(Path(args.results).with_suffix(".json"), summary)
    write_text(Path(args.results).with_suffix(".md"), table_markdown(summary))
    return summary


def section_configs(args) -> dict:
    """The job file's sections as configs, with --set overrides (and --student/--teacher/--engine) applied."""
    overrides: dict[str, list] = {s: [] for s in ("convert", "synthesize", "train", "evaluate")}
    for item in args.set:
        key, sep, value = item.partition("=")
        stage = key.split(".", 1)[0]
        if not sep or stage not in overrides or "." not in key:
            raise SystemExit(f"--set {item!r}: expected STAGE.FIELD=VALUE with STAGE one of {', '.join(overrides)}")
        overrides[stage].append((key.split(".", 1)[1], value))
    overrides["train"].append(("model", args.student))
    overrides["synthesize"].append(("engine.model", args.teacher))
    if args.engine is not None:
        overrides["synthesize"].append(("engine.backend", args.engine))
        overrides["evaluate"].append(("engine.backend", args.engine))
    return {s: build_config(s, args.config, o) for s, o in overrides.items()}


class Steps:
    """Runs steps in order; skips one whose config fingerprint and output manifest are already there.

    Several processes may share one run dir (`--lanes`): each records its steps by re-reading the state file under
    a lock and adding its own entries, so no process drops another's."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.state_path = run_dir / "recipe_state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.seconds: dict[str, float] = dict(self.state.get("_seconds", {}))

    def run(self, name: str, module, cfg, after: tuple[str, ...] = ()) -> Path:
        fp = fingerprint(cfg, "".join(self.state.get(a, "") for a in after))
        out = Path(cfg.out)
        if self.state.get(name) == fp and read_manifest(out) is not None:
            log.info("recipe: %s is up to date (%s)", name, out)
            return out
        log.info("recipe: %s -> %s", name, out)
        if module is train:  # a train run of another config left checkpoints: train refuses them, start over
            clear_stale_checkpoints(cfg, self.state.get("_started", {}).get(name), fp)
            self.record(name, None, started=fp)
        t0 = time.time()
        module.run(cfg)
        self.record(name, fp, round(time.time() - t0, 1))
        return out

    def record(self, name: str, fp: str | None, seconds: float | None = None, started: str | None = None) -> None:
        """Write this step's fingerprint (None: leave it), wall time and started-with fingerprint into the state
        file, merged with what other processes wrote there meanwhile."""
        import fcntl

        with open(self.run_dir / "recipe_state.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            disk = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
            mine = {k: v for k, v in self.state.items() if k not in disk and not k.startswith("_")}
            nested = {k: {**self.state.get(k, {}), **disk.get(k, {})} for k in ("_seconds", "_started", "_finished")}
            self.state = {**disk, **mine, **nested}
            if fp is not None:
                self.state[name] = fp
            if seconds is not None:
                self.state["_seconds"][name] = seconds
                self.state["_finished"][name] = round(time.time(), 1)
            if started is not None:
                self.state["_started"][name] = started
            self.seconds = self.state["_seconds"]
            write_json(self.state_path, self.state)


def evaluated(train_out: Path) -> str:
    """What a row evaluates of a train output: its merged model when training wrote one (a plain model dir: vLLM
    serves it without LoRA kernels), else the adapter dir; evaluate finds the recorded prompt beside either."""
    return str(train_out / "merged") if (train_out / "merged" / "config.json").is_file() else str(train_out)


def _ex_of(report: dict, maj: bool) -> dict:
    if maj:
        m = report.get("maj_at_k") or {}
        return {"ex": m.get("ex"), "n_correct": m.get("n_correct"), "n_scored": m.get("n_scored")}
    return {"ex": report.get("ex"), "n_correct": report.get("n_correct"), "n_scored": report.get("n_scored")}


def hinted_note(s: dict) -> str:
    """The hinted rows' SFT sets in words (their chains' verdicts counted apart)."""
    h, sets = s.get("synthesis_bird_hinted") or {}, s["sft_sets"]
    mixed = (f"; CoT + no-CoT SFT, hinted chains {sets['sft_mix_hinted']['rows']} rows (those chains + the no-CoT "
             "rows)") if "sft_mix_hinted" in sets else ""
    return (f"; CoT SFT, hinted chains {sets['sft_cot_hinted']['rows']} rows (teacher shown the gold SQL on BIRD "
            f"train: {h.get('selected_questions', '?')} questions, {h.get('samples', '?')} samples, "
            f"{h.get('sft_canonical_match', '?')} chains kept by canonical match with the gold, "
            f"{h.get('sft_execution_verified', '?')} execution-verified; plus the Spider chains)" + mixed)


def gold_chain_mix(run_dir: Path, conv: dict[str, Path]) -> dict:
    """The gold-chain row's SFT set (<run_dir>/sft/cot_gold): every question of BIRD train and Spider train (their CoT
    conversions, conv['bird_train_cot'] / conv['spider_train_cot']) with the answer replaced by a chain written by rule
    from its gold SQL (`synthesize.gold_chain`). A gold query sqlglot cannot read gets no chain: counted and named in
    the set's counts (`no_chain`), not trained on. Returns write_mix's counts + no_chain."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from text2sql_ray.convert import output_schema
    from text2sql_ray.prompts import prompt_turns

    sources, left_out = [], {}
    for src in ("bird_train", "spider_train"):
        rows, missing = [], []
        for r in pq.read_table(conv[f"{src}_cot"] / "train.parquet", columns=output_schema().names).to_pylist():
            chain = synthesize.gold_chain(r["gold_sql"] or "")
            if chain is None:
                missing.append(int(r["question_id"]))
                continue
            rows.append({**r, "messages": prompt_turns(r["messages"]) + [{"role": "assistant", "content": chain}]})
        path = run_dir / "sft" / "cot_gold_chains" / f"{src}.parquet"
        write_parquet(path, pa.Table.from_pylist(rows, schema=output_schema()))
        sources.append((f"{src}_gold_chains", path, "cot"))
        left_out[src] = missing
    counts = write_mix(run_dir / "sft" / "cot_gold", sources, conv["spider_train_cot"])
    counts["no_chain"] = {src: {"questions": len(q), "question_ids": q[:50]} for src, q in left_out.items()}
    if any(left_out.values()):
        log.warning("recipe: gold chains: no chain for %s (gold SQL sqlglot cannot read)",
                    ", ".join(f"{len(q)} {src} questions" for src, q in left_out.items() if q))
    return counts


def gold_chain_note(g: dict) -> str:
    """The gold-chain row's SFT set in words."""
    no_chain = g.get("no_chain") or {}
    return (f"; CoT SFT, chains written from the gold SQL {g['rows']} rows (every converted BIRD train and Spider "
            "train question: " + ", ".join(f"{v['rows']} {k.removesuffix('_gold_chains')}" for k, v in
                                          g.get("sources", {}).items())
            + (", no chain for " + ", ".join(f"{v['questions']} {k}" for k, v in no_chain.items() if v["questions"])
               + " (gold SQL sqlglot cannot read)" if any(v["questions"] for v in no_chain.values()) else "") + ")")


def run_recipe(args) -> dict:
    cfgs = section_configs(args)
    conv_t, syn_t, train_t, eval_t = cfgs["convert"], cfgs["synthesize"], cfgs["train"], cfgs["evaluate"]
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = Steps(run_dir)
    rep = dataclasses.replace

    # 1. conversions (train splits only)
    nocot_prompt, cot_prompt = rep(conv_t.prompt, cot=False), rep(conv_t.prompt, cot=True)
    conv = {}
    for src, data in (("bird_train", args.bird_train), ("spider_train", args.spider)):
        for kind, prompt in (("nocot", nocot_prompt), ("cot", cot_prompt)):
            c = rep(conv_t, data=data, out=str(run_dir / "convert" / f"{src}_{kind}"), prompt=prompt)
            conv[f"{src}_{kind}"] = steps.run(f"convert_{src}_{kind}", convert, c)

    # 2. teacher chains on Spider train, verified by execution
    syn_cfg = rep(syn_t, input=str(conv["spider_train_cot"]), data=args.spider, out=str(run_dir / "synthesize" / "spider_train"))
    hinted_reused = reused_synthesis("--hinted-synthesis", args.hinted_synthesis, mode="hinted")  # checked now
    if args.synthesis:  # reuse an earlier synthesis: it stands for the step (its fingerprint is its manifest)
        syn_dir, fp = reused_synthesis("--synthesis", args.synthesis)
        steps.record("synthesize_spider_train", fp)
    else:
        syn_dir = steps.run("synthesize_spider_train", synthesize, syn_cfg, after=("convert_spider_train_cot",))
    syn_counts = (read_manifest(syn_dir) or {}).get("counts", {})

    # 3. the SFT sets; each student is trained when a row first needs it (so --rows orders the GPU time)
    gold_sources = [("bird_train_gold", conv["bird_train_nocot"] / "train.parquet", "sql"),
                    ("spider_train_gold", conv["spider_train_nocot"] / "train.parquet", "sql")]
    chains = [("spider_train_verified_chains", syn_dir / "sft.parquet", "cot")]
    hinted_counts: dict = {}
    mixes = {"sft_nocot": write_mix(run_dir / "sft" / "nocot", gold_sources, conv["bird_train_nocot"]),
             "sft_cot": write_mix(run_dir / "sft" / "cot", chains, conv["spider_train_cot"]),
             "sft_mix": write_mix(run_dir / "sft" / "mix", chains + gold_sources, conv["spider_train_cot"])}
    from text2sql_ray.models import resolve_model

    # the student is evaluated exactly as training starts from it ("" = the embedded default, as a path)
    models, not_trained = {"student": train_t.model or resolve_model("")}, {}

    dpo_counts: dict = {}  # per DPO row

    def model_for(name: str) -> str | None:
        if name in models or name in not_trained:
            return models.get(name)
        if name in DPO_START:
            return dpo_model(name)
        if name in ("sft_cot_hinted", "sft_mix_hinted") and name not in mixes:
            hinted_sets()
        if name == "sft_cot_gold" and name not in mixes:
            mixes[name] = gold_chain_mix(run_dir, conv)
        if mixes[name]["rows"] == 0:
            not_trained[name] = "no training rows (the teacher verified no chain)"
            log.warning("recipe: %s has no training rows; its table row is left empty", name)
            return None
        kind = name.removeprefix("sft_")
        t = rep(train_t, input=str(run_dir / "sft" / kind), out=str(run_dir / "train" / kind))
        after = ("convert_bird_train_nocot", "convert_spider_train_nocot") + (
            ("synthesize_spider_train",) if kind not in ("nocot", "cot_gold") else ()) + (
            ("convert_bird_train_cot", "convert_spider_train_cot") if kind == "cot_gold" else ()) + (
            ("synthesize_bird_train_hinted",) if kind.endswith("_hinted") else ())
        models[name] = evaluated(steps.run(f"train_{name}", train, t, after=after))
        return models[name]

    def hinted_sets() -> None:
        """The hinted rows' SFT sets: the teacher shown each BIRD train question's gold SQL (the seed's recipe; BIRD
        train has no databases here, so a chain counts when its final SQL equals the gold after sqlglot
        canonicalisation: `canonical_match`, kept apart from execution-verified in the counts), beside the verified
        Spider chains (and, for the mixed row, the gold SQL rows). Made when a hinted row first needs them (a teacher
        generation: GPU time), or read from --hinted-synthesis."""
        if hinted_reused:
            h_dir, fp = hinted_reused
            steps.record("synthesize_bird_train_hinted", fp)
        else:
            h_cfg = rep(syn_t, input=str(conv["bird_train_cot"]), data=args.bird_train, mode="hinted",
                        samples=args.hinted_samples, limit=args.hinted_limit, no_db_check="canonical",
                        sft_canonical_match=True, out=str(run_dir / "synthesize" / "bird_train_hinted"))
            h_dir = steps.run("synthesize_bird_train_hinted", synthesize, h_cfg, after=("convert_bird_train_cot",))
        hinted_counts.update((read_manifest(h_dir) or {}).get("counts", {}))
        hinted = chains + [("bird_train_hinted_chains", h_dir / "sft.parquet", "cot")]
        mixes["sft_cot_hinted"] = write_mix(run_dir / "sft" / "cot_hinted", hinted, conv["spider_train_cot"])
        mixes["sft_mix_hinted"] = write_mix(run_dir / "sft" / "mix_hinted", hinted + gold_sources,
                                            conv["spider_train_cot"])

    def dpo_model(name: str) -> str | None:
        """A DPO row's model: a new LoRA on its SFT model (the reference), trained on pairs of one Spider train question
        (prompts: this run's CoT conversion of Spider train). sft_cot_dpo: the teacher's samples (the synthesis'
        verdicts); sft_mix_hinted_dpo: on-policy, its SFT model's own samples, drawn with its own CoT prompt."""
        (start_row,) = DPO_START[name]
        start = model_for(start_row)
        if start is None:
            not_trained[name] = f"no {start_row} model to start from"
            return None
        kind = name.removeprefix("sft_")
        # the teacher row keeps the paths of the runs before the on-policy row existed (a resumed run stays valid)
        pair_dir = run_dir / ("dpo" if name == "sft_cot_dpo" else f"dpo_{kind}")
        after = (f"train_{start_row}",)
        sources = [("spider_train", syn_dir)]  # (split, samples dir): the teacher's samples for sft_cot_dpo
        if name in ONPOLICY_SOURCES:
            sources = []
            # the first on-policy row keeps its step and dir names (a resumed run stays valid)
            tag = "" if name == "sft_mix_hinted_dpo" else "_" + start_row.removeprefix("sft_")
            for src in ONPOLICY_SOURCES[name]:
                o_cfg = rep(syn_t, input=str(conv[f"{src}_cot"]), data=args.spider if src == "spider_train"
                            else args.bird_train, mode="blind", student_prompt=True, samples=args.onpolicy_samples,
                            sft_canonical_match=False, include_unverified=False, no_db_check="canonical",
                            schema_check=True, engine=rep(syn_t.engine, model=start),
                            out=str(run_dir / "synthesize" / f"{src}_onpolicy{tag}"))
                step = f"synthesize_{src}_onpolicy{tag}"
                sources.append((src, steps.run(step, synthesize, o_cfg, after=after)))
                after = after + (step,)
        t = rep(train_t, method="dpo", input=str(pair_dir / "pairs.parquet"), model=start,
                out=str(run_dir / "train" / kind), packing=False, lr=args.dpo_lr, epochs=args.dpo_epochs,
                max_steps=0, schedule="cosine", warmup_ratio=0.1, lora_r=args.dpo_lora_r, lora_alpha=2 * args.dpo_lora_r,
                dpo_beta=args.dpo_beta, dpo_sft_weight=args.dpo_sft_weight,
                dpo_pairs_per_question=args.dpo_pairs_per_question, dpo_max_length_gap=args.dpo_max_length_gap,
                # BIRD train has no databases: a canonical match with the gold is its only chosen answer
                dpo_chosen="verified,canonical_match" if "bird_train" in dict(sources) else train_t.dpo_chosen)
        parts = {src: dpo.read_input([d / "samples.parquet", conv[f"{src}_cot"] / "train.parquet"], t)
                 for src, d in sources}
        built = merge_pairs(parts)
        counts = dpo_counts.setdefault(name, {})
        counts.update(dpo.manifest_section(built, len(built.pairs), t, from_samples=True))
        counts["pairs_file"] = str(pair_dir / "pairs.parquet")
        counts["samples_from"] = ", ".join(str(d) for _, d in sources)
        if len(parts) > 1:  # each split's own counts (the words and files are the row's)
            skip = ("pairs_file", "pairs_trained", "source", "policy")
            counts["by_source"] = {src: {k: v for k, v in dpo.manifest_section(b, len(b.pairs), t, True).items()
                                         if k not in skip} for src, b in parts.items()}
        write_json(pair_dir / "pairs.json", counts)
        if not built.pairs:
            not_trained[name] = "no preference pairs (no question has both a verified and a failing chain)"
            return None
        import pyarrow as pa

        write_parquet(pair_dir / "pairs.parquet", pa.Table.from_pylist(built.pairs))
        models[name] = evaluated(steps.run(f"train_{name}", train, t, after=after))
        return models[name]

    # 4. evaluations: every row on both benchmarks, in --rows order
    by_name = {r.name: r for r in ROWS}
    wanted = [n for n in (x.strip() for x in args.rows.split(",")) if n]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {', '.join(unknown)}; rows are {', '.join(by_name)}")
    bench_data = {"bird": args.bird_dev, "spider": args.spider}
    results_stem = Path(args.results)
    pred_dir = results_stem.parent / results_stem.name
    # before pred_dir goes: it may be that dir
    earlier, earlier_summary = read_earlier(Path(args.earlier)) if args.earlier else ({}, {})
    if pred_dir.exists():
        shutil.rmtree(pred_dir)
    pred_dir.mkdir(parents=True)
    done = {}
    for row in (by_name[n] for n in wanted):
        maj_row = row.maj and row.name not in args.no_maj
        # a DPO row trained with RPO's NLL term or length-matched pairs says so in its label (the plain-DPO rows of an
        # earlier table keep their own)
        dpo_tags = [f"RPO, NLL weight {args.dpo_sft_weight}"] if args.dpo_sft_weight else []
        dpo_tags += [f"pairs at most {args.dpo_max_length_gap:g} apart in length"] if args.dpo_max_length_gap else []
        label = row.label + (f" ({'; '.join(dpo_tags)})" if row.name in DPO_START and dpo_tags else "")
        entries = [(row.name, label, False)] + ([(f"{row.name}_maj{args.maj_k}", f"{label} + maj@{args.maj_k}",
                                                  True)] if maj_row else [])
        results = {e[0]: {} for e in entries}
        model = model_for(row.model)
        for bench in BENCHMARKS:
            if model is None or bench not in args.benchmarks:
                for e in entries:
                    results[e[0]][bench] = {"ex": None, "n_correct": None, "n_scored": None,
                                            "note": not_trained[row.model] if model is None else "not run"}
                continue
            engine = eval_t.engine
            if args.nocot_engine and not row.prompt.get("cot") and not maj_row:
                engine = rep(engine, backend=args.nocot_engine)
            samples = 1
            if maj_row:
                samples, engine = args.maj_k, rep(engine, temperature=args.maj_temperature)
            e_cfg = rep(eval_t, data=bench_data[bench], model=model, predictions="", endpoint="",
                        compare=[], samples=samples, engine=rep(engine, model=""),
                        prompt=rep(eval_t.prompt, **row.prompt), out=str(run_dir / "eval" / f"{row.name}_{bench}"))
            after = (f"train_{row.model}",) if row.model != "student" else ()
            out = steps.run(f"eval_{row.name}_{bench}", evaluate, e_cfg, after=after)
            report = json.loads((out / "report.json").read_text())
            for name, _, maj in entries:
                src = out / (evaluate.MAJ_DIR if maj else "") / "predict_dev.json"
                shutil.copyfile(src, pred_dir / f"{name}_{bench}_predict_dev.json")
                results[name][bench] = {**_ex_of(report, maj), "n_questions": report.get("n_questions"),
                                        "n_skipped_missing_db": report.get("n_skipped_missing_db"),
                                        "engine": engine.backend,
                                        "predictions": f"{pred_dir.name}/{name}_{bench}_predict_dev.json"}
        done[row.name] = [(name, label, maj, results[name]) for name, label, maj in entries]
    table = []
    for row in ROWS:  # table order, whatever order the rows ran in
        if row.name not in done and row.name in earlier:
            table += earlier_rows(earlier[row.name], pred_dir)
            continue
        for name, label, maj, res in done.get(row.name, [(row.name, row.label, False, {
                b: {"ex": None, "n_correct": None, "n_scored": None, "note": "not run"} for b in BENCHMARKS})]):
            table.append({"row": name, "label": label, "training": row.training,
                          "prompt": "seed (bare DDL)" if row.prompt.get("schema_style") == "ddl" else "ours (rich)",
                          "cot": bool(row.prompt.get("cot")), "decoding": f"maj@{args.maj_k}, T={args.maj_temperature}"
                          if maj else "greedy", "model": models.get(row.model, ""), **res})

    took = {r["row"] for r in table if r.get("earlier")}
    dpo_train = (f"LoRA r {args.dpo_lora_r} / alpha {2 * args.dpo_lora_r} on the row's merged SFT model, lr {args.dpo_lr} "
                 f"cosine (10% warmup), beta {args.dpo_beta}, {args.dpo_epochs} epoch(s), at most "
                 f"{args.dpo_pairs_per_question} pairs per question"
                 + (f", + {args.dpo_sft_weight} x the chosen answer's NLL per token (RPO)" if args.dpo_sft_weight
                    else "")
                 + (f", chosen and rejected answers at most {args.dpo_max_length_gap:g} apart in length (closest "
                    "first)" if args.dpo_max_length_gap else ""))
    dpo_pairs = {key: dpo_counts.get(name, {}) for name, (key, _) in DPO_PAIR_KEYS.items()}
    for name, (key, _) in DPO_PAIR_KEYS.items():
        if dpo_pairs[key]:  # each DPO row's own words on how it was trained (the rows may come from two runs)
            dpo_pairs[key] = {**dpo_pairs[key], "training": dpo_train}
        elif name in took:  # an earlier row keeps the words on what it was trained on
            e = earlier_summary.get(key) or {}
            dpo_pairs[key] = {**e, "training": e.get("training") or earlier_summary.get("dpo_train", "")} if e else {}
    for name in ("sft_cot_hinted", "sft_mix_hinted", "sft_cot_gold"):
        if name in took and name not in mixes and name in earlier_summary.get("sft_sets", {}):
            mixes[name] = earlier_summary["sft_sets"][name]
            hinted_counts = hinted_counts or earlier_summary.get("synthesis_bird_hinted") or {}
    finished = steps.state.get("_finished", {})
    summary = {
        "config": shown(args.config), "student": train_t.model, "teacher": syn_t.engine.model,
        "engine": {"synthesize": syn_t.engine.backend, "evaluate": eval_t.engine.backend,
                   "evaluate_nocot": args.nocot_engine or eval_t.engine.backend},
        "data": {"bird_train": args.bird_train, "bird_dev": args.bird_dev, "spider": args.spider},
        "synthesis": syn_counts, "synthesis_bird_hinted": hinted_counts, "sft_sets": mixes, **dpo_pairs,
        "rows": table,
        # wall time of the steps this run ran; a step done in the run dir before (an earlier, killed run, or a run dir
        # unpacked from elsewhere: h200.sh RECIPE_RUN_TGZ) is listed apart, its time not this run's
        "step_seconds": {k: v for k, v in steps.seconds.items() if finished.get(k, 0) >= args.started},
        "step_seconds_before": {k: v for k, v in steps.seconds.items() if finished.get(k, 0) < args.started},
        "train": {k: getattr(train_t, k) for k in ("method", "epochs", "max_steps", "lr", "schedule", "warmup_ratio",
                                                    "lora_r", "lora_alpha", "lora_dropout", "micro_batch_size",
                                                    "grad_accum", "max_length", "packing", "max_grad_norm")},
        "run_dir": str(run_dir),
        "dpo_train": dpo_train,
    }
    write_json(results_stem.with_suffix(".json"), summary)
    write_text(results_stem.with_suffix(".md"), table_markdown(summary))
    plot_table(summary, results_stem.with_suffix(".png"))
    log.info("recipe: table %s", results_stem.with_suffix(".md"))
    return summary


def reused_synthesis(flag: str, path: str, mode: str | None = None) -> tuple[Path, str] | None:
    """--synthesis / --hinted-synthesis: (the dir, the fingerprint that stands for its step: its manifest and
    where it is), checked to be a `t2s synthesize` output (of `mode`, when given); None when not given."""
    if not path:
        return None
    d = Path(path)
    manifest = read_manifest(d)
    if manifest is None or manifest.get("stage") != "synthesize" or not (d / "sft.parquet").is_file():
        raise SystemExit(f"{flag} {d}: not a `t2s synthesize` output (manifest.json with stage 'synthesize' and "
                         "sft.parquet); give the dir `t2s synthesize --out` wrote")
    got = (manifest.get("config") or {}).get("mode")
    if mode and got != mode:
        raise SystemExit(f"{flag} {d}: a synthesis in mode {got!r}, not {mode!r}; give a `t2s synthesize --mode "
                         f"{mode}` output")
    log.info("recipe: synthesis from %s (%s SFT rows), not rerun", d, manifest.get("counts", {}).get("sft_rows"))
    return d, hashlib.sha256((json.dumps(manifest, sort_keys=True, default=str) + str(d.resolve())).encode()).hexdigest()[:16]


def shown(path: str) -> str:
    """A path as a table shows it: relative to this checkout when inside it (the GPU machine's copy at /tmp/src and
    a user's clone then read the same), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO.resolve()))
    except (OSError, ValueError):
        return str(path)


def read_earlier(path: Path) -> tuple[dict[str, list[dict]], dict]:
    """--earlier: ({row name: its table entries (the row and its maj@k line), each bench's predictions file read
    into "_predictions" (bytes)} for the rows of an earlier table that have a number, that table's summary)."""
    try:
        s = json.loads(path.read_text())
        rows = s["rows"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--earlier {path}: not a results table written by this script ({e}); give its STEM.json")
    out: dict[str, list[dict]] = {}
    secs = {**(s.get("step_seconds_before") or {}), **(s.get("step_seconds") or {})}  # a row's steps ran then or before
    for row in ROWS:
        entries = [dict(r) for r in rows if r.get("row") == row.name or r.get("row", "").startswith(f"{row.name}_maj")]
        if not any(e.get(b, {}).get("ex") is not None for e in entries for b in BENCHMARKS):
            continue
        own_steps = (f"train_{row.model}",) + tuple(f"eval_{row.name}_{b}" for b in BENCHMARKS)
        own_seconds = {k: secs[k] for k in own_steps if k in secs}
        for e in entries:
            for b in BENCHMARKS:
                res = e.get(b, {})
                if res.get("predictions"):
                    src = path.parent / res["predictions"]
                    if not src.is_file():
                        raise SystemExit(f"--earlier {path}: row {e['row']} names predictions {src}, which is not "
                                         "there; an earlier row is only taken with the predictions it was scored from")
                    e[b] = {**res, "_predictions": src.read_bytes()}
            # a row that table took from a yet earlier one keeps where it was run
            e["earlier"] = e.get("earlier") or {"table": shown(str(path)), "run_dir": s.get("run_dir", ""),
                                                "student": s.get("student", ""), "step_seconds": own_seconds}
        out[row.name] = entries
    return out, s


def earlier_rows(entries: list[dict], pred_dir: Path) -> list[dict]:
    """An earlier table's entries for one row, their predictions written into this table's predictions dir."""
    rows = []
    for e in entries:
        e = dict(e)
        for b in BENCHMARKS:
            res = dict(e.get(b, {}))
            data = res.pop("_predictions", None)
            if data is not None:
                name = Path(res["predictions"]).name
                (pred_dir / name).write_bytes(data)
                res["predictions"] = f"{pred_dir.name}/{name}"
            e[b] = res
        rows.append(e)
    return rows


def table_markdown(s: dict) -> str:
    def cell(r):
        if r.get("ex") is None:
            return "n/a" + (f" ({r['note']})" if r.get("note") else "")
        return f"{r['ex']:.2f} ({r['n_correct']}/{r['n_scored']})"

    lines = [
        "# The recipe on small real models: BIRD dev and Spider dev execution accuracy",
        "",
        (f"Student `{s['student']}`, teacher `{s['teacher']}`; engines: synthesize `{s['engine']['synthesize']}`, "
        f"evaluate `{s['engine']['evaluate']}` (SQL-only rows: `{s['engine'].get('evaluate_nocot', s['engine']['evaluate'])}`). "
        f"Job file `{s['config']}`."),
        "",
        "| row | prompt | training | decoding | BIRD dev EX % (correct/scored) | Spider dev EX % (correct/scored) |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in s["rows"]:
        lines.append(f"| {r['label']}{' (earlier run)' if r.get('earlier') else ''} | {r['prompt']}{', CoT' if r['cot'] else ''} | {r['training']} | {r['decoding']} "
                     f"| {cell(r.get('bird', {}))} | {cell(r.get('spider', {}))} |")
    earlier = sorted({(shown(r["earlier"]["table"]), r["earlier"]["run_dir"]) for r in s["rows"] if r.get("earlier")})
    if earlier:
        lines += ["", "Rows marked (earlier run) are not rerun here: taken with their predictions from " + "; ".join(
            f"`{t}` (run dir `{d}`)" for t, d in earlier) + "."]
        then = {k: v for r in s["rows"] if r.get("earlier") for k, v in r["earlier"].get("step_seconds", {}).items()}
        if then:
            lines.append("Their wall time per step (s), in that run: " + ", ".join(f"{k} {v}" for k, v in then.items())
                         + ". The times below are this run's.")
    skipped = {b: next((r[b].get("n_skipped_missing_db") for r in s["rows"] if r.get(b, {}).get("ex") is not None), "n/a")
               for b in BENCHMARKS}
    syn = s["synthesis"]
    lines += [
        "",
        (f"Scored questions are those whose database is on disk (skipped: BIRD {skipped['bird']}, Spider "
         f"{skipped['spider']} of the questions asked); EX is the official BIRD rule (set equality of result rows). "
         "Greedy rows are temperature 0; a maj@k row votes by execution result over k samples of the row above's "
         "model (that greedy line comes from the same run)."),
        "",
        (f"SFT sets: no-CoT {s['sft_sets']['sft_nocot']['rows']} rows, CoT {s['sft_sets']['sft_cot']['rows']} rows"
         + (f", CoT + no-CoT {s['sft_sets']['sft_mix']['rows']} rows" if "sft_mix" in s["sft_sets"] else "") + " "
         f"(teacher synthesis on Spider train: {syn.get('selected_questions', '?')} questions, "
         f"{syn.get('samples', '?')} samples, {syn.get('sft_execution_verified', '?')} execution-verified chains kept)"
         + (hinted_note(s) if "sft_cot_hinted" in s["sft_sets"] else "")
         + (gold_chain_note(s["sft_sets"]["sft_cot_gold"]) if "sft_cot_gold" in s["sft_sets"] else "") + ". "
         "Training (every SFT row): " + ", ".join(f"{k} {v}" for k, v in s["train"].items()) + "."),
        "",
    ]
    for key, what in DPO_PAIR_KEYS.values():
        d = s.get(key) or {}
        if not d:
            continue
        q = d.get("questions", {})
        by_source = "".join(
            f"; {src}: {b.get('pairs')} pairs from {b.get('questions', {}).get('paired', '?')} of "
            f"{b.get('questions', {}).get('total', '?')} questions" for src, b in (d.get("by_source") or {}).items())
        lines += [
            (f"{what}: {d.get('pairs')} pairs from "
             f"{q.get('paired', '?')} questions (" + ", ".join(f"{k} {v}" for k, v in q.items() if k != "paired")
             + f"){by_source}; {d.get('samples_in_pairs')} of {d.get('samples')} samples in a pair"
             + (f"; answers {d['answer_chars']['chosen_mean']:.0f} chars chosen vs "
                f"{d['answer_chars']['rejected_mean']:.0f} rejected on average, the chosen one shorter in "
                f"{100 * d['answer_chars']['chosen_shorter_fraction']:.0f}% of pairs" if d.get("answer_chars") else "")
             + ". Training: "
             f"{d.get('training') or s.get('dpo_train', '')}. Policy: {d.get('policy', '')}."),
            "",
        ]
    lines += [
        "Predictions (official predict_dev.json format, every question of the file in order; empty = not scored or "
        "not answered): " + ", ".join(f"`{r[b]['predictions']}`" for r in s["rows"] for b in BENCHMARKS
                                      if r.get(b, {}).get("predictions")) + ".",
        "",
        "Wall time per step (s), this run: " + (", ".join(f"{k} {v}" for k, v in s["step_seconds"].items()) or
                                                "none (every step was done before)") + ".",
    ]
    if s.get("step_seconds_before"):
        lines += ["", "Done in the run dir before this run started, not rerun (their time then, s): " + ", ".join(
            f"{k} {v}" for k, v in s["step_seconds_before"].items()) + "."]
    if s.get("lanes"):
        lines += ["", "Lanes (processes sharing the GPU, steps within a lane one after another): " + "; ".join(
            f"{k}: {','.join(v['rows'])} ({v['seconds']} s{'' if v['rc'] == 0 else ', failed: rc ' + str(v['rc'])})"
            for k, v in s["lanes"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot_table(s: dict, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from text2sql_ray.common import atomic_path

    rows = s["rows"]
    fig = Figure(figsize=(8, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.38
    xs = list(range(len(rows)))
    for off, bench, color in ((-w / 2, "bird", "#4c72b0"), (w / 2, "spider", "#dd8452")):
        vals = [r.get(bench, {}).get("ex") for r in rows]
        bars = ax.bar([x + off for x in xs], [v or 0.0 for v in vals], w, label=f"{bench} dev", color=color)
        for bar, v in zip(bars, vals):
            ax.annotate("n/a" if v is None else f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xticklabels([r["label"] for r in rows], rotation=15, fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("execution accuracy (%)")
    ax.set_title("Recipe table: EX per row", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    summary = run_lanes(args) if args.lanes else run_recipe(args)
    print(table_markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
