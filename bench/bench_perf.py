"""Prefill/decode speed, load time and peak RSS of every engine on the embedded default model.

    python bench/bench_perf.py                         # full bench: 5 runs per engine (slow, quiet machine)
    python bench/bench_perf.py --quick --engines ours-fp32,hf-bf16     # smoke run
    python bench/bench_perf.py --llama-python /path/to/venv/bin/python  # where llama-cpp-python lives
    python bench/bench_perf.py --baseline /tmp/old --engines ours-bf16    # before/after a change, one run
    python bench/bench_perf.py --prompt 12 --new 256   # a short context's decode (default: 512 and 128)

The model is SmolLM2-135M-Instruct (Q4_1 GGUF), batch 1, 2 threads. Every run is a fresh worker
subprocess, so load time and peak RSS belong to that engine alone; runs are interleaved across
engines so that a slow spell on a shared machine hits all of them alike. Each worker loads the
model, makes one untimed-for-speed warm-up pass (reported as "first call s": a lazily compiled
kernel shows there, not hidden), then times a prefill of the prompt and a greedy decode of the
new tokens, prefill excluded. The table reports medians over runs and writes bench/RESULTS.md and
bench/perf.png.

`--baseline DIR` (a checkout of another commit, e.g. `git worktree add /tmp/old HEAD~3`) adds an
`ENGINE@baseline` row for every ours-* engine, run from DIR/src in the same interleaved series, so
a refactor's before/after shares one machine state.

RESULTS.md is regenerated down to the heading "## Measurements behind the code"; that section
and what follows it are kept as they are: it records the measurements that explain why code
paths exist (the code's comments keep the reasons and point here).

The llama.cpp worker runs under another interpreter (llama-cpp-python is not a dependency of
this project), so the module imports only the standard library at the top, and each worker
imports its own engine inside its function.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

THREADS = 2
REFERENCE_HF = "hf-bf16"
REFERENCE_LLAMA = "llama.cpp-q4_1"
ENGINES = ("ours-fp32", "ours-bf16", "ours-bf16+compile", "ours-int8", "ours-int4", "ours-gguf-q4_1",
           "ours-gguf-q4_1+compile", "ours-gguf-q4_1-torch",
           "hf-fp32", "hf-bf16", "llama.cpp-q4_1")
METRICS = ("load_s", "first_call_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb")
# A fixed English text, repeated and cut to the prompt length: real token ids, identical for
# every engine (the parent tokenizes it once and hands the ids to each worker).
TEXT = (
    "The harbour town wakes before the sun. Fishermen check their nets, bakers pull the first "
    "loaves from stone ovens, and the ferry to the islands sounds its horn twice. By noon the "
    "market square is full: apples from the valley, cheese from the high pastures, salt cod, "
    "rope, lamp oil and newspapers a day old. Children run between the stalls while their "
    "grandparents argue about the weather, the price of fuel and whether the new bridge will "
    "ever be finished. In the evening the wind turns, the boats come home, and the lighthouse "
    "keeper climbs the hundred and twelve steps to light the lamp. "
)
WORKER_TIMEOUT_S = 1800


# ----------------------------------------------------------------------------- worker side
def _peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM). getrusage's ru_maxrss survives exec, so a worker started
    from a parent that loaded a tokenizer or a model would report the parent's peak instead."""
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


