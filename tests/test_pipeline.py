"""`t2s pipeline`: stage wiring under one run directory, skip-when-done, and rerun after a change."""

from __future__ import annotations

import json

import pytest

from text2sql_ray import pipeline
from text2sql_ray.config import build_config


def _tiny_overrides(run_dir, model) -> list[tuple[str, str]]:
    return [
        ("out", str(run_dir)),
        ("sft_source", "mix"),
        ("convert.limit", "12"), ("convert.workers", "1"),
        ("convert.prompt.sample_values", "1"), ("convert.prompt.descriptions", "false"),
        ("convert.prompt.max_schema_tokens", "400"),
        ("synthesize.limit", "3"), ("synthesize.samples", "2"), ("synthesize.exec_actors", "1"),
        ("synthesize.engine.model", str(model)), ("synthesize.engine.max_new_tokens", "8"),
        ("synthesize.engine.num_cpus", "0.5"),
        ("train.model", str(model)), ("train.max_steps", "2"), ("train.num_workers", "1"),
        ("train.cpus_per_worker", "0.5"), ("train.max_length", "768"), ("train.checkpoint_every", "1"),
        ("evaluate.limit", "4"), ("evaluate.num_actors", "1"), ("evaluate.engine.max_new_tokens", "8"),
        ("evaluate.engine.num_cpus", "0.5"),
    ]


def test_stage_configs_place_every_path_under_the_run_dir(tmp_path):
    cfg = build_config("pipeline", None, [("out", str(tmp_path)), ("train.model", "/m"), ("convert.prompt.cot", "false")])
    cfgs = pipeline.stage_configs(cfg)
    assert cfgs["convert"].out == str(tmp_path / "convert")
    assert cfgs["synthesize"].input == str(tmp_path / "convert")
    assert cfgs["train"].input == str(tmp_path / "synthesize") and cfgs["train"].out == str(tmp_path / "train")
    assert cfgs["eval_base"].model == "/m" and cfgs["eval_finetuned"].model == str(tmp_path / "train")
    assert cfgs["report"].compare == [str(tmp_path / "eval_base"), str(tmp_path / "eval_finetuned")]
    # evaluation prompts repeat the training template
    assert cfgs["eval_finetuned"].prompt == cfgs["convert"].prompt and cfgs["eval_base"].prompt.cot is False


def test_fingerprint_changes_downstream_of_a_changed_stage(tmp_path):
    a = pipeline.stage_configs(build_config("pipeline", None, [("out", str(tmp_path)), ("train.model", "/m")]))
    b = pipeline.stage_configs(
        build_config("pipeline", None, [("out", str(tmp_path)), ("train.model", "/m"), ("train.lr", "0.5")])
    )

    fa, fb = pipeline.fingerprints(a), pipeline.fingerprints(b)
    assert fa["convert"] == fb["convert"] and fa["synthesize"] == fb["synthesize"]
    assert all(fa[s] != fb[s] for s in ("train", "eval_finetuned", "report"))
    # the base model's evaluation depends on convert (its prompt) and the base model, not on training options
    assert fa["eval_base"] == fb["eval_base"]
    c = pipeline.fingerprints(pipeline.stage_configs(build_config(
        "pipeline", None, [("out", str(tmp_path)), ("train.model", "/m"), ("convert.prompt.cot", "false")])))
    assert c["eval_base"] != fa["eval_base"]


def test_lora_layers_puts_adapters_on_the_last_layers_only(tiny_llama_dir):
    import torch

    from text2sql_ray.config import ConfigError, TrainConfig
    from text2sql_ray.train import build_training_model

    targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    wrapper, _ = build_training_model(TrainConfig(lora_layers=1, lora_targets=targets), str(tiny_llama_dir),
                                      torch.float32, "cpu")
    adapted = {n.split(".lora_")[0] for n, p in wrapper.named_parameters() if "lora_" in n and p.requires_grad}
    assert len(adapted) == 7 and all(".layers.1." in n for n in adapted), adapted  # the tiny Llama has 2 layers
    with pytest.raises(ConfigError, match="lora_layers .* needs a list"):
        TrainConfig(lora_layers=8)  # PEFT cannot limit 'all-linear' to layers


