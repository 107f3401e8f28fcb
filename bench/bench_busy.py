"""Decode on a busy machine: the default model while another process keeps one core busy.

    python bench/bench_busy.py                    # quiet and busy, ours and llama.cpp, 3 runs
    python bench/bench_busy.py --runs 5 --new 128 --llama-python /path/to/venv/bin/python

A laptop running a browser or a build has fewer free cores than it has cores. A decode step split
over threads waits at every barrier for its slowest thread, so one thread descheduled for a
scheduler slice stalls the whole step. The fused step counts how often its threads slept at its
barriers and runs the next steps on fewer threads while that happens (fused_step.Threads). This
bench measures greedy decode of the embedded default model (GGUF blocks, the CLI's path) with
2 threads and 1, quiet and with a busy-loop process beside it, for:

- `ours`: the default, threads adapted;
- `ours-fixed`: the same with the adaptation switched off (every step on the asked threads);
- `llama.cpp`: llama-cpp-python on the same file (when importable).

Each run is a fresh worker process; engines alternate. Prints a markdown table of the median
decode tok/s (the rate over all steps after the first token) per engine, threads and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_perf import TokenClock, _error_line, _llama_round, _timed, resolve_llama_python  # noqa: E402

HOG = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


def ours_worker(engine: str, path: Path, threads: int, prompt: int, new_tokens: int) -> dict:
    import torch

    from mistral_lm import MistralForCausalLM, fused_step

    torch.set_num_threads(threads)
    if engine == "ours-fixed":
        fused_step.Threads.update = lambda self, *args: None  # type: ignore[method-assign]
    model = MistralForCausalLM.from_pretrained(path, gguf_native=True)
    ids = torch.arange(1000, 1000 + prompt)[None]
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, do_sample=False)
        clock = TokenClock()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       eos_token_id=None, pad_token_id=0, streamer=clock)
    steps = clock.times[-1] - clock.times[1]
    return {"decode_tok_s": (len(clock.times) - 2) / steps}


def llama_worker(path: Path, threads: int, prompt: int, new_tokens: int) -> dict:
    from llama_cpp import Llama

    llm, _ = _timed(lambda: Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                                  n_ctx=1024, n_batch=1024, verbose=False))
    ids = list(range(1000, 1000 + prompt))
    _llama_round(llm, ids, 8)
    _, decode_s = _llama_round(llm, ids, new_tokens)
    return {"decode_tok_s": new_tokens / decode_s}


def spawn(python: str, engine: str, threads: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [python, str(Path(__file__).resolve()), "--worker", engine, "--model-path", str(args.model_path),
               "--threads", str(threads),
               "--prompt", str(args.prompt), "--new", str(args.new)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        return {"error": _error_line(done.stderr, done.returncode)}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=96)
    parser.add_argument("--engines", default="ours,ours-fixed,llama.cpp")
    parser.add_argument("--llama-python", help="an interpreter that can import llama_cpp")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (llama_worker(args.model_path, args.threads, args.prompt, args.new) if args.worker == "llama.cpp"
                  else ours_worker(args.worker, args.model_path, args.threads, args.prompt, args.new))
        print(json.dumps(result))
        return
    from mistral_lm.defaults import default_model_path

    args.model_path = default_model_path()
    llama_python, llama_version = resolve_llama_python(args.llama_python)
    engines = [e for e in args.engines.split(",") if e and (e != "llama.cpp" or llama_python)]
    rates: dict[tuple[str, int, str], list[float]] = {}
    for load in ("quiet", "busy"):
        hog = subprocess.Popen([sys.executable, "-c", HOG.format(seconds=3600)]) if load == "busy" else None
        try:
            time.sleep(0.5)
            for run in range(args.runs):
                for engine in engines:
                    for threads in (2, 1):
                        python = llama_python if engine == "llama.cpp" else sys.executable
                        result = spawn(python, engine, threads, args)  # type: ignore[arg-type]
                        print(f"[{load} run {run + 1}/{args.runs}] {engine} {threads} thread(s): {result}",
                              file=sys.stderr, flush=True)
                        if "error" not in result:
                            rates.setdefault((engine, threads, load), []).append(result["decode_tok_s"])
        finally:
            if hog is not None:
                hog.kill()
    print(f"Default model, {args.prompt}-token prompt, {args.new} new tokens, median of {args.runs} runs; "
          f"{os.cpu_count()} CPUs; busy = one busy-loop process beside the worker; llama.cpp {llama_version}.\n")
    print("| engine | threads | quiet decode tok/s | busy decode tok/s | busy / quiet |")
    print("|---|---|---|---|---|")
    for engine in engines:
        for threads in (2, 1):
            quiet, busy = (statistics.median(rates.get((engine, threads, load)) or [float("nan")])
                           for load in ("quiet", "busy"))
            print(f"| {engine} | {threads} | {quiet:.1f} | {busy:.1f} | {busy / quiet:.2f} |")


if __name__ == "__main__":
    main()
