"""Tensor parallel over 2 gloo processes (1 thread each) against the single-process model.

The ranks are this file run as a script (`python tests/test_parallel.py <mode> <spec>`). The
parity launch starts them through two torchrun "nodes" meeting at a c10d rendezvous on loopback
(multi-node as two machines would run it) and computes every case once; the tests read its
results. The fault tests start their pairs with torchrun's variables set directly, without
torchrun's agent, which would otherwise kill the surviving rank for us.

The oracle is the in-memory float32 model that wrote each safetensors folder, run in this
process: the ranks only ever see the files, read slice by slice.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mistral_lm.errors import CheckpointError
from mistral_lm.quantization import BitsAndBytesConfig, quantize_model

# its tests share costly module fixtures: one xdist worker runs them all (make test's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("parallel")

if __name__ != "__main__":
    from .conftest import tiny_config

WORLD = 2
# The timeout paths (a hung rank, a rank that never starts) add ~25 s: `-m "not slow"` skips them.
SLOW = pytest.mark.slow
PROMPT = 11
NEW_TOKENS = 64  # greedy tokens compared for the configurations with a window: 6-8 slots, crossed many times
SHORT_TOKENS = 16  # without a window, and for the variants below (whose window, 8, is crossed anyway)
# name -> config overrides of the tiny config: MHA, GQA and MQA-like, with and without a window
CASES = {
    "mha": dict(num_key_value_heads=4, sliding_window=None),
    "gqa": dict(num_key_value_heads=2, sliding_window=None),
    "gqa_window": dict(num_key_value_heads=2, sliding_window=8),
    "mqa_window": dict(num_key_value_heads=1, sliding_window=6),  # kv head replicated on both ranks
    "wide_tied": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, intermediate_size=256,
                      sliding_window=8, tie_word_embeddings=True),  # written as 2 safetensors shards
}
# name -> (folder of CASES, from_pretrained options). Quantized after sharding, each rank its
# slices; float32 compute, so equal codes show as logits equal to 1e-5 (parallel/quantize.py)
VARIANTS = {
    "int8": ("gqa_window", dict(quantization_config=dict(load_in_8bit=True, bnb_4bit_compute_dtype="float32"))),
    "int4": ("gqa_window", dict(quantization_config=dict(load_in_4bit=True, bnb_4bit_quant_type="int4",
                                                         group_size=32, bnb_4bit_compute_dtype="float32"))),
    "nf4": ("mqa_window", dict(quantization_config=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        group_size=32, bnb_4bit_compute_dtype="float32"))),
    "vocab": ("gqa_window", dict(vocab_parallel=True)),
    "vocab_tied": ("wide_tied", dict(vocab_parallel=True)),
    # a .gguf of llama.cpp blocks (Q8_0 attention, Q4_0 MLP and embedding): slices dequantized
    # to float32, or kept as blocks (GGUFLinear computes in bfloat16: compared at its precision)
    "gguf": ("gguf", dict(torch_dtype="float32")),
    "gguf_native": ("gguf", dict(gguf_native=True, torch_dtype="float32")),
}


def _tokens(name: str) -> int:
    return NEW_TOKENS if CASES.get(name, {}).get("sliding_window") else SHORT_TOKENS


# ---------------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, spec: dict, timeout: float = 120.0, linger: float | None = None,
            nodes: bool = False, meanwhile: Callable[[], None] | None = None, started: int = WORLD) -> list[dict]:
    """Run 2 ranks of this file as `mode`; per rank: returncode (None: killed at `timeout`, or
    `linger` seconds after rank 0 exited), output, seconds until exit. `meanwhile` runs here
    while the ranks start and work (they mostly wait on each other's collectives).

    Ranks get torchrun's variables directly, or, with `nodes=True`, are started by two torchrun
    "nodes" (1 process each) meeting through the c10d rendezvous on loopback, as two machines
    would; the rendezvous then decides which one is rank 0. `started` < 2: the other ranks never come."""
    port = _free_port()
    procs = []
    start = time.monotonic()
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    for rank in range(started):
        if nodes:
            env = base
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(WORLD), "--nproc-per-node", "1",
                       "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"tp{port}",
                       __file__, mode, json.dumps(spec)]
        else:
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                   "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            command = [sys.executable, __file__, mode, json.dumps(spec)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    if meanwhile is not None:
        meanwhile()
    results = [{} for _ in procs]
    for rank, proc in enumerate(procs):
        left = timeout - (time.monotonic() - start)
        try:
            output, _ = proc.communicate(timeout=max(0.1, left if rank == 0 or linger is None else linger))
        except subprocess.TimeoutExpired:
            for other in procs:
                if other.poll() is None:
                    other.kill()  # only the processes this test started
            output, _ = proc.communicate()
            results[rank] = {"returncode": None, "output": output, "seconds": time.monotonic() - start}
            continue
        results[rank] = {"returncode": proc.returncode, "output": output, "seconds": time.monotonic() - start}
    return results


def _write_folder(folder: Path, overrides: dict, sharded: bool = False) -> torch.nn.Module:
    from mistral_lm import MistralForCausalLM
    from mistral_lm.checkpoints.safetensors import save_state_dict

    config = tiny_config(initializer_range=0.1, **overrides)
    model = MistralForCausalLM(config).eval()
    state = {k: v for k, v in model.state_dict().items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_state_dict(state, folder, max_shard_size="100KB" if sharded else "5GB")
    config.save_pretrained(folder)
    return model


def _write_gguf(path: Path) -> Path:
    """A GGUF of the "gqa" shape: Q8_0 attention and head, Q4_0 MLP and embedding (random valid
    blocks: codes, then a small float16 scale d, and for Q4_0/Q8_0 nothing else), float norms."""
    import gguf

    h, kv_rows, ff, vocab, layers = 64, 32, 128, 128, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_context_length, 512), (writer.add_embedding_length, h),
                       (writer.add_feed_forward_length, ff), (writer.add_block_count, layers),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 2),
                       (writer.add_layer_norm_rms_eps, 1e-6), (writer.add_vocab_size, vocab)):
        add(value)
    rng = np.random.default_rng(0)
    q8, q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    shapes = {"token_embd.weight": ((vocab, h), q4), "output.weight": ((vocab, h), q8),
              "output_norm.weight": ((h,), None)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": ((h,), None), f"blk.{i}.ffn_norm.weight": ((h,), None),
                       f"blk.{i}.attn_q.weight": ((h, h), q8), f"blk.{i}.attn_k.weight": ((kv_rows, h), q8),
                       f"blk.{i}.attn_v.weight": ((kv_rows, h), q8), f"blk.{i}.attn_output.weight": ((h, h), q8),
                       f"blk.{i}.ffn_gate.weight": ((ff, h), q4), f"blk.{i}.ffn_up.weight": ((ff, h), q4),
                       f"blk.{i}.ffn_down.weight": ((h, ff), q4)})
    for name, (shape, kind) in shapes.items():
        if kind is None:
            writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        block, size = gguf.GGML_QUANT_SIZES[kind]
        data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
        scale = (rng.standard_normal((shape[0], shape[1] // block, 1)) * 0.0015).astype(np.float16)
        data[..., 0:2] = scale.view(np.uint8)
        writer.add_tensor(name, data.reshape(shape[0], -1), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 11 and 7 tokens, the second left-padded."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, PROMPT), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    return ids, mask


@torch.inference_mode()
def _compute(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> dict:
    """What both the ranks and the reference compute: full-sequence logits, logits through the
    cache in two chunks, and `new_tokens` greedy tokens."""
    from mistral_lm.generation import generate

    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = model.make_cache(ids.shape[0])
    model(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache)
    chunked = model(ids[:, 6:], attention_mask=mask, past_key_values=cache).logits
    tokens = generate(model, ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                      eos_token_id=None)
    return {"full": full, "chunked": chunked, "tokens": tokens, "cache_heads": cache.keys[0].shape[1]}


# ---------------------------------------------------------------------------------- the ranks
def _worker_parity(spec: dict) -> None:
    from mistral_lm import AutoModelForCausalLM, parallel
    from mistral_lm.generation import generate
    from mistral_lm.errors import CheckpointError, ConfigError

    out: dict = {}
    runs = {**{name: (name, {}) for name in spec["folders"] if name in CASES}, **VARIANTS}
    for name, (case, options) in runs.items():
        began = time.perf_counter()
        # Transformers' entry point and keywords: tp_plan="auto" under torchrun
        model = AutoModelForCausalLM.from_pretrained(spec["folders"][case], tp_plan="auto", tp_size=WORLD,
                                                     timeout_s=60, **options)
        ids, mask = _inputs(model.config.vocab_size)
        model.tensor_parallel.stats.reset()
        with torch.inference_mode():
            model(ids[:1, -1:])  # one decode-shaped step: its collectives
        step = (model.tensor_parallel.stats.calls, model.tensor_parallel.stats.bytes)
        out[name] = {**_compute(model, ids, mask, _tokens(name)), "step_collectives": step}
        with torch.inference_mode():  # sampling: equal logits and equal seeds draw equal tokens
            out[name]["sampled"] = generate(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=True,
                                            top_k=0, seed=7)
        if spec.get("timing"):
            print(f"{name}: {time.perf_counter() - began:.2f}s", flush=True)
    # then each rank loads a different checkpoint: every rank must refuse, none may hang
    mismatched = spec["mismatch"][int(os.environ["RANK"])]
    try:
        parallel.from_pretrained(mismatched, timeout_s=60)
        out["mismatch"] = "loaded"
    except CheckpointError as exc:
        out["mismatch"] = f"CheckpointError: {exc}"
    try:  # 3 kv heads over 2 ranks: refused by the plan on every rank, before a tensor is read
        parallel.from_pretrained(spec["indivisible"], timeout_s=60)
        out["indivisible"] = "loaded"
    except ConfigError as exc:
        out["indivisible"] = f"ConfigError: {exc}"
    torch.save(out, Path(spec["out"]) / f"rank{os.environ['RANK']}.pt")


def _worker_crash(spec: dict) -> None:
    """Rank 1 raises inside its third forward (in layer 1's MLP); rank 0 must not hang."""
    from mistral_lm import parallel
    from mistral_lm.generation import generate

    model = parallel.from_pretrained(spec["folder"], timeout_s=spec["timeout_s"])
    calls = [0]

    def fail(module, args):  # noqa: ANN001
        calls[0] += 1
        if calls[0] == 3:
            if spec["how"] == "hang":
                time.sleep(600)
            raise RuntimeError("injected failure on rank 1")

    if os.environ["RANK"] == "1":
        model.model.layers[1].mlp.register_forward_pre_hook(fail)
    ids, mask = _inputs(model.config.vocab_size)
    generate(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    print("finished generate", flush=True)


# ---------------------------------------------------------------------------------- parity
def _references(models: dict, references: dict, gguf_path: Path) -> None:
    """The single-process results: the float models, the quantized ones, the GGUF file loaded
    by `MistralForCausalLM.from_pretrained`."""
    from mistral_lm import MistralForCausalLM

    for name, model in models.items():
        references[name] = _compute(model, *_inputs(model.config.vocab_size), _tokens(name))
    for name, (case, options) in VARIANTS.items():
        if case == "gguf":
            reference = MistralForCausalLM.from_pretrained(gguf_path, fuse_projections=False, **options)
            models[name] = reference
        else:
            reference = models[case]
        if "quantization_config" in options:
            reference = quantize_model(copy.deepcopy(reference), BitsAndBytesConfig(**options["quantization_config"]))
        references[name] = _compute(reference, *_inputs(reference.config.vocab_size), _tokens(name))


@pytest.fixture(scope="module")
def parity(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp")
    models, folders = {}, {}
    for name, overrides in CASES.items():
        torch.manual_seed(len(name))
        models[name] = _write_folder(root / name, overrides, sharded=name == "wide_tied")
        folders[name] = str(root / name)
    mismatch = [folders["gqa"], folders["gqa_window"]]  # same shapes, another window
    indivisible = root / "indivisible"
    _write_folder(indivisible, dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3))
    gguf_path = _write_gguf(root / "tiny.gguf")
    references: dict = {}

    def compute_references() -> None:  # one thread: the ranks need the cores too
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _references(models, references, gguf_path)
        finally:
            torch.set_num_threads(threads)

    runs = _launch("parity", {"folders": {**folders, "gguf": str(gguf_path)}, "out": str(root), "mismatch": mismatch,
                              "indivisible": str(indivisible)}, timeout=240, nodes=True, meanwhile=compute_references)
    for run in runs:
        assert run["returncode"] == 0, run["output"][-3000:]
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(WORLD)]
    models.update({name: models[case] for name, (case, _) in VARIANTS.items() if case != "gguf"})
    return {"ranks": ranks, "references": references, "models": models}


@pytest.mark.parametrize("case", [*CASES, *VARIANTS])
def test_logits_equal_single_process(parity, case) -> None:
    """Within 1e-5 in float32; GGUFLinear computes in bfloat16 (8 mantissa bits), where each
    rank rounds its partial sum: within 1% of the largest logit."""
    ref = parity["references"][case]
    for rank in parity["ranks"]:
        for key in ("full", "chunked"):
            got = rank[case][key]
            assert got.shape == ref[key].shape
            err = (got - ref[key]).abs().max().item()
            bound = 1e-2 * ref[key].abs().max().item() if case == "gguf_native" else 1e-5
            assert err < bound, f"{case} {key}: max |TP - single| = {err:.2e}"


@pytest.mark.parametrize("case", [*CASES, *(v for v in VARIANTS if v != "gguf_native")])  # bfloat16: near-ties
def test_greedy_tokens_equal_single_process(parity, case) -> None:
    ref = parity["references"][case]["tokens"]
    assert ref.shape[1] == PROMPT + _tokens(case)
    for rank in parity["ranks"]:
        assert torch.equal(rank[case]["tokens"], ref)


def test_ranks_agree_exactly(parity) -> None:
    """The all-reduce hands every rank the same sums, so the replicated rest matches bit for bit."""
    first, second = parity["ranks"]
    for case in CASES:
        assert torch.equal(first[case]["full"], second[case]["full"])
        assert torch.equal(first[case]["tokens"], second[case]["tokens"])
        assert torch.equal(first[case]["chunked"], second[case]["chunked"])
        assert torch.equal(first[case]["sampled"], second[case]["sampled"])


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_caches_its_kv_heads(parity, case) -> None:
    heads = parity["models"][case].config.num_key_value_heads
    for rank in parity["ranks"]:
        assert rank[case]["cache_heads"] == max(1, heads // WORLD)


@pytest.mark.parametrize("case", ["gqa", "wide_tied", "vocab"])
def test_two_all_reduces_per_layer_per_step(parity, case) -> None:
    """2 per layer, of one fp32 row of hidden state; vocab-parallel adds the embedding's sum and
    the logits' gather (V / N floats from each rank)."""
    config = parity["models"][case].config
    layers = 2 * config.num_hidden_layers
    for rank in parity["ranks"]:
        calls, nbytes = rank[case]["step_collectives"]
        if case == "vocab":
            assert (calls, nbytes) == (layers + 2, ((layers + 1) * config.hidden_size + config.vocab_size // 2) * 4)
        else:
            assert (calls, nbytes) == (layers, layers * config.hidden_size * 4)


def test_ranks_loading_different_checkpoints_are_refused(parity) -> None:
    for rank in parity["ranks"]:
        assert rank["mismatch"].startswith("CheckpointError") and "differs across ranks" in rank["mismatch"]
        assert "ranks [0] load" in rank["mismatch"] and "gqa_window" in rank["mismatch"]


def test_heads_that_do_not_divide_are_refused_on_every_rank(parity) -> None:
    for rank in parity["ranks"]:
        assert rank["indivisible"].startswith("ConfigError") and "num_key_value_heads (3)" in rank["indivisible"]


# ---------------------------------------------------------------------------------- plan (no processes)
def test_plan_refuses_heads_that_do_not_divide() -> None:
    from mistral_lm.errors import ConfigError
    from mistral_lm.parallel import plan_tensor_parallel

    with pytest.raises(ConfigError, match=r"num_attention_heads \(4\) divisible by 3"):
        plan_tensor_parallel(tiny_config(), 3, 0)
    with pytest.raises(ConfigError, match=r"num_key_value_heads \(3\)"):
        plan_tensor_parallel(tiny_config(hidden_size=96, num_attention_heads=6, num_key_value_heads=3), 2, 0)
    with pytest.raises(ConfigError, match=r"intermediate_size \(130\)"):
        plan_tensor_parallel(tiny_config(intermediate_size=130), 4, 0)


def test_init_without_torchrun_environment_names_the_variables(monkeypatch) -> None:
    from mistral_lm.errors import ConfigError
    from mistral_lm.parallel import init_distributed

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"torchrun --nproc-per-node N.*RANK"):
        init_distributed()


def test_plan_slices_tile_every_weight() -> None:
    """Column-parallel slices of all ranks cover each weight once, in order (kv heads: once per
    replica), and rank r's query heads read exactly its kv heads (h // group)."""
    from mistral_lm.parallel import plan_tensor_parallel

    config = tiny_config(num_attention_heads=8, num_key_value_heads=4, hidden_size=128)
    for n in (1, 2, 4, 8):
        plans = [plan_tensor_parallel(config, n, r) for r in range(n)]
        group = config.num_attention_heads // config.num_key_value_heads
        for plan in plans:
            assert {h // group for h in plan.q_heads} == set(plan.kv_heads)
        rows = [i for p in plans for i in range(*_bounds(p.split("model.layers.0.self_attn.q_proj.weight")))]
        assert rows == list(range(config.num_attention_heads * config.head_dim))
        columns = [i for p in plans for i in range(*_bounds(p.split("model.layers.0.mlp.down_proj.weight")))]
        assert columns == list(range(config.intermediate_size))
        assert plans[0].split("model.embed_tokens.weight").dim is None


def _bounds(split) -> tuple[int, int]:  # noqa: ANN001
    return split.start, split.stop


def test_sharded_forward_with_autograd_is_refused() -> None:
    """The hooks sum in place, which autograd cannot see: a grad-enabled forward is an error
    (the hook raises before any collective, so no process group is needed)."""
    from mistral_lm import MistralForCausalLM
    from mistral_lm.errors import ConfigError
    from mistral_lm.parallel import plan_tensor_parallel, shard_model

    model = MistralForCausalLM(tiny_config())
    shard_model(model, plan_tensor_parallel(model.config, 2, 0))
    with pytest.raises(ConfigError, match="inference only"):
        model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q4_K"])
def test_gguf_blocks_shard_without_requantizing(kind) -> None:
    """GGUFLinear over each rank's rows (column-parallel) concatenates to the full output; over
    each rank's block-aligned columns (row-parallel) it sums to it. 2 ranks, 512 columns."""
    gguf = pytest.importorskip("gguf")
    from mistral_lm.errors import ConfigError
    from mistral_lm.parallel import Split, shard_gguf_blocks
    from mistral_lm.quantization import GGUFLinear

    kind_enum = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[kind_enum]  # random valid blocks: codes, small float16 d (and min)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (128, 512 // block, size), dtype=np.uint8)
    scales = (rng.standard_normal((128, 512 // block, 2)) * 0.01).astype(np.float16)
    data[..., 0:4] = scales.view(np.uint8).reshape(128, -1, 4)
    tensor = SimpleNamespace(ggml_type=kind_enum, shape=(128, 512), data=data.reshape(128, -1))
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))

    def run(part, inputs):  # noqa: ANN001
        return GGUFLinear.from_quantized(part, compute_dtype=torch.float32)(inputs)

    full = run(tensor, x)
    rows = torch.cat([run(shard_gguf_blocks(tensor, Split(0, r * 64, r * 64 + 64)), x) for r in range(2)], -1)
    torch.testing.assert_close(rows, full, rtol=0, atol=0)
    summed = sum(run(shard_gguf_blocks(tensor, Split(1, r * 256, r * 256 + 256)), x[:, r * 256: r * 256 + 256])
                 for r in range(2))
    torch.testing.assert_close(summed, full, rtol=1e-5, atol=1e-4)
    with pytest.raises(ConfigError, match="blocks"):
        shard_gguf_blocks(tensor, Split(1, 0, 160 if kind == "Q4_K" else 48))


def test_shard_model_in_memory_matches_the_plan(tmp_path) -> None:
    """shard_model on an in-memory model: weights are the plan's slices, heads and config divided."""
    from mistral_lm import MistralForCausalLM
    from mistral_lm.parallel import plan_tensor_parallel, shard_model

    model = MistralForCausalLM(tiny_config())
    full = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_tensor_parallel(model.config, 2, 1)
    shard_model(model, plan)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, plan.split(key).apply(full[key])), key
    attention = model.model.layers[0].self_attn
    assert (attention.num_heads, attention.num_kv_heads) == (2, 1)
    assert model.config.num_key_value_heads == 1 and model.tensor_parallel.full_config.num_key_value_heads == 2
    assert model.make_cache(1).keys[0].shape[1] == 1
    with pytest.raises(CheckpointError, match="tensor-parallel shard"):  # it would write slices as a model
        model.save_pretrained(tmp_path)


# ---------------------------------------------------------------------------------- faults
@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tp_fault") / "gqa"
    _write_folder(folder, CASES["gqa"])
    return str(folder)


@SLOW
def test_a_rank_that_never_starts_is_reported_after_the_timeout(gqa_folder) -> None:
    runs = _launch("crash", {"folder": gqa_folder, "how": "crash", "timeout_s": 3}, timeout=60, started=1)
    assert runs[0]["returncode"] not in (0, None) and runs[0]["seconds"] < 60
    assert "DistributedError: could not join the process group" in runs[0]["output"], runs[0]["output"][-2000:]


@pytest.mark.parametrize("how", ["crash", pytest.param("hang", marks=SLOW)])
def test_a_failing_rank_makes_the_other_exit(gqa_folder, how) -> None:
    """crash: rank 1's process dies; hang: rank 1 stops joining collectives (timeout 3 s). Either
    way rank 0 exits non-zero with DistributedError naming the layer, well under 60 s."""
    runs = _launch("crash", {"folder": gqa_folder, "how": how, "timeout_s": 3}, timeout=90, linger=1)
    survivor = runs[0]
    assert survivor["returncode"] not in (0, None), survivor["output"][-2000:]
    assert "DistributedError" in survivor["output"] and "all-reduce after model.layers." in survivor["output"]
    assert survivor["seconds"] < 60
    if how == "crash":
        assert runs[1]["returncode"] != 0 and "injected failure on rank 1" in runs[1]["output"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"parity": _worker_parity, "crash": _worker_crash}[sys.argv[1]](json.loads(sys.argv[2]))
    torch.distributed.destroy_process_group()  # gloo's threads stopped before interpreter teardown
    # and no teardown at all: torch's store and gloo keep C++ threads that interpreter finalization
    # can still race (a rank that had written its results died with SIGABRT, "terminate called
    # without an active exception", once in CI); this process has nothing left to flush but stdio
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
