"""The fused native decode step (fused_step.py, native/step.c) against the module path.

The reference is the model's own modules run one by one (each kernel of which has its own
pure-torch reference in tests/test_native_*.py): the fused step calls the same kernels in the
same order, so the logits must be equal bit for bit, on the default model (Q4_1 layers, a Q8_0
tied head, llama.cpp's Q/K row order) and in every situation where it runs: batches at different
positions, a sliding window that wraps, 1 or 2 threads. Where the modules would compute something
else (a hook, per-layer outputs, a changed module or weight), the step must not run.
"""

from __future__ import annotations

import pytest
import torch

from mistral_lm import MistralForCausalLM, fused_step
from mistral_lm.decoding import Decoder, prefill
from mistral_lm.native import ggml
from mistral_lm.native import step as native_step
from mistral_lm.quantization.gguf_blocks import GGUFBlockLinear

from .conftest import default_model_or_skip, torch_threads

PATH = default_model_or_skip()
pytestmark = pytest.mark.skipif(not native_step.available(), reason="the C kernels could not be built here")


@pytest.fixture
def model() -> MistralForCausalLM:
    return MistralForCausalLM.from_pretrained(PATH, gguf_native=True)


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """The steps the fused path ran, each as its tokens per row: 1 for a decode step, T for a
    prompt's chunk of T tokens."""
    seen: list[int] = []
    run = native_step.decode_layers

    def counted(*args):
        seen.append(args[2].T)
        return run(*args)

    monkeypatch.setattr(native_step, "decode_layers", counted)
    return seen


def modules_only(monkeypatch) -> None:
    monkeypatch.setattr(fused_step, "decode_layers", lambda *args: None)
    monkeypatch.setattr(fused_step, "decode_logits", lambda *args: None)


def decode(model, ids: torch.Tensor, mask: torch.Tensor, steps: int, cache_size: int = 96) -> torch.Tensor:
    """Prefill left-padded prompts, then greedy single-token steps, each row at its own position;
    every step's logits (steps + 1, B, V)."""
    with torch.inference_mode():
        cache = model.make_cache(ids.shape[0], cache_size)
        logits = [prefill(model, cache, ids, mask, 1024)]
        positions = mask.sum(1)
        step = Decoder(model)
        for i in range(steps):
            logits.append(step(logits[-1].argmax(-1), positions + i, cache))
    return torch.stack(logits)


