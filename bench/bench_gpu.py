"""Ours against transformers on a CUDA GPU: load, prefill, decode, memory and logits agreement.

    python bench/bench_gpu.py                       # every stage that fits in --budget seconds
    python bench/bench_gpu.py --shapes 1b --stages bf16 --budget 120
    python bench/bench_gpu.py --device cpu --shapes tiny --budget 60   # a smoke run of the script

Never part of the tests: a GPU is lent to some sessions only. The checkpoints are Mistral-shaped
folders of random bfloat16 weights written with safetensors alone (neither engine writes them):
`smollm2` has the default model's shape (hidden 576, 30 layers, 9/3 heads, ffn 1536, vocab 49152,
tied embeddings), `1b` and `7b` bench_scale.py's. Stages, in this order, each skipped once the
budget is spent:

- `smoke`: a tiny model, ours against transformers in float32 on the device; stops the run if ours
  fails there, so a broken device path costs seconds;
- `numerics`: both engines in one process on the 1B folder, float32 and then bfloat16: max |logit
  difference| and top-1 agreement over a [2, 64] batch, and the greedy continuations compared;
- `bf16`: every shape, `from_pretrained(folder, bfloat16, device_map=device)`, one fresh worker per
  engine and run, engines alternating (the first run here, later runs after the other stages);
- `gguf`: a 1B Q4_0 GGUF (bench_scale.write_gguf), ours `gguf_native=True` and transformers'
  dequantizing GGUF loader;
- `quant`: ours with BitsAndBytesConfig int4, nf4 (bfloat16 compute) and int8 on the 7B folder.

Per worker: load s (from_pretrained to a model on the device, synchronized), first call s, prefill
tok/s at 64 and 512 prompt tokens (median of 3 `generate(max_new_tokens=1)`), decode tok/s at
batch 1 (128 greedy steps: generate(129) minus generate(1)) and at batch 32 (64 steps, 32 rows),
peak device memory (torch.cuda.max_memory_allocated) and the fraction of the measured copy
bandwidth that batch-1 decode reads (the parameters' bytes per token). Writes gpu.json and gpu.md
to --out after every worker, so a run stopped by its time limit keeps what it measured.
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
import traceback
from pathlib import Path
from typing import Any

SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, ffn=128, vocab=512, tie=False, theta=10000.0),
    "smollm2": dict(hidden=576, layers=30, heads=9, kv=3, ffn=1536, vocab=49152, tie=True, theta=100000.0),
    "1b": dict(hidden=2048, layers=16, heads=32, kv=8, ffn=5632, vocab=32000, tie=False, theta=10000.0),
    "7b": dict(hidden=4096, layers=32, heads=32, kv=8, ffn=14336, vocab=32000, tie=False, theta=10000.0),
}
QUANT = {"ours-int4": "int4", "ours-nf4": "nf4", "ours-int8": "int8"}
PROMPT, LONG, NEW, BATCH, BATCH_NEW = 64, 512, 128, 32, 64


# ----------------------------------------------------------------------------- checkpoints
def write_folder(folder: Path, shape: str, device: str) -> int:
    """A Mistral checkpoint of random bfloat16 weights (std 0.02, norms 1); returns its bytes."""
    import torch
    from safetensors.torch import save_file

    s = SHAPES[shape]
    h, d = s["hidden"], s["hidden"] // s["heads"]
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    tensors = {"model.embed_tokens.weight": rand(s["vocab"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": rand(s["heads"] * d, h), p + "self_attn.k_proj.weight": rand(s["kv"] * d, h),
                    p + "self_attn.v_proj.weight": rand(s["kv"] * d, h), p + "self_attn.o_proj.weight": rand(h, s["heads"] * d),
                    p + "mlp.gate_proj.weight": rand(s["ffn"], h), p + "mlp.up_proj.weight": rand(s["ffn"], h),
                    p + "mlp.down_proj.weight": rand(h, s["ffn"]),
                    p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                    p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not s["tie"]:
        tensors["lm_head.weight"] = rand(s["vocab"], h)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": h,
              "intermediate_size": s["ffn"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
              "num_key_value_heads": s["kv"], "head_dim": d, "vocab_size": s["vocab"], "rms_norm_eps": 1e-5,
              "rope_theta": s["theta"], "max_position_embeddings": 4096, "sliding_window": None,
              "tie_word_embeddings": s["tie"], "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------- engines
def load(engine: str, path: Path, device: str, dtype: Any = None) -> Any:
    import torch

    dtype = dtype or torch.bfloat16
    if engine.startswith("hf-"):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        if path.suffix == ".gguf":
            return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                                     device_map=device)
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device)
    from mistral_lm import BitsAndBytesConfig, MistralForCausalLM

    if path.suffix == ".gguf":
        return MistralForCausalLM.from_pretrained(path, gguf_native=True, device_map=device)
    if engine in QUANT:
        kind = QUANT[engine]
        config = (BitsAndBytesConfig(load_in_8bit=True) if kind == "int8" else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.bfloat16))
        return MistralForCausalLM.from_pretrained(path, quantization_config=config, device_map=device)
    return MistralForCausalLM.from_pretrained(path, torch_dtype=dtype, device_map=device)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Any, device: str) -> tuple[Any, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _generate(model: Any, prompt: Any, n: int) -> Any:
    import torch

    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    if out.shape[1] != prompt.shape[1] + n:
        raise RuntimeError(f"generated {out.shape[1] - prompt.shape[1]} tokens, wanted {n}")
    return out


def bench_worker(engine: str, path: Path, device: str, vocab: int) -> dict:
    import torch

    torch.manual_seed(0)
    model, load_s = _timed(lambda: load(engine, path, device).eval(), device)
    dev = next(model.parameters()).device
    ids = torch.randint(3, vocab, (BATCH, LONG), generator=torch.Generator().manual_seed(1)).to(dev)
    one, long = ids[:1, :PROMPT], ids[:1]

    def median(fn: Any, runs: int) -> float:
        return statistics.median(_timed(fn, device)[1] for _ in range(runs))

    with torch.inference_mode():
        _, first_s = _timed(lambda: _generate(model, one, 8), device)
        prefill = median(lambda: _generate(model, one, 1), 3)
        prefill_long = median(lambda: _generate(model, long, 1), 3)
        greedy, total = _timed(lambda: _generate(model, one, NEW + 1), device)
        decode = max(total - prefill, 1e-9)
        rows = ids[:, :PROMPT]
        batch_prefill = median(lambda: _generate(model, rows, 1), 2)
        batch_total = _timed(lambda: _generate(model, rows, BATCH_NEW + 1), device)[1]
    weight_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"load_s": load_s, "first_call_s": first_s, "prefill_tok_s": PROMPT / prefill,
            "prefill_long_tok_s": LONG / prefill_long, "decode_tok_s": NEW / decode,
            "batch_decode_tok_s": BATCH * BATCH_NEW / max(batch_total - batch_prefill, 1e-9),
            "weight_gb": weight_bytes / 1e9, "peak_gb": peak, "greedy": greedy[0, PROMPT:].tolist()}


def _compare(a: Any, b: Any) -> dict:
    """Max |difference| of two [batch, seq, vocab] logit tensors and their top-1 agreement."""
    a, b = a.float(), b.float()
    return {"max_abs": (a - b).abs().max().item(), "scale": b.abs().max().item(),
            "top1": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}


def numerics_worker(path: Path, device: str, vocab: int) -> dict:
    """Both engines in one process on the same folder and the same ids."""
    import torch

    ids = torch.randint(3, vocab, (2, PROMPT), generator=torch.Generator().manual_seed(2)).to(device)
    out: dict[str, Any] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        logits, greedy = {}, {}
        for engine in ("ours-" + name, "hf-" + name):
            model = load(engine, path, device, dtype).eval()
            with torch.inference_mode():
                logits[engine] = model(ids).logits.float().cpu()
                greedy[engine] = _generate(model, ids[:1], 32)[0, PROMPT:].tolist()
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        ours, hf = greedy["ours-" + name], greedy["hf-" + name]
        same = next((i for i, (x, y) in enumerate(zip(ours, hf)) if x != y), len(ours))
        out[name] = _compare(logits["ours-" + name], logits["hf-" + name]) | {"greedy_same_prefix": same}
    return out


def run_worker(args: argparse.Namespace) -> None:
    path, vocab = Path(args.path), args.vocab
    try:
        if args.worker == "numerics":
            result = numerics_worker(path, args.device, vocab)
        else:
            result = bench_worker(args.worker, path, args.device, vocab)
    except Exception as exc:  # reported as the row's error; the parent goes on with the next
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    print(json.dumps(result))


# ----------------------------------------------------------------------------- parent
def spawn(worker: str, path: Path, device: str, vocab: int, timeout: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--path", str(path),
               "--device", device, "--vocab", str(vocab)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}", "stderr": done.stderr[-3000:]}
    return json.loads(lines[-1])


def bandwidth_gb_s(device: str) -> float | None:
    """Device-to-device copy of 4 GiB, bytes read plus written, best of 5."""
    if not device.startswith("cuda"):
        return None
    import torch

    a = torch.empty(2**30, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        times.append(_timed(lambda: b.copy_(a), device)[1])
    del a, b
    return 2 * 4 * 2**30 / min(times[1:]) / 1e9


def machine(device: str) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "safetensors"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gb": props.total_memory / 2**30, "sms": props.multi_processor_count,
                 "capability": f"{props.major}.{props.minor}"}
    return info


def markdown(report: dict) -> str:
    lines = [f"Machine: {json.dumps(report['machine'])}; copy bandwidth {report.get('bandwidth_gb_s')} GB/s", ""]
    if "numerics" in report:
        lines += ["| numerics (ours vs transformers, 1B, [2, 64]) | max abs | max |logit| | top-1 | greedy same |",
                  "|---|---|---|---|---|"]
        for name, row in report["numerics"].items():
            lines.append(f"| {name} | {row['max_abs']:.3g} | {row['scale']:.3g} | {row['top1']:.4f} | "
                         f"{row['greedy_same_prefix']}/32 |" if "max_abs" in row else f"| {name} | {row} |")
        lines.append("")
    lines += ["| shape | engine | load s | first call s | prefill tok/s @64 | @512 | decode tok/s | vs hf | "
              "batch-32 decode tok/s | vs hf | % bandwidth | peak GB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bandwidth = report.get("bandwidth_gb_s")
    for shape, engines in report["rows"].items():
        med = {e: _medians(runs) for e, runs in engines.items()}
        hf = med.get("hf-bf16") or med.get("hf-gguf")
        for engine, row in med.items():
            if "error" in row:
                lines.append(f"| {shape} | {engine} | error: {row['error'][:160]} |")
                continue
            ratio = lambda key: f"{row[key] / hf[key]:.2f}x" if hf and "error" not in hf else "-"  # noqa: E731
            share = f"{100 * row['weight_gb'] * row['decode_tok_s'] / bandwidth:.0f}%" if bandwidth else "-"
            lines.append(f"| {shape} | {engine} | {row['load_s']:.2f} | {row['first_call_s']:.2f} | "
                         f"{row['prefill_tok_s']:.0f} | {row['prefill_long_tok_s']:.0f} | {row['decode_tok_s']:.1f} | "
                         f"{ratio('decode_tok_s')} | {row['batch_decode_tok_s']:.0f} | {ratio('batch_decode_tok_s')} | "
                         f"{share} | {row['peak_gb'] if row['peak_gb'] is None else round(row['peak_gb'], 2)} |")
    return "\n".join(lines) + "\n"


def _medians(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    keys = [k for k, v in good[0].items() if isinstance(v, (int, float)) and v is not None]
    return {**good[0], **{k: statistics.median(r[k] for r in good) for k in keys}, "runs": len(good)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="smollm2,1b,7b")
    parser.add_argument("--stages", default="smoke,numerics,bf16,quant,gguf")
    parser.add_argument("--runs", type=int, default=2, help="bf16 runs per engine and shape")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; stages starting later are skipped")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)

    deadline = time.monotonic() + args.budget
    left = lambda: deadline - time.monotonic()  # noqa: E731
    stages, shapes = args.stages.split(","), args.shapes.split(",")
    report: dict[str, Any] = {"machine": machine(args.device), "bandwidth_gb_s": bandwidth_gb_s(args.device), "rows": {}}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "gpu.json").write_text(json.dumps(report, indent=1))
        (args.out / "gpu.md").write_text(markdown(report))

    def log(*parts: Any) -> None:
        print(f"[{args.budget - left():6.1f} s]", *parts, flush=True)

    root = Path(tempfile.mkdtemp(prefix="bench_gpu-"))
    folders: dict[str, Path] = {}

    def folder(shape: str) -> Path:
        if shape not in folders:
            start = time.perf_counter()
            report.setdefault("checkpoint_gb", {})[shape] = write_folder(root / shape, shape, args.device) / 1e9
            folders[shape] = root / shape
            log(f"wrote {shape} in {time.perf_counter() - start:.1f} s")
        return folders[shape]

    def record(shape: str, engine: str, result: dict) -> None:
        report["rows"].setdefault(shape, {}).setdefault(engine, []).append(result)
        log(shape, engine, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()
                            if k not in ("greedy", "traceback", "stderr")})
        if "error" in result:
            log(result.get("traceback") or result.get("stderr"))
        save()

    if "smoke" in stages:
        small = folder("tiny")
        result = spawn("numerics", small, args.device, SHAPES["tiny"]["vocab"], min(left(), 120))
        report["smoke"] = result
        log("smoke", result)
        save()
        if "error" in result or result["float32"]["max_abs"] > 1e-3:
            log("ours fails on the device: stopping")
            return
    if "numerics" in stages and left() > 60:
        shape = "1b" if "1b" in SHAPES and args.device.startswith("cuda") else shapes[0]
        report["numerics"] = spawn("numerics", folder(shape), args.device, SHAPES[shape]["vocab"], min(left(), 180))
        log("numerics", report["numerics"])
        save()
    def bf16_run(run: int) -> None:
        for shape in shapes:
            for engine in ("ours-bf16", "hf-bf16") if run % 2 == 0 else ("hf-bf16", "ours-bf16"):
                if left() > 30:
                    record(shape, engine, spawn(engine, folder(shape), args.device, SHAPES[shape]["vocab"],
                                                min(left(), 240)))

    if "bf16" in stages:
        bf16_run(0)
    if "gguf" in stages and left() > 60:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_scale import write_gguf

        path = root / "1b-q4_0.gguf"
        write_gguf(path, "1b-q4_0")
        for engine in ("ours-gguf", "hf-gguf"):
            if left() > 40:
                record("1b-q4_0 gguf", engine, spawn(engine, path, args.device, SHAPES["1b"]["vocab"], min(left(), 150)))
    if "quant" in stages:
        shape = "7b" if "7b" in shapes else shapes[-1]
        for engine in QUANT:
            if left() > 60:
                record(shape, engine, spawn(engine, folder(shape), args.device, SHAPES[shape]["vocab"], min(left(), 100)))
    if "bf16" in stages:
        for run in range(1, args.runs):
            bf16_run(run)
    log("done")
    print(markdown(report))


if __name__ == "__main__":
    main()
