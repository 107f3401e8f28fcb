"""Load, prefill and decode of Mistral-shaped GGUFs at the sizes users run (1B, 7B), ours vs llama.cpp.

    python bench/bench_scale.py                                   # 1B and 7B Q4_0, 1 run each (~20 min)
    python bench/bench_scale.py --paired-rounds 0                 # without the in-turns decode
    python bench/bench_scale.py --files 1b-q4_0,1b-q4_k --runs 3
    python bench/bench_scale.py --files 7b-q4_0 --baseline /tmp/old   # before/after: /tmp/old/src's mistral_lm
    python bench/bench_scale.py --llama-python /path/to/venv/bin/python

Each file is written with the `gguf` package into a temporary folder (random blocks with small
scales; one file at a time, deleted when its rows are done): `1b` is hidden 2048, 16 layers,
32/8 heads, ffn 5632; `7b` hidden 4096, 32 layers, 32/8 heads, ffn 14336; vocab 32000; `-sw`
adds `sliding_window` 4096 (the ring-buffer cache should cost nothing). The type is one ggml type
for every matrix (q4_0, q4_k, q6_k, ...) or `q4_k_m`, llama.cpp's most downloaded mix: Q4_K, with
Q6_K for the head and for `attn_v` and `ffn_down` in the layers llama.cpp gives more bits. Every run is a fresh
worker process, engines alternate, and no two workers run at once. Engines:

- `ours`: `from_pretrained(path, gguf_native=True)`, the CLI's default; its first run builds the
  kernel cache beside the file and is reported on its own row ("first load"), later runs map it;
- `ours-unfused`: the same with `fuse_projections=False`;
- `ours@baseline`: `ours` imported from `--baseline DIR/src` (a checkout of another commit);
- `llama.cpp`: llama-cpp-python under `--llama-python` (or $LLAMA_CPP_PYTHON), when importable.

Per run: load s (the constructor), first call s (the first greedy generate: mapped pages fault
in there), prefill tok/s (a `--prompt`-token forward into a fresh cache, and a second one of
`--long-prompt` tokens), decode tok/s (`--new` one-token steps), peak RSS (VmHWM of the worker, so it includes torch's own ~0.3 GB). Before every
worker the machine's read bandwidth is probed with 2 threads (a 1 GiB float32 sum, median of 7),
and each row reports the fraction of its own probes that decode streams: bytes of the quantized
matrices read per token (every GGUFLinear's storage, counted once; llama.cpp: the file's tensors
but the embedding) times decode tok/s. Below the table, each file's decode ceiling: how many
times llama.cpp's decode a read at the probed bandwidth would be. Results go to stdout, to the "## Scale" section of bench/RESULTS.md, which
this script owns (bench_perf.py regenerates the file only above its kept section), and to the
chart bench/scale.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_perf import (THREADS, WORKER_TIMEOUT_S, TokenClock, _error_line, _llama_round,  # noqa: E402
                        _peak_rss_mb, _timed, llama_model, resolve_llama_python)

SHAPES = {"1b": dict(hidden=2048, layers=16, heads=32, kv=8, ffn=5632, vocab=32000),
          "7b": dict(hidden=4096, layers=32, heads=32, kv=8, ffn=14336, vocab=32000)}
SECTION = "## Scale: Mistral-shaped GGUFs (bench/bench_scale.py)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CACHE_SUFFIX = ".mistral_lm-cache"
PAIRED = "ours and llama.cpp in turns"  # results' key of paired_worker's one run


# ----------------------------------------------------------------------------- files
def write_gguf(path: Path, name: str) -> int:
    """Write the file `name` (e.g. 7b-q4_0, 7b-q4_0-sw) tensor by tensor; returns its size."""
    import gguf
    import numpy as np

    shape_name, qtype_name, *rest = name.split("-")
    s = SHAPES[shape_name]
    types = _mix(qtype_name, s["layers"])
    h, ff, v, d = s["hidden"], s["ffn"], s["vocab"], s["hidden"] // s["heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(32768)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(ff)
    writer.add_block_count(s["layers"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(d)
    if "sw" in rest:
        writer.add_sliding_window(4096)
    writer.add_tokenizer_model("llama")  # a placeholder SentencePiece vocabulary llama.cpp accepts
    writer.add_token_list(["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)),
                           *(f"t{i}" for i in range(v - 259))])
    writer.add_token_scores([0.0] * v)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (v - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    tensors = [("token_embd.weight", (v, h)), ("output_norm.weight", (h,)), ("output.weight", (v, h))]
    for i in range(s["layers"]):
        tensors += [(f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.ffn_norm.weight", (h,)),
                    (f"blk.{i}.attn_q.weight", (h, h)), (f"blk.{i}.attn_k.weight", (s["kv"] * d, h)),
                    (f"blk.{i}.attn_v.weight", (s["kv"] * d, h)), (f"blk.{i}.attn_output.weight", (h, h)),
                    (f"blk.{i}.ffn_gate.weight", (ff, h)), (f"blk.{i}.ffn_up.weight", (ff, h)),
                    (f"blk.{i}.ffn_down.weight", (h, ff))]
    for tensor, shape in tensors:
        if len(shape) == 1:
            writer.add_tensor_info(tensor, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            block, size = gguf.GGML_QUANT_SIZES[types(tensor)]
            nbytes = shape[0] * shape[1] // block * size
            writer.add_tensor_info(tensor, (shape[0], nbytes // shape[0]), np.dtype(np.uint8), nbytes,
                                   raw_dtype=types(tensor))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for tensor, shape in tensors:
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, np.float32))
            continue
        qtype = types(tensor)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
        scale = (rng.standard_normal(blocks.shape[:2]) * 0.004).astype(np.float16)
        at = size - 2 if qtype == gguf.GGMLQuantizationType.Q6_K else 0  # Q6_K's d ends its block
        blocks[..., at:at + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
        if qtype == gguf.GGMLQuantizationType.Q4_K:  # dmin; the 12 sub-block scale bytes stay random
            blocks[..., 2:4] = (np.abs(scale) / 2).astype(np.float16).view(np.uint8).reshape(*blocks.shape[:2], 2)
        if qtype == gguf.GGMLQuantizationType.Q6_K:  # the 16 int8 sub-block scales: small, as a quantizer's
            blocks[..., 192:208] = rng.integers(-32, 32, (*blocks.shape[:2], 16), dtype=np.int8).view(np.uint8)
        writer.write_tensor_data(blocks.reshape(shape[0], -1))
    writer.close()
    return path.stat().st_size


def _mix(type_name: str, layers: int) -> Any:
    """tensor name -> its ggml type: one type for all, or (`q4_k_m`) llama.cpp's Q4_K_M choice,
    Q6_K for the head and for `attn_v` / `ffn_down` in the first and last eighth of the layers
    and every third one between (llama.cpp's `use_more_bits`), Q4_K elsewhere."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    if type_name.lower() != "q4_k_m":
        return lambda tensor: kinds[type_name.upper()]

    def more_bits(i: int) -> bool:
        return i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2

    def choose(tensor: str) -> Any:
        if tensor == "output.weight":
            return kinds.Q6_K
        parts = tensor.split(".")
        if parts[0] == "blk" and parts[2] in ("attn_v", "ffn_down") and more_bits(int(parts[1])):
            return kinds.Q6_K
        return kinds.Q4_K
    return choose


# ----------------------------------------------------------------------------- workers
def _greedy(model: Any, prompt: Any, n: int) -> TokenClock:
    """`n` greedy tokens after `prompt`, timed: times[0] the call, times[1] the prefill's token,
    then one per decode step."""
    import torch

    clock = TokenClock()
    start = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, eos_token_id=None, pad_token_id=0, streamer=clock)
    if out.shape[1] != prompt.shape[1] + n:
        raise RuntimeError(f"generated {out.shape[1] - prompt.shape[1]} tokens, wanted {n}")
    clock.times[0] = start
    return clock


