"""Server throughput at 1, 8 and 32 concurrent streaming clients, plain, with logprobs and under a JSON
schema, and the prefix cache's effect on a chat's second turn, same model, one run.

The server runs in its own process (so the clients' JSON parsing does not share its GIL) on
127.0.0.1; clients stream /v1/completions with temperature 0 (`--temperature` to sample) and
count the tokens that `usage` reports. Continuous batching should make the 32-client total
several times the one-client rate: a decode step for 32 rows costs far less than 32 steps of
one row. `logprobs: 5` adds a log-softmax and a top-5 per token and the per-token JSON; the
schema phase streams chat answers under `response_format` json_schema, so each step also pays
the grammar's mask (grammar.py).

Turn-2 time to first token: a chat whose first user message makes a ~1,450-token prompt, its
answer, then a short second question (a ~1,500-token history). Measured as the latency of
`max_tokens: 1` (prefill + first token), median over documents never seen before: turn 1, turn 2
(the history's first prompt is in the prefix cache) and a cold read of the same turn-2 prompt.

    python bench/bench_server.py                  # the packaged SmolLM2-135M (or a random model without it)
    python bench/bench_server.py --model PATH     # any folder or .gguf
    python bench/bench_server.py --random         # a random 4-layer Mistral, no download needed
    python bench/bench_server.py --llama-python /path/to/venv/bin/python   # llama.cpp as the reference

With `--llama-python` (a GGUF model), the same run measures llama.cpp at one stream on the same
prompt ids and token count, in process (bench_perf.py's worker, before the server starts and after
it stops), and through llama-cpp-python's own OpenAI server with the same client where its
`server` extra is installed: every client count is reported against them. `--llama-server PATH`
(llama.cpp's own C++ `llama-server` binary, built from the same source) adds one client of it,
with the same client and prompts. `--alternate PAIRS` takes requests in turns, ours then
theirs, and reports the medians of the pairs' ratios: against llama.cpp's in-process stream, and
with `--llama-server` against that server, up beside ours for the pairs. The machine's speed
drifts within minutes; only neighbours compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

# Every client opens a connection per request: llama.cpp's server closes a streamed response's
# connection, and a kept one would then fail on the next request. A localhost connect is ~0.1 ms.
ONE_CONNECTION_A_REQUEST = httpx.Limits(max_keepalive_connections=0)

RANDOM = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, sliding_window=256, max_position_embeddings=2048)


def random_model(folder: Path) -> Path:
    """A random Mistral with the v1 SentencePiece tokenizer from the mistral-common wheel."""
    import mistral_common
    import torch

    from mistral_lm import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(**RANDOM)).save_pretrained(folder)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    return folder


def start_server(model: Path | None, port: int, threads: int | None) -> subprocess.Popen:
    code = ("import sys, torch\n"
            f"if {threads!r}: torch.set_num_threads({threads!r})\n"
            "from mistral_lm.server.app import serve\n"
            f"serve({str(model) if model else None!r}, port={port}, log_level='warning', max_queue=256)\n")
    return subprocess.Popen([sys.executable, "-c", code])


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(server: subprocess.Popen) -> None:
    """Ask a server to stop, then make it: llama.cpp's `llama-server` at times outlives a SIGTERM."""
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(30)


def wait_ready(url: str, server: subprocess.Popen, seconds: float = 300, health: str = "/health") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(url + health, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


# The schema phase: chat with a JSON schema (the grammar masks every step); the story string is
# unbounded, so answers run to max_tokens like the others.
SCHEMA = {"type": "json_schema", "json_schema": {"name": "story", "schema": {
    "type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"},
                                     "story": {"type": "string"}},
    "required": ["title", "year", "story"], "additionalProperties": False}}}


