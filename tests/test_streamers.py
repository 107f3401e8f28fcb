"""StreamingDetokenizer and the Transformers-protocol streamers: streamed text == decode."""

from __future__ import annotations

import importlib.resources
import itertools
import queue
import threading
from pathlib import Path

import pytest
import sentencepiece
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral_lm.errors import GenerationError
from mistral_lm.streamers import TextIteratorStreamer, TextStreamer
from mistral_lm.tokenizer import MistralTokenizer, StreamingDetokenizer
from mistral_lm.tokenizer.detokenizer import _clean_up_cut, _clean_up_tokenization

V1 = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=40)
# What Transformers' clean-up rewrites (" .", " ' ", " n't", ...), densely.
CLEANUP_TEXT = st.lists(st.sampled_from([" ", "'", " ' ", "n't", "n", "s", "ve", "re", "m", ".", ",", "?", "!", "a"]),
                       max_size=20).map("".join)
CORPUS = (Path(__file__).parent / "data" / "tokenizer_corpus.txt").read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def tok() -> MistralTokenizer:
    return MistralTokenizer.from_pretrained(V1)


@pytest.fixture(scope="module")
def byte_level() -> MistralTokenizer:
    from tokenizers import ByteLevelBPETokenizer

    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(CORPUS.split("\n"), vocab_size=400, special_tokens=["<|endoftext|>"])
    return MistralTokenizer(tokenizer_object=trained._tokenizer, eos_token="<|endoftext|>", add_bos_token=False)


def stream(tokenizer: MistralTokenizer, ids: list[int], cuts: list[int], **options: bool) -> list[str]:
    """Feed `ids` in pieces split at `cuts`; return every chunk, the final flush included."""
    detok = StreamingDetokenizer(tokenizer, **options)
    bounds = [0, *sorted({c % (len(ids) + 1) for c in cuts}), len(ids)]
    return [*(detok.add(ids[a:b]) for a, b in itertools.pairwise(bounds)), detok.finish()]


@settings(max_examples=150, deadline=None)
@given(text=TEXT | CLEANUP_TEXT, cuts=st.lists(st.integers(0, 200), max_size=8), skip=st.booleans(),
       clean=st.booleans(), eos=st.booleans())
def test_chunks_concatenate_to_decode(tok, text, cuts, skip, clean, eos):
    ids = tok.encode(text) + ([tok.eos_token_id] if eos else [])
    chunks = stream(tok, ids, cuts, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
    assert not any("\ufffd" in chunk for chunk in chunks)  # valid text never shows a half character


@settings(max_examples=500, deadline=None)
@given(held=CLEANUP_TEXT, following=CLEANUP_TEXT)
def test_clean_up_cut_is_final_whatever_follows(held, following):
    """The streaming rule behind clean_up_tokenization_spaces=True (decode applies Transformers' clean-up)."""
    cut = _clean_up_cut(held)
    clean = _clean_up_tokenization
    assert clean(held[:cut]) + clean(held[cut:] + following) == clean(held + following)


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 31999) | st.integers(3, 258), max_size=30), cuts=st.lists(st.integers(0, 40)),
       skip=st.booleans())
def test_arbitrary_ids_stream_equals_decode(tok, ids, cuts, skip):
    """Invalid byte sequences and special tokens included (decode itself is checked against sentencepiece)."""
    assert "".join(stream(tok, ids, cuts, skip_special_tokens=skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_character_split_over_byte_pieces_appears_once_complete(tok):
    reference = sentencepiece.SentencePieceProcessor(model_file=str(V1))
    euro = [reference.piece_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    detok = StreamingDetokenizer(tok)
    assert [detok.add(i) for i in euro] == ["", "", "€"]
    assert [detok.add(i) for i in euro[:2]] == ["", ""] and detok.finish() == "\ufffd\ufffd"
    assert reference.decode(euro[:2]) == "\ufffd\ufffd"


def test_first_piece_loses_its_dummy_prefix_space_only(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    detok = StreamingDetokenizer(tok)
    assert [detok.add(i) for i in ids] == ["Hello", " world"]
    detok = StreamingDetokenizer(tok, skip_special_tokens=True)
    assert [detok.add(i) for i in [tok.bos_token_id, *ids]] == ["", "Hello", " world"]


@settings(max_examples=60, deadline=None)
@given(text=TEXT, cuts=st.lists(st.integers(0, 200), max_size=8))
def test_byte_level_vocabulary_streams(byte_level, text, cuts):
    ids = byte_level.encode(text)
    chunks = stream(byte_level, ids, cuts)
    assert "".join(chunks) == byte_level.decode(ids) == text
    assert not any("\ufffd" in chunk for chunk in chunks)


def generate(streamer: TextStreamer, prompt: list[int], steps: list[int]) -> None:
    """What generate() does with a streamer: the prompt as (1, T), each step as (1,), then end()."""
    streamer.put(torch.tensor([prompt]))
    for token in steps:
        streamer.put(torch.tensor([token]))
    streamer.end()


def test_text_streamer_prints_decode(tok, capsys):
    prompt = tok.encode("[INST] Say something [/INST]")
    steps = [*tok.encode("Sure: 東京 😀 €5, naïve!", add_special_tokens=False), tok.eos_token_id]
    generate(TextStreamer(tok), prompt, steps)
    assert capsys.readouterr().out == tok.decode([*prompt, *steps]) + "\n"
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    generate(streamer, prompt, steps)
    generate(streamer, prompt, steps)  # reusable: end() resets it
    assert capsys.readouterr().out == 2 * (tok.decode(steps, skip_special_tokens=True) + "\n")


def test_text_iterator_streamer_from_a_thread(tok):
    prompt = tok.encode("Hi")
    steps = tok.encode("Bonjour à tous 👋 — ça va ?", add_special_tokens=False)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=10)
    producer = threading.Thread(target=generate, args=(streamer, prompt, steps))
    producer.start()
    chunks = list(streamer)
    producer.join()
    assert "".join(chunks) == tok.decode(steps) and len(chunks) > 1
    with pytest.raises(queue.Empty):
        next(iter(TextIteratorStreamer(tok, timeout=0.01)))


def test_streamers_reject_batches_and_unknown_options(tok):
    streamer = TextStreamer(tok)
    with pytest.raises(GenerationError, match="batch of 2"):
        streamer.put(torch.tensor([[1, 2], [1, 3]]))
    streamer.put(torch.tensor([1, 2]))  # a (T,) prompt
    with pytest.raises(GenerationError, match="batch size > 1"):
        streamer.put(torch.tensor([5, 6]))
    with pytest.raises(TypeError, match="skip_special"):
        TextStreamer(tok, skip_special=True)
