"""Native ggml kernels (mistral_lm.native.ggml) against the current GGUF path and bfloat16.

For each weight shape and type, and each batch M, times three Linears of the same weights:
    ggml   ggml.linear on the GGUF blocks (int8 activations, integer dots; native/ggml.c)
    (a)    GGUFLinear.from_quantized (torch's int4 kernel, bfloat16 compute): the current path
    (b)    F.linear on the weights dequantized to bfloat16
and prints the time, GB/s of each one's own weight bytes (M = 1, 4) or GFLOP/s (M >= 16), and
(a)'s time over ggml's. Weights are random blocks (gguf-py cannot quantize K-quants).

    python bench/bench_kernels.py                  # all shapes, 2 threads
    python bench/bench_kernels.py --only smol --m 1 64
"""

from __future__ import annotations

import argparse
import platform
import time
from types import SimpleNamespace

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from mistral_lm.native import build, ggml
from mistral_lm.quantization.gguf import GGUFLinear

Q = gguf.GGMLQuantizationType
SHAPES = [  # (group, label, N, K, types)
    ("smol", "q/o 576->576", 576, 576, [Q.Q4_1]),
    ("smol", "k/v 576->192", 192, 576, [Q.Q4_1]),
    ("smol", "up 576->1536", 1536, 576, [Q.Q4_1]),
    ("smol", "down 1536->576", 576, 1536, [Q.Q4_1]),
    ("smol", "head 576->49152", 49152, 576, [Q.Q8_0]),
    ("7b", "q/o 4096->4096", 4096, 4096, [Q.Q4_0, Q.Q4_K]),
    ("7b", "k/v 4096->1024", 1024, 4096, [Q.Q4_0, Q.Q4_K]),
    ("7b", "up 4096->14336", 14336, 4096, [Q.Q4_0, Q.Q4_K]),
    ("7b", "down 14336->4096", 4096, 14336, [Q.Q4_0, Q.Q4_K]),
    ("7b", "head 4096->32000", 32000, 4096, [Q.Q6_K]),
]


def cpu_header() -> str:
    model, flags = platform.processor(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile"]
    lib = ggml._lib()
    level = lib.mlm_set_isa(build.isa_cap()) if lib else None
    return (f"CPU: {model}\nflags: {' '.join(f for f in wanted if f in flags) or '-'} "
            f"(absent: {' '.join(f for f in wanted if f not in flags) or '-'})\n"
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, ggml library "
            f"{'ISA level ' + str(level) + ' (2 AVX-512 VNNI, 1 AVX2, 0 scalar)' if lib else 'NOT available'}")


def random_blocks(ggml_type: int, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random codes with float16 scales of a trained layer's size (random bytes are valid blocks)."""
    block, size = gguf.GGML_QUANT_SIZES[Q(ggml_type)]
    b = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    scale = lambda: (rng.random((n, k // block, 1), dtype=np.float32) * 0.004).astype(np.float16).view(np.uint8)  # noqa: E731
    fields = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q6_K: [208]}[Q(ggml_type)]
    for f in fields:
        b[..., f:f + 2] = scale()
    return b.reshape(n, -1)


def dequantized_bf16(blocks: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor:
    out = torch.empty(blocks.shape[0], k, dtype=torch.bfloat16)
    for n0 in range(0, blocks.shape[0], 1024):
        out[n0:n0 + 1024] = ggml.dequantize(blocks[n0:n0 + 1024], ggml_type, k)
    return out


def seconds(fn, x: torch.Tensor, budget: float) -> float:
    """Best time of calls of fn(x) after one warm-up, within about `budget` seconds: the minimum,
    because on a shared machine the median measures the neighbours (preemption costs ~16 ms)."""
    fn(x)
    times: list[float] = []
    start = time.perf_counter()
    while not times or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    parser.add_argument("--only", choices=["smol", "7b"], default=None)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of timing per cell")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_header())
    print("\n| shape | type | M | ggml ms | (a) ms | (b) bf16 ms | ggml | (a) | (b) | (a)/ggml |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for group, label, n, k, types in SHAPES:
        if args.only and group != args.only:
            continue
        for t in types:
            raw = random_blocks(t, n, k, rng)
            blocks = torch.from_numpy(raw)
            impls = {"ggml": (lambda x, b=blocks, t=t: ggml.linear(x, b, t), blocks.numel())}
            if GGUFLinear.supports(t):
                a = GGUFLinear.from_quantized(SimpleNamespace(ggml_type=t, shape=(n, k), data=raw))
                impls["a"] = (lambda x, a=a: a(x), sum(b.numel() * b.element_size() for b in a.buffers()))
            w16 = dequantized_bf16(blocks, t, k)
            impls["b"] = (lambda x, w=w16: F.linear(x.to(torch.bfloat16), w), w16.numel() * 2)
            for m in args.m:
                x = torch.randn(m, k)
                with torch.inference_mode():
                    s = {name: seconds(fn, x, args.budget) for name, (fn, _) in impls.items()}
                rate = {name: (f"{nbytes / s[name] / 1e9:.1f} GB/s" if m <= 4 else
                               f"{2 * m * n * k / s[name] / 1e9:.0f} GFLOP/s") for name, (_, nbytes) in impls.items()}
                ms = {name: f"{v * 1e3:.3f}" for name, v in s.items()}
                ratio = f"{s['a'] / s['ggml']:.2f}x" if "a" in s else "n/a"
                print(f"| {label} | {Q(t).name} | {m} | {ms['ggml']} | {ms.get('a', 'n/a')} | {ms['b']} | "
                      f"{rate['ggml']} | {rate.get('a', 'n/a')} | {rate['b']} | {ratio} |", flush=True)
            del impls, w16


if __name__ == "__main__":
    main()
