"""generate()'s sampled draw: native/draw.c against torch.multinomial, the draw it reproduces.

1. One draw from a processed row: vocabularies of 32000 (Mistral 7B), 49152 (the default model),
   131072 (Tekken); the full softmax and the top-50 row Transformers' default `top_k` leaves.
2. The default model's `generate(do_sample=True)` (Transformers' defaults: top_k 50), tokens per
   second with the native draw and with torch's, alternating in one process. The tokens are the
   same either way (tests/test_native_draw.py); this measures only their cost.

    python bench/bench_sampling.py [--rounds 4] [--new 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_scale import cpu_description
from mistral_lm import runtime
from mistral_lm.native import draw


def per_call_us(fn, calls: int = 100) -> float:
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def draws() -> list[str]:
    lines = ["| vocabulary | row | draw.c µs | torch.multinomial µs | speed-up |", "|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for vocab in (32000, 49152, 131072):
        logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
        kth = logits.topk(50).values[:, -1:]
        for name, row in (("full softmax", logits), ("top-50", logits.masked_fill(logits < kth, float("-inf")))):
            probs = row.softmax(dim=-1)
            ours = per_call_us(lambda: draw.multinomial(probs, g))
            theirs = per_call_us(lambda: torch.multinomial(probs, 1, generator=g))
            lines.append(f"| {vocab} | {name} | {ours:.0f} | {theirs:.0f} | {theirs / ours:.1f}x |")
    return lines


def generation(rounds: int, new: int) -> list[str]:
    model, tok = runtime.load_for_inference()
    ids = tok("Once upon a time, in a city by the sea,", return_tensors="pt").input_ids
    native = draw.multinomial

    def rate(fast: bool, seed: int) -> float:
        draw.multinomial = native if fast else (lambda probs, generator=None: None)
        stamps: list[float] = []

        class Clock:
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        try:
            torch.manual_seed(seed)
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=True, streamer=Clock())
        finally:
            draw.multinomial = native
        return (len(stamps) - 2) / (stamps[-1] - stamps[1])  # from the first new token to the last

    rate(True, 0)
    fast, slow = [], []
    for r in range(rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        for which in order:
            (fast if which else slow).append(rate(which, r))
    ratio = statistics.median(a / b for a, b in zip(fast, slow))
    return [f"default model, `generate(do_sample=True, max_new_tokens={new})`, {rounds} alternated rounds: "
            f"draw.c {statistics.median(fast):.1f} tok/s (runs {', '.join(f'{x:.1f}' for x in fast)}), "
            f"torch.multinomial {statistics.median(slow):.1f} tok/s (runs {', '.join(f'{x:.1f}' for x in slow)}); "
            f"median ratio **{ratio:.2f}x**."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not draw.agrees_with_torch():
        raise SystemExit("the native draw is not available or differs from this torch")
    model, flags = cpu_description()
    print(f"{model}, flags: {flags}; torch {torch.__version__}; 2 threads\n")
    print("\n".join(draws()))
    print()
    print("\n".join(generation(args.rounds, args.new)))


if __name__ == "__main__":
    main()