class TokenClock:
    """A generate() streamer that notes when each put arrives: first the prompt, then each new
    token as it is picked (bench_scale.py and bench_nf4.py time decode steps with it)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _torch_loader(engine: str, model_path: Path) -> Callable[[], Any]:
    """The from_pretrained call of one torch engine, unevaluated, so the worker can time it."""
    import torch

    if engine.startswith("hf-"):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        dtype = {"hf-fp32": torch.float32, "hf-bf16": torch.bfloat16}[engine]
        # transformers 5.x names the keyword `dtype` (`torch_dtype` is deprecated there)
        return lambda: transformers.AutoModelForCausalLM.from_pretrained(
            model_path.parent, gguf_file=model_path.name, dtype=dtype)

    from mistral_lm import BitsAndBytesConfig, MistralForCausalLM

    kwargs: dict[str, Any] = {
        "ours-fp32": {},
        "ours-bf16": {"torch_dtype": torch.bfloat16},
        "ours-int8": {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)},
        "ours-int4": {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="int4")},
        "ours-gguf-q4_1": {"gguf_native": True},
        # the path taken where the C kernels cannot be built: torch's int4 kernel, bfloat16
        "ours-gguf-q4_1-torch": {"gguf_native": True},
    }[engine.removesuffix("+compile")]
    if engine == "ours-gguf-q4_1-torch":
        os.environ["MISTRAL_LM_NATIVE"] = "0"  # this worker process only; read at the first kernel use
    return lambda: MistralForCausalLM.from_pretrained(model_path, **kwargs)


def _torch_generate(model: Any, prompt: Any, new_tokens: int, **options: Any) -> None:
    """Greedy generation of exactly `new_tokens` tokens (EOS never stops it)."""
    import torch

    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0, **options)
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - prompt.shape[1]} tokens, wanted {new_tokens}")


def torch_worker(engine: str, model_path: Path, ids: list[int], new_tokens: int) -> dict:
    """One run of ours-* or hf-*: load, warm up, then prefill alone and prefill + decode.

    Prefill is generate(max_new_tokens=1): the prompt's forward into a fresh cache plus one
    argmax. Decode is generate(new_tokens + 1) minus that, i.e. exactly `new_tokens` one-token
    forwards, so the rate excludes the prefill."""
    import torch

    torch.set_num_threads(THREADS)
    load = _torch_loader(engine, model_path)
    model, load_s = _timed(lambda: load().eval())
    prompt = torch.tensor([ids], dtype=torch.long)
    # "+compile": decode steps through torch.compile; the first call below pays the compile
    options = {"compile": True} if engine.endswith("+compile") else {}
    with torch.inference_mode():
        _, first_s = _timed(lambda: _torch_generate(model, prompt, new_tokens + 1, **options))
        _, prefill_s = _timed(lambda: _torch_generate(model, prompt, 1, **options))
        _, total_s = _timed(lambda: _torch_generate(model, prompt, new_tokens + 1, **options))
    return _result(load_s, first_s, len(ids), prefill_s, new_tokens, total_s - prefill_s)


def _llama_round(llm: Any, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill s, decode s) of one greedy pass; reset() empties the KV cache, so it recomputes."""
    import numpy as np

    llm.reset()
    _, prefill_s = _timed(lambda: llm.eval(ids))

    def decode() -> None:
        for _ in range(new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])

    _, decode_s = _timed(decode)
    return prefill_s, decode_s


def llama_model(model_path: Path) -> Any:
    """llama.cpp on a GGUF file with the benches' threads and a 1024-token context. n_batch = n_ctx:
    without logits_all, llama-cpp-python keeps an (n_batch, vocab) score buffer indexed by
    absolute position, which overflows once the context passes n_batch."""
    from llama_cpp import Llama

    return Llama(model_path=str(model_path), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=1024, n_batch=1024,
                 verbose=False)


def llama_worker(model_path: Path, ids: list[int], new_tokens: int) -> dict:
    """One run of llama.cpp on the same GGUF file; needs neither torch nor mistral_lm."""
    llm, load_s = _timed(lambda: llama_model(model_path))
    if len(ids) + new_tokens > llm.n_ctx():
        raise ValueError(f"prompt + new tokens ({len(ids) + new_tokens}) exceed n_ctx {llm.n_ctx()}")
    first_s = sum(_llama_round(llm, ids, new_tokens))
    prefill_s, decode_s = _llama_round(llm, ids, new_tokens)
    return _result(load_s, first_s, len(ids), prefill_s, new_tokens, decode_s)


def _result(load_s: float, first_s: float, prompt_len: int, prefill_s: float, new_tokens: int,
            decode_s: float) -> dict:
    """One run's metrics, with the peak RSS read last (after everything was allocated)."""
    return {"load_s": load_s, "first_call_s": first_s, "prefill_tok_s": prompt_len / max(prefill_s, 1e-9),
            "decode_tok_s": new_tokens / max(decode_s, 1e-9), "peak_rss_mb": _peak_rss_mb()}


