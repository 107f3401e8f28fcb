"""NF4 / FP4 (bitsandbytes' 4-bit formats) on the CPU: decode speed, load and quantization time, and
top-1 agreement with the float model of the dequantized weights, on the embedded default model.

    python bench/bench_nf4.py                              # ours nf4, fp4, int4 (+ bnb if importable)
    python bench/bench_nf4.py --bnb-path /tmp/bnbpkgs      # where `pip install --target` put bitsandbytes
    python bench/bench_nf4.py --runs 5 --new-tokens 64

Every engine runs in fresh worker subprocesses (2 threads, OMP_NUM_THREADS=2: bitsandbytes' CPU
library brings its own OpenMP runtime, whose default spinning threads fight torch's and make it
~250x slower), runs interleaved across engines so a busy spell on a shared machine hits all of
them; the table reports the median and the best decode rate. Decode = greedy one-token steps after a
64-token prompt, timed one by one (a streamer notes each token), three generations per worker:
the rate of the median step, and of the fastest step; the table takes medians over workers.

transformers cannot quantize a GGUF checkpoint, so the bnb worker reads a float32 safetensors copy
of the same model (written once to `--hf-dir`); its load time is that read plus bnb's quantization.

Accuracy: the top-1 agreement of each quantized model with the float32 model of its own
dequantized weights, teacher-forced over `--positions` tokens of a fixed text (the Python
reference topics that ship with the interpreter), for three settings: the recipe as
`from_pretrained` gives it (a bfloat16 model computing in bfloat16), a float32 model whose 4-bit
matmuls compute in bfloat16, and float32 compute; for ours and, where importable, for
transformers + bitsandbytes (each against its own dequantized weights). `--runs 0` measures only this.
A third row, `dense`, is bfloat16's own floor: the float model of ours' nf4 weights, no 4-bit
anywhere, in the same model and compute dtypes (its linears cast their input and weight to the
compute dtype, as a 4-bit matmul does), against the same float32 model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_perf import TokenClock  # noqa: E402

THREADS = 2
ENGINES = ("ours-nf4", "ours-fp4", "ours-int4", "bnb-nf4")
PROMPT = 64


# ----------------------------------------------------------------------------- workers
def _config(engine: str) -> Any:
    import torch

    if engine.startswith("bnb-"):
        import transformers

        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16)
    from mistral_lm import BitsAndBytesConfig

    kind = engine.removeprefix("ours-")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.bfloat16)


def _load(engine: str, hf_dir: Path) -> Any:
    import torch

    if engine.startswith("bnb-"):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=_config(engine),
                                                                 device_map="cpu", dtype=torch.bfloat16)
    from mistral_lm import MistralForCausalLM
    from mistral_lm.defaults import default_model_path

    return MistralForCausalLM.from_pretrained(default_model_path(), quantization_config=_config(engine))


def speed_worker(engine: str, hf_dir: Path, new_tokens: int) -> dict:
    """Load time, prefill rate, and decode step times of three greedy generations (after a
    warm-up): on a shared machine the median and the fastest step say more than a total."""
    import torch

    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    model = _load(engine, hf_dir).eval()
    load_s = time.perf_counter() - start
    ids = torch.arange(1000, 1000 + PROMPT)[None]
    options = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
    steps: list[float] = []
    prefill: list[float] = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **options)
        for _ in range(3):
            clock = TokenClock()
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, streamer=clock,
                                 **options)
            assert out.shape[1] == PROMPT + new_tokens + 1 and len(clock.times) == new_tokens + 2
            prefill.append(clock.times[1] - start)  # prompt forward + first token
            steps += [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
    return {"load_s": load_s, "prefill_tok_s": PROMPT / min(prefill),
            "decode_tok_s": 1 / statistics.median(steps), "best_decode_tok_s": 1 / min(steps)}


def _text_chunks(tokenizer: Any, positions: int) -> list[Any]:
    """`positions` tokens of a fixed English text (the Python reference topics that ship with the
    interpreter), as (1, 1024) id rows: the default model's context holds each at once."""
    import pydoc_data.topics
    import torch

    text = "\n\n".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text[:8 * positions])["input_ids"][:positions]
    return [torch.tensor([ids[i:i + 1024]]) for i in range(0, len(ids), 1024)]


def _top1(model: Any, reference: Any, chunks: list[Any]) -> float:
    """The fraction of positions where the two models' argmax agree, teacher-forced."""
    import torch

    agree = total = 0
    with torch.inference_mode():
        for ids in chunks:
            ours, theirs = model(input_ids=ids).logits[0].float(), reference(input_ids=ids).logits[0].float()
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += ids.shape[1]
    return agree / total