def prompts(b: int = 3, t: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 2000, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    for row in range(1, b):  # rows of different lengths, left-padded
        mask[row, : 2 * row] = 0
    return ids, mask


@pytest.mark.parametrize("kv_cache_dtype", [None, torch.bfloat16, torch.float32],
                         ids=["float16_cache", "bf16_cache", "float32_cache"])
def test_fused_step_equals_the_modules_bitwise(kv_cache_dtype, calls, monkeypatch):
    """The default float16 cache and a bfloat16 one (the step rounds the keys and values it
    writes as the cache's `.to(dtype)` does, and attends float32 queries over them), and a
    float32 one."""
    model = MistralForCausalLM.from_pretrained(PATH, gguf_native=True, kv_cache_dtype=kv_cache_dtype)
    assert model.make_cache(1).keys[0].dtype == (kv_cache_dtype or torch.float16)
    ids, mask = prompts()
    fused = decode(model, ids, mask, 12)
    assert calls == [12] + [1] * 12  # the prompt's chunk and every decode step took the fused path
    modules_only(monkeypatch)
    assert torch.equal(fused, decode(model, ids, mask, 12))


def test_a_wrapping_window_and_one_thread_change_nothing(model, calls, monkeypatch):
    model.config.sliding_window = 8  # a rolling cache of 8 slots, wrapped three times over
    ids, mask = prompts(2, 6)
    fused = decode(model, ids, mask, 24)
    assert calls == [1] * 24 and model.make_cache(1).rolling  # a rolling cache's chunk: the modules
    with torch_threads(1):
        assert torch.equal(fused, decode(model, ids, mask, 24))
    modules_only(monkeypatch)
    assert torch.equal(fused, decode(model, ids, mask, 24))


@pytest.mark.parametrize("threads", [3, 5])
def test_any_thread_count_gives_the_modules_bits(model, calls, monkeypatch, threads):
    """Threads split every projection's rows and the attention's (row, key/value head) items:
    more threads than the machine's cores, and than the default model's 3 key/value heads, give
    some threads uneven shares or none, and change no bit."""
    ids, mask = prompts(4, 10)
    with torch_threads(threads):
        fused = decode(model, ids, mask, 6)
    assert calls == [10] + [1] * 6
    modules_only(monkeypatch)
    assert torch.equal(fused, decode(model, ids, mask, 6))


def read_prompt(model, ids: torch.Tensor, mask: torch.Tensor, chunk: int) -> tuple[torch.Tensor, list, list]:
    """Every position's logits of prompts read in chunks of `chunk` tokens, and the cache's keys
    and values after them."""
    with torch.inference_mode():
        cache = model.make_cache(ids.shape[0], 64)
        logits = [model(ids[:, s:s + chunk], attention_mask=mask[:, :s + chunk], past_key_values=cache,
                        use_cache=True, logits_to_keep=0).logits for s in range(0, ids.shape[1], chunk)]
    return torch.cat(logits, 1), [k.clone() for k in cache.keys], [v.clone() for v in cache.values]


@pytest.mark.parametrize("kv_cache_dtype", [None, torch.bfloat16, torch.float32],
                         ids=["float16_cache", "bf16_cache", "float32_cache"])
def test_a_prompts_chunks_equal_the_modules_bitwise(kv_cache_dtype, calls, monkeypatch):
    """A prompt's chunk of up to MAX_CHUNK_ROWS tokens runs as one step of its tokens' rows,
    each token attending the chunk's earlier ones through the cache: every position's logits and
    the cache's keys and values equal the modules', for a first chunk (plain causal, no mask
    given), chunks after it, left-padded rows, 1 and 3 threads."""
    model = MistralForCausalLM.from_pretrained(PATH, gguf_native=True, kv_cache_dtype=kv_cache_dtype)
    one = torch.randint(0, 2000, (1, 20))
    cases = [(one, torch.ones_like(one), 20), (one, torch.ones_like(one), 7), (*prompts(3, 12), 5)]
    fused = []
    for ids, mask, chunk in cases:
        for threads in (1, 3):
            with torch_threads(threads):
                fused.append(read_prompt(model, ids, mask, chunk))
    assert calls == [20, 20, 7, 7, 6, 7, 7, 6] + [5, 5, 2] * 2
    modules_only(monkeypatch)
    for i, (ids, mask, chunk) in enumerate(cases):
        modules = read_prompt(model, ids, mask, chunk)
        for got in fused[2 * i: 2 * i + 2]:
            assert torch.equal(got[0], modules[0])
            assert all(torch.equal(a, b) for a, b in zip(got[1] + got[2], modules[1] + modules[2]))


def test_longer_chunks_run_the_modules(model, calls, monkeypatch):
    """Past MAX_CHUNK_ROWS tokens (all prompts together) the modules read a chunk faster than the
    step (bench/RESULTS.md); decode steps of any batch still take it."""
    monkeypatch.setattr(fused_step, "MAX_CHUNK_ROWS", 5)
    ids, mask = prompts(1, 6)
    decode(model, ids, mask, 2)
    assert calls == [1, 1]
    ids, mask = prompts(2, 3)
    decode(model, ids, mask, 2)
    assert calls == [1, 1] * 2
    ids, mask = prompts(1, 5)
    decode(model, ids, mask, 2)
    assert calls == [1, 1] * 2 + [5, 1, 1]


def test_a_vouched_span_checks_the_modules_once(model, calls, monkeypatch):
    """Inside `fused_step.vouched` (a driver that owns the model: the server's engine thread) the
    first fused step checks the table against the modules and later steps reuse that check, with
    the same bits; outside a span, and after it ends, every step checks, so a hook registered
    then runs."""
    checks = []
    table_for = fused_step.table_for
    monkeypatch.setattr(fused_step, "table_for", lambda *args: checks.append(1) or table_for(*args))
    ids, mask = prompts(1, 8)
    plain = decode(model, ids, mask, 4)
    assert calls == [8, 1, 1, 1, 1] and len(checks) == 5
    with fused_step.vouched(model.model):
        inside = decode(model, ids, mask, 4)
    assert calls[5:] == [8, 1, 1, 1, 1] and len(checks) == 6 and torch.equal(inside, plain)
    seen = []
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *args: seen.append(1))
    decode(model, ids, mask, 2)
    handle.remove()
    assert len(seen) == 3 and len(calls) == 10  # the prefill and both steps ran the modules


