"""Encode/decode throughput: mistral_lm's tokenizer vs sentencepiece vs tokenizers (transformers' fast one).

All three tokenize the same lines (tests/data/tokenizer_corpus.txt, repeated) with the Mistral-7B
v0.1 tokenizer from the mistral-common wheel; ids are checked equal before timing. A second part
does the same for Tekken (tekken_240911.json from the wheel): tiktoken (our `TekkenEngine`,
mistral-common's `Tekkenizer`) vs the same BPE converted to a `tokenizers.Tokenizer`
(`TekkenEngine.to_tokenizers`), which is the alternative engine. Prints markdown tables; ratio =
throughput / ours.

    python bench/bench_tokenizer.py [--repeat 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import sentencepiece
import transformers

from mistral_lm.tokenizer import MistralTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
TEKKEN = Path(str(importlib.resources.files("mistral_common") / "data" / "tekken_240911.json"))


def best_time(fn: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=60, help="copies of the corpus lines")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best is reported")
    args = parser.parse_args()

    lines = (ROOT / "tests" / "data" / "tokenizer_corpus.txt").read_bytes().decode("utf-8").split("\n") * args.repeat
    megabytes = sum(len(line.encode()) for line in lines) / 1e6

    ours = MistralTokenizer.from_pretrained(MODEL)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(MODEL))
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as folder:  # transformers' own conversion of the same file
        shutil.copy(MODEL, Path(folder) / "tokenizer.model")
        fast = transformers.AutoTokenizer.from_pretrained(folder)

    ids = reference.encode(lines)
    assert ours(lines, add_special_tokens=False).input_ids == ids
    plain = [i for i, line in enumerate(lines) if not any(s in line for s in ("<s>", "</s>", "<unk>"))]
    assert all(fast(lines[i], add_special_tokens=False).input_ids == ids[i] for i in plain[:2000])

    encoders = {
        "mistral_lm `tok(lines)`": lambda: ours(lines, add_special_tokens=False),
        "sentencepiece `encode(lines)`": lambda: reference.encode(lines),
        "transformers fast `tok(lines)`": lambda: fast(lines, add_special_tokens=False),
        "tokenizers `encode_batch_fast`":
            lambda: fast.backend_tokenizer.encode_batch_fast(lines, add_special_tokens=False),
    }
    decoders = {
        "mistral_lm `batch_decode`": lambda: ours.batch_decode(ids),
        "sentencepiece `decode(ids)`": lambda: reference.decode(ids),
        "transformers fast `batch_decode`": lambda: fast.batch_decode(ids),
    }
    print(f"{len(lines)} lines, {megabytes:.2f} MB of UTF-8, best of {args.rounds}\n")
    print_tables({"encode": encoders, "decode": decoders}, megabytes, args.rounds)
    print("Tekken (tekken_240911.json)\n")
    print_tables(tekken_tables(lines), megabytes, args.rounds)


def print_tables(tables: dict[str, dict[str, Callable[[], object]]], megabytes: float, rounds: int) -> None:
    for title, table in tables.items():
        rates = {name: megabytes / best_time(fn, rounds) for name, fn in table.items()}
        baseline = next(iter(rates.values()))
        print(f"| {title} | MB/s | ratio vs ours |\n| --- | ---: | ---: |")
        for name, rate in rates.items():
            print(f"| {name} | {rate:.2f} | {rate / baseline:.2f} |")
        print()


def tekken_tables(lines: list[str]) -> dict[str, dict[str, Callable[[], object]]]:
    """Tekken encoders: ours (tiktoken), mistral-common (tiktoken, one line at a time), tokenizers."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    ours = MistralTokenizer.from_pretrained(TEKKEN)
    reference = Tekkenizer.from_file(TEKKEN)
    engine = ours._engine
    converted = engine.to_tokenizers()
    converted.encode_special_tokens = True  # "[INST]" typed in text stays text, as in tiktoken
    offset = engine.num_special_tokens
    ids = [reference.encode(line, bos=False, eos=False) for line in lines]
    assert ours(lines, add_special_tokens=False).input_ids == ids
    assert [e.ids for e in converted.encode_batch_fast(lines, add_special_tokens=False)] == ids
    one_thread = engine.tiktoken
    return {"encode": {
        "mistral_lm `tok(lines)` (tiktoken)": lambda: ours(lines, add_special_tokens=False),
        "tiktoken `encode_ordinary` per line": lambda: [one_thread.encode_ordinary(line) for line in lines],
        "mistral-common `Tekkenizer.encode` per line": lambda: [reference.encode(line, False, False)
                                                                for line in lines],
        "tokenizers `encode_batch_fast` (converted)":
            lambda: converted.encode_batch_fast(lines, add_special_tokens=False),
        "tokenizers `encode` per line (converted)":
            lambda: [converted.encode(line, add_special_tokens=False) for line in lines],
    }, "decode": {
        "mistral_lm `batch_decode`": lambda: ours.batch_decode(ids),
        "mistral-common `Tekkenizer.decode`": lambda: [reference.decode(row) for row in ids],
        "tokenizers `decode_batch` (converted)": lambda: converted.decode_batch(ids),
    }} if offset else {}


if __name__ == "__main__":
    main()
