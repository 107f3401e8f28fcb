"""Per-layer Linear timings: float32 / bfloat16 F.linear vs our weight-only quantized modules.

Shapes are SmolLM2-135M's (out x in): q/o 576x576, k/v 192x576, gate/up 1536x576, down
576x1536, tied lm_head 49152x576. M=1 is a decode step, M=128 a prefill chunk. Quantized
modules get bfloat16 activations (their compute dtype; a float32 model pays one cast more).

Like a forward pass, each timed call sweeps all the model's distinct weights of that shape
(60 of 576x576, 30 of 576x1536, ...), so weights come from memory as they would, not from a
cache warmed by the previous call; a cell is microseconds per weight. Cells are medians over
interleaved rounds, so a busy machine slows every variant alike; ratios are float32 time /
variant time (higher is faster). The last table adds the layers up as one forward uses them.

    .venv/bin/python bench/bench_linear.py [--rows 1 128] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from mistral_lm.quantization import GGUFLinear, Int4Linear, Int8Linear, NF4Linear

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
PER_TOKEN = {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30, (49152, 576): 1}  # per forward
VARIANTS = ["float32", "bfloat16", "int8", "int4", "nf4", "Q4_1", "Q8_0"]


def _gguf(weight: torch.Tensor, ggml_type: gguf.GGMLQuantizationType) -> GGUFLinear:
    raw = gguf.quants.quantize(weight.numpy(), ggml_type)
    return GGUFLinear.from_quantized(SimpleNamespace(ggml_type=ggml_type, shape=tuple(weight.shape), data=raw))


def build(out_features: int, in_features: int, rows: int, copies: int) -> dict[str, Callable[[], None]]:
    """Per variant, one zero-argument call that runs `copies` distinct weights of this shape."""
    x = torch.randn(rows, in_features)
    xb = x.bfloat16()
    layers: dict[str, list[Callable[[], torch.Tensor]]] = {v: [] for v in VARIANTS}
    for _ in range(copies):
        linear = nn.Linear(in_features, out_features, bias=False)
        weight = linear.weight.detach()
        wb = weight.bfloat16()
        layers["float32"].append(lambda w=weight: F.linear(x, w))
        layers["bfloat16"].append(lambda w=wb: F.linear(xb, w))
        modules = {
            "int8": Int8Linear.from_linear(linear),
            "int4": Int4Linear.from_linear(linear, group_size=64),
            "nf4": NF4Linear.from_linear(linear, "nf4"),
            "Q4_1": _gguf(weight, gguf.GGMLQuantizationType.Q4_1),
            "Q8_0": _gguf(weight, gguf.GGMLQuantizationType.Q8_0),
        }
        for name, module in modules.items():
            layers[name].append(lambda m=module: m(xb))

    def sweep(calls: list[Callable[[], torch.Tensor]]) -> Callable[[], None]:
        def run() -> None:
            for call in calls:
                call()
        return run

    return {name: sweep(calls) for name, calls in layers.items()}


def measure(calls: dict[str, Callable[[], None]], rounds: int, budget_s: float, copies: int) -> dict[str, float]:
    """Median microseconds per weight; variants interleaved round by round."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up: caches, lazily built tables, oneDNN primitives
        call(), call()
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            n = 0
            while n < 3 or time.perf_counter() - start < budget_s:
                t = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - t)
                n += 1
    return {name: statistics.median(s) * 1e6 / copies for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 128], help="M values (tokens per call)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.05, help="seconds per variant per round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| out x in | M | " + " | ".join(VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    totals: dict[int, dict[str, float]] = {}
    for rows in args.rows:
        totals[rows] = dict.fromkeys(VARIANTS, 0.0)
        for shape in SHAPES:
            copies = PER_TOKEN[shape]
            us = measure(build(*shape, rows, copies), args.rounds, args.budget, copies)
            cells = [f"{us[v]:.0f} us" + ("" if v == "float32" else f" ({us['float32'] / us[v]:.2f}x)")
                     for v in VARIANTS]
            print(f"| {shape[0]}x{shape[1]} | {rows} | " + " | ".join(cells) + " |", flush=True)
            for v in VARIANTS:
                totals[rows][v] += us[v] * PER_TOKEN[shape]
    print("\nAll Linear layers of one SmolLM2-135M forward (30 layers + lm_head), milliseconds:\n")
    print("| M | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for rows, total in totals.items():
        cells = [f"{total[v] / 1e3:.2f}" + ("" if v == "float32" else f" ({total['float32'] / total[v]:.2f}x)")
                 for v in VARIANTS]
        print(f"| {rows} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