def test_the_engine_vouches_for_its_steps(model, monkeypatch):
    """The server's engine thread owns its model: its steps check the modules once, at its first
    fused step (a prompt's chunk), and the span ends with the engine."""
    import threading

    from mistral_lm.server.engine import Engine, Finished
    from mistral_lm.server.protocol import CompletionRequest
    from mistral_lm.tokenizer import MistralTokenizer

    checks = []
    table_for = fused_step.table_for
    monkeypatch.setattr(fused_step, "table_for", lambda *args: checks.append(1) or table_for(*args))
    tokenizer = MistralTokenizer.from_pretrained(PATH)
    engine = Engine(model, tokenizer)
    done, tokens = threading.Event(), []

    def emit(events):
        for event in events:
            if isinstance(event, Finished):
                done.set()
    request = CompletionRequest(chat=False, messages=None, prompts=("Once upon a time",), max_tokens=6,
                                temperature=0.0, top_p=1.0, n=1, seed=None, stop=(), stream=True,
                                include_usage=True)
    engine.start()
    try:
        engine.submit(request, emit)
        assert done.wait(120)
    finally:
        engine.close()
    assert len(checks) == 1 and engine.counts["decode_steps"] == 5
    assert "_fused_vouched" not in model.model.__dict__  # the span ended with the engine


def test_a_span_vouches_for_its_own_threads_steps_only(model, calls, monkeypatch):
    """A span is its thread's: a forward on another thread while it lasts (a hook of its own
    registered) checks the modules, so the hook runs there; the span's thread reuses its check."""
    import threading

    ids, mask = prompts(1, 8)
    seen, other = [], []
    with fused_step.vouched(model.model):
        decode(model, ids, mask, 2)  # the span's check is made
        fused = len(calls)

        def elsewhere():
            handle = model.model.layers[0].mlp.register_forward_hook(lambda *args: seen.append(1))
            try:
                other.append(decode(model, ids, mask, 1))
            finally:
                handle.remove()

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert len(seen) == 2 and len(calls) == fused  # the other thread's prefill and step ran the modules
        decode(model, ids, mask, 2)  # the hook is gone: the span's thread steps fused again
        assert calls[fused:] == [8, 1, 1]
    assert "_fused_vouched" not in model.model.__dict__


class _Recorder:
    """A streamer of the user's: generate() calls its put between steps."""

    def __init__(self, model, hook_at: int) -> None:
        self.model, self.hook_at, self.puts, self.seen = model, hook_at, 0, []

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == self.hook_at:  # the prompt, then the first tokens: a hook from here on
            self.model.model.layers[0].mlp.register_forward_hook(lambda *args: self.seen.append(1))

    def end(self) -> None:
        pass


def test_generate_checks_once_without_callbacks_of_the_users(model, calls, monkeypatch):
    """generate() with no streamer, or one of ours, runs no code of the user's between steps: its
    fused steps check the modules once, with the same tokens. A streamer of the user's may change
    the model between steps (here: a hook after the second token), and the next step sees it."""
    from mistral_lm import TextStreamer
    from mistral_lm.tokenizer import MistralTokenizer

    checks = []
    table_for = fused_step.table_for
    monkeypatch.setattr(fused_step, "table_for", lambda *args: checks.append(1) or table_for(*args))
    ids = torch.randint(0, 2000, (1, 8))
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert len(checks) == 1 and calls == [8, 1, 1, 1, 1, 1]
    streamer = TextStreamer(MistralTokenizer.from_pretrained(PATH))
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                          streamer=streamer), want)
    assert len(checks) == 2 and "_fused_vouched" not in model.model.__dict__
    recorder = _Recorder(model, hook_at=3)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, streamer=recorder)
    assert len(recorder.seen) == 4  # the hook ran in each of the four steps after it was registered
    assert calls[12:] == [8, 1]  # only the prefill and the step before the hook were fused