def ours_worker(engine: str, path: Path, ids: list[int], long_ids: list[int], new_tokens: int) -> dict:
    import torch

    from mistral_lm import MistralForCausalLM
    from mistral_lm.quantization import GGUFLinear

    torch.set_num_threads(THREADS)
    fuse = engine != "ours-unfused"
    model, load_s = _timed(lambda: MistralForCausalLM.from_pretrained(path, gguf_native=True, fuse_projections=fuse))
    storages = {}
    for module in model.modules():
        if isinstance(module, GGUFLinear):
            for tensor in module.buffers(recurse=False):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        _, first_s = _timed(lambda: _greedy(model, prompt, new_tokens + 1))
        timed = _greedy(model, prompt, new_tokens + 1)
        long = _greedy(model, torch.tensor([long_ids]), 1) if long_ids else None
    prefill_s, decode_s = timed.times[1] - timed.times[0], timed.times[-1] - timed.times[1]
    long_tok_s = len(long_ids) / (long.times[1] - long.times[0]) if long else None
    return _result(load_s, first_s, len(ids) / prefill_s, new_tokens / decode_s, sum(storages.values()), long_tok_s)


def paired_worker(path: Path, ids: list[int], new_tokens: int, rounds: int) -> dict:
    """Both engines in one process, decoding in turns: each round times `new_tokens` greedy steps
    of ours and of llama.cpp after the same prompt, the order swapped every round, so both see the
    same state of the host's bus (which moves 26-52 GB/s between fresh workers). The ratio is the
    median of the rounds' own ratios. llama_cpp comes from the --llama-python interpreter's
    site-packages, appended to the path (this interpreter's numpy and jinja2 come first)."""
    import torch

    from mistral_lm import MistralForCausalLM

    sys.path.append(os.environ["LLAMA_CPP_SITE"])
    torch.set_num_threads(THREADS)
    model = MistralForCausalLM.from_pretrained(path, gguf_native=True)
    llm = llama_model(path)
    prompt = torch.tensor([ids])

    def ours() -> float:
        with torch.inference_mode():
            clock = _greedy(model, prompt, new_tokens + 1)
        return new_tokens / (clock.times[-1] - clock.times[1])

    def llama() -> float:
        return new_tokens / _llama_round(llm, ids, new_tokens)[1]

    ours(), llama()  # pages mapped in, caches made
    rates: dict[str, list[float]] = {"ours": [], "llama.cpp": []}
    for index in range(rounds):
        for name, run in ([("ours", ours), ("llama.cpp", llama)] if index % 2 == 0 else
                          [("llama.cpp", llama), ("ours", ours)]):
            rates[name].append(run())
    ratios = [a / b for a, b in zip(rates["ours"], rates["llama.cpp"])]
    return {"ours_tok_s": statistics.median(rates["ours"]), "llama_tok_s": statistics.median(rates["llama.cpp"]),
            "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios), "rounds": rounds}


def _llama_worker(path: Path, ids: list[int], long_ids: list[int], new_tokens: int) -> dict:
    llm, load_s = _timed(lambda: llama_model(path))
    first_s = sum(_llama_round(llm, ids, new_tokens))
    prefill_s, decode_s = _llama_round(llm, ids, new_tokens)
    long_tok_s = len(long_ids) / _llama_round(llm, long_ids, 0)[0] if long_ids else None
    return _result(load_s, first_s, len(ids) / prefill_s, new_tokens / decode_s, None, long_tok_s)


def _result(load_s: float, first_s: float, prefill: float, decode: float, weight_bytes: int | None,
            long_prefill: float | None) -> dict:
    return {"load_s": load_s, "first_call_s": first_s, "prefill_tok_s": prefill, "decode_tok_s": decode,
            "peak_rss_gb": _peak_rss_mb() / 1024, "weight_bytes": weight_bytes, "long_prefill_tok_s": long_prefill}


def bandwidth_worker() -> dict:
    """GB/s of a 2-thread read of 1 GiB (float32 sum), the median of 7 after a warm-up."""
    import torch

    torch.set_num_threads(THREADS)
    x = torch.ones(2**28)
    x.sum()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return {"read_gb_s": x.nbytes / statistics.median(times) / 1e9,
            "best_gb_s": x.nbytes / min(times) / 1e9}


# ----------------------------------------------------------------------------- parent side
def spawn(python: str, args: list[str], pythonpath: str | None = None, env: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), **(env or {}))
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    try:
        done = subprocess.run([python, str(Path(__file__).resolve()), "--worker", *args], capture_output=True,
                              text=True, env=env, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    if done.returncode != 0:
        return {"error": _error_line(done.stderr, done.returncode)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def tensor_bytes_but_embedding(path: Path) -> int:
    """What llama.cpp reads per decoded token: every tensor but the embedding (one row of it)."""
    from mistral_lm.checkpoints.gguf import read_gguf

    file = read_gguf(path)
    try:
        return sum(info.nbytes for name, info in file.tensors.items() if name != "token_embd.weight")
    finally:
        file.buffer.close()


def cpu_description() -> tuple[str, str]:
    """(model name, the SIMD flags that matter here) from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), "?"
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = [f for f in info.get("flags", "").split() if f.startswith(("avx", "amx", "fma", "f16c", "vnni"))]
    return info.get("model name", "?"), " ".join(sorted(flags))


def _on_the_bus(run: Any, bandwidths: list[float]) -> dict:
    """`run()`'s result with `bus_gb_s`, the read bandwidth probed just before it: this host's
    bus moves with its neighbours (26-52 GB/s within one run), so a decode's share of the bus is
    taken against the probe next to it, not against the run's median."""
    bus = spawn(sys.executable, ["bandwidth"]).get("read_gb_s")
    if bus is not None:
        bandwidths.append(bus)
    result = run()
    return result if "error" in result else {**result, "bus_gb_s": bus}


def _site_of_llama_cpp(llama_python: str) -> str | None:
    """The site-packages folder that holds llama_cpp for `llama_python`."""
    done = subprocess.run([llama_python, "-c", "import llama_cpp, os; print(os.path.dirname(os.path.dirname("
                           "llama_cpp.__file__)))"], capture_output=True, text=True)
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def bench_file(name: str, folder: Path, engines: list[str], runs: int, ids: dict[str, list[int]], new_tokens: int,
               llama_python: str | None, baseline: Path | None, bandwidths: list[float], paired_rounds: int = 0
               ) -> tuple[int, int, dict[str, list[dict]]]:
    path = folder / f"{name}.gguf"
    print(f"writing {name} ...", file=sys.stderr, flush=True)
    size = write_gguf(path, name)
    ids_file = folder / "ids.json"
    ids_file.write_text(json.dumps(ids))
    common = ["--model-path", str(path), "--ids-file", str(ids_file), "--new-tokens", str(new_tokens)]
    results: dict[str, list[dict]] = {e: [] for e in engines}
    if "ours" in engines:
        results["ours, first load"] = []
    try:
        for index in range(runs):
            for engine in engines:
                label = "ours, first load" if engine == "ours" and index == 0 else engine
                print(f"[{name} run {index + 1}/{runs}] {label} ...", file=sys.stderr, flush=True)
                if engine == "llama.cpp":
                    result = _on_the_bus(lambda: spawn(llama_python, ["llama.cpp", *common]) if llama_python
                                         else {"error": "not installed"}, bandwidths)
                elif engine.endswith("@baseline"):
                    result = _on_the_bus(lambda: spawn(sys.executable, ["ours", *common], str(baseline / "src")),
                                         bandwidths)
                else:
                    result = _on_the_bus(lambda: spawn(sys.executable, [engine, *common]), bandwidths)
                results[label].append(result)
                if engine == "ours" and index == 0:  # the cache's first user
                    results["ours"].append(_on_the_bus(lambda: spawn(sys.executable, [engine, *common]), bandwidths))
        if paired_rounds and "ours" in engines and "llama.cpp" in engines and llama_python:
            print(f"[{name}] ours and llama.cpp in turns, one process ...", file=sys.stderr, flush=True)
            site = _site_of_llama_cpp(llama_python)
            results[PAIRED] = [spawn(sys.executable, ["paired", *common, "--rounds", str(paired_rounds)],
                                       env={"LLAMA_CPP_SITE": site}) if site else {"error": "llama_cpp not found"}]
        return size, tensor_bytes_but_embedding(path), results
    finally:
        for leftover in folder.glob(f"{name}.gguf*"):
            leftover.unlink()


def _streamed_gb_s(row: dict, llama_bytes: int) -> float:
    """GB/s of weights a row's decode reads: its own weight bytes (llama.cpp: the file's tensors
    but the embedding) per token times tok/s."""
    return (row["weight_bytes"] or llama_bytes) * row["decode_tok_s"] / 1e9


def table(rows: dict[str, tuple[int, int, dict[str, list[dict]]]], bandwidth: float, prompt: int, long: int) -> str:
    lines = [f"| file | engine | load s | first call s | prefill tok/s ({prompt}) | vs llama.cpp | prefill tok/s "
             f"({long}) | vs llama.cpp | decode tok/s | vs llama.cpp | peak RSS GB | RSS / file | decode GB/s "
             "| bus GB/s | % of bus |", "|" + "---|" * 15]

    def versus(row: dict, llama: dict | None, key: str) -> str:
        return f"{row[key] / llama[key]:.2f}x" if llama and row.get(key) and llama.get(key) else "-"

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for name, (size, llama_bytes, results) in rows.items():
        llama = _median(results.get("llama.cpp", []))
        for engine, runs in results.items():
            if engine == PAIRED:
                continue
            row = _median(runs)
            if row is None:
                error = next((r["error"] for r in runs if "error" in r), "no run")
                lines.append(f"| {name} ({size / 1e9:.2f} GB) | {engine} | {error} |" + " |" * 12)
                continue
            streamed = _streamed_gb_s(row, llama_bytes)
            bus = row.get("bus_gb_s") or bandwidth
            lines.append(
                f"| {name} ({size / 1e9:.2f} GB) | {engine} | {row['load_s']:.2f} | {row['first_call_s']:.1f} | "
                f"{row['prefill_tok_s']:.1f} | {versus(row, llama, 'prefill_tok_s')} | "
                f"{rate(row.get('long_prefill_tok_s'))} | {versus(row, llama, 'long_prefill_tok_s')} | "
                f"{row['decode_tok_s']:.2f} | {versus(row, llama, 'decode_tok_s')} | {row['peak_rss_gb']:.2f} | "
                f"{row['peak_rss_gb'] * 2**30 / size:.2f} | {streamed:.1f} | {bus:.1f} | {100 * streamed / bus:.0f}% |")
    return "\n".join(lines)


def ceilings(rows: dict[str, tuple[int, int, dict[str, list[dict]]]], bandwidth: float) -> list[str]:
    """Per file, how far any engine could pass llama.cpp's decode on this bus: a token reads its
    weights once, so decode tok/s is at most bandwidth / bytes per token, and a ratio to llama.cpp
    is at most bandwidth / llama.cpp's own GB/s. A goal above that asks to read faster than the
    machine's memory does."""
    lines = []
    for name, (_, llama_bytes, results) in rows.items():
        llama, ours = _median(results.get("llama.cpp", [])), _median(results.get("ours", []))
        if llama is None or ours is None:
            continue
        llama_gb_s, ours_gb_s = _streamed_gb_s(llama, llama_bytes), _streamed_gb_s(ours, llama_bytes)
        llama_bus, ours_bus = llama.get("bus_gb_s") or bandwidth, ours.get("bus_gb_s") or bandwidth
        lines.append(f"- {name}: llama.cpp streams {100 * llama_gb_s / llama_bus:.0f}% of the bus probed beside it and "
                     f"ours {100 * ours_gb_s / ours_bus:.0f}%; decoding at that bus would be "
                     f"{llama_bus / llama_gb_s:.2f}x llama.cpp (ours: {ours['decode_tok_s'] / llama['decode_tok_s']:.2f}x).")
    return lines


def paired_lines(rows: dict[str, tuple[int, int, dict[str, list[dict]]]]) -> list[str]:
    """Per file, the decode of both engines taken in turns in one process (paired_worker)."""
    lines = []
    for name, (_, _, results) in rows.items():
        for run in results.get(PAIRED, []):
            if "error" in run:
                lines.append(f"- {name}: {run['error']}")
            else:
                lines.append(f"- {name}: ours {run['ours_tok_s']:.2f} tok/s, llama.cpp {run['llama_tok_s']:.2f} tok/s; "
                             f"**{run['ratio']:.2f}x** (median of {run['rounds']} rounds' ratios, "
                             f"{run['low']:.2f}-{run['high']:.2f}x).")
    return lines


def write_chart(rows: dict[str, tuple[int, int, dict[str, list[dict]]]], subtitle: str) -> Path | None:
    """bench/scale.png: decode and prefill tok/s per file, each engine beside llama.cpp (the
    section's table as bars); None where matplotlib (the `bench` extra) is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = {name: {e: _median(runs) for e, runs in results.items() if e != PAIRED}
               for name, (_, _, results) in rows.items()}
    engines = sorted({e for per in medians.values() for e in per}, key=lambda e: (e == "llama.cpp", e))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(engines), 1)
    for ax, metric, label in zip(axes, ("decode_tok_s", "prefill_tok_s"), ("decode tok/s", "prefill tok/s")):
        for i, engine in enumerate(engines):
            values = [(medians[n].get(engine) or {}).get(metric) or 0.0 for n in medians]
            bars = ax.bar([x + i * width for x in range(len(medians))], values, width, label=engine)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(medians))], list(medians))
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Mistral-shaped GGUFs, ours vs llama.cpp ({subtitle})", fontsize=10)
    fig.tight_layout()
    path = RESULTS.parent / "scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _median(runs: list[dict]) -> dict | None:
    good = [r for r in runs if "error" not in r]
    if not good:
        return None
    return {k: (statistics.median(r[k] for r in good) if good[0][k] is not None else None) for k in good[0]}


def write_section(text: str) -> None:
    """Replace this script's section of RESULTS.md (from its heading to the next '## ' heading or
    the end), or append it at the end, below the kept sections bench_perf.py leaves alone."""
    current = RESULTS.read_text() if RESULTS.exists() else ""
    if SECTION in current:
        head, rest = current.split(SECTION, 1)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        current = head.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n" + tail
    else:
        current = current.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    RESULTS.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default="1b-q4_0,7b-q4_0", help="comma list of SHAPE-TYPE[-sw], e.g. 7b-q4_k-sw")
    parser.add_argument("--engines", default="ours,ours-unfused,llama.cpp")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--long-prompt", type=int, default=512, help="a second prefill of this many ids (0: none)")
    parser.add_argument("--paired-rounds", type=int, default=8,
                        help="rounds of ours and llama.cpp decoding in turns in one process, per file (0: none)")
    parser.add_argument("--rounds", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", type=Path, help="another checkout; adds ours@baseline (its src/ first on the path)")
    parser.add_argument("--llama-python", help="an interpreter that can import llama_cpp")
    parser.add_argument("--folder", type=Path, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--worker", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "bandwidth":
            print(json.dumps(bandwidth_worker()))
            return
        ids = json.loads(args.ids_file.read_text())
        if args.worker == "paired":
            print(json.dumps(paired_worker(args.model_path, ids["prompt"], args.new_tokens, args.rounds)))
        elif args.worker == "llama.cpp":
            print(json.dumps(_llama_worker(args.model_path, ids["prompt"], ids["long"], args.new_tokens)))
        else:
            print(json.dumps(ours_worker(args.worker, args.model_path, ids["prompt"], ids["long"], args.new_tokens)))
        return
    engines = [e for e in args.engines.split(",") if e] + (["ours@baseline"] if args.baseline else [])
    llama_python, llama_version = resolve_llama_python(args.llama_python)
    import random

    ids = {"prompt": [random.Random(0).randrange(3, 32000) for _ in range(args.prompt)],
           "long": [random.Random(1).randrange(3, 32000) for _ in range(args.long_prompt)]}
    rows = {}
    bandwidths = []
    if args.folder:
        Path(args.folder).mkdir(parents=True, exist_ok=True)  # a folder named on the command line is made
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        for name in [f for f in args.files.split(",") if f]:
            rows[name] = bench_file(name, Path(tmp), engines, args.runs, ids, args.new, llama_python,
                                    args.baseline, bandwidths, args.paired_rounds)
    bandwidth = statistics.median(bandwidths)
    model, flags = cpu_description()
    text = "\n".join([
        SECTION, "",
        f"Measured {datetime.date.today().isoformat()} on {model} ({os.cpu_count()} CPUs visible, {THREADS} threads "
        f"used), flags: {flags}. Python {platform.python_version()}; llama.cpp: {llama_version}. "
        f"Prompt {args.prompt} random ids (and a second prefill of {args.long_prompt}), {args.new} new tokens, median of {args.runs} run(s) per engine, each "
        f"a fresh process. 2-thread read bandwidth, probed before every worker: median {bandwidth:.1f} GB/s "
        f"({min(bandwidths):.1f}-{max(bandwidths):.1f}); `bus GB/s` is the median of a row's own probes.",
        "",
        table(rows, bandwidth, args.prompt, args.long_prompt), "",
        "Decode's ceiling on this bus:", "", *ceilings(rows, bandwidth), "",
        *(["Decode in turns: both engines in one process, the same prompt, greedy steps timed round by "
           "round with the order swapped each round (the pairs see the same bus):", "", *paired, ""]
          if (paired := paired_lines(rows)) else []),
        "`first load` builds the kernel cache beside the file (once per file); the other `ours` runs map it. "
        "`first call s` is the first generate (prefill + new tokens) after loading, when mapped pages are "
        "read in. RSS / file is the worker's peak RSS (torch and the interpreter included) over the file's "
        "size. The chart `scale.png` shows the same medians. Regenerate with `python bench/bench_scale.py` "
        "(see its docstring for options).", "", "![scale](scale.png)", ""])
    print(text)
    if not args.no_write:
        write_section(text)
        write_chart(rows, f"prompt {args.prompt}, {args.new} new tokens, median of {args.runs} runs")


if __name__ == "__main__":
    main()
