"""Constrained decoding engines on CPU: llguidance vs xgrammar vs outlines-core.

For each vocabulary (the embedded SmolLM2's 49,152 byte-level tokens, and Tekken's 131,072 from
mistral-common's tekken_240911.json) every engine is given the same token bytes (our
`tokenizer.token_table.raw`), the same EOS id and the same special ids (which must never be
allowed inside JSON). Each grammar is compiled (timed), then a valid document, tokenized by our
tokenizer, is walked token by token: the next-token mask is computed into a preallocated 32-bit
bitmask (timed: the per-token cost a decode step pays) and the token is consumed (timed apart).
Every engine uses the same JSON layout (separators ", " and ": ", no other whitespace), so they
walk the same tokens. A keyword probe records whether an engine refuses or silently ignores
schema keywords it cannot enforce.

    python bench/bench_grammar.py [--rounds 5] [--vocab smollm2,tekken] [--engines llguidance,xgrammar,outlines-core]

Prints a markdown table. Timings on a shared 2-core machine are noisy: medians over many tokens.
Only llguidance is a dependency; `pip install xgrammar outlines-core` for the others (xgrammar
brings torch, transformers and, on Linux x86-64, triton: ~1 GB). A missing engine is skipped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import importlib.util
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mistral_lm.defaults import default_model_path
from mistral_lm.tokenizer import MistralTokenizer

TEKKEN = Path(str(importlib.resources.files("mistral_common") / "data" / "tekken_240911.json"))

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "geo": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"], "additionalProperties": False}},
            "required": ["street", "city", "geo"], "additionalProperties": False},
    },
    "required": ["name", "age", "address"], "additionalProperties": False,
}
ENUM = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue", "ultraviolet"]},
                   "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
                   "in_stock": {"type": "boolean"}},
    "required": ["color", "size", "in_stock"], "additionalProperties": False,
}
ARRAY = {
    "type": "object",
    "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
        "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"},
                                         "note": {"type": ["string", "null"]}},
        "required": ["sku", "qty", "note"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False,
}
CASES: dict[str, tuple[dict[str, Any] | None, Any]] = {  # name -> (schema or None for json_object, document)
    "json_object": (None, {"id": 7, "tags": ["alpha", "beta"], "meta": {"ok": True, "score": 0.25, "none": None},
                           "title": "A widget, with \"quotes\" and ünïcode"}),
    "nested object": (NESTED, {"name": "Ada Lovelace", "age": 36, "address": {
        "street": "12 St James's Square", "city": "London", "geo": {"lat": 51.5074, "lon": -0.1357}}}),
    "enum": (ENUM, {"color": "ultraviolet", "size": "XL", "in_stock": False}),
    "array of objects": (ARRAY, {"items": [{"sku": "A-100", "qty": 2, "note": None},
                                           {"sku": "B-7", "qty": 12, "note": "gift wrap"},
                                           {"sku": "C-33", "qty": 1, "note": None}]}),
}
OBJECT = {"type": "object"}  # what json_object means: any JSON object
# Keywords an engine may not enforce, each with a document that violates it: an engine must refuse
# the schema or reject the document; accepting both means the keyword is silently ignored.
PROBES: dict[str, tuple[dict[str, Any], Any]] = {
    "not": ({"not": {"type": "string"}}, "abc"),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 1]),
    "if/then": ({"if": {"type": "string"}, "then": {"maxLength": 3}}, "abcdef"),
    "format (unknown name)": ({"type": "string", "format": "no-such-format"}, None),
    "minimum/maximum": ({"type": "integer", "minimum": 3, "maximum": 5}, 7),
    "propertyNames": ({"type": "object", "propertyNames": {"maxLength": 3}}, {"abcdef": 1}),
    "minProperties": ({"type": "object", "minProperties": 2}, {"a": 1}),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, 4),
}


@dataclass
class Vocab:
    name: str
    raw: list[bytes]
    specials: list[int]
    eos: int
    bos: int | None
    encode: Callable[[str], list[int]]


def load_vocab(name: str) -> Vocab:
    tok = MistralTokenizer.from_pretrained(default_model_path() if name == "smollm2" else TEKKEN)
    return Vocab(name, list(tok.token_table.raw), sorted(tok.all_special_ids), tok.eos_token_id, tok.bos_token_id,
                 lambda text: tok.encode(text, add_special_tokens=False))


class Engine:
    """prepare(vocab) once; compile(schema) -> matcher factory; mask(m, buf); consume(m, id)."""

    name: str

    def prepare(self, v: Vocab) -> None: ...
    def compile(self, schema: dict[str, Any] | None) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def mask(self, m: Any, buf: np.ndarray) -> None: ...
    def consume(self, m: Any, token: int) -> bool: ...

    def probe(self, schema: dict[str, Any], violating: Any, v: Vocab, buf: np.ndarray) -> str:
        """"refused" at compile time, "enforced" (the violating document is rejected) or "IGNORED"."""
        try:
            compiled = self.compile(schema)
        except Exception as err:  # noqa: BLE001 - any refusal counts; the message is shown
            return f"refused ({str(err).strip().splitlines()[-1][-48:]})"
        if violating is None:
            return "accepted"
        try:
            walk(self, compiled, v.encode(json.dumps(violating)), v.eos, buf)
        except AssertionError:
            return "enforced"
        return "**IGNORED**"


class LLGuidance(Engine):
    name = "llguidance"
    OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def prepare(self, v: Vocab) -> None:
        import llguidance as llg

        class Wrapper:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id, tokens, special_token_ids = v.eos, v.bos, v.raw, v.specials

            def __call__(self, text: bytes | str) -> list[int]:
                return v.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

        self.llg = llg
        self.tok = llg.LLTokenizer(llg.TokenizerWrapper(Wrapper()))

    def compile(self, schema: dict[str, Any] | None) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema or OBJECT, defaults=self.OPTIONS)
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)  # the compile happens here (lexer, token trie)
        if m.is_error():  # llguidance reports grammar errors as a state, not an exception
            raise ValueError(m.get_error())
        return m

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def mask(self, m: Any, buf: np.ndarray) -> None:
        m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes)

    def consume(self, m: Any, token: int) -> bool:
        return m.consume_token(token)



class XGrammar(Engine):
    name = "xgrammar"

    def prepare(self, v: Vocab) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        vocab = [b"" if i in set(v.specials) else r for i, r in enumerate(v.raw)]  # empty = special for xgrammar
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(v.raw), stop_token_ids=[v.eos])
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def compile(self, schema: dict[str, Any] | None) -> Any:
        return self.compiler.compile_json_schema(schema or OBJECT, any_whitespace=False, separators=(", ", ": "))

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, m: Any, buf: np.ndarray) -> None:
        import torch

        m.fill_next_token_bitmask(torch.from_numpy(buf))  # shares buf's memory

    def consume(self, m: Any, token: int) -> bool:
        return m.accept_token(token)


class OutlinesCore(Engine):
    name = "outlines-core"

    def prepare(self, v: Vocab) -> None:
        import outlines_core as oc

        self.oc = oc
        specials = set(v.specials)
        tokens: dict[bytes, list[int]] = {}
        for i, r in enumerate(v.raw):
            if i not in specials:  # special tokens are left out: never part of the text
                tokens.setdefault(r, []).append(i)
        self.vocab = oc.Vocabulary(v.eos, tokens)

    def compile(self, schema: dict[str, Any] | None) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema or OBJECT), whitespace_pattern=" ?")
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def mask(self, m: Any, buf: np.ndarray) -> None:
        m.write_mask_into(buf.ctypes.data, buf.size, 4)

    def consume(self, m: Any, token: int) -> bool:
        try:
            m.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True


ENGINES: dict[str, type[Engine]] = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


def walk(engine: Engine, compiled: Any, ids: list[int], eos: int, buf: np.ndarray) -> tuple[list[float], list[float]]:
    """Mask and consume times (µs) of every token of `ids`, then EOS's mask; checks each id is allowed."""
    m = engine.matcher(compiled)
    masks, consumes = [], []
    for token in [*ids, eos]:
        t0 = time.perf_counter()
        engine.mask(m, buf)
        t1 = time.perf_counter()
        masks.append((t1 - t0) * 1e6)
        if not (buf[0, token // 32] >> (token % 32)) & 1:
            raise AssertionError(f"{engine.name}: token {token} of the document is not allowed")
        if token == eos:
            break
        t1 = time.perf_counter()
        ok = engine.consume(m, token)
        consumes.append((time.perf_counter() - t1) * 1e6)
        if not ok:
            raise AssertionError(f"{engine.name} refused token {token}")
    return masks, consumes


def p95(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.95 * len(xs)))]


