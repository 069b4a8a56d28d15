"""`t2s evaluate --model / --endpoint / --samples k / --compare` on the bundled demo dev split.

The model is a tiny Llama whose weights are set by hand (see `sql_model_dir`) so that it answers
every prompt with question 2's gold SQL (probability 2/3 when sampling) or a variant that executes
to another result (1/3): greedy EX is then 1/6 on the first six questions instead of a vacuous 0,
and sampled answers differ, so the maj@k vote has something to decide. The endpoint is a real Ray
Serve app (`t2s serve`) serving that model.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from text2sql_ray import bird, cli, evaluate, generation
from text2sql_ray import serve as serve_mod
from text2sql_ray.common import read_jsonl
from text2sql_ray.config import ConfigError, EngineConfig, EvaluateConfig, PromptConfig, ServeConfig
from text2sql_ray.sqlexec import SqlExecutor, execute, result_digest

EXECUTOR = SqlExecutor()  # one in-process executor (its connection cache) for the whole module

LIMIT = 6
PROMPT = PromptConfig(cot=False, schema_style="ddl", sample_values=0, descriptions=False)
PROMPT_FLAGS = ["--prompt.cot", "false", "--prompt.schema-style", "ddl", "--prompt.sample-values", "0",
                "--prompt.descriptions", "false"]
LIKELY = "SELECT COUNT(member_id) FROM member WHERE email IS NULL"  # gold of question 2
OTHER = "SELECT COUNT(member_id) FROM member WHERE email IS NOT NULL"


@pytest.fixture(scope="module")
def split():
    return bird.load_split(bird.resolve_data("", "dev"))


@pytest.fixture(scope="module")
def sql_model_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A 1-layer Llama whose weights are set by hand to be a bigram model over the tokens of LIKELY/OTHER.

    Attention and MLP outputs are zero, so the logits depend on the current token only: each token of
    the chain (the generation prompt's last token, then LIKELY's tokens, then the stop token) has a
    one-hot embedding and its lm_head column gives its successor logit 30 (every other token 0). After
    " IS" both " NULL" (logit 30) and " NOT" (30 - ln 2) follow: at temperature 1, LIKELY comes out
    with probability 2/3 and OTHER ("... IS NOT NULL", which also executes) with 1/3; greedy gives LIKELY.
    """
    import math

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    gen_prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    start = tok(gen_prompt, add_special_tokens=False)["input_ids"][-1]
    edges: dict[int, dict[int, float]] = {}
    for sql, logit in ((LIKELY, 30.0), (OTHER, 30.0 - math.log(2))):
        ids = [start] + tok(sql, add_special_tokens=False)["input_ids"] + [eos]
        for a, b in itertools.pairwise(ids):
            edges.setdefault(a, {}).setdefault(b, logit)
    assert all(len(nxt) == 1 for a, nxt in edges.items() if a != tok(" IS", add_special_tokens=False)["input_ids"][0])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    slots = {t: i for i, t in enumerate(edges)}
    scale = math.sqrt(cfg.hidden_size)  # RMSNorm maps a one-hot embedding to sqrt(hidden) * one-hot
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for a, i in slots.items():
            model.model.embed_tokens.weight[a].zero_()
            model.model.embed_tokens.weight[a, i] = 1.0
            for b, logit in edges[a].items():
                model.lm_head.weight[b, i] = logit / scale
    out = tmp_path_factory.mktemp("sql_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def endpoint(ray_local, sql_model_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = serve_mod.start(ServeConfig(model=str(sql_model_dir), model_id="sqlm", port=port, name="t2s_eval_test",
                                         num_cpus=0.25, max_batch_size=4, blocking=False))
    yield served
    serve_mod.stop(served.app_name)


def engine(**kw) -> EngineConfig:
    return EngineConfig(**{"max_new_tokens": 24, "batch_size": 3, "num_cpus": 0.5, **kw})


