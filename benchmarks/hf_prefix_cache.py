"""hf engine prefix cache: the same evaluation prompts generated with `engine.prefix_cache` off (every prompt
prefilled whole, left-padded) and on (prompts of a batch sharing a schema prefill it once), side by side.

    python benchmarks/hf_prefix_cache.py [--data DIR] [--model M] [--batch-size 24] [--max-new-tokens 64]

Default: the bundled demo dev set (46 questions on 3 databases) with the laptop profile's prompt
(text2sql_ray/demo/pipeline_laptop.yaml's convert.prompt: 400-650 tokens) and the embedded SmolLM2-135M-Instruct, one torch
thread, one process (what one of the laptop evaluation's two actors does with its half). Prints both wall
times, the ratio, and whether every generation (texts and token counts) is the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from text2sql_ray import bird  # noqa: E402
from text2sql_ray.config import build_config  # noqa: E402
from text2sql_ray.engines import HFGenerator  # noqa: E402
from text2sql_ray.generation import question_prompts  # noqa: E402

LAPTOP = REPO / "text2sql_ray" / "demo" / "pipeline_laptop.yaml"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="", help="a BIRD-format dev split (default: the bundled demo dev)")
    p.add_argument("--model", default="", help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=0, help="first N questions only (0 = all)")
    p.add_argument("--prompt-section", choices=("convert", "evaluate"), default="convert",
                   help="the laptop file's section whose prompt config to use: convert (the laptop prompts, 400-650 "
                        "tokens) or evaluate (no prompt there: the rich defaults, sample values and descriptions)")
    p.add_argument("--json", default="", help="also write the numbers here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    # the laptop profile's prompt is its convert section's (the fine-tuned model records it; evaluate reads it)
    prompt = build_config(args.prompt_section, str(LAPTOP)).prompt
    cfg = dataclasses.replace(build_config("evaluate", str(LAPTOP), [("model", args.model)]), prompt=prompt)
    split = bird.load_split(bird.resolve_data(args.data, "dev"), "dev")
    questions = split.questions[: args.limit] if args.limit else split.questions
    rows, errors = question_prompts(split, questions, cfg)
    engine = dataclasses.replace(cfg.engine, backend="hf", model=args.model, temperature=0.0, num_cpus=1,
                                 num_gpus=0, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    messages, keys = [r["messages"] for r in rows], [str(r["question_id"]) for r in rows]
    times, outs = {}, {}
    for on in (False, True):
        gen = HFGenerator(dataclasses.replace(engine, prefix_cache=on))
        t0 = time.perf_counter()
        outs[on] = [(g.texts, g.tokens, g.error) for g in gen.generate(messages, 1, keys)]
        times[on] = time.perf_counter() - t0
        print(f"prefix_cache={on}: {len(rows)} prompts in {times[on]:.1f} s", flush=True)
    same = outs[True] == outs[False]
    n_same = sum(a == b for a, b in zip(outs[True], outs[False]))
    result = {"prompt_section": args.prompt_section, "prompts": len(rows), "schema_errors": len(errors), "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "seconds_off": round(times[False], 2),
              "seconds_on": round(times[True], 2), "speedup": round(times[False] / times[True], 2),
              "same_generations": same, "rows_identical": n_same}
    print(json.dumps(result))
    print(f"prefix cache: {times[False] / times[True]:.2f}x faster ({times[False]:.1f} s -> {times[True]:.1f} s), "
          f"{n_same}/{len(rows)} generations identical")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