def test_threads_step_down_while_the_machine_is_busy_and_come_back():
    threads = fused_step.Threads()

    def busy(wanted: int, used: int) -> None:
        threads.update(wanted, used, waited=0.4)
        threads.update(wanted, used, waited=0.4)

    threads.update(4, 4, waited=0.02)  # a quiet step
    threads.update(4, 4, waited=0.3)  # one busy step alone (a blip) changes nothing
    threads.update(4, 4, waited=0.0)
    assert threads.count(4) == 4
    busy(4, 4)  # two in a row: one thread fewer, for 32 steps
    assert threads.count(4) == 3
    busy(4, 3)  # still busy: one fewer again, now for 64 steps
    assert threads.count(4) == 2
    for _ in range(63):
        threads.update(4, 2, waited=0.0)
        assert threads.count(4) == 2
    threads.update(4, 2, waited=0.0)
    assert threads.count(4) == 4  # the caller's count again
    busy(4, 4)  # busy again: the wait doubles
    for _ in range(128):
        assert threads.count(4) == 3
        threads.update(4, 3, waited=0.0)
    threads.update(4, 4, waited=0.0)  # quiet at the full count: the wait starts over
    busy(4, 4)
    assert (threads.count(4), threads.hold) == (3, 32)
    threads.update(1, 1, waited=0.9)  # one thread waits for no other
    threads.update(1, 1, waited=0.9)
    assert threads.count(1) == 1


def test_a_step_that_waited_for_cpus_runs_the_next_on_fewer_threads(model, monkeypatch):
    """The first two steps report their threads waiting for a CPU all their time, as when another
    process holds a core: the steps after them run on one thread, and the logits stay the
    modules' bit for bit."""
    seen: list[tuple[int, float]] = []
    run = native_step.decode_layers

    def recorded(layers, count, step, x):
        waited = run(layers, count, step, x)
        if step.T > 1:  # the prompt's chunk: not a decode step, whose threads the policy picks
            return waited
        seen.append((step.nthreads, waited))
        return 1.0 if len(seen) <= 2 else waited

    monkeypatch.setattr(native_step, "decode_layers", recorded)
    ids, mask = prompts(2, 6)
    with torch_threads(2):
        fused = decode(model, ids, mask, 6)
        assert torch.get_num_threads() == 2  # the caller's count, put back after each step
    assert [threads for threads, _ in seen] == [2, 2] + [1] * 4
    assert all(0 <= waited <= 1 for _, waited in seen)
    modules_only(monkeypatch)
    assert torch.equal(fused, decode(model, ids, mask, 6))


def test_a_scratch_the_kernels_cannot_allocate_fails_the_step_with_memory_error(model, calls):
    """A projection whose kernel could not allocate its scratch left rows of the step's buffers
    unwritten, and the step went on with them; now the step stops with MemoryError (a 1-byte cap
    on the kernels' scratch stands in for the failed allocation)."""
    from mistral_lm.native import ggml

    ids, mask = prompts(2, 6)
    lib = ggml._lib()
    old = lib.mlm_ggml_scratch_limit(1)
    try:
        with pytest.raises(MemoryError, match="scratch"):
            with torch.inference_mode():
                cache = model.make_cache(2, 32)
                logits = prefill(model, cache, ids, mask, 1024)
    finally:
        lib.mlm_ggml_scratch_limit(old)
    with torch.inference_mode():
        cache = model.make_cache(2, 32)
        logits = prefill(model, cache, ids, mask, 1024)
        old = lib.mlm_ggml_scratch_limit(1)
        try:
            with pytest.raises(MemoryError, match="scratch"):
                Decoder(model)(logits.argmax(-1), mask.sum(1), cache)
        finally:
            lib.mlm_ggml_scratch_limit(old)
    assert calls == [6, 6, 1]


