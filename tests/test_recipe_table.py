"""benchmarks/recipe_table.py end to end on CPU (jobs/recipe_tiny_cpu.yaml): every step runs through the real
stages on a real local Ray, and the table, the plot and every row's predictions (official format) are written
with the right counts; a rerun redoes nothing.

Opt-in (`pytest -m recipe tests/test_recipe_table.py`, ~7 min on 2 cores; `benchmarks/gpu/prepare_carry.sh` runs it
before it packs a GPU run): the benchmark script's end-to-end run was a fifth of CI's time, past what CI's 30 minutes
allow. The stages it drives have their own tests in CI; the two tests below without the fixture stay in CI.

Stand-ins, for what cannot run here: the student is the tiny random Llama (a real 0.5B model on CPU would take
hours), and the teacher (a 1.5B model on a GPU in the real run) is a local OpenAI-compatible HTTP server that
answers every hinted teacher prompt with a chain ending in the hinted query, so the CoT step has verified chains.
The same server stands in for the on-policy DPO row's sampler (the student it starts from, served by vLLM in the
real run; the tiny random student writes no SQL): asked with the student's own prompt under the student model's
name, it answers with the question's gold SQL (or a failing query), and the test checks what it was asked.
The data are real: the bundled demo (BIRD format) as BIRD, and the first questions of the real Spider.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastapi import Request  # module level: the handler's annotation is resolved by name
from local_http import LocalServer

from text2sql_ray import bird, dpo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # ~17 stage runs (each starts its own actors)

REPO = Path(__file__).resolve().parents[1]
SPIDER = Path(os.environ.get("T2S_SPIDER_DATA", REPO.parent / "shared" / "data" / "spider"))
HINT = re.compile(r"A reference query, which may be wrong, is:\n```sql\n(.*?)\n```", re.DOTALL)


class HintCopyingTeacher(LocalServer):
    """/v1/chat/completions answering a hinted teacher prompt with a short chain that ends in the hinted SQL."""

    def __init__(self, gold_by_question: dict[str, str]):
        from fastapi import FastAPI

        self.asked: list[dict] = []  # per request: the model name, the system turn, whether a hint was shown
        app = FastAPI()
        # longest first: a question that is part of a longer one never takes its gold
        questions = sorted(gold_by_question, key=len, reverse=True)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            user = body["messages"][-1]["content"]
            m = HINT.search(user)
            self.asked.append({"model": body["model"], "system": body["messages"][0]["content"], "hinted": bool(m)})
            sql = m.group(1) if m else next((gold_by_question[q] for q in questions if q in user), "SELECT 1")
            n = body.get("n", 1)
            # even samples copy the hint (verified), odd ones query a table that does not exist (an execution
            # error): every question gets a chosen and a rejected chain, the DPO row's pairs
            texts = [f"Step 1: find the table.\nStep 2: filter and aggregate.\n\n```sql\n"
                     f"{sql if i % 2 == 0 else 'SELECT * FROM no_such_table_t2s'}\n```" for i in range(n)]
            return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                                 "finish_reason": "stop"} for i in range(n)],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 9 * n, "total_tokens": 1 + 9 * n}}

        super().__init__(app)

    @property
    def requests(self) -> int:
        return len(self.asked)


@pytest.fixture(scope="module")
def recipe_run(ray_local, tmp_path_factory, tiny_llama_dir):
    if not (SPIDER / "tables.json").is_file():
        pytest.fail(f"real Spider data not found at {SPIDER}; set T2S_SPIDER_DATA")
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import recipe_table

    tmp = tmp_path_factory.mktemp("recipe")
    gold = {q["question"]: q["SQL"] for q in bird.load_split(SPIDER, "train").questions[:50]}
    # the demo's BIRD train questions too: the hinted CoT SFT model's on-policy samples of them (sft_cot_hinted_dpo)
    gold.update({q["question"]: q["SQL"] for q in bird.load_split(bird.resolve_data("", "train")).questions})
    with HintCopyingTeacher(gold) as teacher:
        argv = ["--config", str(REPO / "jobs" / "recipe_tiny_cpu.yaml"), "--student", str(tiny_llama_dir),
                "--teacher", "stand-in-teacher", "--bird", "demo", "--spider", str(SPIDER), "--maj-k", "2",
                "--out", str(tmp / "run"), "--results", str(tmp / "results" / "table"),
                # the rows of the teacher's Spider chains; the hinted rows are the reuse runs' below (sft_mix, the
                # CoT + no-CoT set, is trained there with the hinted chains: the same code, one student less here)
                "--rows", ",".join(r for r in MAIN_ROWS),
                # BIRD only here; the two base rows get Spider in the "two" run (each tiny evaluation is ~10 s of CI)
                "--benchmarks", "bird",
                "--set", "synthesize.engine.backend=openai", "--set", f"synthesize.engine.endpoint={teacher.endpoint}",
                "--set", "synthesize.engine.max_retries=0"]
        assert recipe_table.main(argv) == 0
        first_state = json.loads((tmp / "run" / "recipe_state.json").read_text())
        requests = teacher.requests
        assert recipe_table.main(argv) == 0  # everything is up to date: nothing reruns
        rerun = {"state": json.loads((tmp / "run" / "recipe_state.json").read_text()),
                 "requests": teacher.requests}
        # two rows only, in another order, on both benchmarks: only their Spider evaluations run, the table keeps
        # table order and marks the rest
        assert recipe_table.main(argv[:-6] + ["--results", str(tmp / "results" / "two"), "--rows", "base_ours,base_seed",
                                              "--benchmarks", "bird,spider"] + argv[-6:]) == 0
        # an earlier Spider synthesis reused (no Spider teacher request); only the hinted row asked: its BIRD train
        # chains are made (the teacher shown the gold SQL) and its student is trained on them + the reused chains;
        # then its on-policy DPO row: that student samples Spider train and BIRD train itself (its own CoT prompt)
        before = len(teacher.asked)
        assert recipe_table.main(argv[:-6] + ["--results", str(tmp / "results" / "reuse"), "--rows",
                                              "sft_cot_hinted,sft_cot_hinted_dpo", "--onpolicy-samples", "2",
                                              "--dpo-sft-weight", "0.5", "--dpo-max-length-gap", "0.9",
                                              "--no-maj", "sft_cot_hinted",
                                              "--synthesis", str(tmp / "run" / "synthesize" / "spider_train"),
                                              "--benchmarks", "bird"] + argv[-6:]) == 0
        rerun["reuse_asked"] = teacher.asked[before:]
        rerun["reuse_requests"] = sum(a["model"] == "stand-in-teacher" for a in rerun["reuse_asked"])
        # the mixed hinted row from that hinted synthesis, reused (--hinted-synthesis): no teacher request at all.
        # Greedy only (--no-maj), as on the GPU where a row's maj@k costs minutes. (Its on-policy DPO row,
        # sft_mix_hinted_dpo, runs the same code as sft_cot_hinted_dpo above with Spider train alone, and the
        # gold-chain row trains and evaluates like any SFT row: neither is rerun here, to keep CI time; the gold-chain
        # set is checked below)
        before = len(teacher.asked)
        assert recipe_table.main(argv[:-6] + ["--results", str(tmp / "results" / "mixed"), "--rows",
                                              "sft_mix_hinted", "--no-maj", "sft_mix_hinted",
                                              "--synthesis", str(tmp / "run" / "synthesize" / "spider_train"),
                                              "--hinted-synthesis", str(tmp / "run" / "synthesize" / "bird_train_hinted"),
                                              "--benchmarks", "bird"] + argv[-6:]) == 0
        rerun["mixed_asked"] = teacher.asked[before:]
        # one row run, the rest taken from the first table (--earlier): nothing else reruns
        assert recipe_table.main(argv[:-6] + ["--results", str(tmp / "results" / "earlier"), "--rows", "base_ours",
                                              "--earlier", str(tmp / "results" / "table.json")] + argv[-6:]) == 0
        broken = json.loads((tmp / "results" / "table.json").read_text())
        broken["rows"][2]["bird"]["predictions"] = "table/no_such_predict_dev.json"
        (tmp / "broken.json").write_text(json.dumps(broken))
        with pytest.raises(SystemExit, match="which is not there"):
            recipe_table.main(argv[:-6] + ["--rows", "base_ours", "--earlier", str(tmp / "broken.json")] + argv[-6:])
        with pytest.raises(SystemExit, match="--no-maj: unknown row"):
            recipe_table.main(argv[:-6] + ["--no-maj", "sft_nocott"] + argv[-6:])
        with pytest.raises(SystemExit, match="not a `t2s synthesize` output"):
            recipe_table.main(argv[:-6] + ["--synthesis", str(tmp / "run" / "sft" / "cot")] + argv[-6:])
        with pytest.raises(SystemExit, match="a synthesis in mode 'blind', not 'hinted'"):  # the on-policy samples
            recipe_table.main(argv[:-6] + ["--hinted-synthesis",
                                           str(tmp / "run" / "synthesize" / "spider_train_onpolicy_cot_hinted")]
                              + argv[-6:])
    return {"tmp": tmp, "first_state": first_state, "first_requests": requests, "rerun": rerun,
            "student": tiny_llama_dir}


MAIN_ROWS = ["base_seed", "base_ours", "sft_nocot", "sft_cot", "sft_cot_dpo"]
# the main table: the other rows read "not run" (one line each, no maj@k line)
NOT_IN_MAIN = ("sft_cot_hinted", "sft_cot_gold", "sft_mix", "sft_mix_hinted", "sft_mix_hinted_dpo",
               "sft_cot_hinted_dpo")
ROW_NAMES = ["base_seed", "base_ours", "sft_nocot", "sft_nocot_maj2", "sft_cot", "sft_cot_maj2", "sft_cot_hinted",
             "sft_cot_gold", "sft_mix", "sft_mix_hinted", "sft_cot_dpo", "sft_mix_hinted_dpo", "sft_cot_hinted_dpo"]
RAN = [r for r in ROW_NAMES if r not in NOT_IN_MAIN]


@pytest.mark.recipe
def test_the_table_has_every_row_with_the_scored_counts(recipe_run):
    results = recipe_run["tmp"] / "results"
    summary = json.loads((results / "table.json").read_text())
    assert [r["row"] for r in summary["rows"]] == ROW_NAMES
    for r in summary["rows"]:
        assert r["spider"]["ex"] is None and r["spider"]["note"] == "not run"  # --benchmarks bird
        if r["row"] in NOT_IN_MAIN:
            assert r["bird"]["ex"] is None and r["bird"]["note"] == "not run"
            continue
        assert r["bird"]["n_scored"] == 4 and r["bird"]["n_questions"] == 4, r["row"]
        assert 0.0 <= r["bird"]["ex"] <= 100.0
    assert [r["decoding"] for r in summary["rows"]] == ["greedy"] * 2 + ["greedy", "maj@2, T=0.8"] * 2 + ["greedy"] * 7
    # the rerun (same --results) wrote this table: it ran nothing, so no time is called its own; the first run's
    # times of every step are kept, said apart
    assert summary["step_seconds"] == {}
    assert summary["step_seconds_before"] == recipe_run["first_state"]["_seconds"]
    assert set(summary["step_seconds_before"]) == {k for k in recipe_run["first_state"] if not k.startswith("_")}
    assert summary["rows"][0]["prompt"] == "seed (bare DDL)" and not summary["rows"][0]["cot"]
    by_row = {r["row"]: r for r in summary["rows"]}
    assert by_row["sft_cot"]["cot"] and by_row["sft_cot"]["model"].endswith(("train/cot", "train/cot/merged"))
    assert not by_row["sft_nocot_maj2"]["cot"] and by_row["sft_nocot_maj2"]["bird"]["engine"] == "hf"
    md = (results / "table.md").read_text()
    for label in ("baseline, seed prompt", "baseline, our prompt", "| no-CoT SFT |", "no-CoT SFT + maj@2", "| CoT SFT |",
                  "CoT SFT + maj@2", "| CoT + no-CoT SFT | ours (rich), CoT |", "| CoT SFT + DPO |",
                  "DPO pairs (teacher samples of the synthesis): 4 pairs from 4 questions"):
        assert label in md
    assert len([ln for ln in md.splitlines() if ln.startswith("| ") and "/4)" in ln]) == 7
    assert "earlier run" not in md and "Wall time per step (s), this run: none (every step was done before)." in md
    assert (results / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.recipe
def test_every_row_writes_official_predictions_per_benchmark(recipe_run):
    results = recipe_run["tmp"] / "results"
    assert sorted(p.name for p in (results / "table").iterdir()) == sorted(f"{r}_bird_predict_dev.json" for r in RAN)
    files = sorted((results / "table").iterdir()) + sorted((results / "two").glob("*_spider_predict_dev.json"))
    assert [p.name for p in files if "_spider_" in p.name] == [f"{r}_spider_predict_dev.json" for r in ("base_ours", "base_seed")]
    spider_dev = bird.load_split(SPIDER, "dev").questions[:4]
    for path in files:
        name = path.name
        preds = json.loads(path.read_text())
        assert list(preds) == ["0", "1", "2", "3"], name
        assert all("\t----- bird -----\t" in v for v in preds.values())
        if "_spider_" in name:
            assert [v.rsplit("\t", 1)[1] for v in preds.values()] == [q["db_id"] for q in spider_dev]


@pytest.mark.recipe
def test_the_sft_sets_are_the_gold_rows_and_the_execution_verified_chains(recipe_run):
    summary = json.loads((recipe_run["tmp"] / "results" / "table.json").read_text())
    sets = summary["sft_sets"]
    assert sets["sft_nocot"]["sources"]["bird_train_gold"]["rows"] == 8
    assert sets["sft_nocot"]["sources"]["spider_train_gold"]["rows"] == 8
    assert sets["sft_cot"]["rows"] == 4 == summary["synthesis"]["sft_execution_verified"]  # 4 Spider questions
    assert sets["sft_mix"]["rows"] == 4 + 8 + 8 and sets["sft_mix"]["cot"] == 4
    assert summary["synthesis"]["sft_canonical_match"] == 0


@pytest.mark.recipe
def test_the_hinted_row_trains_on_chains_the_teacher_wrote_with_the_gold_sql_shown(recipe_run):
    """The hinted row (the fixture's reuse run): the teacher shown every BIRD train question's gold SQL (1 sample
    each), its chains kept beside the (reused) Spider chains. The demo's BIRD train has databases, so the chains here
    are execution-verified; on the real BIRD train (no databases here) the same config keeps canonical matches
    (sft_canonical_match on), counted apart (tests/test_synthesize.py covers that verdict)."""
    run = recipe_run["tmp"] / "run"
    summary = json.loads((recipe_run["tmp"] / "results" / "reuse.json").read_text())
    h = summary["synthesis_bird_hinted"]
    assert h["selected_questions"] == 8 and h["samples"] == 8  # the 8 converted BIRD train rows x 1 sample
    assert h["sft_execution_verified"] == 8 and h["sft_canonical_match"] == 0  # even samples copy the hint
    s = summary["sft_sets"]["sft_cot_hinted"]
    assert s["rows"] == s["cot"] == 4 + 8 and s["no_cot"] == 0
    assert s["sources"]["bird_train_hinted_chains"]["rows"] == 8 and s["sources"]["spider_train_verified_chains"]["rows"] == 4
    cfg = json.loads((run / "synthesize" / "bird_train_hinted" / "manifest.json").read_text())["config"]
    assert cfg["mode"] == "hinted" and cfg["samples"] == 1 and cfg["sft_canonical_match"] is True
    assert cfg["input"] == str(run / "convert" / "bird_train_cot") and cfg["no_db_check"] == "canonical"
    assert s["sources"]["spider_train_verified_chains"]["file"] == str(run / "synthesize" / "spider_train" / "sft.parquet")
    rows = {r["row"]: r for r in summary["rows"]}
    assert rows["sft_cot_hinted"]["cot"] and rows["sft_cot_hinted"]["model"].startswith(str(run / "train" / "cot_hinted"))
    # --no-maj (as on the GPU, where a row's maj@k costs minutes): the greedy line alone
    assert rows["sft_cot_hinted"]["bird"]["n_scored"] == 4 and rows["sft_cot_hinted"]["spider"]["note"] == "not run"
    assert rows["sft_cot_hinted"]["decoding"] == "greedy" and "sft_cot_hinted_maj2" not in rows
    md = (recipe_run["tmp"] / "results" / "reuse.md").read_text()
    assert "| CoT SFT, hinted chains |" in md and "hinted chains + maj@2" not in md
    assert "CoT SFT, hinted chains 12 rows" in md


@pytest.mark.recipe
def test_the_mixed_hinted_row_reuses_the_hinted_chains_beside_the_gold_rows(recipe_run):
    """--hinted-synthesis: the hinted chains of the reuse run stand for the teacher step (no teacher request); the
    mixed row trains on them + the Spider chains + the gold SQL rows of BIRD train and Spider train."""
    run = recipe_run["tmp"] / "run"
    assert [a for a in recipe_run["rerun"]["mixed_asked"] if a["model"] == "stand-in-teacher"] == []
    summary = json.loads((recipe_run["tmp"] / "results" / "mixed.json").read_text())
    s = summary["sft_sets"]["sft_mix_hinted"]
    assert s["rows"] == 8 + 4 + 8 + 8 and s["cot"] == 12 and s["no_cot"] == 16
    assert s["sources"]["bird_train_hinted_chains"]["file"] == str(run / "synthesize" / "bird_train_hinted" / "sft.parquet")
    assert summary["synthesis_bird_hinted"]["sft_execution_verified"] == 8
    rows = {r["row"]: r for r in summary["rows"]}
    assert rows["sft_mix_hinted"]["cot"] and rows["sft_mix_hinted"]["model"].startswith(str(run / "train" / "mix_hinted"))
    # --no-maj: the greedy line alone, from an evaluation of one sample per question
    assert rows["sft_mix_hinted"]["bird"]["n_scored"] == 4 and rows["sft_mix_hinted"]["decoding"] == "greedy"
    assert "sft_mix_hinted_maj2" not in rows and "maj@" not in rows["sft_mix_hinted"]["bird"]["predictions"]
    report = json.loads((run / "eval" / "sft_mix_hinted_bird" / "report.json").read_text())
    assert report["generation"]["samples"] == 1 and "maj_at_k" not in report
    assert rows["sft_cot_hinted"]["bird"]["note"] == "not run"
    assert "CoT + no-CoT SFT, hinted chains 28 rows" in (recipe_run["tmp"] / "results" / "mixed.md").read_text()
    # only the mixed rows' steps ran in that run (the conversions and Spider chains were there)
    assert set(summary["step_seconds"]) == {"train_sft_mix_hinted", "eval_sft_mix_hinted_bird"}


@pytest.mark.recipe
def test_the_gold_chain_set_holds_every_question_with_a_chain_written_from_its_gold_sql(recipe_run, tmp_path):
    """sft_cot_gold's SFT set (no teacher), from the run's CoT conversions: every converted BIRD train and Spider train
    question, its answer a chain written by rule from its gold SQL that ends in that query, under the CoT system
    turn; the table's words count it. (The row then trains and evaluates like every SFT row.)"""
    import recipe_table

    from text2sql_ray.prompts import extract_sql, strip_sql

    run = recipe_run["tmp"] / "run"
    conv = {f"{src}_cot": run / "convert" / f"{src}_cot" for src in ("bird_train", "spider_train")}
    g = recipe_table.gold_chain_mix(tmp_path, conv)
    assert g["rows"] == g["cot"] == 8 + 8 and g["no_cot"] == 0
    assert {k: v["rows"] for k, v in g["sources"].items()} == {"bird_train_gold_chains": 8, "spider_train_gold_chains": 8}
    assert g["no_chain"] == {"bird_train": {"questions": 0, "question_ids": []},
                             "spider_train": {"questions": 0, "question_ids": []}}
    rows = pq.read_table(tmp_path / "sft" / "cot_gold" / "sft.parquet").to_pylist()
    cot_system = pq.read_table(run / "sft" / "cot" / "sft.parquet").to_pylist()[0]["messages"][0]["content"]
    assert len(rows) == 16
    for r in rows:
        answer = r["messages"][-1]["content"]
        assert answer.startswith("1. Tables: ") and extract_sql(answer) == strip_sql(r["gold_sql"])
        assert r["messages"][0] == {"role": "system", "content": cot_system} and r["target"] == "cot"
    assert recipe_table.gold_chain_note(g) == ("; CoT SFT, chains written from the gold SQL 16 rows (every converted "
                                               "BIRD train and Spider train question: 8 bird_train, 8 spider_train)")


@pytest.mark.recipe
def test_rows_run_in_the_order_asked_and_the_others_read_not_run(recipe_run):
    results = recipe_run["tmp"] / "results"
    two = json.loads((results / "two.json").read_text())
    assert [r["row"] for r in two["rows"]] == ["base_seed", "base_ours", "sft_nocot", "sft_cot", "sft_cot_hinted",
                                               "sft_cot_gold", "sft_mix", "sft_mix_hinted", "sft_cot_dpo", "sft_mix_hinted_dpo",
                                               "sft_cot_hinted_dpo"]
    # only the Spider evaluations ran in that run: their times are its own; the steps done before keep theirs, apart
    assert set(two["step_seconds"]) == {"eval_base_seed_spider", "eval_base_ours_spider"}
    assert two["step_seconds_before"] == recipe_run["first_state"]["_seconds"]
    full = {r["row"]: r for r in json.loads((results / "table.json").read_text())["rows"]}
    for r in two["rows"]:
        for bench in ("bird", "spider"):
            if r["row"].startswith("base_"):  # BIRD: the same evaluation, not rerun, the same numbers; Spider: new
                assert r[bench]["n_scored"] == 4 and (bench == "spider" or r[bench]["ex"] == full[r["row"]][bench]["ex"])
            else:
                assert r[bench]["ex"] is None and r[bench]["note"] == "not run"
    assert sorted(p.name for p in (results / "two").iterdir()) == sorted(
        f"{r}_{b}_predict_dev.json" for r in ("base_seed", "base_ours") for b in ("bird", "spider"))
    two_md = (results / "two.md").read_text()
    assert "n/a (not run)" in two_md and "Wall time per step (s), this run: eval_base_ours_spider " in two_md
    assert "Done in the run dir before this run started, not rerun (their time then, s): " in two_md


@pytest.mark.recipe
def test_the_dpo_row_trains_on_every_question_s_pair_from_the_cot_sft_model(recipe_run):
    run = recipe_run["tmp"] / "run"
    summary = json.loads((recipe_run["tmp"] / "results" / "table.json").read_text())
    d = summary["dpo_pairs"]
    assert d["pairs"] == 4 and d["questions"]["paired"] == 4 and d["samples"] == 8 and d["samples_in_pairs"] == 8
    manifest = json.loads((run / "train" / "cot_dpo" / "manifest.json").read_text())
    assert manifest["config"]["method"] == "dpo" and manifest["config"]["model"].startswith(str(run / "train" / "cot"))
    assert manifest["data"]["dpo"]["pairs_trained"] == 4
    dpo_row = next(r for r in summary["rows"] if r["row"] == "sft_cot_dpo")
    assert dpo_row["model"].startswith(str(run / "train" / "cot_dpo")) and dpo_row["cot"]
    assert dpo_row["bird"]["n_scored"] == 4


@pytest.mark.recipe
def test_a_reused_synthesis_asks_the_teacher_nothing_for_spider(recipe_run):
    results = recipe_run["tmp"] / "results"
    # the hinted row's 8 BIRD train questions are the only teacher requests (1 sample each; the Spider chains reused)
    assert recipe_run["rerun"]["reuse_requests"] == 8
    reuse = {r["row"]: r for r in json.loads((results / "reuse.json").read_text())["rows"]}
    assert reuse["sft_cot_hinted"]["bird"]["n_scored"] == 4
    assert reuse["base_seed"]["bird"]["note"] == "not run" and reuse["sft_cot"]["bird"]["note"] == "not run"


@pytest.mark.recipe
def test_the_hinted_cot_dpo_row_pairs_its_own_samples_of_spider_train_and_bird_train(recipe_run):
    """sft_cot_hinted_dpo: the hinted CoT SFT model samples Spider train and BIRD train (k 2 each, its own CoT prompt,
    under its own name); the pairs of both splits, tagged with their split, train one new LoRA on it. (The demo's
    BIRD train has databases, so its pairs here are execution-verified; on the real BIRD train the same step keeps
    canonical matches as chosen and schema errors as rejected: dpo_chosen allows canonical_match.)"""
    from text2sql_ray.config import PromptConfig
    from text2sql_ray.prompts import recorded_prompt, system_prompt

    run = recipe_run["tmp"] / "run"
    summary = json.loads((recipe_run["tmp"] / "results" / "reuse.json").read_text())
    start = next(r for r in summary["rows"] if r["row"] == "sft_cot_hinted")["model"]
    asked = [a for a in recipe_run["rerun"]["reuse_asked"] if a["model"] == start]
    assert len(asked) == 4 + 4 and not any(a["hinted"] for a in asked)  # 4 questions of each split (synthesize.limit)
    # asked with the CoT prompt it was trained on (its system turn, no hint), under its own name
    trained_prompt = recorded_prompt(run / "train" / "cot_hinted")["config"]
    assert {a["system"] for a in asked} == {system_prompt(PromptConfig(**trained_prompt))}
    for src, data in (("spider_train", str(SPIDER)), ("bird_train", bird.resolve_data("", "train"))):
        syn = json.loads((run / "synthesize" / f"{src}_onpolicy_cot_hinted" / "manifest.json").read_text())
        assert syn["config"]["student_prompt"] is True and syn["config"]["engine"]["model"] == start
        assert syn["config"]["input"] == str(run / "convert" / f"{src}_cot") and syn["config"]["data"] == data
        assert syn["config"]["schema_check"] is True and syn["counts"]["samples"] == 4 * 2
    d = summary["dpo_pairs_onpolicy_cot_hinted"]
    assert d["pairs"] == 8 and d["questions"]["paired"] == 8 and d["samples"] == 16 and d["samples_in_pairs"] == 16
    assert {src: b["pairs"] for src, b in d["by_source"].items()} == {"spider_train": 4, "bird_train": 4}
    assert d["questions"]["total"] == 16 and "pairs_trained" not in d["by_source"]["bird_train"]
    pairs = pq.read_table(run / "dpo_cot_hinted_dpo" / "pairs.parquet").to_pylist()
    assert sorted(p["source"] for p in pairs) == ["bird_train"] * 4 + ["spider_train"] * 4
    manifest = json.loads((run / "train" / "cot_hinted_dpo" / "manifest.json").read_text())
    assert manifest["config"]["method"] == "dpo" and manifest["config"]["model"] == start
    assert manifest["config"]["dpo_chosen"] == "verified,canonical_match" and manifest["data"]["dpo"]["pairs_trained"] == 8
    # --dpo-sft-weight: RPO's NLL term on the chosen answers, in the config, the loss words and every step's stats
    assert manifest["config"]["dpo_sft_weight"] == 0.5 and "0.5 x the chosen answer's mean NLL" in manifest["model"]["loss"]
    steps = [json.loads(line) for line in (run / "train" / "cot_hinted_dpo" / "steps.jsonl").read_text().splitlines()]
    assert steps and all(s["dpo_chosen_nll"] > 0 for s in steps)
    assert "(RPO)" in d["training"] and d["training"].endswith("(closest first)")
    assert summary["dpo_pairs"] == {}  # the teacher-pair row did not run here
    row = next(r for r in summary["rows"] if r["row"] == "sft_cot_hinted_dpo")
    assert row["model"].startswith(str(run / "train" / "cot_hinted_dpo")) and row["bird"]["n_scored"] == 4
    assert row["cot"] and row["label"] == ("CoT SFT, hinted chains + on-policy DPO, Spider + BIRD pairs (RPO, NLL "
                                           "weight 0.5; pairs at most 0.9 apart in length)")
    md = (recipe_run["tmp"] / "results" / "reuse.md").read_text()
    assert "+ 0.5 x the chosen answer's NLL per token (RPO), chosen and rejected answers at most 0.9 apart" in md
    # --dpo-max-length-gap: in the config and the policy words, and every pair within it
    assert manifest["config"]["dpo_max_length_gap"] == 0.9 and "answer lengths at most 0.9 apart" in d["policy"]
    assert all(dpo.length_gap(p["chosen"], p["rejected"]) <= 0.9 for p in pairs)
    chosen, rejected = (sum(len(p[k]) for p in pairs) / len(pairs) for k in ("chosen", "rejected"))
    assert d["answer_chars"]["chosen_mean"] == round(chosen, 1) and d["answer_chars"]["rejected_mean"] == round(rejected, 1)
    assert f"answers {chosen:.0f} chars chosen vs {rejected:.0f} rejected on average" in md
    assert ("On-policy DPO pairs of the CoT SFT, hinted chains model (its own samples on Spider train and BIRD train, "
            "its own CoT prompt; BIRD: canonical match vs schema error): 8 pairs from 8 questions") in md
    # of the 8 converted questions of each split, the first 4 were sampled (synthesize.limit): 4 without samples
    assert "; spider_train: 4 pairs from 4 of 8 questions; bird_train: 4 pairs from 4 of 8 questions;" in md
    assert d["by_source"]["bird_train"]["questions"] == {"no_samples": 4, "no_usable_samples": 0, "only_chosen": 0,
                                                         "only_rejected": 0, "length_gap": 0, "paired": 4,
                                                         "total": 8}


@pytest.mark.recipe
def test_the_students_record_the_prompts_they_were_trained_on(recipe_run):
    from text2sql_ray.prompts import recorded_prompt

    run = recipe_run["tmp"] / "run"
    for kind, conv in (("nocot", "bird_train_nocot"), ("cot", "spider_train_cot"), ("cot_hinted", "spider_train_cot"),
                       ("mix_hinted", "spider_train_cot")):
        trained, converted = recorded_prompt(run / "train" / kind), recorded_prompt(run / "convert" / conv)
        assert trained is not None and trained["config"] == converted["config"], kind
        assert trained["config"]["cot"] is (kind != "nocot")


@pytest.mark.recipe
def test_a_rerun_redoes_no_step(recipe_run):
    assert recipe_run["rerun"]["state"] == recipe_run["first_state"]
    assert recipe_run["rerun"]["requests"] == recipe_run["first_requests"] > 0
    steps = [k for k in recipe_run["first_state"] if not k.startswith("_")]
    assert len(steps) == 4 + 1 + 3 + 5  # 4 conversions, synthesis, 3 trainings, 5 rows on BIRD


@pytest.mark.recipe
def test_earlier_rows_come_with_their_predictions_and_are_marked(recipe_run):
    results = recipe_run["tmp"] / "results"
    first_table = json.loads((results / "table.json").read_text())
    first = {r["row"]: r for r in first_table["rows"]}
    got = json.loads((results / "earlier.json").read_text())
    assert [r["row"] for r in got["rows"]] == ROW_NAMES
    for r in got["rows"]:
        if r["row"] in NOT_IN_MAIN:  # not run in the first table either: nothing to take
            assert r["bird"]["note"] == "not run" and not r.get("earlier")
            continue
        assert bool(r.get("earlier")) is (r["row"] != "base_ours"), r["row"]
        if r.get("earlier"):
            assert r["earlier"]["table"] == str(results / "table.json")
            # the row's own step times travel with it (the first table is overwritten when it is the same file)
            name = r["row"].split("_maj")[0]
            own = {f"eval_{name}_bird"} | ({f"train_{name}"} if name.startswith("sft_") else set())
            assert r["earlier"]["step_seconds"] == {k: first_table["step_seconds_before"][k] for k in own}, r["row"]
        assert r["bird"]["ex"] == first[r["row"]]["bird"]["ex"] and r["bird"]["predictions"].startswith("earlier/")
        assert (results / r["bird"]["predictions"]).read_bytes() == (
            results / first[r["row"]]["bird"]["predictions"]).read_bytes()
        assert r["spider"]["ex"] is None  # that table had no Spider numbers, nor does this run (--benchmarks bird)
    md = (results / "earlier.md").read_text()
    assert "| CoT SFT (earlier run) |" in md and "| baseline, our prompt |" in md
    # the DPO row taken from the earlier table keeps its pairs' counts (this run built none)
    assert got["dpo_pairs"] == first_table["dpo_pairs"] and "DPO pairs (teacher samples of the synthesis): 4 pairs" in md
    assert f"taken with their predictions from `{results / 'table.json'}`" in md
    then = md.split("Their wall time per step (s), in that run: ")[1].split(". The times below")[0]
    assert f"eval_sft_cot_bird {first_table['step_seconds_before']['eval_sft_cot_bird']}" in then and "base_ours" not in then


@pytest.mark.recipe
def test_lanes_run_rows_in_parallel_processes_and_the_state_keeps_every_lane_s_steps(recipe_run):
    """--lanes on the real run dir: two evaluations redone at once, one per lane process (each its own local Ray);
    both lanes' fingerprints and times land in the one state file, and the table is the sequential run's. Lane 1 also
    trains and evaluates the gold-chain row (sft_cot_gold, run nowhere else on CPU), as the next GPU run would."""
    import recipe_table

    tmp = recipe_run["tmp"]
    state_path = tmp / "run" / "recipe_state.json"
    state = json.loads(state_path.read_text())
    had = dict(state)
    redo = ("eval_base_ours_bird", "eval_base_seed_spider")
    for k in redo:
        state.pop(k)
    state_path.write_text(json.dumps(state))
    argv = ["--config", str(REPO / "jobs" / "recipe_tiny_cpu.yaml"), "--student", str(recipe_run["student"]),
            "--teacher", "stand-in-teacher", "--bird", "demo", "--spider", str(SPIDER), "--maj-k", "2",
            "--out", str(tmp / "run"), "--results", str(tmp / "results" / "lanes"),
            "--lanes", "sft_cot_gold,base_ours;base_seed",
            # the synthesis the last fixture run reused (its fingerprint is in the state): the teacher is gone
            "--synthesis", str(tmp / "run" / "synthesize" / "spider_train")]
    assert recipe_table.main(argv) == 0
    after = json.loads(state_path.read_text())
    for k in redo:  # the same config: the same fingerprint as the run that made it first, written by its lane
        assert after[k] == had[k] and after["_seconds"][k] > 0
    logs = {i: (tmp / "run" / "lanes" / f"lane{i}.log").read_text() for i in (1, 2)}
    assert "recipe: eval_base_ours_bird ->" in logs[1] and "recipe: eval_base_seed" not in logs[1]
    assert "recipe: eval_base_seed_spider ->" in logs[2] and "recipe: eval_base_seed_bird is up to date" in logs[2]
    assert "recipe: train_sft_cot_gold ->" in logs[1] and "recipe: train_sft_cot_gold" not in logs[2]
    summary = json.loads((tmp / "results" / "lanes.json").read_text())
    assert {k: (v["rows"], v["rc"]) for k, v in summary["lanes"].items()} == {
        "lane1": (["sft_cot_gold", "base_ours"], 0), "lane2": (["base_seed"], 0)}
    full = {r["row"]: r for r in json.loads((tmp / "results" / "two.json").read_text())["rows"]}  # both benchmarks
    for r in summary["rows"]:
        for bench in ("bird", "spider"):
            if r["row"].startswith("base_"):
                assert r[bench]["ex"] == full[r["row"]][bench]["ex"] and r[bench]["n_scored"] == 4
            elif r["row"].startswith("sft_cot_gold"):  # greedy and maj@2, scored on both benchmarks
                assert r[bench]["n_scored"] == 4 and 0 <= r[bench]["ex"] <= 100
                assert (tmp / "results" / r[bench]["predictions"]).is_file()
            else:
                assert r[bench]["note"] == "not run"
    assert [r["row"] for r in summary["rows"] if r["row"].startswith("sft_cot_gold")] == ["sft_cot_gold",
                                                                                          "sft_cot_gold_maj2"]
    # trained on the gold-chain set (16 rows: every converted BIRD train and Spider train question), CoT prompt
    gold = json.loads((tmp / "run" / "train" / "cot_gold" / "manifest.json").read_text())
    assert gold["config"]["input"] == str(tmp / "run" / "sft" / "cot_gold") and gold["data"]["rows"] == 16
    assert summary["sft_sets"]["sft_cot_gold"]["rows"] == 16 and next(
        r for r in summary["rows"] if r["row"] == "sft_cot_gold")["cot"]
    assert "Lanes (processes sharing the GPU" in (tmp / "results" / "lanes.md").read_text()


def test_lanes_are_checked_before_anything_runs():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import recipe_table

    assert recipe_table.parse_lanes("sft_cot, sft_cot_dpo ; sft_nocot,base_ours;") == [
        ["sft_cot", "sft_cot_dpo"], ["sft_nocot", "base_ours"]]
    with pytest.raises(SystemExit, match="unknown row"):
        recipe_table.parse_lanes("sft_cot;nope")
    with pytest.raises(SystemExit, match="named twice"):
        recipe_table.parse_lanes("base_ours;base_ours")
    with pytest.raises(SystemExit, match="sft_cot model are in lanes 1 and 2"):
        recipe_table.parse_lanes("sft_cot;sft_cot_dpo")  # DPO starts from the CoT SFT model: one lane trains it
    with pytest.raises(SystemExit, match="the hinted teacher chains are in lanes 1 and 2"):
        recipe_table.parse_lanes("sft_cot_hinted;sft_mix_hinted")  # one teacher step makes both rows' chains
    with pytest.raises(SystemExit, match="the hinted teacher chains are in lanes 1 and 2"):
        recipe_table.parse_lanes("sft_mix_hinted;sft_mix_hinted_dpo")  # and the model it starts from
    assert recipe_table.lane_argv(["--out", "r", "--rows", "x", "--lanes=a;b", "--results", "old", "--maj-k", "2"],
                                  ["a", "b"], Path("new")) == ["--out", "r", "--maj-k", "2", "--rows", "a,b",
                                                                "--results", "new"]


def test_two_processes_recording_steps_keep_each_other_s_entries(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import recipe_table

    a, b = recipe_table.Steps(tmp_path), recipe_table.Steps(tmp_path)  # both read the (empty) state first
    a.record("convert", "f0", 1.0)
    b.state = json.loads((tmp_path / "recipe_state.json").read_text())  # b started after convert
    a.record("train_a", "fa", 2.0)
    b.record("train_b", "fb", 3.0)  # b never read train_a: it must not drop it
    a.record("eval_a", "ea", 4.0)
    state = json.loads((tmp_path / "recipe_state.json").read_text())
    b.record("train_c", None, started="fc0")  # a train step records what it started with before it runs
    assert {k: v for k, v in state.items() if not k.startswith("_")} == {"convert": "f0", "train_a": "fa",
                                                                          "train_b": "fb", "eval_a": "ea"}
    assert json.loads((tmp_path / "recipe_state.json").read_text())["_started"] == {"train_c": "fc0"}
    assert state["_seconds"] == {"convert": 1.0, "train_a": 2.0, "train_b": 3.0, "eval_a": 4.0}