def run_worker(engine: str, model_path: str, ids_file: str, new_tokens: int) -> None:
    """Entry of a worker subprocess: its result is the last line of stdout, as JSON."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ids = json.loads(Path(ids_file).read_text())
    if engine == REFERENCE_LLAMA:
        result = llama_worker(Path(model_path), ids, new_tokens)
    else:
        result = torch_worker(engine, Path(model_path), ids, new_tokens)
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent side
def _can_import_llama(python: str) -> str | None:
    """llama-cpp-python's version under `python`, or None when it cannot be imported there."""
    try:
        probe = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                               capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if probe.returncode != 0:
        return None
    return probe.stdout.strip() or "unknown"


def resolve_llama_python(option: str | None) -> tuple[str | None, str]:
    """(interpreter for the llama.cpp worker or None, its version or why it is missing).

    Order: --llama-python, $LLAMA_CPP_PYTHON, then this interpreter if it has llama_cpp."""
    chosen = option or os.environ.get("LLAMA_CPP_PYTHON")
    candidates = [chosen] if chosen else [sys.executable]
    for python in candidates:
        version = _can_import_llama(python)
        if version is not None:
            return python, version
    where = f" under {chosen}" if chosen else " (pass --llama-python or set LLAMA_CPP_PYTHON)"
    return None, f"not installed{where}"


def prompt_ids(prompt_len: int) -> list[int]:
    """`prompt_len` ids of TEXT from our tokenizer of the default model (no BOS: all engines get
    exactly these ids)."""
    from mistral_lm import AutoTokenizer
    from mistral_lm.defaults import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    once = tokenizer(TEXT)["input_ids"]
    return (once * (prompt_len // len(once) + 1))[:prompt_len]


def _error_line(stderr: str, returncode: int) -> str:
    """The last meaningful stderr line (the exception), short enough for a table cell."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if returncode < 0:  # a crash inside native code (llama.cpp, a kernel) leaves no traceback
        status = f"killed by {signal.Signals(-returncode).name}"
        message = f"{status}: {lines[-1]}" if lines else status
    else:
        message = lines[-1] if lines else f"exit status {returncode}"
    return message.replace("|", "/")[:160]


BASELINE = "@baseline"
KEPT_SECTION = "## Measurements behind the code"


def spawn(python: str, engine: str, model_path: Path, ids_file: Path, new_tokens: int,
          baseline: Path | None = None) -> dict:
    """Run one worker in a fresh interpreter; a failure comes back as {"error": message}.
    An `ENGINE@baseline` worker imports mistral_lm from `baseline`/src instead of this checkout."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               TOKENIZERS_PARALLELISM="false")
    if engine.endswith(BASELINE):
        engine = engine.removesuffix(BASELINE)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(baseline / "src"), env.get("PYTHONPATH")]))
    command = [python, str(Path(__file__).resolve()), "--worker", engine, "--model-path", str(model_path),
               "--ids-file", str(ids_file), "--new-tokens", str(new_tokens)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    if done.returncode != 0:
        return {"error": _error_line(done.stderr, done.returncode)}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"no result on stdout: {_error_line(done.stderr, done.returncode)}"}


def run_all(engines: list[str], runs: int, pythons: dict[str, str | None], skipped: dict[str, str],
            model_path: Path, ids_file: Path, new_tokens: int, baseline: Path | None = None) -> dict[str, dict]:
    """Round-robin over engines, `runs` times; an engine that fails or is unavailable stops there.

    Returns per engine either {"runs": [result, ...]} or {"note": why there is no number}."""
    state: dict[str, dict] = {e: {"note": skipped[e]} if e in skipped else {"runs": []} for e in engines}
    for index in range(runs):
        for engine in engines:
            if "note" in state[engine]:
                continue
            print(f"[run {index + 1}/{runs}] {engine} ...", file=sys.stderr, flush=True)
            result = spawn(pythons[engine], engine, model_path, ids_file, new_tokens, baseline)
            if "error" in result or "unavailable" in result:
                kind = "error" if "error" in result else "unavailable"
                state[engine] = {"note": f"{kind}: {result[kind]}"}
            else:
                state[engine]["runs"].append(result)
    return state


def medians(state: dict[str, dict]) -> dict[str, dict]:
    """Per engine, the median of each metric over its runs (or its note)."""
    table = {}
    for engine, entry in state.items():
        if "note" in entry:
            table[engine] = {"note": entry["note"]}
        else:
            table[engine] = {m: statistics.median(r[m] for r in entry["runs"]) for m in METRICS}
            table[engine]["runs"] = [r["decode_tok_s"] for r in entry["runs"]]
    return table