# (model dtype, compute dtype): the recipe as from_pretrained gives it (a bfloat16 model), the same
# matmuls in a float32 model (the residual stream unrounded), and float32 compute (the kernel's own numerics)
SETTINGS = (("bfloat16", "bfloat16"), ("float32", "bfloat16"), ("float32", "float32"))


def accuracy_worker(positions: int) -> dict:
    """Quantization time of the float default model, and top-1 agreement of nf4 / fp4 models with
    the float32 model of their own dequantized weights, teacher-forced over `positions` tokens,
    for each of SETTINGS. Every row runs through the decode kernel (as generated tokens do)."""
    import copy

    import torch

    from mistral_lm import AutoTokenizer, BitsAndBytesConfig, MistralForCausalLM
    from mistral_lm.defaults import default_model_path
    from mistral_lm.quantization import NF4Linear, quantize_model

    torch.set_num_threads(THREADS)
    path = default_model_path()
    chunks = _text_chunks(AutoTokenizer.from_pretrained(path), positions)
    base = MistralForCausalLM.from_pretrained(path).eval()
    NF4Linear.native_max_rows = 1 << 30  # the kernel's numerics, not the prefill path's
    result: dict[str, float] = {}
    for kind in ("nf4", "fp4"):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        quantize_model(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind))
        result[f"quantize_s_{kind}"] = time.perf_counter() - start
        for dtype, compute in SETTINGS:
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                        bnb_4bit_compute_dtype=getattr(torch, compute))
            model = MistralForCausalLM.from_pretrained(path, quantization_config=config,
                                                       dtype=getattr(torch, dtype)).eval()
            reference = copy.deepcopy(base)
            for name, module in model.named_modules():
                if isinstance(module, NF4Linear):
                    reference.get_submodule(name).weight.data = module.dequantize().float()
            result[f"top1_{kind}_{dtype}_{compute}"] = _top1(model, reference, chunks)
            if kind == "nf4":
                dense = _dense_in(reference, model, getattr(torch, dtype), getattr(torch, compute))
                result[f"top1_dense_{dtype}_{compute}"] = _top1(dense, reference, chunks)
    return result


def _dense_in(reference: Any, quantized: Any, dtype: Any, compute: Any) -> Any:
    """The float32 `reference` cast to `dtype`, each linear `quantized` has in 4 bits computing in
    `compute` (input and weight cast to it, the output cast back): what a 4-bit matmul costs in
    rounding without the 4-bit codes."""
    import copy

    import torch

    from mistral_lm.quantization import NF4Linear

    class ComputeIn(torch.nn.Module):
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(weight.to(compute), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x.to(compute), self.weight).to(x.dtype)

    dense = copy.deepcopy(reference).to(dtype)
    for name, module in quantized.named_modules():
        if isinstance(module, NF4Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(dense.get_submodule(parent), leaf, ComputeIn(reference.get_submodule(name).weight.data))
    return dense.eval()


def bnb_accuracy_worker(hf_dir: Path, positions: int) -> dict:
    """accuracy_worker's agreements for transformers + bitsandbytes, each model against the
    float32 model of bitsandbytes' own dequantized weights (from the same float32 checkpoint)."""
    import bitsandbytes
    import torch
    import transformers

    from mistral_lm import AutoTokenizer
    from mistral_lm.defaults import default_model_path

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(THREADS)
    chunks = _text_chunks(AutoTokenizer.from_pretrained(default_model_path()), positions)
    result: dict[str, float] = {}
    for kind in ("nf4", "fp4"):
        for dtype, compute in SETTINGS:
            config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind,
                                                     bnb_4bit_compute_dtype=getattr(torch, compute))
            model = transformers.AutoModelForCausalLM.from_pretrained(
                hf_dir, quantization_config=config, device_map="cpu", dtype=getattr(torch, dtype)).eval()
            reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            for name, module in model.named_modules():
                if isinstance(module, bitsandbytes.nn.Linear4bit):
                    weight = bitsandbytes.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                    reference.get_submodule(name).weight.data = weight.float()
            result[f"top1_{kind}_{dtype}_{compute}"] = _top1(model, reference, chunks)
    return result


def prepare_hf(hf_dir: Path) -> dict:
    """Write the default model as a float32 transformers checkpoint (bnb quantizes from it)."""
    import torch
    import transformers

    from mistral_lm.defaults import default_model_path

    if (hf_dir / "config.json").is_file():
        return {}
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = default_model_path()
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # "quantized with gguf": not savable as such
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.save_pretrained(hf_dir)
    return {}