def test_a_hook_or_per_layer_outputs_take_the_modules(model, calls):
    ids, mask = prompts(1, 8)
    seen = []
    handle = model.model.layers[3].mlp.down_proj.register_forward_hook(lambda *args: seen.append(1))
    hooked = decode(model, ids, mask, 3)
    assert not calls and len(seen) == 4  # the prefill and every step ran the hooked module
    handle.remove()
    assert torch.equal(hooked, decode(model, ids, mask, 3)) and calls == [8, 1, 1, 1]
    with torch.inference_mode():
        cache = model.make_cache(1, 32)
        prefill(model, cache, ids, mask, 1024)
        out = model(ids[:, -1:], past_key_values=cache, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1 and calls == [8, 1, 1, 1, 8]


def test_a_changed_module_or_weight_is_seen(model, calls, monkeypatch):
    ids, mask = prompts(2, 8)
    before = decode(model, ids, mask, 2)
    layers = model.model.layers
    other = layers[1].self_attn.o_proj
    layers[0].self_attn.o_proj = GGUFBlockLinear(other.blocks, other.ggml_type, other.in_features, tiled=other.tiled)
    norm = layers[2].post_attention_layernorm
    norm.weight.data = norm.weight.detach() * 1.5  # new storage under the same Parameter
    layers[3].mlp.up_proj.blocks.data = layers[4].mlp.up_proj.blocks.clone()  # and under the same buffer
    after = decode(model, ids, mask, 2)
    assert calls == [8, 1, 1] * 2 and not torch.equal(before, after)
    modules_only(monkeypatch)
    assert torch.equal(after, decode(model, ids, mask, 2))


def test_the_final_norm_is_the_models_own(model, calls, monkeypatch):
    """step.c applies the model's final norm too: a hook on it takes the modules (and runs), and
    a changed epsilon or weight is what the next step applies."""
    ids, mask = prompts(2, 8)
    norm = model.model.norm
    seen = []
    handle = norm.register_forward_hook(lambda *args: seen.append(1))
    hooked = decode(model, ids, mask, 2)
    assert not calls and len(seen) == 3
    handle.remove()
    assert torch.equal(hooked, decode(model, ids, mask, 2)) and calls == [8, 1, 1]
    norm.variance_epsilon = 0.5  # large enough to move every logit
    other_eps = decode(model, ids, mask, 2)
    original = norm.weight.detach().clone()
    norm.weight.data = original * torch.linspace(0.5, 1.5, norm.weight.numel())  # new storage
    other_weight = decode(model, ids, mask, 2)
    assert calls == [8, 1, 1] * 3 and not torch.equal(other_eps, hooked) and not torch.equal(other_weight, other_eps)
    modules_only(monkeypatch)
    assert torch.equal(other_weight, decode(model, ids, mask, 2))
    norm.weight.data = original.clone()
    assert torch.equal(other_eps, decode(model, ids, mask, 2))


@pytest.fixture
def heads(monkeypatch) -> list[bool]:
    """For each fused step, whether the model's head ran inside it."""
    seen: list[bool] = []
    run = native_step.decode_layers

    def counted(*args):
        seen.append(bool(args[2].head))
        return run(*args)

    monkeypatch.setattr(native_step, "decode_layers", counted)
    return seen


def test_the_head_runs_inside_a_decode_step_with_the_modules_bits(model, heads, monkeypatch):
    """A decode step computes the tied Q8_0 head in step.c's threads (a prompt's chunk leaves it
    to the module): the same logits as the head module after the fused layers, and as the
    modules alone."""
    ids, mask = prompts(3, 8)
    fused = decode(model, ids, mask, 5)
    assert heads == [False] + [True] * 5
    monkeypatch.setattr(fused_step, "_head", lambda *args: None)  # the layers fused, the head module after
    assert torch.equal(fused, decode(model, ids, mask, 5)) and heads[6:] == [False] * 6
    modules_only(monkeypatch)
    assert torch.equal(fused, decode(model, ids, mask, 5))


def test_a_hooked_or_changed_head_is_the_one_that_runs(model, heads):
    ids, mask = prompts(2, 8)
    before = decode(model, ids, mask, 3)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda *args: seen.append(1))
    assert torch.equal(before, decode(model, ids, mask, 3))
    assert len(seen) == 4 and heads[4:] == [False] * 4  # the prefill's head and every step's: the module
    handle.remove()
    head = model.lm_head
    rows = ggml.untile(head.blocks, head.kernel_type, head.in_features) if head.tiled else head.blocks
    model.lm_head = GGUFBlockLinear.tiled_from(rows.flip(0).contiguous(), head.ggml_type, head.in_features)  # reversed
    after = decode(model, ids, mask, 3)
    assert heads[8:] == [False, True, True, True]
    assert torch.equal(after[0], before[0].flip(-1))  # the prompt's logits: the same head, rows reversed
    model.lm_head = head
    assert torch.equal(before, decode(model, ids, mask, 3))