def _ratio(row: dict, reference: dict | None, metric: str) -> str:
    """`row / reference` for a throughput (higher is better), or a dash when either is missing."""
    if "note" in row or reference is None or "note" in reference:
        return "-"
    return f"{row[metric] / reference[metric]:.2f}x"


def markdown_table(table: dict[str, dict]) -> str:
    """The results as a markdown table; a failed or unavailable engine shows its note."""
    header = ("| engine | load s | first call s | prefill tok/s | decode tok/s | peak RSS MB | "
              "decode vs hf-bf16 | prefill vs hf-bf16 | decode vs llama.cpp |")
    lines = [header, "|" + "---|" * 9]
    hf, llama = table.get(REFERENCE_HF), table.get(REFERENCE_LLAMA)
    for engine, row in table.items():
        if "note" in row:
            lines.append(f"| {engine} | {row['note']} |" + " |" * 7)
            continue
        lines.append(
            f"| {engine} | {row['load_s']:.2f} | {row['first_call_s']:.2f} | {row['prefill_tok_s']:.1f} | "
            f"{row['decode_tok_s']:.1f} | {row['peak_rss_mb']:.0f} | {_ratio(row, hf, 'decode_tok_s')} | "
            f"{_ratio(row, hf, 'prefill_tok_s')} | {_ratio(row, llama, 'decode_tok_s')} |")
    return "\n".join(lines)


def baseline_table(table: dict[str, dict]) -> str:
    """Before (ENGINE@baseline) against after (ENGINE), measured in the same interleaved series."""
    lines = ["| engine | decode before | decode after | after/before | prefill before | prefill after | after/before |",
             "|" + "---|" * 7]
    for engine, after in table.items():
        before = table.get(engine + BASELINE)
        if before is None or "note" in after or "note" in before:
            continue
        lines.append(
            f"| {engine} | {before['decode_tok_s']:.1f} | {after['decode_tok_s']:.1f} | "
            f"{_ratio(after, before, 'decode_tok_s')} | {before['prefill_tok_s']:.1f} | "
            f"{after['prefill_tok_s']:.1f} | {_ratio(after, before, 'prefill_tok_s')} |")
    return "\n".join(lines)


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_header(args: argparse.Namespace, llama_version: str, model_path: Path) -> str:
    """What the numbers depend on: machine, versions, date, the exact command and the workload."""
    command = "python bench/bench_perf.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    smoke = ("\n**SMOKE RUN (`--quick`): tiny workload, 1 run; not a measurement. "
             "Regenerate with `make bench` on a quiet machine.**\n" if args.quick else "")
    return "\n".join([
        "# Benchmark: prefill, decode, load time and peak RSS per engine", smoke,
        f"- command: `{command.strip()}`",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores; threads used: {THREADS}",
        f"- torch {_package_version('torch')}, transformers {_package_version('transformers')}, "
        f"llama-cpp-python {llama_version}, Python {platform.python_version()}",
        f"- model: `{model_path.name}` (embedded default), batch 1",
        f"- workload: prompt {args.prompt_len} tokens, {args.new_tokens} new tokens (greedy), "
        f"median of {args.runs} run(s), each a fresh process",
        "",
        "Throughputs are tokens/s (higher is better); ratios are engine / reference throughput. "
        "Prefill: the prompt's forward into an empty cache. Decode: the new tokens alone, prefill "
        "excluded. Load s: from the start of from_pretrained / Llama() to a usable model. First "
        "call s: the first prefill + decode after loading (one-time costs such as kernel "
        "compilation show here). Peak RSS: VmHWM of the worker process, imports included.",
        "", "",
    ])


