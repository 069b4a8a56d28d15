"""One prompt, recorded: convert records its prompt config and tokenizer, train carries it (directly or
through synthesize), `t2s evaluate --model <train output>` and `--endpoint` (through `t2s serve`'s model
card) use it by default and warn when an option overrides it. No Ray: manifests are written with the
stages' own writers; the endpoint is real HTTP.
"""

from __future__ import annotations

import dataclasses
import logging

from text2sql_ray import generation, serve
from text2sql_ray.common import write_manifest
from text2sql_ray.config import ConvertConfig, EvaluateConfig, PromptConfig, ServeConfig, build_config
from text2sql_ray.prompts import prompt_record, recorded_prompt

TRAINED = PromptConfig(cot=False, sample_values=1, descriptions=False, max_schema_tokens=900)


def _chain(tmp_path):
    """convert -> synthesize -> train outputs whose manifests link as the stages write them."""
    conv, synth, train = tmp_path / "convert", tmp_path / "synth", tmp_path / "train"
    for d in (conv, synth, train):
        d.mkdir()
    cc = ConvertConfig(tokenizer="tok-x", prompt=TRAINED)
    write_manifest(conv, "convert", cc, 0.0, prompt=prompt_record(cc.prompt, cc.tokenizer))
    write_manifest(synth, "synthesize", {}, 0.0, input=str(conv / "train.parquet"))
    record = recorded_prompt(synth)  # what train.run writes into its manifest
    write_manifest(train, "train", {}, 0.0, prompt=record, data={"input": str(synth)})
    return conv, train


def test_train_output_carries_the_convert_prompt_through_synthesize(tmp_path):
    conv, train = _chain(tmp_path)
    rec = recorded_prompt(train)
    assert rec["config"] == dataclasses.asdict(TRAINED) and rec["tokenizer"] == "tok-x"
    assert rec["manifest"] == str(conv / "manifest.json") and rec["schema_budget_unit"] == "tokens of tok-x"


def test_evaluate_model_uses_the_recorded_prompt_by_default(tmp_path, caplog):
    _, train = _chain(tmp_path)
    cfg = build_config("evaluate", None, [("model", str(train))])
    with caplog.at_level(logging.INFO, logger="text2sql_ray"):
        resolved, source = generation.resolve_prompt(cfg)
    assert resolved.prompt == TRAINED and resolved.tokenizer == "tok-x"
    assert source["overrides"] == {} and "overrides" not in caplog.text


def test_evaluate_option_that_differs_from_the_record_wins_and_is_logged(tmp_path, caplog):
    _, train = _chain(tmp_path)
    # --prompt.cot true is the default value, yet given on the command line it overrides the record
    cfg = build_config("evaluate", None, [("model", str(train)), ("prompt.cot", "true"), ("tokenizer", "")])
    with caplog.at_level(logging.INFO, logger="text2sql_ray"):
        resolved, source = generation.resolve_prompt(cfg)
    assert resolved.prompt == dataclasses.replace(TRAINED, cot=True) and resolved.tokenizer == ""
    assert source["overrides"] == {"prompt.cot": {"given": True, "recorded": False},
                                   "tokenizer": {"given": "", "recorded": "tok-x"}}
    assert "--prompt.cot True overrides False recorded in" in caplog.text
    assert "--tokenizer '' overrides 'tok-x'" in caplog.text


def test_a_model_without_a_record_keeps_the_given_prompt(tmp_path):
    cfg = EvaluateConfig(model=str(tmp_path), prompt=TRAINED)
    assert generation.resolve_prompt(cfg) == (cfg, None)


def test_serve_puts_the_record_on_the_model_card_and_evaluate_endpoint_reads_it(tmp_path):
    from fastapi import FastAPI
    from local_http import LocalServer

    _, train = _chain(tmp_path)
    (m,) = serve.served_models(ServeConfig(model=str(train)))
    card = serve.model_card(m, 0)
    assert card["t2s_prompt"]["config"] == dataclasses.asdict(TRAINED)

    app = FastAPI()
    app.get("/v1/models/{model_id}")(lambda model_id: card if model_id == m.model_id else {"error": "no"})
    with LocalServer(app) as srv:
        rec = generation.endpoint_prompt(srv.endpoint, m.model_id)
        assert generation.endpoint_prompt(srv.endpoint, "other") is None
    resolved, _ = generation.resolve_prompt(EvaluateConfig(endpoint=srv.endpoint), rec)
    assert resolved.prompt == TRAINED and resolved.tokenizer == "tok-x"