def test_a_hook_on_the_model_runs_its_forward_every_step(model, heads):
    """A hook on the causal LM or on its decoder wraps the forward: a decode step calls it."""
    ids, mask = prompts(1, 8)
    before = decode(model, ids, mask, 3)
    for module in (model, model.model):
        seen = []
        handle = module.register_forward_pre_hook(lambda *args: seen.append(1))
        assert torch.equal(before, decode(model, ids, mask, 3)) and len(seen) == 4
        handle.remove()


@pytest.mark.parametrize("kind", ["gguf", "nf4"])
def test_a_model_copies_after_its_fused_steps(model, kind, calls):
    """copy.deepcopy (trl's reference model, for one) of a model that has decoded: the native
    tables it keeps held ctypes pointers, which cannot be copied, and deepcopy raised; the copy
    now builds its own tables, over its own tensors, and computes the same logits."""
    import copy

    if kind == "nf4":
        model = bf16_model("nf4")
        if not native_step.available(True, frozenset({native_step.LIN_NF4})):
            pytest.skip("the bfloat16 kernels could not be built here")
    ids, mask = prompts(2, 6)
    before = decode(model, ids, mask, 3)
    twin = copy.deepcopy(model)
    assert torch.equal(decode(twin, ids, mask, 3), before) and len(calls) == 8
    for name in ("_fused_step", "_fused_head"):
        owner = twin.model if name == "_fused_step" else twin
        mine = model.model if name == "_fused_step" else model
        assert owner.__dict__[name] is not mine.__dict__[name]
    twin.model.norm.weight.data = twin.model.norm.weight.detach() * 2  # the copy's own tensors
    assert torch.equal(decode(model, ids, mask, 3), before)
    with fused_step.vouched_model(model):  # a copy made inside a span is not in it
        decode(model, ids, mask, 1)
        twin = copy.deepcopy(model)
    assert not twin.model.__dict__.get("_fused_vouched")
    with fused_step.vouched_model(twin):  # and opens spans of its own
        assert torch.equal(decode(twin, ids, mask, 3), before)


def test_other_models_never_take_it(calls):
    from .conftest import tiny_config

    dense = MistralForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 128, (1, 6))
    decode(dense, ids, torch.ones_like(ids), 3, cache_size=16)
    assert not calls


def test_a_refused_decode_step_asks_the_native_step_once(monkeypatch):
    """Where the fused step refuses a decode step (here: attention on torch's kernels), the
    step runs the modules after one refusal, not after asking again for the layers alone."""
    asked: list[bool] = []
    fused = fused_step._fused

    def counted(decoder, h, step, cache, stock, head_of):
        asked.append(head_of is not None)
        return fused(decoder, h, step, cache, stock, head_of)

    monkeypatch.setattr(fused_step, "_fused", counted)
    model = MistralForCausalLM.from_pretrained(PATH, gguf_native=True, attn_implementation="sdpa")
    ids, mask = prompts(2, 6)
    with torch.inference_mode():
        cache = model.make_cache(2, 32)
        logits = prefill(model, cache, ids, mask, 1024)
        asked.clear()
        Decoder(model)(logits.argmax(-1), mask.sum(1), cache)
    assert asked == [True]


# ------------------------------------------------------------------ bfloat16 activations
def bf16_model(kind: str) -> MistralForCausalLM:
    from mistral_lm import BitsAndBytesConfig

    if kind == "bf16":
        return MistralForCausalLM.from_pretrained(PATH, torch_dtype=torch.bfloat16)
    if kind == "int8":
        return MistralForCausalLM.from_pretrained(PATH, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    return MistralForCausalLM.from_pretrained(PATH, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=torch.bfloat16))


