"""The server's prefix cache: a prompt that starts with a stored one continues from its keys.

Oracle: the same requests on an engine without the cache, and `generate()` on each prompt alone;
greedy texts must be identical. `KVCache.copy` is checked against one uncached forward.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from .test_server import (  # noqa: F401  (fixtures)
    _one_intra_op_thread, _reference, _text, _tiny_model, model_dir, tokenizer,
)

from mistral_lm.server.engine import Engine  # noqa: E402
from mistral_lm.server.prefix_cache import PrefixCache  # noqa: E402
from mistral_lm.server.protocol import parse_chat  # noqa: E402


@pytest.mark.parametrize("window, stored", [(None, 20), (8, 5), (8, 20)],
                         ids=["static", "rolling-short-prefix", "rolling-long-prefix"])
def test_continuing_a_copy_equals_one_forward(window: int | None, stored: int) -> None:
    model = _tiny_model(window)
    ids = torch.randint(3, 32000, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids, use_cache=False).logits[0]
        cache = model.make_cache(1, max_length=stored)
        model(ids[:, :stored], past_key_values=cache, use_cache=True)
        before = [k.clone() for k in cache.keys]
        for _ in range(2):  # twice: the stored cache is not changed by continuing its copy
            copy = cache.copy()
            out = model(ids[:, stored:], past_key_values=copy, use_cache=True).logits[0]
            assert torch.allclose(out, full[stored:], atol=1e-4), float((out - full[stored:]).abs().max())
        assert all(torch.equal(a, b) for a, b in zip(before, cache.keys))


def _chat(engine: Engine, messages: list[dict[str, str]], max_tokens: int, n: int = 1) -> list[str]:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "n": n}
    events: list[Any] = []
    done = threading.Semaphore(0)

    def emit(batch: list[Any]) -> None:
        events.extend(batch)
        if any(type(e).__name__ == "Finished" for e in batch):
            done.release()

    engine.submit(parse_chat(body), emit)
    engine.start()
    assert done.acquire(timeout=120)
    texts = [""] * n
    for e in events[:-1]:
        texts[e.index] += e.text
    assert events[-1].error is None
    return texts


@pytest.mark.parametrize("window", [None, 8], ids=["static-cache", "rolling-cache"])
def test_multi_turn_chat_reuses_the_history_exactly(tokenizer: Any, window: int | None) -> None:
    model = _tiny_model(window)
    cached, plain = Engine(model, tokenizer), Engine(model, tokenizer, prefix_cache_bytes=0)
    try:
        history = [{"role": "user", "content": "Tell me about the sea. " * 6}]
        for turn in range(3):
            answers = [_chat(engine, history, 12) for engine in (cached, plain)]
            ids = tokenizer.apply_chat_template(history, add_generation_prompt=True)
            expected = _text(tokenizer, _reference(model, ids, 12))
            assert answers == [[expected], [expected]], f"turn {turn}"
            history += [{"role": "assistant", "content": expected}, {"role": "user", "content": f"And {turn}?"}]
        first_ids = tokenizer.apply_chat_template(history[:1], add_generation_prompt=True)
        again = _chat(cached, history[:1], 12, n=2)  # the whole first prompt is stored: no prefill at all
        assert again == [_text(tokenizer, _reference(model, first_ids, 12))] * 2
    finally:
        cached.close()
        plain.close()
    assert cached.counts["prefix_hits"] >= 3 and plain.counts["prefix_hits"] == 0
    first = len(tokenizer.apply_chat_template(history[:1], add_generation_prompt=True))
    assert cached.counts["prefix_tokens"] >= 3 * first


def test_lru_stays_within_its_bytes(tokenizer: Any) -> None:
    model = _tiny_model(None)
    caches = []
    with torch.inference_mode():
        for length in (20, 30, 40):
            cache = model.make_cache(1, max_length=length)
            model(torch.arange(3, 3 + length)[None], past_key_values=cache, use_cache=True)
            caches.append(cache)
    store = PrefixCache(max_bytes=caches[1].nbytes() + caches[2].nbytes())
    logits = torch.zeros(1, 8)
    store.add(list(range(3, 23)), caches[0], logits)
    store.add(list(range(3, 33)), caches[1], logits)
    assert store.lookup(list(range(3, 60)))[0] == 30  # the longest stored prefix
    assert store.lookup([3, 4, 99] + list(range(6, 40))) is None  # a prefix must match token for token
    store.add(list(range(3, 43)), caches[2], logits)  # over budget: the least recently used (20) goes
    assert [len(k) for k in store.entries] == [30, 40] and store.nbytes <= store.max_bytes
    store.add(list(range(10)), caches[0], logits)  # shorter than min_tokens: not worth storing
    assert len(store.entries) == 2