def _messages(system, question, answer):
    return [{"role": "system", "content": system}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


def test_mix_holds_every_convert_row_without_cot_and_every_verified_chain(tmp_path):
    import dataclasses

    import pyarrow as pa

    from text2sql_ray.common import write_manifest, write_parquet
    from text2sql_ray.config import PromptConfig
    from text2sql_ray.convert import output_schema
    from text2sql_ray.prompts import prompt_record, recorded_prompt, system_prompt

    prompt = PromptConfig(cot=False, sample_values=0)
    conv = [{"question_id": q, "db_id": "d", "question": f"q{q}", "evidence": "", "gold_sql": f"SELECT {q}",
             "difficulty": "simple", "prompt_tokens": 10,
             "messages": _messages(system_prompt(prompt), f"q{q}", f"```sql\nSELECT {q}\n```")} for q in range(3)]
    write_parquet(tmp_path / "convert" / "train.parquet", pa.Table.from_pylist(conv, schema=output_schema()))
    write_manifest(tmp_path / "convert", "convert", {}, 0.0, prompt=prompt_record(prompt, "tok"))
    # synthesize copies convert's system turn (here the no-CoT one) and puts the chain in the assistant turn
    chain = {**conv[1], "messages": _messages(system_prompt(prompt), "q1", "Reason.\n\n```sql\nSELECT 1\n```"),
             "sample_index": 0, "sql": "SELECT 1", "status": "verified"}
    write_parquet(tmp_path / "synthesize" / "sft.parquet", pa.Table.from_pylist([chain]))

    counts = pipeline.write_mix(tmp_path / "sft", [("convert", tmp_path / "convert" / "train.parquet", "sql"),
                                                   ("chains", tmp_path / "synthesize" / "sft.parquet", "cot")],
                                tmp_path / "convert")
    assert {k: counts[k] for k in ("rows", "no_cot", "cot")} == {"rows": 4, "no_cot": 3, "cot": 1}
    assert {k: (v["rows"], v["target"]) for k, v in counts["sources"].items()} == {"convert": (3, "sql"),
                                                                                   "chains": (1, "cot")}
    with pytest.raises(ValueError, match="no prompt record"):
        pipeline.write_mix(tmp_path / "x", [("chains", tmp_path / "synthesize" / "sft.parquet", "cot")],
                           tmp_path / "synthesize")
    rows = pa.parquet.read_table(tmp_path / "sft" / "sft.parquet").to_pylist()
    assert [(r["question_id"], r["target"]) for r in rows] == [(0, "sql"), (1, "sql"), (2, "sql"), (1, "cot")]
    cot_system = system_prompt(dataclasses.replace(prompt, cot=True))
    assert [r["messages"][0]["content"] for r in rows] == [system_prompt(prompt)] * 3 + [cot_system]
    assert rows[3]["messages"][1:] == chain["messages"][1:] and rows[0]["messages"][1:] == conv[0]["messages"][1:]
    # train and evaluate find convert's prompt record through the mix's manifest
    assert recorded_prompt(tmp_path / "sft")["config"] == dataclasses.asdict(prompt)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_llama_dir, ray_local):
    run_dir = tmp_path_factory.mktemp("pipeline")
    cfg = build_config("pipeline", None, _tiny_overrides(run_dir, tiny_llama_dir))
    pipeline.run(cfg)
    return run_dir, cfg


