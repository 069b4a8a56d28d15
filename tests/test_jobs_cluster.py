"""The run configs in jobs/ and the cluster configs in cluster/: they load, validate and agree.

Every section of every jobs/*.yaml is built through the real config loader, so a renamed or removed
config field breaks this test instead of a cluster run. The commands written in the files' comment
headers are parsed by the real CLI too. Cluster YAMLs are checked for the structure Ray / KubeRay need
(the launcher config against Ray's own JSON schema).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from text2sql_ray import cli
from text2sql_ray.config import STAGE_CONFIGS, build_config, load_yaml

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
CLUSTER = REPO / "cluster"
JOB_FILES = sorted(JOBS.glob("*.yaml"))
EXPECTED_JOBS = {
    "convert_bird.yaml", "synth_70b_vllm.yaml", "sft_lora_8b.yaml", "sft_full_8b_zero3.yaml",
    "eval_dev.yaml", "serve_lora.yaml", "tiny_cpu.yaml", "train_dpo.yaml",
}
SUBMIT = "ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml --"
SHARED = ("/mnt/", "s3://", "gs://")
STAGE_CMD = re.compile(r"\bt2s (" + "|".join(STAGE_CONFIGS) + r")\b(.*)$")


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def header(path: Path) -> list[str]:
    """The leading comment block of a file (lines before the first YAML content)."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            lines.append(line)
        else:
            break
    return lines


def cfg(name: str, stage: str):
    return build_config(stage, str(JOBS / name))


def job_ids(paths):
    return [p.name for p in paths]


# --------------------------------------------------------------------------------------------------
# jobs/*.yaml
# --------------------------------------------------------------------------------------------------


def test_every_expected_job_file_exists():
    assert EXPECTED_JOBS <= {p.name for p in JOB_FILES}


@pytest.mark.parametrize("path", JOB_FILES, ids=job_ids(JOB_FILES))
def test_every_section_of_every_job_file_builds_its_stage_config(path):
    data = load_yaml(path)  # unknown sections are errors
    assert data, f"{path.name} has no stage section"
    for stage in data:
        built = build_config(stage, str(path))  # unknown or mistyped fields are errors
        assert isinstance(built, STAGE_CONFIGS[stage])


@pytest.mark.parametrize("path", JOB_FILES, ids=job_ids(JOB_FILES))
def test_job_header_says_what_hardware_and_the_ray_job_submit_command_per_section(path):
    head = header(path)
    assert path.read_text().startswith("# "), f"{path.name} must start with a comment line"
    text = "\n".join(head)
    assert "Hardware:" in text, f"{path.name}: the header must say what hardware it expects"
    for stage in load_yaml(path):
        cmd = f"t2s {stage} --config {rel(path)}"
        assert f"{SUBMIT} {cmd}" in text, f"{path.name}: header lacks `{SUBMIT} {cmd}`"
        local = [ln for ln in head if re.match(rf"#\s+{re.escape(cmd)}(\s|$)", ln)]
        assert local, f"{path.name}: header lacks the locally runnable `{cmd} ...`"


@pytest.mark.parametrize("path", JOB_FILES, ids=job_ids(JOB_FILES))
def test_every_t2s_command_in_a_job_header_parses_and_validates(path):
    commands = 0
    for line in header(path):
        m = STAGE_CMD.search(line)
        if not m:
            continue
        stage, tail = m.group(1), re.sub(r"\s+\(.*\)\s*$", "", m.group(2))  # drop a trailing "(note)"
        tokens = shlex.split(tail)
        assert tokens[:1] == ["--config"], f"{path.name}: `{line.strip()}` does not start with --config"
        config_path, rest = tokens[1], tokens[2:]
        assert (REPO / config_path).is_file(), f"{path.name}: {config_path} does not exist"
        overrides = cli.parse_overrides(rest, STAGE_CONFIGS[stage])
        build_config(stage, str(REPO / config_path), overrides)
        commands += 1
    assert commands >= 2


def test_referenced_deepspeed_presets_exist():
    referenced = {c.deepspeed for p in JOB_FILES if "train" in load_yaml(p) for c in [build_config("train", str(p))]}
    referenced.discard("")
    assert referenced == {"jobs/deepspeed/zero3.json"}
    assert {p.name for p in (JOBS / "deepspeed").glob("*.json")} == {"zero2.json", "zero3.json", "zero3_offload.json"}
    for ref in referenced:
        json.loads((REPO / ref).read_text())  # exists and is valid JSON


def test_lora_job_uses_the_seed_recipe_hyperparameters():
    t = cfg("sft_lora_8b.yaml", "train")
    assert t.model == "meta-llama/Llama-3.1-8B-Instruct" and t.method == "lora"
    assert (t.lora_r, t.lora_alpha, t.lora_dropout, t.lora_targets) == (256, 128, 0.05, "all-linear")
    assert (t.lr, t.schedule, t.warmup_ratio, t.epochs, t.max_steps) == (2e-4, "constant", 0.03, 3, 0)
    assert t.max_length == 4096 and t.use_gpu and t.num_workers >= 1 and t.dtype == "bfloat16"


