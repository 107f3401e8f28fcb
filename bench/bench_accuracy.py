"""Accuracy of each precision mode against float32: teacher-forced top-1 agreement and perplexity.

Every mode of `mistral_lm.evaluation.MODES` (fp32, bf16, int8, int4, int4-g64, nf4, gguf-native)
scores the same text, CPython's pydoc topics (`reference_text_ids`), on the embedded SmolLM2
GGUF or `--model`. Prints a markdown table and writes a JSON list of dicts (mode, tokens,
top1_agreement, decisive_agreement, ppl, ppl_reference, ppl_increase_pct, eval_s).

"Decisive" positions are those where float32's top-1 beats its top-2 by >= 0.1 nats: the rest
are near ties that flip under any rounding (bf16 alone flips some), see evaluation.Comparison.
Accuracy numbers are deterministic for a given machine and Python; eval_s is a timing and noisy.

    .venv/bin/python bench/bench_accuracy.py [--tokens 2000] [--modes fp32 int8] [--out bench/accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mistral_lm import AutoTokenizer, MistralForCausalLM
from mistral_lm.defaults import default_model_path
from mistral_lm.evaluation import MODES, compare, mode_kwargs, reference_text_ids, token_logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model path (default: the embedded SmolLM2 GGUF)")
    parser.add_argument("--tokens", type=int, default=2000, help="scored positions (default 2000)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "accuracy.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    ids = reference_text_ids(AutoTokenizer.from_pretrained(path), args.tokens)

    reference = token_logprobs(MistralForCausalLM.from_pretrained(path), ids)
    rows = []
    for mode in args.modes:
        model = MistralForCausalLM.from_pretrained(path, **mode_kwargs(mode))
        start = time.perf_counter()
        result = compare(token_logprobs(model, ids), reference)
        elapsed = time.perf_counter() - start
        del model
        rows.append({
            "mode": mode, "tokens": result.tokens, "top1_agreement": round(result.top1_agreement, 4),
            "decisive_agreement": round(result.decisive_agreement, 4), "ppl": round(result.ppl, 4),
            "ppl_reference": round(result.ppl_reference, 4),
            "ppl_increase_pct": round(100 * result.ppl_increase, 2), "eval_s": round(elapsed, 2),
        })
        print(f"{mode}: done in {elapsed:.1f} s", flush=True)

    decisive = int((reference.margins >= 0.1).sum())
    lines = [
        "# Accuracy against float32, teacher-forced", "",
        f"Command: `python bench/bench_accuracy.py`. Model: {path.name}; text: pydoc topics, "
        f"{reference.tokens} tokens ({decisive} decisive: float32's top-1 leads its top-2 by >= 0.1 nats); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.", "",
        "| mode | tokens | top-1 agreement vs fp32 | on decisive positions | perplexity | perplexity increase |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['tokens']} | {100 * row['top1_agreement']:.2f} % | "
                     f"{100 * row['decisive_agreement']:.2f} % | {row['ppl']:.3f} | {row['ppl_increase_pct']:+.2f} % |")
    print("\n" + "\n".join(lines))
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    markdown = args.out.with_name("ACCURACY.md")
    markdown.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {args.out} and {markdown}")


if __name__ == "__main__":
    main()
