"""The OpenAI-compatible server: protocol validation, the batching engine, and HTTP end to end.

The oracle for every generated text is `generate()` on the same model, one prompt at a time:
whatever the engine does with rows, slots and joins, greedy text must equal that. The HTTP tests
talk to a real uvicorn server on 127.0.0.1 through the official `openai` client and raw `httpx`.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
import uvicorn  # noqa: E402

from mistral_lm import MistralForCausalLM  # noqa: E402
from mistral_lm.generation import generate  # noqa: E402
from mistral_lm.server.app import create_app, serve  # noqa: E402
from mistral_lm.server.engine import Delta, Engine, Finished, _StopMatcher  # noqa: E402
from mistral_lm.server.protocol import ProtocolError, parse_chat, parse_completion  # noqa: E402
from mistral_lm.tokenizer import MistralTokenizer  # noqa: E402

from .conftest import tiny_config  # noqa: E402

API_KEY = "test-key"
CONTEXT = 512  # max_position_embeddings of the test model: small, so "too long" is cheap to build
WINDOW = 12  # prompts and answers run past it, so the rolling buffer wraps


def _tiny_model(window: int | None) -> MistralForCausalLM:
    """A random model whose greedy answers depend on the whole context (not one repeated token)."""
    torch.manual_seed(0)
    model = MistralForCausalLM(tiny_config(vocab_size=32000, max_position_embeddings=CONTEXT, sliding_window=window))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine every OpenMP barrier
    waits for a descheduled peer: measured 20x slower steps with 2 threads on a loaded 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_model_v1: Path) -> Path:
    folder = tmp_path_factory.mktemp("tiny-mistral")
    _tiny_model(WINDOW).save_pretrained(folder)
    shutil.copy(tokenizer_model_v1, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def model(model_dir: Path) -> MistralForCausalLM:
    return MistralForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> MistralTokenizer:
    return MistralTokenizer.from_pretrained(model_dir)


class _Server:
    """uvicorn in a thread, on a free loopback port bound before the thread starts."""

    def __init__(self, app: Any) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def engine(model: MistralForCausalLM, tokenizer: MistralTokenizer) -> Engine:
    return Engine(model, tokenizer, max_batch_size=32, max_queue=64)


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[str]:
    app = create_app(engine, "tiny-mistral", api_key=API_KEY, max_body_bytes=64 * 1024)
    running = _Server(app)
    yield running.url
    running.close()


@pytest.fixture()
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _reference(model: Any, ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of one prompt alone, by generate() (EOS, id 2, included when reached)."""
    out = generate(model, torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=2)
    return out[0, len(ids):].tolist()