@pytest.fixture(scope="module")
def by_model(ray_local, sql_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "model"
    return evaluate.run(EvaluateConfig(model=str(sql_model_dir), limit=LIMIT, out=str(out), prompt=PROMPT,
                                       num_actors=2, engine=engine()))


@pytest.fixture(scope="module")
def by_endpoint(endpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "endpoint"
    rc = cli.main(["evaluate", "--endpoint", endpoint.url, "--limit", str(LIMIT), "--out", str(out), "--num-actors", "2",
                   "--engine.max-new-tokens", "24", "--engine.concurrency", "3", "--engine.num-cpus", "0.5",
                   *PROMPT_FLAGS])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def by_maj(endpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "maj3"
    return evaluate.run(EvaluateConfig(endpoint=endpoint.url, limit=LIMIT, samples=3, out=str(out), prompt=PROMPT,
                                       num_actors=2, engine=engine(temperature=1.0, concurrency=3, seed=3)))


def report(d: Path) -> dict:
    return json.loads((d / "report.json").read_text())


def by_qid(rows: list[dict]) -> dict[int, dict]:
    return {r["question_id"]: r for r in rows}


# --------------------------------------------------------------------------------------------------
# --model and --endpoint agree
# --------------------------------------------------------------------------------------------------


def test_endpoint_and_model_give_the_same_ex_and_sql_per_question(by_model, by_endpoint):
    a, b = report(by_model), report(by_endpoint)
    assert a["ex"] == b["ex"] == round(100 / LIMIT, 2)  # question 2 right: the eval is not vacuous
    ga, gb = by_qid(read_jsonl(by_model / "generations.jsonl")), by_qid(read_jsonl(by_endpoint / "generations.jsonl"))
    assert sorted(ga) == sorted(gb) == list(range(LIMIT))
    for qid in ga:
        assert ga[qid]["sql"] == gb[qid]["sql"] == LIKELY and ga[qid]["text"] == gb[qid]["text"]
    ra, rb = by_qid(read_jsonl(by_model / "results.jsonl")), by_qid(read_jsonl(by_endpoint / "results.jsonl"))
    assert [q for q in ra if ra[q]["correct"]] == [q for q in rb if rb[q]["correct"]] == [2]


def test_endpoint_run_records_the_served_model_and_its_outputs(by_endpoint, endpoint):
    manifest = json.loads((by_endpoint / "manifest.json").read_text())
    assert manifest["inputs"]["endpoint"] == endpoint.url and manifest["inputs"]["served_model"] == "sqlm"
    assert manifest["counts"]["n_generated"] == LIMIT and manifest["counts"]["n_generation_errors"] == 0
    for name in (*evaluate.OUTPUT_FILES, "generations.jsonl", "manifest.json"):
        assert (by_endpoint / name).is_file(), name


def test_generations_file_re_scores_to_the_same_results(ray_local, by_model, tmp_path):
    out = evaluate.run(EvaluateConfig(predictions=str(by_model / "generations.jsonl"), limit=LIMIT,
                                      out=str(tmp_path / "rescored"), num_actors=2))
    assert report(out)["ex"] == report(by_model)["ex"]
    again, first = read_jsonl(out / "results.jsonl"), read_jsonl(by_model / "results.jsonl")
    assert [(r["question_id"], r["correct"], r["pred_sql"]) for r in again] == [
        (r["question_id"], r["correct"], r["pred_sql"]) for r in first
    ]


def test_eval_prompt_is_byte_identical_to_the_training_prompt_of_convert(split):
    from text2sql_ray.convert import convert_row
    from text2sql_ray.schema import SchemaCache

    cfg = EvaluateConfig(prompt=PromptConfig())  # the default, rich schema prompt
    rows, errors = generation.question_prompts(split, split.questions, cfg)
    assert not errors and len(rows) == len(split.questions)
    cache = SchemaCache.from_split(split, cfg.prompt)
    for q, row in zip(split.questions, rows):
        train = convert_row(q, cache, cfg.prompt, set())["messages"]
        assert [m["role"] for m in train] == ["system", "user", "assistant"]
        assert row["messages"] == train[:2]


def test_endpoint_urls_become_openai_base_urls_and_modes_pick_their_engine():
    assert generation.normalize_endpoint("http://h:8000") == "http://h:8000/v1"
    assert generation.normalize_endpoint("http://h:8000/v1/") == "http://h:8000/v1"
    assert generation.normalize_endpoint("http://h:8000/small/v1") == "http://h:8000/small/v1"
    ep = generation.engine_config(EvaluateConfig(endpoint="http://h:8000", engine=EngineConfig(backend="vllm")))
    assert (ep.backend, ep.endpoint) == ("openai", "http://h:8000/v1")
    m = generation.engine_config(EvaluateConfig(model="/m", engine=EngineConfig(backend="vllm")))
    assert (m.backend, m.model) == ("vllm", "/m")
    with pytest.raises(ConfigError, match="for a server use --endpoint"):
        EvaluateConfig(model="/m", engine=EngineConfig(backend="openai", endpoint="http://h/v1"))


# --------------------------------------------------------------------------------------------------
# maj@k
# --------------------------------------------------------------------------------------------------


def test_majority_vote_picks_the_most_frequent_result_and_ignores_failures():
    vote = evaluate.majority_vote
    assert vote(["r1", "r2", "r2"]) == 1  # the winner's first sample
    assert vote([None, None, "r3"]) == 2  # failed executions do not vote
    assert vote([None, "r1", None, None]) == 1
    assert vote(["r1", "r2", "r2", "r1"]) == 0  # tie: the result whose first sample came earliest
    assert vote(["r2", "r1", "r1", "r2", None, None]) == 0
    assert vote(["r1", "r2", "r3"]) == 0  # all different: sample 0
    assert vote([None, None]) is None and vote([]) is None


def test_majority_vote_with_digests_of_real_results(tmp_path):
    import sqlite3

    db = tmp_path / "t.sqlite"
    con = sqlite3.connect(db)
    con.executescript("CREATE TABLE t(a INTEGER, b REAL); INSERT INTO t VALUES (1, 1.0), (2, 2.5);")
    con.commit()
    con.close()
    samples = ["SELECT a FROM t", "SELECT nosuch FROM t", "SELECT b FROM t WHERE a = 1 UNION SELECT 2",
               "SELECT a FROM t ORDER BY a DESC", "SELECT b FROM t"]
    digests = []
    for sql in samples:
        r = execute(db, sql)
        digests.append(result_digest(r.rows) if r.ok else None)
    # {1, 2} three times (row order and 1.0 == 1 ignored, as BIRD compares), an error, {1.0, 2.5} once
    assert digests[0] == digests[2] == digests[3] and digests[1] is None and digests[4] != digests[0]
    assert evaluate.majority_vote(digests) == 0


def test_samples_need_a_temperature_above_zero():
    with pytest.raises(ConfigError, match="samples=3 with engine.temperature=0 .* set engine.temperature > 0"):
        EvaluateConfig(model="m", samples=3)
    EvaluateConfig(model="m", samples=3, engine=EngineConfig(temperature=0.7))


def test_maj_at_k_end_to_end_votes_by_execution_and_keeps_greedy_equal_to_the_plain_run(by_maj, by_endpoint, split):
    r = report(by_maj)
    assert r["ex"] == report(by_endpoint)["ex"]  # greedy: a separate temperature-0 generation
    maj = r["maj_at_k"]
    assert maj["k"] == 3 and maj["n_scored"] == LIMIT
    gens = read_jsonl(by_maj / "generations.jsonl")
    plain = by_qid(read_jsonl(by_endpoint / "generations.jsonl"))
    maj_results = by_qid(read_jsonl(by_maj / "maj_at_k" / "results.jsonl"))
    questions = {q["question_id"]: q for q in split.questions}
    n_correct = 0
    for g in gens:
        qid = g["question_id"]
        assert g["sql"] == plain[qid]["sql"] and len(g["samples"]) == 3
        db = split.db_path(questions[qid]["db_id"])
        # the vote, recomputed here from each sample's own execution result
        digests = []
        for s in g["samples"]:
            e = execute(db, s["sql"])
            digests.append(result_digest(e.rows) if e.ok else None)
        winner = evaluate.majority_vote(digests)
        assert g["vote"]["winner"] == winner
        assert g["vote"]["executed"] == sum(d is not None for d in digests)
        assert g["maj_sql"] == g["samples"][0 if winner is None else winner]["sql"]
        assert maj_results[qid]["pred_sql"] == g["maj_sql"]
        correct = EXECUTOR.compare_pair(db, g["maj_sql"], questions[qid]["SQL"]).correct
        assert maj_results[qid]["correct"] == correct
        n_correct += correct
    assert maj["n_correct"] == n_correct
    assert len({s["sql"] for g in gens for s in g["samples"]}) > 1  # the samples do differ
    assert "maj@3" in (by_maj / "report.md").read_text()


# --------------------------------------------------------------------------------------------------
# --compare
# --------------------------------------------------------------------------------------------------


def test_compare_reports_fixed_and_broken_question_ids(ray_local, split, tmp_path):
    gold = {q["question_id"]: q["SQL"] for q in split.questions[:10]}

    def run(name: str, right: set[int]) -> Path:
        preds = tmp_path / f"{name}.jsonl"
        preds.write_text("".join(json.dumps({"question_id": q, "sql": s if q in right else "SELECT 0"}) + "\n"
                                 for q, s in gold.items()))
        return evaluate.run(EvaluateConfig(predictions=str(preds), limit=10, out=str(tmp_path / name), num_actors=2))

    a, b = run("a", {0, 1, 2, 3}), run("b", {2, 3, 4, 5, 9})  # question 9 is 'moderate', 0-8 'simple'
    rc = cli.main(["evaluate", "--compare", str(a), str(b), "--out", str(tmp_path / "cmp")])
    assert rc == 0
    c = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert c["fixed"] == [4, 5, 9] and c["broken"] == [0, 1]
    assert (c["n_both_correct"], c["n_both_wrong"]) == (2, 3)
    assert c["overall"] == {"n_scored": 10, "a_correct": 4, "b_correct": 5, "a_ex": 40.0, "b_ex": 50.0, "delta": 10.0}
    assert c["by_difficulty"]["simple"]["a_ex"] == round(400 / 9, 2)
    assert c["by_difficulty"]["moderate"] == {"n_scored": 1, "a_correct": 0, "b_correct": 1, "a_ex": 0.0,
                                              "b_ex": 100.0, "delta": 100.0}
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Fixed by B (3): 4, 5, 9" in md and "Broken by B (2): 0, 1" in md
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert json.loads((tmp_path / "cmp" / "manifest.json").read_text())["counts"]["n_fixed"] == 3


def test_compare_of_a_dir_without_results_says_what_it_needs(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match="report.json does not exist: --compare takes two"):
        evaluate.run(EvaluateConfig(compare=[str(tmp_path / "a"), str(tmp_path / "a")], out=str(tmp_path / "o")))
