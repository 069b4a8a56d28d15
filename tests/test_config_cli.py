"""Config loading, dotted overrides, validation messages, and the CLI's option handling."""

from __future__ import annotations

import pytest

from text2sql_ray import cli
from text2sql_ray.config import (
    STAGE_CONFIGS,
    ConfigError,
    EvaluateConfig,
    SynthesizeConfig,
    TrainConfig,
    build_config,
    field_docs,
)


def test_every_field_of_every_config_has_a_docstring():
    import dataclasses

    def walk(cls):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type.endswith("Config")):
                import typing

                walk(typing.get_type_hints(cls)[f.name])

    for cls in STAGE_CONFIGS.values():
        walk(cls)


def test_yaml_section_then_overrides_win(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("train:\n  lr: 0.001\n  max_steps: 7\nevaluate:\n  samples: 3\n")
    cfg = build_config("train", str(job), [("train.lr", "1e-4"), ("max-steps", "9")])
    assert isinstance(cfg, TrainConfig)
    assert cfg.lr == pytest.approx(1e-4)
    assert cfg.max_steps == 9


def test_nested_dotted_override_reaches_engine_section():
    cfg = build_config("synthesize", None, [("engine.model", "/m"), ("engine.temperature", "0.7"), ("samples", "2")])
    assert isinstance(cfg, SynthesizeConfig)
    assert cfg.engine.model == "/m" and cfg.engine.temperature == pytest.approx(0.7) and cfg.samples == 2


def test_unknown_option_error_lists_known_options():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) train.lrr.*known options.*lr"):
        build_config("train", None, [("lrr", "1")])


def test_wrong_type_error_names_the_field():
    with pytest.raises(ConfigError, match=r"train.max_steps must be an integer"):
        build_config("train", None, [("max_steps", "lots")])


def test_contradiction_is_rejected_with_what_to_change():
    with pytest.raises(ConfigError, match="--method full"):
        TrainConfig(method="lora", deepspeed="jobs/deepspeed/zero3.json")
    with pytest.raises(ConfigError, match="only one of"):
        EvaluateConfig(predictions="p.json", model="m")
    with pytest.raises(ConfigError, match="temperature > 0"):
        build_config("synthesize", None, [("samples", "4"), ("engine.temperature", "0")])


def test_yaml_with_unknown_section_names_the_file(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown section\(s\) trian"):
        build_config("train", str(job), [])


def test_pipeline_section_inherits_stage_sections(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("train:\n  max_steps: 3\npipeline:\n  out: /tmp/x\n  train:\n    lr: 0.5\n")
    cfg = build_config("pipeline", str(job), [("train.method", "full")])
    assert cfg.out == "/tmp/x"
    assert cfg.train.max_steps == 3 and cfg.train.lr == 0.5 and cfg.train.method == "full"


def test_cli_boolean_flag_alone_means_true_and_values_are_coerced():
    pairs = cli.parse_overrides(["--strict", "--limit", "5", "--engine.temperature=0.5"], EvaluateConfig)
    assert pairs == [("strict", True), ("limit", "5"), ("engine.temperature", "0.5")]
    cfg = build_config("evaluate", None, pairs)
    assert cfg.strict is True and cfg.limit == 5 and cfg.engine.temperature == 0.5


def test_cli_non_boolean_flag_without_value_is_an_error(capsys):
    rc = cli.main(["evaluate", "--out"])
    assert rc == 2
    assert "needs a value" in capsys.readouterr().err


def test_cli_help_lists_stages_and_options(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage in cli.available():
        assert stage in out
    assert "evaluate" in cli.available()
    assert cli.main(["evaluate", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--predictions" in text and "--engine.model" in text and "[default: 30.0]" in text


def test_cli_unknown_stage_exits_2(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_nested_override_keeps_the_parents_default_for_other_fields():
    # SynthesizeConfig's teacher defaults to temperature 0.8; overriding only the model must keep it
    cfg = build_config("synthesize", None, [("engine.model", "/m")])
    assert cfg.engine.model == "/m" and cfg.engine.temperature == pytest.approx(0.8)
    # and in a pipeline's nested synthesize section too
    cfg = build_config("pipeline", None, [("synthesize.engine.max_new_tokens", "8")])
    assert cfg.synthesize.engine.temperature == pytest.approx(0.8) and cfg.synthesize.engine.max_new_tokens == 8


def _float_fields(cls, prefix=""):
    """Dotted names of every float field of a config dataclass, nested sections included."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out += _float_fields(typ, f"{prefix}{f.name}.")
        elif typ is float:
            out.append(prefix + f.name)
    return out


@pytest.mark.parametrize("stage", sorted(STAGE_CONFIGS))
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e999"])
def test_every_float_field_rejects_non_finite_values_naming_the_field(stage, raw):
    fields = _float_fields(STAGE_CONFIGS[stage])
    assert fields, stage
    for name in fields:
        with pytest.raises(ConfigError, match=rf"{stage}\.{name} must be a finite number, got '{raw}'"):
            build_config(stage, None, [(name, raw)])


def test_directly_built_configs_reject_non_finite_floats_too():
    import dataclasses

    from text2sql_ray.config import EngineConfig

    with pytest.raises(ConfigError, match=r"engine.temperature=nan must be a finite number"):
        EngineConfig(temperature=float("nan"))
    with pytest.raises(ConfigError, match=r"train.epochs=inf must be a finite number"):
        TrainConfig(epochs=float("inf"))
    with pytest.raises(ConfigError, match=r"evaluate.timeout_s=nan"):
        dataclasses.replace(EvaluateConfig(), timeout_s=float("nan"))


@pytest.mark.parametrize(
    "argv, field",
    [
        (["evaluate", "--timeout-s", "nan"], "evaluate.timeout_s"),
        (["train", "--lr", "nan"], "train.lr"),
        (["evaluate", "--engine.temperature", "nan"], "evaluate.engine.temperature"),
        (["train", "--epochs", "inf"], "train.epochs"),
        (["synthesize", "--timeout-s", "inf"], "synthesize.timeout_s"),
    ],
)
def test_cli_rejects_non_finite_numbers_before_anything_starts(capsys, argv, field):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{field} must be a finite number" in err and "Traceback" not in err


def test_yaml_non_finite_float_and_infinite_int_are_config_errors(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("train:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"train.lr must be a finite number"):
        build_config("train", str(job), [])
    job.write_text("train:\n  max_steps: .inf\n")
    with pytest.raises(ConfigError, match=r"train.max_steps must be an integer"):
        build_config("train", str(job), [])
    with pytest.raises(ConfigError, match=r"train.max_steps must be an integer"):
        build_config("train", None, [("max_steps", "1e999")])


@pytest.mark.parametrize(
    "text, where",
    [
        ("train: 5\n", "section train: must be a mapping"),
        ("train:\n  - lr\n  - 1\n", "section train: must be a mapping"),
        ("evaluate: just a string\n", "section evaluate: must be a mapping"),
        ("pipeline:\n  train: 3\n", "pipeline.train must be a mapping"),
    ],
)
def test_yaml_section_that_is_not_a_mapping_is_a_one_line_error(tmp_path, capsys, text, where):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    stage = "pipeline" if text.startswith("pipeline") else text.split(":")[0]
    assert cli.main([stage, "--config", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"job.yaml: {where}" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