def stream_one(client: httpx.Client, url: str, prompt: str, max_tokens: int, logprobs: int | None = None,
               schema: bool = False, rates: list[float] | None = None, temperature: float = 0.0,
               usage: bool = True) -> int:
    """Stream one completion (a chat answer under SCHEMA with `schema`) through `client`; return
    its completion tokens (from the final usage chunk). Each simulated user keeps one client, as
    the OpenAI SDK does: a client per request would time httpx setting up its SSL context (tens of
    milliseconds, even for http://), not the server. `rates` receives the stream's own rate: tokens per
    second from its first token chunk to its last (decode as the client sees it, without the
    request's set-up and prefill: the figure comparable to an engine's decode rate)."""
    body: dict = {"max_tokens": max_tokens, "temperature": temperature, "stream": True}
    if usage:  # without it (a server that does not send usage), every choice chunk counts as a token
        body["stream_options"] = {"include_usage": True}
    if schema:
        body |= {"messages": [{"role": "user", "content": prompt}], "response_format": SCHEMA}
    else:
        body["prompt"] = prompt
    if logprobs is not None:
        body["logprobs"] = logprobs
    produced = None
    path = "/v1/chat/completions" if schema else "/v1/completions"
    arrivals = []
    with client.stream("POST", url + path, json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if event.get("usage"):
                    produced = event["usage"]["completion_tokens"]
                elif event.get("choices") and (usage or event["choices"][0].get("finish_reason") is None):
                    arrivals.append(time.perf_counter())  # (without usage, a closing chunk is no token)
    if not usage:
        produced = len(arrivals)
    assert produced is not None, "no usage chunk"
    if rates is not None and len(arrivals) > 2 and produced == len(arrivals):  # one token per chunk
        rates.append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
    return produced


def phase(url: str, clients: int, requests_each: int, max_tokens: int, mode: str = "plain",
          temperature: float = 0.0) -> dict[str, float]:
    """`clients` concurrent clients, each sending `requests_each` streams one after the other;
    `mode` "plain", "logprobs" (5 alternatives per token) or "schema" (SCHEMA's grammar)."""
    before = httpx.get(url + "/health").json()
    logprobs = 5 if mode == "logprobs" else None
    rates: list[float] = []

    def client(c: int) -> int:
        with httpx.Client(limits=ONE_CONNECTION_A_REQUEST) as http:
            return sum(stream_one(http, url, PROMPT.format(c=c, r=r), max_tokens, logprobs,
                                  schema=mode == "schema", rates=rates, temperature=temperature)
                       for r in range(requests_each))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    after = httpx.get(url + "/health").json()
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decoded_rows"] - before["decoded_rows"]
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed, "rows_per_step": rows / max(steps, 1),
            "stream_tok_s": statistics.median(rates) if rates else float("nan")}


