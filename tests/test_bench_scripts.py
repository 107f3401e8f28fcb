"""The bench scripts' own plumbing: a missing optional extra must not cost a finished run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_charts_are_skipped_without_matplotlib(monkeypatch, tmp_path):
    """bench_perf used to import matplotlib after minutes of measuring and die there, after the
    table was written but before it was printed; both scripts now skip the chart."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    perf, scale = _load("bench_perf"), _load("bench_scale")
    assert perf.write_chart({"ours": {"decode_tok_s": 1.0, "prefill_tok_s": 2.0}}, tmp_path, "test") is None
    assert scale.write_chart({}, "test") is None
    assert not list(tmp_path.iterdir())


def test_bench_perf_takes_a_prompt_and_a_token_count():
    import pytest

    perf = _load("bench_perf")
    args = perf.parse_args(["--prompt", "12", "--new", "256", "--engines", "ours-gguf-q4_1"])
    assert (args.prompt_len, args.new_tokens) == (12, 256)
    assert (perf.parse_args(["--quick"]).prompt_len, perf.parse_args([]).new_tokens) == (64, 128)
    with pytest.raises(SystemExit):
        perf.parse_args(["--prompt", "0"])


def test_bench_server_reports_the_median_of_the_pairs_ratios():
    """Pairs taken in turns compare as neighbours: the median of each pair's ratio, ours over
    theirs (here 0.60x a request), not the ratio of the medians (3 / 4 = 0.75x)."""
    server = _load("bench_server")
    pairs = [(10.0, 8.0, 1.0, 2.0), (2.0, 3.0, 4.0, 6.0), (3.0, 2.0, 5.0, 8.0)]
    assert server.pair_medians(pairs) == ("0.60x a request (set-up and prefill included; pairs 0.50-10.00x), "
                                          "its stream 0.50x (0.25-4.00x)")


def test_bench_scale_states_decode_s_ceiling_against_llama_cpp():
    """A token reads its weights once: llama.cpp reading 1 GB a token at 30 tok/s beside a
    40 GB/s probe streams 75% of the bus, so no engine can decode faster than 40 / 30 = 1.33x
    it there. Each engine is taken against its own probes (the bus moves between runs); a run
    without one falls back on the run's median bandwidth."""
    scale = _load("bench_scale")
    run = {"load_s": 1.0, "first_call_s": 1.0, "prefill_tok_s": 1.0, "long_prefill_tok_s": None,
           "peak_rss_gb": 1.0}
    ours = {**run, "decode_tok_s": 33.0, "weight_bytes": 10**9, "bus_gb_s": 44.0}
    llama = {**run, "decode_tok_s": 30.0, "weight_bytes": None, "bus_gb_s": 40.0}
    rows = {"7b-q4_0": (2 * 10**9, 10**9, {"ours": [ours], "llama.cpp": [llama]}),
            "1b-q4_0": (10**9, 10**9, {"ours": [{**run, "decode_tok_s": 1.0, "weight_bytes": 10**9}]})}
    assert scale.ceilings(rows, 20.0) == [
        "- 7b-q4_0: llama.cpp streams 75% of the bus probed beside it and ours 75%; decoding at that bus "
        "would be 1.33x llama.cpp (ours: 1.10x)."]
    del llama["bus_gb_s"]
    assert "llama.cpp streams 150% of the bus" in scale.ceilings(rows, 20.0)[0]
    assert "| 33.0 | 44.0 | 75% |" in scale.table(rows, 20.0, 64, 512)


def test_bench_scale_reports_the_paired_decode_apart_from_the_engines_rows():
    """The in-turns run has its own schema: it is left out of the table and the chart's medians
    (which would fail on its keys) and reported on its own line."""
    scale = _load("bench_scale")
    run = {"load_s": 1.0, "first_call_s": 1.0, "prefill_tok_s": 1.0, "long_prefill_tok_s": None,
           "peak_rss_gb": 1.0, "decode_tok_s": 30.0, "weight_bytes": None}
    paired = {"ours_tok_s": 9.0, "llama_tok_s": 7.5, "ratio": 1.21, "low": 1.1, "high": 1.3, "rounds": 8}
    rows = {"7b-q4_k": (10**9, 10**9, {"llama.cpp": [run], scale.PAIRED: [paired]}),
            "1b-q4_k": (10**9, 10**9, {scale.PAIRED: [{"error": "llama_cpp not found"}]})}
    assert scale.paired_lines(rows) == [
        "- 7b-q4_k: ours 9.00 tok/s, llama.cpp 7.50 tok/s; **1.21x** (median of 8 rounds' ratios, 1.10-1.30x).",
        "- 1b-q4_k: llama_cpp not found"]
    assert scale.PAIRED not in scale.table(rows, 30.0, 64, 512)
