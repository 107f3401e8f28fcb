"""Tensor parallel (TP=2, gloo, 1 thread per rank) vs one process, on the same random Mistral.

    python bench/bench_tp.py            # hidden 1024, 8 layers, vocab 32000 (~690 MB in float32)
    python bench/bench_tp.py --quick    # a small model, for a smoke run
    python bench/bench_tp.py --dtype bfloat16

One process is measured with 1 thread and with 2 threads (the same cores TP=2 uses); TP=2 runs
under `torchrun --standalone --nproc-per-node 2`. Reported per configuration: median decode
ms/token at batch 1, prefill ms for the prompt, and for TP the all-reduces per decode token and
their bytes (counted by the hooks, `model.tensor_parallel.stats`), plus the latency of one
hidden-sized all-reduce alone. Output: one JSON object per line, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
           num_attention_heads=16, num_key_value_heads=4, sliding_window=4096, max_position_embeddings=32768)
SMALL = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, sliding_window=64, max_position_embeddings=4096)


def write_model(folder: Path, config: dict) -> None:
    import torch

    from mistral_lm import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**config))
    model.save_pretrained(folder)


def measure(model, prompt_len: int, new_tokens: int, runs: int) -> dict:  # noqa: ANN001
    """Median prefill and decode times of `runs` generations (first one discarded as warm-up)."""
    import torch

    from mistral_lm.generation import Decoder, prefill

    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    prefills, decodes = [], []
    stats = getattr(getattr(model, "tensor_parallel", None), "stats", None)
    with torch.inference_mode():
        for _ in range(runs + 1):
            cache = model.make_cache(1, max_length=prompt_len + new_tokens)
            start = time.perf_counter()
            logits = prefill(model, cache, ids, mask, prompt_len)
            middle = time.perf_counter()
            step, token = Decoder(model), logits.argmax(-1)
            positions = torch.tensor([prompt_len])
            if stats is not None:
                stats.reset()
            for i in range(new_tokens):
                token = step(token, positions + i, cache).argmax(-1)
            end = time.perf_counter()
            prefills.append((middle - start) * 1e3)
            decodes.append((end - middle) * 1e3 / new_tokens)
    out = {"prefill_ms": statistics.median(prefills[1:]), "decode_ms_per_token": statistics.median(decodes[1:])}
    if stats is not None:
        out["all_reduces_per_token"] = stats.calls / new_tokens
        out["all_reduce_bytes_per_token"] = stats.bytes / new_tokens
    return out


def single(folder: str, threads: int, args: argparse.Namespace) -> dict:
    import torch

    from mistral_lm import MistralForCausalLM

    torch.set_num_threads(threads)
    model = MistralForCausalLM.from_pretrained(folder, torch_dtype=args.dtype)
    return {"run": f"1 process, {threads} thread{'s' * (threads > 1)}",
            **measure(model, args.prompt, args.new_tokens, args.runs)}


def tp_worker(folder: str, args: argparse.Namespace) -> None:
    """One torchrun rank: load the shard, time generation, time a bare all-reduce."""
    import torch
    import torch.distributed as dist

    from mistral_lm import parallel

    torch.set_num_threads(1)
    model = parallel.from_pretrained(folder, torch_dtype=args.dtype, vocab_parallel=args.vocab_parallel)
    result = measure(model, args.prompt, args.new_tokens, args.runs)
    row = torch.zeros(1, 1, model.config.hidden_size, dtype=model.dtype)
    for _ in range(20):
        dist.all_reduce(row)
    start = time.perf_counter()
    for _ in range(200):
        dist.all_reduce(row)
    result["one_all_reduce_us"] = (time.perf_counter() - start) / 200 * 1e6
    if dist.get_rank() == 0:
        head = "vocab-parallel" if args.vocab_parallel else "replicated"
        print("RESULT " + json.dumps({"run": f"TP={dist.get_world_size()} (gloo, 1 thread/rank), {head} head",
                                      **result}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--worker", choices=["single1", "single2", "tp"])
    parser.add_argument("--folder")
    parser.add_argument("--vocab-parallel", action="store_true", help="(worker) split embeddings and lm_head")
    args = parser.parse_args()
    if args.worker == "tp":
        return tp_worker(args.folder, args)
    if args.worker:
        print("RESULT " + json.dumps(single(args.folder, int(args.worker[-1]), args)))
        return
    passed = [f"--prompt={args.prompt}", f"--new-tokens={args.new_tokens}", f"--runs={args.runs}",
              f"--dtype={args.dtype}"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        write_model(folder, SMALL if args.quick else BIG)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        commands = [[sys.executable, __file__, "--worker", "single1", "--folder", str(folder), *passed],
                    [sys.executable, __file__, "--worker", "single2", "--folder", str(folder), *passed],
                    *[[sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.tp}",
                       __file__, "--worker", "tp", "--folder", str(folder), *passed, *vocab]
                      for vocab in ([], ["--vocab-parallel"])]]
        rows = []
        for command in commands:  # one at a time: each gets the whole machine
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(f"{command[-8:]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            rows.append(json.loads(lines[0][len("RESULT "):]))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["decode_ms_per_token"]
    print(f"\n{'run':56s} {'decode ms/token':>16s} {'vs 1 thread':>12s} {'prefill ms':>11s}")
    for row in rows:
        print(f"{row['run']:56s} {row['decode_ms_per_token']:16.1f} {base / row['decode_ms_per_token']:11.2f}x "
              f"{row['prefill_ms']:11.1f}")
    hidden = SMALL["hidden_size"] if args.quick else BIG["hidden_size"]
    for tp in rows[2:]:
        print(f"{tp['run']}: {tp['all_reduces_per_token']:.0f} collectives per decode token, "
              f"{tp['all_reduce_bytes_per_token'] / 1024:.1f} KiB contributed per rank per token; "
              f"one {hidden}-float all-reduce alone: {tp['one_all_reduce_us']:.0f} us")


if __name__ == "__main__":
    main()