def test_full_finetune_job_uses_zero3_and_the_seed_fft_hyperparameters():
    t = cfg("sft_full_8b_zero3.yaml", "train")
    assert t.model == "meta-llama/Llama-3.1-8B-Instruct" and t.method == "full"
    assert t.deepspeed == "jobs/deepspeed/zero3.json"
    assert (t.lr, t.schedule, t.warmup_ratio, t.epochs) == (5e-6, "cosine", 0.1, 3)
    assert t.max_length == 4096 and t.use_gpu


def test_synthesis_job_samples_k_blind_chains_from_the_70b_teacher_on_8_gpus():
    s = cfg("synth_70b_vllm.yaml", "synthesize")
    assert s.engine.model == "meta-llama/Llama-3.3-70B-Instruct" and s.engine.backend == "vllm"
    assert s.engine.tensor_parallel_size == 8 and s.engine.temperature == 0.8
    assert s.mode == "blind" and s.samples > 1


def test_eval_and_serve_jobs_use_the_lora_output_greedy_eval_and_vllm():
    e, v = cfg("eval_dev.yaml", "evaluate"), cfg("serve_lora.yaml", "serve")
    lora_out = cfg("sft_lora_8b.yaml", "train").out
    assert e.samples == 1 and e.engine.temperature == 0 and e.model == lora_out
    assert v.backend == "vllm" and v.num_gpus >= 1 and v.model == lora_out
    assert e.data.rstrip("/").endswith("/dev")


def test_cluster_job_files_chain_stage_outputs_by_path_on_shared_storage():
    conv = cfg("convert_bird.yaml", "convert")
    syn = cfg("synth_70b_vllm.yaml", "synthesize")
    lora, full = cfg("sft_lora_8b.yaml", "train"), cfg("sft_full_8b_zero3.yaml", "train")
    assert syn.input == conv.out
    assert lora.input == full.input == syn.out
    assert len({conv.out, syn.out, lora.out, full.out, cfg("eval_dev.yaml", "evaluate").out}) == 5
    paths = [conv.data, conv.out, syn.out, lora.out, full.out, cfg("eval_dev.yaml", "evaluate").data]
    assert all(p.startswith(SHARED) for p in paths), paths


# (convert config, train config, evaluate config) of every chain the job files describe: the cluster jobs,
# and the convert/train/evaluate sections of tiny_cpu.yaml and of the embedded laptop pipeline.
def job_chains():
    from text2sql_ray.cli import LAPTOP_PIPELINE
    from text2sql_ray.pipeline import stage_configs

    conv = cfg("convert_bird.yaml", "convert")
    chains = [(f"convert_bird+{t}+eval_dev", conv, cfg(t, "train"), cfg("eval_dev.yaml", "evaluate"))
              for t in ("sft_lora_8b.yaml", "sft_full_8b_zero3.yaml")]
    tiny = JOBS / "tiny_cpu.yaml"
    chains.append(("tiny_cpu", build_config("convert", str(tiny)), build_config("train", str(tiny)),
                   build_config("evaluate", str(tiny))))
    for name, path in (("tiny_cpu pipeline", tiny), ("laptop pipeline", LAPTOP_PIPELINE)):
        stages = stage_configs(build_config("pipeline", str(path)))
        chains.append((name, stages["convert"], stages["train"], stages["eval_finetuned"]))
    return chains


def test_job_schema_budgets_leave_room_in_train_max_length():
    from text2sql_ray.config import check_schema_budget

    for name, conv, train, _ in job_chains():
        check_schema_budget(conv.prompt, train.max_length, name)  # raises ConfigError saying what to change