def chat_latency(url: str, messages: list[dict[str, str]], max_tokens: int = 1) -> tuple[float, str]:
    """Seconds for a non-streamed chat answer, and its text."""
    start = time.perf_counter()
    response = httpx.post(url + "/v1/chat/completions", timeout=600,
                          json={"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["choices"][0]["message"]["content"]


def turn_two(url: str, repeats: int, history_tokens: int = 1450) -> dict[str, float]:
    """Median time to first token of turn 1, turn 2 (prefix cache) and a cold turn-2 prompt."""
    sentence = "The harbour town kept its records in a long ledger of ships, cargo and weather. "
    per = len(httpx.post(url + "/tokenize", json={"prompt": sentence, "add_special_tokens": False}).json()["tokens"])
    firsts, seconds, colds = [], [], []
    for r in range(repeats + 1):  # the first round warms up and is not counted
        document = f"Document {r}. " + sentence * (history_tokens // per)
        history = [{"role": "user", "content": document + "\nSummarize the ledger in one line."}]
        first, _ = chat_latency(url, history)
        _, answer = chat_latency(url, history, 32)
        history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Which ships came in?"}]
        second, _ = chat_latency(url, history)
        cold_history = [{"role": "user", "content": f"Copy {r}. " + history[0]["content"]}] + history[1:]
        cold, _ = chat_latency(url, cold_history)
        if r:
            firsts.append(first)
            seconds.append(second)
            colds.append(cold)
    size = httpx.post(url + "/tokenize", json={"messages": history}).json()["count"]
    median = statistics.median
    return {"history": size, "turn1": median(firsts), "turn2": median(seconds), "cold": median(colds)}


class LlamaReference:
    """llama.cpp's greedy decode rate at one stream on the server's model and the phases' first
    prompt (bench_perf.py's worker, each run a fresh process), run before the server starts and
    after it stops so that both sides of the machine's drift are in the median."""

    def __init__(self, args: argparse.Namespace, model: Path, folder: Path) -> None:
        from bench_perf import REFERENCE_LLAMA, resolve_llama_python

        if model.suffix != ".gguf":
            raise SystemExit(f"--llama-python needs a .gguf model; {model} is not one")
        self.python, self.version = resolve_llama_python(args.llama_python)
        if self.python is None:
            raise SystemExit(f"llama.cpp: {self.version}")
        self.engine, self.model, self.new = REFERENCE_LLAMA, model, args.max_tokens
        self.ids_file, self.rates = folder / "llama_ids.json", []
        self.server: dict[str, float] | None = None  # llama-cpp-python's server, once `serve` ran
        self.before = args.llama_runs // 2
        self.pairs: list[tuple[float, float, float]] = []  # `alternate`: (ours tok/s, ours stream tok/s, llama.cpp tok/s)

    def prepare(self, url: str) -> None:
        """The prompt's ids as the server tokenizes it, then the runs before the server works."""
        ids = httpx.post(url + "/tokenize", json={"prompt": PROMPT.format(c=0, r=0)}).json()["tokens"]
        self.ids_file.write_text(json.dumps(ids))
        self.run(self.before)

    def run(self, count: int) -> None:
        from bench_perf import spawn

        for _ in range(count):
            result = spawn(self.python, self.engine, self.model, self.ids_file, self.new)
            if "error" in result:
                raise SystemExit(f"llama.cpp failed: {result['error']}")
            self.rates.append(result["decode_tok_s"])

    def alternate(self, url: str, pairs: int) -> None:
        """One client of ours and llama.cpp's one stream taken in turns (`pairs` of each, the order
        swapped every pair), while the server runs: the machine's speed drifts within minutes, and
        only a ratio of neighbours is free of it. Ours: a request's tokens over its wall time (its
        set-up and prefill included) and its stream's rate; llama.cpp: its decode rate alone."""
        with httpx.Client(limits=ONE_CONNECTION_A_REQUEST) as http:
            def ours(i: int) -> tuple[float, float]:
                rates: list[float] = []
                start = time.perf_counter()
                tokens = stream_one(http, url, PROMPT.format(c=1, r=i), self.new, rates=rates)
                return tokens / (time.perf_counter() - start), rates[0] if rates else float("nan")

            for i in range(pairs):
                if i % 2:
                    self.run(1)
                whole, stream = ours(i)
                if not i % 2:
                    self.run(1)
                self.pairs.append((whole, stream, self.rates.pop()))

    def serve(self, requests: int) -> None:
        """llama-cpp-python's own OpenAI server (its `server` extra) on the same file, one client
        streaming the phases' prompts one after the other; skipped where the extra is missing."""
        probe = subprocess.run([self.python, "-c", "import llama_cpp.server.app"], capture_output=True)
        if probe.returncode != 0:
            return
        self.server = one_client(lambda port: [self.python, "-m", "llama_cpp.server", "--model", str(self.model),
                                               "--port", str(port), "--n_threads", "2", "--n_threads_batch", "2",
                                               "--n_ctx", "2048", "--verbose", "False"],
                                 "/v1/models", requests, self.new)

    def report(self, results: list) -> str:
        rate = statistics.median(self.rates)
        lines = [f"llama.cpp {self.version}, one stream: {rate:.1f} tok/s (median of "
                 f"{', '.join(f'{r:.1f}' for r in self.rates)})"]
        ours = next(r for c, m, r in results if m == "plain")
        if self.server:
            lines.append(f"llama-cpp-python's server, one client: {self.server['tok_s']:.1f} tok/s, one stream's rate "
                         f"{self.server['stream_tok_s']:.1f}; ours at {results[0][0]} client(s): "
                         f"{ours['tok_s'] / self.server['tok_s']:.2f}x and "
                         f"{ours['stream_tok_s'] / self.server['stream_tok_s']:.2f}x")
        for clients, mode, r in results:
            if mode == "plain":
                lines.append(f"  {clients} clients: {r['tok_s']:.1f} tok/s = {r['tok_s'] / rate:.2f}x llama.cpp's one "
                             f"stream; one stream's rate {r['stream_tok_s']:.1f} = {r['stream_tok_s'] / rate:.2f}x")
        if self.pairs:  # llama.cpp's decode rate stands for both its request and its stream
            lines.append(f"one client and llama.cpp's one stream in turns ({len(self.pairs)} pairs): ours "
                         f"{pair_medians([(o, s, ll, ll) for o, s, ll in self.pairs])}, medians of the pairs' ratios")
        return "\n".join(lines)


PROMPT = "Story {c}.{r}: Once upon a time, in a city by the sea,"


@contextlib.contextmanager
def other_server(command: Callable[[int], list[str]], health: str) -> Iterator[tuple[str, httpx.Client]]:
    """Another engine's OpenAI server (`command(port)` starts it), ready and warmed up: its URL and
    a client that opens one connection a request; stopped on leaving."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, server, health=health)
        with httpx.Client(limits=ONE_CONNECTION_A_REQUEST) as http:
            stream_one(http, url, "Warm up.", 8, usage=False)
            yield url, http
    finally:
        stop(server)


def one_client(command: Callable[[int], list[str]], health: str, requests: int, max_tokens: int) -> dict[str, float]:
    """Another engine's OpenAI server: one client streaming the phases' prompts one after the
    other, greedy; its tokens/s and one stream's rate, measured as ours are."""
    with other_server(command, health) as (url, http):
        rates: list[float] = []
        start, tokens = time.perf_counter(), 0
        for r in range(requests):
            tokens += stream_one(http, url, PROMPT.format(c=0, r=r), max_tokens, rates=rates, usage=False)
        return {"tok_s": tokens / (time.perf_counter() - start), "stream_tok_s": statistics.median(rates)}


def llama_server_command(binary: str, model: Path) -> Callable[[int], list[str]]:
    """`llama-server` on `model` with 2 threads, as `command(port)`."""
    return lambda port: [binary, "-m", str(model), "-t", "2", "-tb", "2", "-c", "2048", "--host", "127.0.0.1",
                         "--port", str(port)]


def alternate_servers(url: str, command: Callable[[int], list[str]], health: str, pairs: int,
                      max_tokens: int) -> list[tuple[float, float, float, float]]:
    """One request to our server at `url` and one to another server (`command(port)` starts it)
    in turns, the order swapped every pair, both servers up the whole time: the machine's speed
    drifts within minutes, and only neighbours compare. Per pair: (ours tok/s, ours stream tok/s,
    theirs tok/s, theirs stream tok/s), a request's tokens over its wall time (set-up and prefill
    included) and its stream's rate from its first token to its last."""
    with other_server(command, health) as (other, http):
        def one(target: str, i: int) -> tuple[float, float]:
            rates: list[float] = []
            start = time.perf_counter()
            tokens = stream_one(http, target, PROMPT.format(c=2, r=i), max_tokens, rates=rates, usage=target == url)
            return tokens / (time.perf_counter() - start), rates[0] if rates else float("nan")

        found = []
        for i in range(pairs):
            if i % 2:
                theirs, ours = one(other, i), one(url, i)
            else:
                ours, theirs = one(url, i), one(other, i)
            found.append((*ours, *theirs))
        return found


def pair_medians(pairs: list[tuple[float, float, float, float]]) -> str:
    """'Xx a request (pairs a-b), its stream Yx (c-d)': medians of the pairs' ratios, ours over theirs."""
    whole = sorted(o / t for o, _, t, _ in pairs)
    stream = sorted(o / t for _, o, _, t in pairs)
    return (f"{statistics.median(whole):.2f}x a request (set-up and prefill included; pairs {whole[0]:.2f}-"
            f"{whole[-1]:.2f}x), its stream {statistics.median(stream):.2f}x ({stream[0]:.2f}-{stream[-1]:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder or .gguf file (default: the packaged SmolLM2)")
    parser.add_argument("--random", action="store_true", help="serve a random 4-layer Mistral instead")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--turns", type=int, default=3, help="documents for the turn-2 measurement (0: skip)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="requests per client in each phase")
    parser.add_argument("--threads", type=int, help="torch intra-op threads in the server (default: torch's)")
    parser.add_argument("--llama-python", help="an interpreter with llama-cpp-python: adds llama.cpp's decode rate "
                        "at one stream (bench_perf.py's worker: the same GGUF, the phase's prompt ids, --max-tokens "
                        "greedy tokens), run before and after the server, as the reference for every client count")
    parser.add_argument("--llama-runs", type=int, default=4, help="llama.cpp runs, half before and half after")
    parser.add_argument("--alternate", type=int, default=0, metavar="PAIRS",
                        help="with --llama-python: also this many pairs of one request of ours and one llama.cpp "
                        "stream, taken in turns; with --llama-server, as many pairs of one request to each "
                        "server; reported as the medians of the pairs' ratios")
    parser.add_argument("--llama-server", help="llama.cpp's `llama-server` binary: adds one client of it on the same "
                        "GGUF (2 threads), with the same client and prompts, after ours")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="the clients' sampling temperature (0: greedy, the default; OpenAI's own default is 1)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if args.random:
            model = random_model(Path(tmp))
        elif model is None:
            from mistral_lm.defaults import default_model_path
            from mistral_lm.errors import CheckpointError

            try:
                model = default_model_path()
            except CheckpointError as exc:
                print(f"no default model ({exc}); using a random one", file=sys.stderr)
                model = random_model(Path(tmp))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        llama = LlamaReference(args, model, Path(tmp)) if args.llama_python else None
        server = start_server(model, port, args.threads)
        in_turns = None
        try:
            wait_ready(url, server)
            if llama is not None:
                llama.prepare(url)
            with httpx.Client(limits=ONE_CONNECTION_A_REQUEST) as http:
                stream_one(http, url, "Warm up.", 8)
                stream_one(http, url, "Warm up.", 8, schema=True)  # the grammar engine's one-time setup per vocabulary
            results = [(clients, mode, phase(url, clients, args.requests, args.max_tokens, mode, args.temperature))
                       for clients in args.clients for mode in ("plain", "logprobs", "schema")]
            turns = turn_two(url, args.turns) if args.turns else None
            if llama is not None and args.alternate:
                llama.alternate(url, args.alternate)
            if args.llama_server and args.alternate:
                in_turns = alternate_servers(url, llama_server_command(args.llama_server, model), "/health",
                                             args.alternate, args.max_tokens)
        finally:
            stop(server)
        if llama is not None:
            llama.run(args.llama_runs - args.llama_runs // 2)
            llama.serve(args.requests)
        native = None
        if args.llama_server:
            native = one_client(llama_server_command(args.llama_server, model), "/health", args.requests,
                                args.max_tokens)

    label = "random 4-layer Mistral" if model == Path(tmp) else model.name
    print(f"model: {label}, max_tokens {args.max_tokens}, {args.requests} requests per client, "
          f"temperature {args.temperature:g}")
    print(f"{'clients':>8} {'mode':>9} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'rows/forward':>13} "
          f"{'stream tok/s':>13}")
    for clients, mode, r in results:
        print(f"{clients:>8} {mode:>9} {r['tokens']:>8} {r['seconds']:>8.2f} {r['tok_s']:>9.1f} "
              f"{r['rows_per_step']:>13.1f} {r['stream_tok_s']:>13.1f}")
    print("tokens/s: all clients' tokens over the phase's wall time (set-up and prefill included); "
          "stream tok/s: one stream's rate from its first token to its last, median over streams")
    base = {(c, m): r["tok_s"] for c, m, r in results}
    for clients in args.clients:
        print(f"{clients} clients: {base[clients, 'plain'] / base[args.clients[0], 'plain']:.2f}x the "
              f"{args.clients[0]}-client rate; logprobs 5 costs "
              f"{1 - base[clients, 'logprobs'] / base[clients, 'plain']:+.0%}, the JSON schema "
              f"{1 - base[clients, 'schema'] / base[clients, 'plain']:+.0%}")
    if llama is not None:
        print(llama.report(results))
    if native is not None:
        ours = next(r for c, m, r in results if m == "plain")
        print(f"llama.cpp's llama-server, one client: {native['tok_s']:.1f} tok/s, one stream's rate "
              f"{native['stream_tok_s']:.1f}; ours at {results[0][0]} client(s): "
              f"{ours['tok_s'] / native['tok_s']:.2f}x and {ours['stream_tok_s'] / native['stream_tok_s']:.2f}x")
    if in_turns:
        print(f"one client of ours and one of llama-server in turns ({len(in_turns)} pairs): ours "
              f"{pair_medians(in_turns)}, medians of the pairs' ratios")
    if turns:
        print(f"turn-2 time to first token on a {turns['history']}-token history: turn 1 {turns['turn1']:.2f} s, "
              f"turn 2 {turns['turn2']:.2f} s ({turns['turn2'] / turns['turn1']:.2f}x turn 1), "
              f"the same prompt cold {turns['cold']:.2f} s")


if __name__ == "__main__":
    main()