@pytest.mark.parametrize("kind", ["bf16", "int8", "nf4", "fp4"])
def test_bfloat16_models_fused_step_equals_the_modules_bitwise(kind, calls, monkeypatch):
    """bfloat16 and int8 weights (dense.c) and NF4/FP4 (nf4.c), computing in bfloat16: every
    tensor between kernels is bfloat16 in both paths, rounded at the same points."""
    model = bf16_model(kind)
    kinds = {"bf16": {native_step.LIN_BF16}, "int8": {native_step.LIN_INT8}}.get(kind, {native_step.LIN_NF4})
    if not native_step.available(True, frozenset(kinds)):
        pytest.skip("the bfloat16 kernels could not be built here")
    ids, mask = prompts()
    fused = decode(model, ids, mask, 10)
    # the 3 x 12 rows of the prompts' chunk: within NF4Linear's native rows, past dense.c's
    chunked = kind in ("nf4", "fp4")
    assert calls == [12] * chunked + [1] * 10 and fused.dtype == torch.bfloat16
    with torch_threads(1):
        assert torch.equal(fused, decode(model, ids, mask, 10))
    modules_only(monkeypatch)
    assert torch.equal(fused, decode(model, ids, mask, 10))


@pytest.mark.parametrize("kind", ["bf16", "nf4"])
def test_bfloat16_models_prompt_chunk_equals_the_modules_bitwise(kind, calls, monkeypatch):
    """Under bfloat16 activations each (row, key/value head) item attends whole: a chunk's rows
    attend after a barrier, once every row's keys are in the cache."""
    model = bf16_model(kind)
    kinds = {"bf16": {native_step.LIN_BF16}}.get(kind, {native_step.LIN_NF4})
    if not native_step.available(True, frozenset(kinds)):
        pytest.skip("the bfloat16 kernels could not be built here")
    ids = torch.randint(0, 2000, (1, 7))
    fused = [read_prompt(model, ids, torch.ones_like(ids), 7)]
    with torch_threads(3):
        fused.append(read_prompt(model, ids, torch.ones_like(ids), 7))
    assert calls == [7, 7] and fused[0][0].dtype == torch.bfloat16
    modules_only(monkeypatch)
    modules = read_prompt(model, ids, torch.ones_like(ids), 7)
    for got in fused:
        assert torch.equal(got[0], modules[0])
        assert all(torch.equal(a, b) for a, b in zip(got[1] + got[2], modules[1] + modules[2]))


def test_more_rows_than_the_kernels_take_run_the_modules(calls):
    """A bfloat16 model's linears use dense.c for up to `MatvecLinear.native_max_rows` rows and
    torch's GEMM above: a wider batch must not be fused (it would compute other bits)."""
    from mistral_lm.matvec import MatvecLinear

    model = bf16_model("bf16")
    if not native_step.available(True, frozenset({native_step.LIN_BF16})):
        pytest.skip("the bfloat16 kernels could not be built here")
    ids, mask = prompts(MatvecLinear.native_max_rows + 1, 6)
    decode(model, ids, mask, 2)
    assert not calls


def test_a_model_it_cannot_take_is_not_rebuilt_every_step(monkeypatch):
    """Where the table cannot be built (here: the bfloat16 kernels reported missing), the refusal
    is remembered while the modules stay the same, so steps do not pay a rebuild each."""
    model = bf16_model("bf16")
    builds = []
    build = fused_step._build

    def counted(*args):
        builds.append(1)
        return build(*args)

    monkeypatch.setattr(fused_step, "_build", counted)
    monkeypatch.setattr(native_step, "available", lambda *args: False)
    ids, mask = prompts(1, 6)
    refused = decode(model, ids, mask, 4)
    assert len(builds) == 1
    model.model.layers[1].mlp.down_proj = model.model.layers[2].mlp.down_proj  # a changed module: try again
    decode(model, ids, mask, 2)
    assert len(builds) == 2
    monkeypatch.undo()
    model = bf16_model("bf16")
    assert torch.equal(refused, decode(model, ids, mask, 4))  # the modules computed what the step does


def test_compile_is_skipped_where_the_fused_step_is_faster(model, calls):
    """generate(compile=True) on a model the fused step takes warns and decodes with the fused
    step (faster than the compiled layers, the same tokens) instead of compiling."""
    ids = torch.randint(0, 2000, (1, 8))
    with pytest.warns(RuntimeWarning, match="fused native step"):
        compiled = model.generate(ids, max_new_tokens=6, do_sample=False, compile=True)
    assert calls == [8] + [1] * 5
    assert torch.equal(compiled, model.generate(ids, max_new_tokens=6, do_sample=False))