def write_chart(table: dict[str, dict], out: Path, subtitle: str) -> Path | None:
    """Two horizontal bar panels (decode, prefill tok/s); engines without numbers read "n/a".
    None where matplotlib (the `bench` extra) is missing: the table, written before, stands alone."""
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(engines) + 1.8), sharey=True)
    for ax, metric, title in ((axes[0], "decode_tok_s", "decode tok/s"), (axes[1], "prefill_tok_s", "prefill tok/s")):
        values = [table[e].get(metric, 0.0) for e in engines]
        colors = ["tab:blue" if e.startswith("ours") else "tab:orange" if e.startswith("hf") else "tab:green"
                  for e in engines]
        bars = ax.barh(engines, values, color=colors)
        for bar, engine, value in zip(bars, engines, values):
            label = f" {value:.1f}" if "note" not in table[engine] else " n/a"
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=8)
        ax.set_title(title)
        ax.set_xlim(0, max(values + [1.0]) * 1.18)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.suptitle(f"SmolLM2-135M-Instruct Q4_1, batch 1, {THREADS} threads — {subtitle}", fontsize=10)
    fig.tight_layout()
    path = out / "perf.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=None, help="fresh processes per engine (default 5; 1 with --quick)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of: {','.join(ENGINES)}")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 run, prompt 64, 16 new tokens")
    parser.add_argument("--prompt", type=int, default=None,
                        help="prompt tokens (default 512; 64 with --quick): e.g. 12 for a short context's decode")
    parser.add_argument("--new", type=int, default=None, help="new tokens (default 128; 16 with --quick)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder for RESULTS.md and perf.png (default: bench/)")
    parser.add_argument("--llama-python", default=None,
                        help="interpreter with llama-cpp-python (default: $LLAMA_CPP_PYTHON, else this one if it has it)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout of another commit: adds ENGINE@baseline rows run from its src/")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    args.runs = args.runs if args.runs is not None else (1 if args.quick else 5)
    args.prompt_len, args.new_tokens = (64, 16) if args.quick else (512, 128)
    args.prompt_len = args.prompt if args.prompt is not None else args.prompt_len
    args.new_tokens = args.new if args.new is not None else args.new_tokens
    if args.prompt_len < 1 or args.new_tokens < 1:
        parser.error("--prompt and --new must be >= 1")
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engine_list if e not in ENGINES]
    if unknown or args.runs < 1:
        parser.error(f"unknown engines {unknown} (known: {', '.join(ENGINES)})" if unknown else "--runs must be >= 1")
    if args.baseline is not None:
        if not (args.baseline / "src" / "mistral_lm").is_dir():
            parser.error(f"--baseline {args.baseline} has no src/mistral_lm")
        args.engine_list = [name for e in args.engine_list
                            for name in ((e, e + BASELINE) if e.startswith("ours") else (e,))]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker, args.model_path, args.ids_file, args.new_tokens)
        return

    from mistral_lm.defaults import default_model_path

    model_path = default_model_path()
    llama_python, llama_version = (resolve_llama_python(args.llama_python) if REFERENCE_LLAMA in args.engine_list
                                   else (None, "not benchmarked"))
    pythons = {e: (llama_python if e == REFERENCE_LLAMA else sys.executable) for e in args.engine_list}
    skipped = {REFERENCE_LLAMA: llama_version} if REFERENCE_LLAMA in args.engine_list and llama_python is None else {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp, "ids.json")
        ids_file.write_text(json.dumps(prompt_ids(args.prompt_len)))
        state = run_all(args.engine_list, args.runs, pythons, skipped, model_path, ids_file, args.new_tokens,
                        args.baseline)
    table = medians(state)
    report = machine_header(args, llama_version, model_path) + markdown_table(table) + "\n"
    report += "\nDecode tok/s of each run: " + "; ".join(
        f"{e}: {', '.join(f'{v:.1f}' for v in row['runs'])}" for e, row in table.items() if "runs" in row) + "\n"
    if args.baseline is not None:
        report += f"\n## Before and after (baseline: `{args.baseline}`)\n\n" + baseline_table(table) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "RESULTS.md"
    old = results.read_text(encoding="utf-8") if results.exists() else ""
    if KEPT_SECTION in old:  # hand-kept measurements: not ours to regenerate
        report += "\n" + old[old.index(KEPT_SECTION):]
    results.write_text(report, encoding="utf-8")
    chart = write_chart(table, args.out, "smoke run" if args.quick else f"median of {args.runs} runs")
    print(markdown_table(table))
    print(f"\nwrote {args.out / 'RESULTS.md'}" + (f" and {chart}" if chart else
                                                   " (no chart: matplotlib, the `bench` extra, is not installed)"))


if __name__ == "__main__":
    main()
