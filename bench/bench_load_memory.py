"""Load time and peak RSS of from_pretrained, ours vs transformers, on one random checkpoint.

    python bench/bench_load_memory.py            # ~200 MB float32 checkpoint, 3 runs each
    python bench/bench_load_memory.py --hidden 1024 --layers 12 --runs 5

Every load runs in a fresh interpreter. RSS is counted from after the imports (torch, the library
and its model class), so import cost is excluded and everything from_pretrained allocates,
imports or maps is included. The peak is read from /proc/self/status (VmHWM): getrusage's
ru_maxrss survives exec, so a child would report its parent's peak. "after reading" is the peak
once every weight has been summed: mmapped pages become resident then, a second copy would show;
"+ reading" times include that first pass, since a loader may defer work until a weight is used.
Prints a markdown table; ratios are ours / transformers (lower is better for both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, sys, time
import torch
if sys.argv[1] == "ours":
    import mistral_lm
    from mistral_lm import MistralForCausalLM as cls
    kwargs = {"torch_dtype": getattr(torch, sys.argv[3])}
else:
    import transformers
    from transformers import MistralForCausalLM as cls
    transformers.logging.disable_progress_bar()
    kwargs = {"dtype": getattr(torch, sys.argv[3])}

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

base = status("VmRSS:")
start = time.perf_counter()
model = cls.from_pretrained(sys.argv[2], **kwargs)
seconds = time.perf_counter() - start
loading = status("VmHWM:") - base
with torch.no_grad():
    checksum = sum(float(p.sum()) for p in model.parameters())
total = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "total": total, "loading": loading, "reading": status("VmHWM:") - base}))
"""


def make_checkpoint(folder: Path, hidden: int, layers: int, vocab: int, intermediate: int) -> int:
    import torch

    from mistral_lm import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                           num_key_value_heads=max(1, hidden // 128))
    MistralForCausalLM(config).save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(library: str, folder: Path, dtype: str, runs: int) -> dict[str, float]:
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _CHILD, library, str(folder), dtype], check=True,
                             capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = make_checkpoint(folder, args.hidden, args.layers, args.vocab, args.intermediate)
        print(f"checkpoint: {size / 1e6:.0f} MB float32 (hidden {args.hidden}, {args.layers} layers, "
              f"vocab {args.vocab}); median of {args.runs} fresh processes\n")
        print("| load as | library | load (s) | load + reading (s) | peak RSS loading (MB) "
              "| peak RSS after reading (MB) | after reading / file |")
        print("|---|---|---:|---:|---:|---:|---:|")
        ratios = []
        for dtype in ("float32", "bfloat16"):
            row = {lib: measure(lib, folder, dtype, args.runs) for lib in ("ours", "transformers")}
            for lib, m in row.items():
                print(f"| {dtype} | {lib} | {m['seconds']:.2f} | {m['total']:.2f} | {m['loading'] / 1e6:.0f} | "
                      f"{m['reading'] / 1e6:.0f} | {m['reading'] / size:.2f} |")
            ours, ref = row["ours"], row["transformers"]
            ratios.append((dtype, ours["seconds"] / ref["seconds"], ours["total"] / ref["total"],
                           ours["loading"] / max(ref["loading"], 1), ours["reading"] / ref["reading"]))
        print("\n| load as | load time | load + reading time | peak RSS loading | peak RSS after reading |")
        print("|---|---:|---:|---:|---:|")
        for dtype, *values in ratios:
            print(f"| {dtype} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
        print("\n(ratios: ours / transformers)")


if __name__ == "__main__":
    main()
