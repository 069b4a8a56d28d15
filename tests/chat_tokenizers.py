"""A Llama-3-style tokenizer made from any local fast tokenizer (no download), for the one-BOS tests.

What makes Llama 3 special for prompt tokens: its tokenizer adds `<|begin_of_text|>` whenever it is
called with add_special_tokens=True (its post-processor), and its chat template writes that same
token itself. A templated prompt tokenized the default way therefore starts with two BOS. The
tokenizer built here has both properties (its own header/end-of-turn tokens, a template of the
Llama 3 shape written for these tests), so a test sees the bug without the gated Llama weights.
"""

from __future__ import annotations

from pathlib import Path

LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def llama3_style_tokenizer(base_dir: str | Path, out_dir: str | Path):
    """Save a Llama-3-style variant of the tokenizer in `base_dir` to `out_dir`; returns it (reloaded)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
        }
    )
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tok.chat_template = LLAMA3_STYLE_TEMPLATE
    tok.pad_token = tok.eos_token
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