def bench(engine_name: str, v: Vocab, rounds: int) -> list[dict[str, Any]]:
    engine = ENGINES[engine_name]()
    importlib.import_module(engine_name.replace("-", "_"))  # import time is not setup time
    t0 = time.perf_counter()
    engine.prepare(v)
    prepare_s = time.perf_counter() - t0
    buf = np.full((1, (len(v.raw) + 31) // 32), -1, dtype=np.int32)
    rows = []
    for case, (schema, doc) in CASES.items():
        ids = v.encode(json.dumps(doc, ensure_ascii=False))
        compile_ms: list[float] = []
        while len(compile_ms) < 3 and sum(compile_ms) < 2000:  # a slow compile is timed once
            t0 = time.perf_counter()
            compiled = engine.compile(schema)
            compile_ms.append((time.perf_counter() - t0) * 1e3)
        masks, consumes = [], []
        try:
            for _ in range(rounds):
                m, c = walk(engine, compiled, ids, v.eos, buf)
                masks += m
                consumes += c
        except AssertionError as err:
            rows.append({"engine": engine_name, "vocab": v.name, "case": case, "error": str(err)})
            continue
        rows.append({"engine": engine_name, "vocab": v.name, "case": case, "tokens": len(ids) + 1,
                     "prepare_ms": prepare_s * 1e3, "compile_ms": statistics.median(compile_ms),
                     "mask_med": statistics.median(masks), "mask_p95": p95(masks),
                     "consume_med": statistics.median(consumes)})
    probes = {name: engine.probe(schema, doc, v, buf) for name, (schema, doc) in PROBES.items()}
    rows.append({"engine": engine_name, "vocab": v.name, "probes": probes})
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| vocab | engine | grammar | tokens | compile ms | mask µs/token median | mask p95 | consume µs median |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "probes" in r:
            continue
        if "error" in r:
            out.append(f"| {r['vocab']} | {r['engine']} | {r['case']} | failed: {r['error']} | | | | |")
            continue
        out.append(f"| {r['vocab']} | {r['engine']} | {r['case']} | {r['tokens']} | {r['compile_ms']:.1f} | "
                   f"{r['mask_med']:.0f} | {r['mask_p95']:.0f} | {r['consume_med']:.0f} |")
    prep = {(r["vocab"], r["engine"]): r["prepare_ms"] for r in rows if "prepare_ms" in r}
    out += ["", "| vocab | engine | tokenizer setup ms (once per vocabulary) |", "|---|---|---:|"]
    out += [f"| {vocab} | {engine} | {ms:.0f} |" for (vocab, engine), ms in prep.items()]
    probe_rows = [r for r in rows if "probes" in r and r["vocab"] == rows[0]["vocab"]]
    out += ["", "| keyword an engine may not enforce | " + " | ".join(r["engine"] for r in probe_rows) + " |",
            "|---|" + "---|" * len(probe_rows)]
    for name in PROBES:
        out.append(f"| `{name}` | " + " | ".join(r["probes"][name] for r in probe_rows) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="walks of each document (more tokens per median)")
    parser.add_argument("--vocab", default="smollm2,tekken")
    parser.add_argument("--engines", default=",".join(ENGINES))
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; python {platform.python_version()}")
    engines = [e for e in args.engines.split(",") if importlib.util.find_spec(e.replace("-", "_")) is not None]
    for missing in set(args.engines.split(",")) - set(engines):
        print(f"skipped {missing}: not installed (pip install {missing})")
    rows: list[dict[str, Any]] = []
    for vocab_name in args.vocab.split(","):
        v = load_vocab(vocab_name)
        for engine_name in engines:
            rows += bench(engine_name, v, args.rounds)
    print(table(rows))


if __name__ == "__main__":
    main()