# ----------------------------------------------------------------------------- parent
def spawn(args: argparse.Namespace, task: str, engine: str = "") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    if (engine.startswith("bnb-") or task in ("prepare", "bnb-accuracy")) and args.bnb_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.bnb_path, env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--engine", engine,
               "--threads", str(THREADS),
               "--hf-dir", str(args.hf_dir), "--new-tokens", str(args.new_tokens), "--positions", str(args.positions)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bnb_version(path: str | None) -> str | None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])))
    probe = subprocess.run([sys.executable, "-c", "import bitsandbytes; print(bitsandbytes.__version__)"],
                           capture_output=True, text=True, env=env, timeout=300)
    return probe.stdout.strip() if probe.returncode == 0 else None


def cpu_description() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
    return f"{model}, {os.cpu_count()} CPUs; flags: {' '.join(wanted)}"


def main(argv: list[str] | None = None) -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--positions", type=int, default=4096, help="tokens for the top-1 agreement")
    parser.add_argument("--bnb-path", default="/tmp/bnbpkgs" if Path("/tmp/bnbpkgs").is_dir() else None)
    parser.add_argument("--hf-dir", type=Path, default=Path("/tmp/mistral_lm_bench_nf4_hf"))
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    THREADS = args.threads
    if args.worker:
        result = {"speed": lambda: speed_worker(args.engine, args.hf_dir, args.new_tokens),
                  "accuracy": lambda: accuracy_worker(args.positions),
                  "bnb-accuracy": lambda: bnb_accuracy_worker(args.hf_dir, args.positions),
                  "prepare": lambda: prepare_hf(args.hf_dir)}[args.worker]()
        print(json.dumps(result), flush=True)
        return

    engines = args.engines.split(",")
    version = bnb_version(args.bnb_path)
    if version is None:
        engines = [e for e in engines if not e.startswith("bnb-")]
    elif any(e.startswith("bnb-") for e in engines):
        prepared = spawn(args, "prepare")
        if "error" in prepared:
            print(f"bnb: could not write the transformers checkpoint: {prepared['error']}")
            engines = [e for e in engines if not e.startswith("bnb-")]
    print(f"# {datetime.date.today()}  {cpu_description()}")
    print(f"# torch threads {THREADS}; bitsandbytes {version or 'not importable (compare with 19.0 tok/s, issue 13)'}")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for i in range(args.runs):
        for engine in engines:
            result = spawn(args, "speed", engine)
            runs[engine].append(result)
            print(f"run {i} {engine}: {result}", flush=True)
    accuracy = spawn(args, "accuracy") if not args.skip_accuracy else {"error": "skipped"}
    bnb_accuracy = spawn(args, "bnb-accuracy") if version and not args.skip_accuracy else {"error": "skipped"}
    print(f"accuracy: {accuracy}\nbitsandbytes accuracy: {bnb_accuracy}")

    print("\n| engine | decode tok/s (median step) | fastest step | prefill tok/s | load s |")
    print("|---|---|---|---|---|")
    for engine, results in runs.items():
        good = [r for r in results if "error" not in r]
        if not results:
            continue
        if not good:
            print(f"| {engine} | failed: {results[-1]['error']} | | | |")
            continue
        med = {k: statistics.median(r[k] for r in good) for k in good[0]}
        best = max(r["best_decode_tok_s"] for r in good)
        print(f"| {engine} | {med['decode_tok_s']:.1f} | {best:.1f} | {med['prefill_tok_s']:.0f} | {med['load_s']:.2f} |")
    if "error" not in accuracy:
        print(f"\nquantize_model to nf4 {accuracy['quantize_s_nf4']:.2f} s, fp4 {accuracy['quantize_s_fp4']:.2f} s")
        print(f"\ntop-1 agreement with the float32 model of the engine's own dequantized weights, over "
              f"{args.positions} positions of text, every row through the decode kernel:\n")
        print("| engine | format | " + " | ".join(f"{m} model, {c} compute" for m, c in SETTINGS) + " |")
        print("|---|---|" + "---|" * len(SETTINGS))
        rows = (("ours", accuracy, {"nf4": "nf4", "fp4": "fp4"}),
                ("transformers + bitsandbytes", bnb_accuracy, {"nf4": "nf4", "fp4": "fp4"}),
                ("float model of ours' nf4 weights", accuracy, {"dense": "none"}))  # key -> format column
        for engine, numbers, kinds in rows:
            for kind, label in kinds.items() if "error" not in numbers else ():
                cells = " | ".join(f"{numbers[f'top1_{kind}_{m}_{c}']:.2%}" for m, c in SETTINGS)
                print(f"| {engine} | {label} | {cells} |")


if __name__ == "__main__":
    main()