@pytest.fixture(scope="module")
def stand_in_tokenizer(smol_dir):
    """The job files name the gated Llama-3.1 tokenizer, which cannot be downloaded here: both sides of the
    comparison load SmolLM2's in its place (the test asserts first that they name the same one)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def test_eval_prompt_of_a_question_is_byte_identical_to_its_training_prompt(bird_dev, stand_in_tokenizer, monkeypatch):
    from text2sql_ray import bird, generation, models
    from text2sql_ray.convert import convert_row
    from text2sql_ray.prompts import prompt_record
    from text2sql_ray.schema import SchemaCache

    monkeypatch.setattr(models, "load_tokenizer", lambda name: stand_in_tokenizer)
    split = bird.load_split(bird_dev)
    questions = [next(q for q in split.questions if q["db_id"] == db) for db in ("student_club", "superhero", "toxicology")]
    for name, conv, _train, ev in job_chains():
        train_cache = SchemaCache.from_split(split, conv.prompt, stand_in_tokenizer if conv.tokenizer else None)
        trained = {q["question_id"]: [m for m in convert_row(q, train_cache, conv.prompt, set())["messages"]
                                      if m["role"] != "assistant"] for q in questions}
        # the model a train output records (evaluate --model <train output>), and a model without a record
        # (the base model: the evaluate section's own options)
        recorded, _ = generation.resolve_prompt(ev, {**prompt_record(conv.prompt, conv.tokenizer), "manifest": "m"})
        for eval_cfg in (recorded, ev):
            assert (eval_cfg.prompt, eval_cfg.tokenizer) == (conv.prompt, conv.tokenizer), name
            rows, errors = generation.question_prompts(split, questions, eval_cfg)
            assert not errors and {r["question_id"]: r["messages"] for r in rows} == trained, name


def test_tiny_cpu_turns_every_fast_knob_on_and_uses_the_embedded_defaults():
    p = cfg("tiny_cpu.yaml", "pipeline")
    c, s, t, e = p.convert, p.synthesize, p.train, p.evaluate
    assert 0 < c.limit <= 50 and 0 < s.limit <= 10 and s.samples == 2 and 0 < e.limit <= 10
    assert t.max_steps == 2 and t.num_workers in (1, 2) and t.cpus_per_worker == 0.5 and not t.use_gpu
    assert s.engine.max_new_tokens <= 64 and e.engine.max_new_tokens <= 64
    assert s.engine.backend == e.engine.backend == cfg("tiny_cpu.yaml", "serve").backend == "hf"
    assert c.data == e.data == "" and s.engine.model == t.model == ""  # bundled demo, SmolLM2


def test_tiny_cpu_stages_chain_by_path_under_the_pipeline_run_dir():
    p = cfg("tiny_cpu.yaml", "pipeline")
    assert p.synthesize.input == p.convert.out
    assert p.train.input in (p.convert.out, p.synthesize.out)
    assert p.evaluate.model == p.train.out == cfg("tiny_cpu.yaml", "serve").model
    for out in (p.convert.out, p.synthesize.out, p.train.out, p.evaluate.out):
        assert Path(out).parent == Path(p.out)


# --------------------------------------------------------------------------------------------------
# cluster/
# --------------------------------------------------------------------------------------------------


def load_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def test_runtime_env_is_a_valid_ray_runtime_env_that_excludes_local_state():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**data)  # Ray's own validation of the keys
    assert data["working_dir"] == "."
    assert {".venv", "runs", ".git"} <= set(data["excludes"])
    assert {"HF_HOME", "HF_TOKEN"} <= set(data["env_vars"])
    assert all(isinstance(v, str) for v in data["env_vars"].values())


def test_launcher_config_passes_rays_schema_with_a_cpu_head_and_a_gpu_worker_type():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    data = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(fillout_defaults(data))
    types = data["available_node_types"]
    assert data["head_node_type"] in types
    assert types[data["head_node_type"]].get("resources", {}).get("GPU", 0) == 0
    gpu_types = [n for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 8]
    assert gpu_types and all(types[n]["max_workers"] >= 1 for n in gpu_types)
    assert any('[gpu]' in cmd for cmd in data["setup_commands"])


def _pod_specs(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]
    ]


def test_raycluster_has_a_head_a_gpu_worker_group_and_shared_storage_on_every_pod():
    import ray

    docs = load_docs("kuberay-raycluster.yaml")
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = [
        g for g in spec["workerGroupSpecs"]
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
    ]
    assert gpu_groups and all(g["maxReplicas"] >= 1 for g in gpu_groups)
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in _pod_specs(spec):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert claims[mounts["/mnt/cluster_storage"]] == pvc["metadata"]["name"]


def test_rayjob_runs_a_job_file_on_the_raycluster_spec():
    from ray.runtime_env import RuntimeEnv

    (job,) = load_docs("kuberay-rayjob.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    tokens = shlex.split(spec["entrypoint"])
    assert tokens[0] == "t2s" and tokens[2] == "--config"
    build_config(tokens[1], str(REPO / tokens[3]), cli.parse_overrides(tokens[4:], STAGE_CONFIGS[tokens[1]]))
    rc = next(d for d in load_docs("kuberay-raycluster.yaml") if d["kind"] == "RayCluster")
    if "clusterSelector" in spec:
        assert spec["clusterSelector"] == {"ray.io/cluster": rc["metadata"]["name"]}
    else:
        assert spec["rayClusterSpec"] == rc["spec"]  # "the same cluster": kept identical
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    # working_dir is a path inside the image (the submitter pod uploads it); Ray checks that it exists
    # locally, which it does not here, so validate the rest.
    assert env.pop("working_dir") == "/app"
    RuntimeEnv(**env)


def test_files_named_in_cluster_docs_and_job_headers_exist():
    sources = [CLUSTER / "README.md", *CLUSTER.glob("*.yaml"), CLUSTER / "Dockerfile", *JOB_FILES]
    named = set()
    for src in sources:
        named |= set(re.findall(r"\b((?:jobs|cluster)/[\w./-]+\.(?:yaml|json|md))", src.read_text()))
    assert named
    missing = sorted(n for n in named if not (REPO / n).is_file())
    if not any((JOBS / "deepspeed").glob("*.json")):
        missing = [m for m in missing if not m.startswith("jobs/deepspeed/")]  # being written elsewhere
    assert missing == []
