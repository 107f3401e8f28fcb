"""Decode speed and memory: mistral_lm vs transformers generate on the same random Mistral.

Each engine runs in its own subprocess so peak RSS is its own. Reported as medians and ratios.

    python bench/bench_generate.py            # the issue's model: hidden 1024, 16 layers, window 4096
    python bench/bench_generate.py --quick    # a small model, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=16,
           num_attention_heads=16, num_key_value_heads=4, sliding_window=4096, max_position_embeddings=32768)
SMALL = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, sliding_window=64, max_position_embeddings=4096)


def _rss_mb() -> float:
    """Peak RSS of this process (VmHWM): getrusage's ru_maxrss survives exec, so a child started
    from a parent that built the model would report the parent's peak."""
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def worker(engine: str, folder: str, prompt_len: int, new_tokens: int, runs: int) -> dict:
    import torch

    torch.manual_seed(0)
    if engine == "ours":
        from mistral_lm import MistralForCausalLM
    else:
        from transformers import MistralForCausalLM
    base = _rss_mb()
    model = MistralForCausalLM.from_pretrained(folder, **({"dtype": torch.float32} if engine == "hf" else {})).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len))
    times = []
    for _ in range(runs):
        with torch.inference_mode():
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, min_new_tokens=new_tokens)
            total = time.perf_counter() - start
        assert out.shape[1] == prompt_len + new_tokens
        times.append((new_tokens - 1) / max(total - prefill, 1e-9))
    return {"decode_tok_s": statistics.median(times), "peak_rss_mb": _rss_mb() - base}


def long_run(folder: str, windows: int) -> dict:
    """Per-token time and cache bytes over 4x the window: both should stay flat."""
    import torch

    from mistral_lm import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(folder).eval()
    w = model.config.sliding_window
    cache = model.model.make_cache(1)
    token = torch.tensor([[5]])
    per_window, sizes = [], []
    with torch.inference_mode():
        for _ in range(windows):
            start = time.perf_counter()
            for _ in range(w):
                logits = model(token, past_key_values=cache).logits
                token = logits[:, -1:].argmax(-1)
            per_window.append((time.perf_counter() - start) / w * 1000)
            sizes.append(cache.nbytes())
    return {"ms_per_token_by_window": per_window, "cache_bytes_by_window": sizes}


def _spawn(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=5, metavar=("ENGINE", "FOLDER", "PROMPT", "NEW", "RUNS"))
    parser.add_argument("--long", metavar="FOLDER")
    args = parser.parse_args()
    if args.worker:
        engine, folder, p, n, r = args.worker
        print(json.dumps(worker(engine, folder, int(p), int(n), int(r))))
        return
    if args.long:
        print(json.dumps(long_run(args.long, 4)))
        return

    import torch

    from mistral_lm import MistralConfig, MistralForCausalLM

    torch.set_num_threads(torch.get_num_threads())
    config = SMALL if args.quick else BIG
    new_tokens, runs = (32, 3) if args.quick else (64, 3)
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp, "big"), Path(tmp, "small")
        torch.manual_seed(0)
        MistralForCausalLM(MistralConfig(**config)).save_pretrained(big)
        MistralForCausalLM(MistralConfig(**SMALL)).save_pretrained(small)
        results = {e: _spawn("--worker", e, str(big), "32", str(new_tokens), str(runs)) for e in ("ours", "hf")}
        flat = _spawn("--long", str(small))
    ours, hf = results["ours"], results["hf"]
    print(f"model: {config}\nprompt 32 tokens, {new_tokens} new, median of {runs}, threads {torch.get_num_threads()}\n")
    print("| engine | decode tok/s | peak RSS MB |\n|---|---|---|")
    for name, r in (("mistral_lm", ours), ("transformers", hf)):
        print(f"| {name} | {r['decode_tok_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    print(f"| ratio ours/hf | {ours['decode_tok_s'] / hf['decode_tok_s']:.2f}x | "
          f"{ours['peak_rss_mb'] / hf['peak_rss_mb']:.2f}x |")
    print(f"\nlong generation, window {SMALL['sliding_window']}, 4 windows of tokens:")
    print("| window # | ms/token | cache bytes |\n|---|---|---|")
    for i, (ms, size) in enumerate(zip(flat["ms_per_token_by_window"], flat["cache_bytes_by_window"])):
        print(f"| {i + 1} | {ms:.2f} | {size} |")


if __name__ == "__main__":
    main()
