"""training.chat_example / pad_batch: loss on assistant turns only (their end-of-turn included),
padding found by length, on the default model's chat template through Transformers' tokenizer."""

from __future__ import annotations

import pytest
import torch

from mistral_lm.training import chat_example, pad_batch

from .conftest import default_model_or_skip, hf_gguf_tokenizer

pytest.importorskip("transformers")

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."}]


@pytest.fixture(scope="module")
def tokenizer():
    path = default_model_or_skip()
    return hf_gguf_tokenizer(path)


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    example = chat_example(tokenizer, CHAT)
    ids, labels = example["input_ids"], example["labels"]
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(ids) == full  # the template's own rendering, nothing added or lost
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    texts = [tokenizer.decode(span) for span in spans]
    eos = tokenizer.eos_token
    # each assistant reply and the end-of-turn token that closes it (what teaches the model to stop)
    assert [t.split(eos)[0] for t in texts] == ["Paris.", "Rome."]
    assert all(eos in t for t in texts)
    assert sum(label != -100 for label in labels) < len(ids) / 2


def test_padding_keeps_eos_in_the_loss_when_pad_is_eos(tokenizer):
    short = chat_example(tokenizer, CHAT[:3])
    long = chat_example(tokenizer, CHAT)
    batch = pad_batch([short, long], pad_token_id=tokenizer.eos_token_id)
    n = len(short["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["labels"][0, n:] == -100).all()
    eos_positions = [i for i, t in enumerate(short["input_ids"]) if t == tokenizer.eos_token_id]
    assert any(batch["labels"][0, i] == tokenizer.eos_token_id for i in eos_positions)
    assert torch.equal(batch["labels"][1], torch.tensor(long["labels"]))