@pytest.mark.timeout(900)
def test_pipeline_writes_every_stage_and_a_comparison_report(finished_run):
    run_dir, _ = finished_run
    for stage in ("convert", "synthesize", "train", "eval_base", "eval_finetuned"):
        assert (run_dir / stage / "manifest.json").is_file(), stage
    assert (run_dir / "train" / "adapter_config.json").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["ran"] == list(pipeline.STAGES)
    base = json.loads((run_dir / "eval_base" / "report.json").read_text())
    assert base["n_questions"] == 4 and base["n_scored"] == 4
    assert manifest["metrics"]["ex_base"] == base["ex"]
    assert (run_dir / "report" / "compare.md").is_file()
    # the mix: the 12 converted questions without CoT, beside whatever chains the tiny teacher got verified
    mix = json.loads((run_dir / "sft" / "manifest.json").read_text())["counts"]
    verified = json.loads((run_dir / "synthesize" / "manifest.json").read_text())["counts"]["sft_rows"]
    assert mix == {"rows": 12 + verified, "no_cot": 12, "cot": verified, "convert_train": 12,
                   "verified_chains": verified}
    rows = manifest["metrics"]["rows"]
    assert [r["row"] for r in rows] == ["base", "fine-tuned"]
    assert rows[1]["train_rows"]["no_cot"] == 12 and rows[1]["train_rows"]["steps"] == 2
    assert rows[0]["n_scored"] == rows[1]["n_scored"] == 4
    report = (run_dir / "report.md").read_text()
    assert "| base |" in report and "| fine-tuned |" in report and "12 no-CoT rows (gold SQL)" in report


@pytest.mark.timeout(300)
def test_rerun_after_finishing_redoes_nothing(finished_run):
    run_dir, cfg = finished_run
    pipeline.run(cfg)
    assert json.loads((run_dir / "manifest.json").read_text())["ran"] == []


def _eval_limit_3(cfg):
    """The fixture's options with one evaluation option changed (the test below starts from them too)."""
    import dataclasses

    return dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, limit=3))


@pytest.mark.timeout(600)
def test_changed_eval_option_reruns_only_evaluation(finished_run):
    run_dir, cfg = finished_run
    pipeline.run(_eval_limit_3(cfg))
    ran = json.loads((run_dir / "manifest.json").read_text())["ran"]
    assert ran == ["eval_base", "eval_finetuned", "report"]
    assert json.loads((run_dir / "eval_base" / "report.json").read_text())["n_questions"] == 3


@pytest.mark.timeout(600)
def test_changed_train_option_retrains_from_scratch_and_keeps_the_base_evaluation(finished_run):
    run_dir, cfg = finished_run
    import dataclasses

    # the evaluation options of the test above (up to date when it ran first: no evaluation is redone for it)
    cfg = _eval_limit_3(cfg)
    pipeline.run(cfg)
    base_before = (run_dir / "eval_base" / "report.json").stat().st_mtime_ns
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr / 2))
    pipeline.run(changed)
    assert json.loads((run_dir / "manifest.json").read_text())["ran"] == ["train", "eval_finetuned", "report"]
    assert (run_dir / "eval_base" / "report.json").stat().st_mtime_ns == base_before
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    # the first run's final checkpoint (step 2 of 2) is not resumed: both steps run again at the new lr
    assert train["training"]["resumed_from_step"] == [] and train["training"]["steps_run"] == 2
    assert train["config"]["lr"] == cfg.train.lr / 2


def test_pipeline_without_config_uses_the_embedded_laptop_profile(monkeypatch, tmp_path):
    from text2sql_ray import cli

    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda cfg: seen.setdefault("cfg", cfg))
    assert cli.main(["pipeline", "--out", str(tmp_path)]) == 0
    cfg = seen["cfg"]
    assert cfg.out == str(tmp_path)
    assert cfg.synthesize.mode == "hinted" and cfg.synthesize.engine.temperature == 0.8
    assert cfg.sft_source == "mix" and cfg.convert.prompt.cot is False and cfg.convert.val_fraction > 0
    assert cfg.train.lora_layers == 8 and cfg.convert.prompt.max_schema_tokens == 600
    assert cfg.train.frozen_prefix_cache is True
    # one torch thread per reserved CPU: 2 train workers of 1 CPU, 2 generation actors of 1 CPU
    assert (cfg.train.num_workers, cfg.train.cpus_per_worker) == (2, 1.0)
    assert (cfg.evaluate.engine.concurrency, cfg.evaluate.engine.num_cpus) == (2, 1.0)
    # evaluation prefills each database's schema once per batch; synthesis prefills whole prompts
    assert cfg.evaluate.engine.prefix_cache is True and cfg.synthesize.engine.prefix_cache is False