def _text(tokenizer: MistralTokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _chat_ids(tokenizer: MistralTokenizer, content: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _prompt(i: int) -> str:
    """Prompts of 8 to ~60 tokens: some shorter than the window, most longer."""
    return f"Question {i}: what follows? " + "lorem ipsum dolor " * (i % 7) * 2


def _stream_chat(url: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The parsed data events of a streamed chat, and whether [DONE] closed it."""
    events, done = [], False
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line:
                continue
            assert not done, "data after [DONE]"
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
            else:
                events.append(json.loads(line[len("data: "):]))
    return events, done


def _wait_for(predicate: Any, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


# --------------------------------------------------------------------------- protocol (pure)
@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 1000}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": "x"}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": "x"}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 101}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"a": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, "bogus"),
])
def test_chat_validation_names_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_chat(body)
    assert err.value.param == param and err.value.status == 400
    assert param.split("[")[0].split(".")[0] in err.value.message


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": ["one", 2]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": ["x"] * 129}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "echo": True, "max_tokens": -1}, "max_tokens"),
    ({"prompt": "hi", "echo": 1}, "echo"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "logprobs": True}, "logprobs"),
])
def test_completion_validation_names_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_completion(body)
    assert err.value.param == param


def test_completion_defaults_follow_openai() -> None:
    request = parse_completion({"prompt": ["hello"], "temperature": 0, "stop": "x", "frequency_penalty": 0})
    assert (request.prompts, request.max_tokens, request.n, request.stop) == (("hello",), 16, 1, ("x",))
    config = request.generation_config(16, [2])
    assert not config.do_sample and config.top_k == 0  # temperature 0 is greedy; OpenAI has no top-k
    sampled = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                          "temperature": 0.7, "top_p": 0.9, "seed": 5}).generation_config(8, [2])
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.seed) == (True, 0.7, 0.9, 5)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abc ", max_size=30), cuts=st.lists(st.integers(0, 30), max_size=8),
       stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), min_size=1, max_size=4))
def test_stop_strings_split_across_pieces(text: str, cuts: list[int], stops: list[str]) -> None:
    """Whatever the split, the answer ends where a stop string first appears in the text received
    so far (checked after each piece, as a server checks after each token), without the stop."""
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    matcher = _StopMatcher(tuple(stops))
    out, stopped = "", False
    for piece in pieces:
        sent, stopped = matcher.feed(piece)
        out += sent
        if stopped:
            break
    if not stopped:
        out += matcher.release()
    expected, received = text, ""
    for piece in pieces:
        received += piece
        starts = [i for i in (received.find(s) for s in stops) if i >= 0]
        if starts:
            expected = received[:min(starts)]
            break
    assert (out, stopped) == (expected, expected != text or any(s in text for s in stops))


# --------------------------------------------------------------------------- engine (no HTTP)
def _events(engine: Engine, bodies: list[dict[str, Any]]) -> list[list[Any]]:
    """Submit completion bodies at once, then start the engine (so its first iteration sees the
    whole burst); every request's events, up to its Finished."""
    results: list[list[Any]] = [[] for _ in bodies]
    done = threading.Semaphore(0)

    def collector(k: int) -> Any:
        def emit(events: list[Any]) -> None:
            results[k].extend(events)
            if any(isinstance(e, Finished) for e in events):
                done.release()
        return emit

    for k, body in enumerate(bodies):
        engine.submit(parse_completion(body), collector(k))
    engine.start()
    for _ in bodies:
        assert done.acquire(timeout=120), "a request never finished"
    return results


def _run(engine: Engine, bodies: list[dict[str, Any]]) -> list[tuple[list[str], list[str | None], Finished]]:
    """Each request's texts and finish reasons, checking every choice ends exactly once."""
    out = []
    for body, events in zip(bodies, _events(engine, bodies)):
        n = body.get("n", 1)
        texts, reasons = [""] * n, [None] * n
        for e in events[:-1]:
            assert isinstance(e, Delta) and reasons[e.index] is None, "an event after a choice's end"
            texts[e.index] += e.text
            reasons[e.index] = e.finish_reason
        assert isinstance(events[-1], Finished) and events[-1].error is None and all(reasons)
        out.append((texts, reasons, events[-1]))
    return out


@pytest.mark.parametrize("window", [None, 8], ids=["static-cache", "rolling-cache"])
def test_engine_greedy_equals_each_prompt_alone(tokenizer: MistralTokenizer, window: int | None) -> None:
    """Rows join (several per step, or one prompt over several steps) and leave (different
    lengths) while others decode; a batch of 3 makes later requests wait for freed rows, so
    joins land at many offsets."""
    model = _tiny_model(window)
    engine = Engine(model, tokenizer, max_batch_size=3, prefill_tokens=40)
    try:
        bodies = [{"prompt": _prompt(i), "max_tokens": 6 + 5 * (i % 4), "temperature": 0} for i in range(9)]
        results = _run(engine, bodies)
    finally:
        engine.close()
    for body, (texts, reasons, finished) in zip(bodies, results):
        ids = tokenizer.encode(body["prompt"])
        tokens = _reference(model, ids, body["max_tokens"])
        assert texts == [_text(tokenizer, tokens)]
        assert finished.prompt_tokens == len(ids) and finished.completion_tokens == len(tokens)
        assert reasons == ["stop" if tokens[-1] == 2 else "length"]
    assert engine.counts["decoded_rows"] > 1.5 * engine.counts["decode_steps"], "rows did not share forwards"
    assert engine.stats()["active_rows"] == 0


def test_engine_n_choices_and_seeds(engine: Engine, model: Any, tokenizer: MistralTokenizer) -> None:
    """n greedy choices all equal the greedy answer; a seeded sampled request gives the same
    text alone and in a busy batch; different seeds give different texts."""
    prompt = _prompt(3)
    sampled = {"prompt": prompt, "max_tokens": 20, "temperature": 1.0, "n": 3, "seed": 11}
    alone = _run(engine, [sampled])[0][0]
    busy = _run(engine, [{"prompt": _prompt(i), "max_tokens": 20, "temperature": 0} for i in range(6)]
                + [sampled, {**sampled, "seed": 12}, {"prompt": prompt, "max_tokens": 12, "temperature": 0, "n": 2}])
    assert busy[6][0] == alone
    assert busy[7][0] != alone
    assert len(set(alone)) > 1, "the n sampled choices are not independent"
    greedy = _text(tokenizer, _reference(model, tokenizer.encode(prompt), 12))
    assert busy[8][0] == [greedy, greedy]


def test_engine_samples_by_the_inverse_cdf(engine: Engine, monkeypatch) -> None:
    """The server draws its sampled tokens with one uniform number a row, not torch.multinomial
    (an exponential number per vocabulary entry, slower than a batched step: bench/RESULTS.md)."""
    from mistral_lm import sampling

    used: list[str] = []

    def spy(name, draw):  # noqa: ANN001, ANN202
        def counted(logits, generator):  # noqa: ANN001, ANN202
            used.append(name)
            return draw(logits, generator)
        return counted

    for name, draw in list(sampling.SAMPLERS.items()):
        monkeypatch.setitem(sampling.SAMPLERS, name, spy(name, draw))
    _run(engine, [{"prompt": _prompt(1), "max_tokens": 4, "temperature": 0.8, "seed": 3}])
    assert used and set(used) == {"inverse_cdf"}


def test_engine_thread_computes_with_the_servers_thread_count(tokenizer: MistralTokenizer) -> None:
    """torch's intra-op thread count is per thread and a new thread starts at 1: the engine's
    thread must run with the count set where the engine was made (`--threads`, or torch's
    default), or every kernel of the server runs on one core."""
    model = _tiny_model(None)
    threads = []
    step = model.forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        threads.append(torch.get_num_threads())
        return step(*args, **kwargs)

    model.forward = recording
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = Engine(model, tokenizer)
    finally:
        torch.set_num_threads(before)
    try:
        _run(engine, [{"prompt": _prompt(0), "max_tokens": 3, "temperature": 0}])
    finally:
        engine.close()
    assert threads and set(threads) == {2}


def test_engine_survives_a_failed_step(tokenizer: MistralTokenizer) -> None:
    """A forward that raises (think out-of-memory) fails the requests in flight, each with one
    Finished event naming the failure, and the next requests are served normally."""
    model = _tiny_model(None)
    forward, calls = model.forward, [0]

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("simulated failure")
        return forward(*args, **kwargs)

    model.forward = flaky
    engine = Engine(model, tokenizer)
    try:
        bodies = [{"prompt": _prompt(i), "max_tokens": 8, "temperature": 0} for i in range(3)]
        failed = _events(engine, bodies)
        after = _run(engine, bodies[:1])
    finally:
        engine.close()
    assert all(isinstance(events[-1], Finished) and "failed" in events[-1].error for events in failed)
    assert engine.counts["failed"] == 3
    ids = tokenizer.encode(bodies[0]["prompt"])
    assert after[0][0] == [_text(tokenizer, _reference(model, ids, 8))]


def test_engine_refuses_when_full_or_closed(model: Any, tokenizer: MistralTokenizer) -> None:
    """The engine thread stalls in the first request's first emit, so no request can finish
    and free its row while the loop submits: a loaded machine once descheduled the submitting
    thread long enough for the first request to decode all its tokens, and a fourth was queued."""
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=1)
    request = parse_completion({"prompt": "x", "max_tokens": CONTEXT - 8})
    engine.start()
    submissions, refused = [], None
    finished = threading.Semaphore(0)
    submitting = threading.Event()

    def emit(events: list[Any]) -> None:
        submitting.wait(timeout=60)
        if any(isinstance(e, Finished) for e in events):
            finished.release()

    for _ in range(6):  # one decoding, one waiting for a row, one queued: the next is refused
        try:
            submissions.append(engine.submit(request, emit))
        except ProtocolError as exc:
            refused = exc
            break
    submitting.set()
    assert refused is not None and refused.status == 429 and len(submissions) <= 3
    for s in submissions:
        s.cancel()
    for _ in submissions:
        assert finished.acquire(timeout=30), "a cancelled request got no Finished event"
    engine.close()
    assert engine.counts["cancelled"] == len(submissions)
    with pytest.raises(ProtocolError) as err:
        engine.submit(request, emit)
    assert err.value.status == 503


# --------------------------------------------------------------------------- HTTP end to end
def test_chat_and_completion_through_the_openai_client(client: openai.OpenAI, model: Any,
                                                       tokenizer: MistralTokenizer) -> None:
    ids = _chat_ids(tokenizer, "Hello there")
    tokens = _reference(model, ids, 24)
    chat = client.chat.completions.create(model="tiny-mistral", messages=[{"role": "user", "content": "Hello there"}],
                                          max_tokens=24, temperature=0)
    assert chat.object == "chat.completion" and chat.model == "tiny-mistral"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == _text(tokenizer, tokens)
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(ids), len(tokens))
    assert chat.usage.total_tokens == len(ids) + len(tokens)

    prompt_ids = tokenizer.encode("Once upon a time")
    tokens = _reference(model, prompt_ids, 16)
    completion = client.completions.create(model="tiny-mistral", prompt="Once upon a time", temperature=0)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == _text(tokenizer, tokens)  # OpenAI's default max_tokens is 16
    assert completion.usage.completion_tokens == len(tokens)
    by_ids = client.completions.create(model="tiny-mistral", prompt=prompt_ids, temperature=0)
    assert by_ids.choices[0].text == completion.choices[0].text
    assert [m.id for m in client.models.list().data] == ["tiny-mistral"]


def test_streaming_equals_the_whole_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": _prompt(5)}]
    whole = client.chat.completions.create(model="tiny-mistral", messages=messages, max_tokens=30, temperature=0)
    stream = client.chat.completions.create(model="tiny-mistral", messages=messages, max_tokens=30, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    text = client.completions.create(model="tiny-mistral", prompt=_prompt(2), max_tokens=20, temperature=0).choices[0].text
    streamed = client.completions.create(model="tiny-mistral", prompt=_prompt(2), max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_stop_strings_end_the_answer(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny-mistral", prompt=_prompt(4), max_tokens=30, temperature=0).choices[0]
    assert len(full.text) > 8, "the test needs a longer answer"
    stop = full.text[5:8]
    expected = full.text[:full.text.find(stop)]
    cut = client.completions.create(model="tiny-mistral", prompt=_prompt(4), max_tokens=30, temperature=0, stop=[stop, "\x00"])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expected, "stop")
    streamed = client.completions.create(model="tiny-mistral", prompt=_prompt(4), max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_32_concurrent_streams_equal_each_prompt_alone(server: str, engine: Engine, model: Any,
                                                       tokenizer: MistralTokenizer) -> None:
    prompts = [_prompt(i) for i in range(32)]
    budgets = [12 + 4 * (i % 5) for i in range(32)]
    steps_before = dict(engine.counts)

    def one(i: int) -> tuple[str, str | None, int]:
        body = {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": budgets[i], "temperature": 0,
                "stream_options": {"include_usage": True}}
        events, done = _stream_chat(server, body)
        assert done
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        reasons = [e["choices"][0]["finish_reason"] for e in events
                   if e["choices"] and e["choices"][0]["finish_reason"]]
        assert len(reasons) == 1, "a choice must end exactly once"
        return text, reasons[0], events[-1]["usage"]["completion_tokens"]

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32), timeout=120))
    for i, (text, reason, produced) in enumerate(answers):
        tokens = _reference(model, _chat_ids(tokenizer, prompts[i]), budgets[i])
        assert (text, produced) == (_text(tokenizer, tokens), len(tokens)), f"request {i} differs from running alone"
        assert reason == ("stop" if tokens[-1] == 2 else "length")
    steps = engine.counts["decode_steps"] - steps_before["decode_steps"]
    rows = engine.counts["decoded_rows"] - steps_before["decoded_rows"]
    assert rows > 4 * steps, f"32 clients averaged {rows / steps:.1f} rows per forward: they did not share it"


def test_http_errors_are_openai_shaped(client: openai.OpenAI, server: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-mistral", messages=messages, temperature=3)
    assert err.value.param == "temperature" and "temperature" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-mistral", messages=[{"role": "user", "content": "word " * CONTEXT}])
    assert err.value.param == "messages" and "max_position_embeddings" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-mistral", prompt="hi", max_tokens=CONTEXT)
    assert err.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-mistral", messages=[{"role": "assistant", "content": "first"}])
    assert err.value.param == "messages" and "alternate" in err.value.message  # the chat template refused it
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny-mistral", prompt=[40000])
    assert err.value.param == "prompt"
    for key in ("wrong-key", API_KEY + "x", ""):
        bad = openai.OpenAI(base_url=server + "/v1", api_key=key or "none", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.code == "invalid_api_key"
    assert httpx.get(server + "/v1/models").status_code == 401  # no key at all
    assert httpx.get(server + "/health").status_code == 200  # health checks need no key
    missing = httpx.get(server + "/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"})
    assert missing.status_code == 404 and "error" in missing.json()


def test_abuse_leaves_the_server_serving(server: str, engine: Engine, client: openai.OpenAI) -> None:
    """Malformed JSON, oversized bodies, bad parameters and clients that hang up mid-stream,
    all at once with good requests: every good request is answered exactly once and in full,
    every hang-up frees its rows, and the server keeps serving."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    url = server + "/v1/chat/completions"
    before = dict(engine.counts)

    def good(i: int) -> str:
        events, done = _stream_chat(server, {"messages": [{"role": "user", "content": _prompt(i)}], "max_tokens": 16,
                                             "temperature": 0})
        assert done and sum(1 for e in events if e["choices"] and e["choices"][0]["finish_reason"]) == 1
        return "ok"

    def hang_up(i: int) -> str:
        body = {"messages": [{"role": "user", "content": _prompt(i)}], "max_tokens": CONTEXT - 80, "stream": True}
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            for _ in range(3):  # the role chunk, then two deltas: the request is decoding
                next(events)
        return "hung up"

    def malformed(i: int) -> int:
        body = b'{"messages": [' if i % 2 else b"[" * 50_000  # truncated; nested past Python's recursion limit
        return httpx.post(url, content=body, headers=headers).status_code

    def oversized(i: int) -> int:
        return httpx.post(url, content=b"x" * (65 * 1024), headers=headers).status_code

    def invalid(i: int) -> int:
        body = {"messages": [{"role": "user", "content": "hi"}], "n": "two"}
        return httpx.post(url, json=body, headers=headers).status_code

    jobs = [good] * 8 + [hang_up] * 4 + [malformed] * 2 + [oversized] * 2 + [invalid] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda k: jobs[k](k), range(len(jobs)), timeout=120))
    assert results == ["ok"] * 8 + ["hung up"] * 4 + [400, 400, 413, 413, 400, 400]
    _wait_for(lambda: engine.stats()["active_rows"] == 0 and engine.stats()["waiting"] == 0)
    counts = {k: engine.counts[k] - before[k] for k in ("submitted", "completed", "cancelled", "failed")}
    assert counts == {"submitted": 12, "completed": 8, "cancelled": 4, "failed": 0}
    reply = client.chat.completions.create(model="tiny-mistral", messages=[{"role": "user", "content": "still there?"}],
                                           max_tokens=4, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_hang_up_frees_rows_at_once(server: str, engine: Engine) -> None:
    """A non-streaming client that hangs up while its answer is decoding is cancelled at once."""
    before = dict(engine.counts)
    body = json.dumps({"prompt": "x", "max_tokens": CONTEXT - 8, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body)
        _wait_for(lambda: engine.stats()["active_rows"] == 1, seconds=10)
    _wait_for(lambda: engine.stats()["active_rows"] == 0, seconds=10)
    assert engine.counts["cancelled"] == before["cancelled"] + 1
    assert engine.counts["completed"] == before["completed"]


def test_serve_binds_loopback_by_default() -> None:
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def test_default_model_smoke() -> None:
    """The packaged SmolLM2 answers a chat through the server (its own chat template, byte-level BPE)."""
    from mistral_lm.errors import CheckpointError

    try:
        from mistral_lm.defaults import default_model_path

        path = default_model_path()
    except (ImportError, CheckpointError) as exc:
        pytest.skip(f"no default model: {exc}")
    from mistral_lm.runtime import load_for_inference

    model, tokenizer = load_for_inference(path)  # what `serve` loads: the GGUF's own blocks
    running = _Server(create_app(Engine(model, tokenizer), path.stem))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model=path.stem, messages=[{"role": "user", "content": "What is 2+2?"}],
                                               max_tokens=12, temperature=0)
    finally:
        running.close()
    assert reply.choices[0].message.content.strip()
    assert 0 < reply.usage.completion_tokens <= 12


def test_serve_gives_back_the_loading_threads_openmp_pool() -> None:
    """serve() loads in the main thread, whose multi-threaded OpenMP regions leave it a pool of
    OpenMP threads; beside the engine thread's pool the process would have more OpenMP threads than
    CPUs, so libgomp would let every idle thread sleep at once and each decode step's regions
    would wait for one to wake. `release_openmp_threads` gives the pool back (a fresh interpreter:
    a 2-thread region leaves one more thread, released after the call), and later regions still
    compute."""
    import subprocess
    import sys

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("counts threads in /proc (Linux)")
    code = """
import os, torch
from mistral_lm.server.app import release_openmp_threads
def region():
    torch.set_num_threads(2)
    return float((torch.ones(1 << 22) * 2).sum())
threads = lambda: len(os.listdir("/proc/self/task"))
assert region() == 2.0 * (1 << 22)
with_pool = threads()
released = release_openmp_threads()
print(released, with_pool, threads(), region() == 2.0 * (1 << 22))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    released, with_pool, after, still = done.stdout.split()
    if released != "True":
        pytest.skip("this torch's OpenMP runtime has no omp_pause_resource_all")
    assert int(after) == int(with_pool) - 1 and still == "True"
