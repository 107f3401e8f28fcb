"""Log-probabilities, echo, prompt lists, penalties and the smaller OpenAI surface, through real clients.

References are computed by the library outside the server: `evaluation.token_logprobs` (chunked,
teacher-forced through the KV cache) for every chosen token, one uncached full forward for the
top alternatives, `generate()` for greedy texts, and a plain loop of uncached forwards with
OpenAI's penalty formula written out for `frequency_penalty` / `presence_penalty`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from .test_server import (  # noqa: F401  (fixtures: imported to be registered here)
    API_KEY, _chat_ids, _one_intra_op_thread, _prompt, _reference, _Server, _text, client, engine, model, model_dir,
    openai, server, tokenizer,
)

httpx = pytest.importorskip("httpx")

from mistral_lm.evaluation import token_logprobs  # noqa: E402
from mistral_lm.server.app import create_app  # noqa: E402
from mistral_lm.server.engine import Engine  # noqa: E402

TOL = 1e-4  # the bound between served and teacher-forced log-probabilities
MODEL = "tiny-mistral"


def _teacher_forced(model: Any, ids: list[int]) -> list[float]:
    """log p(ids[i+1] | ids[:i+1]) for every i, by the library's evaluation path."""
    return token_logprobs(model, torch.tensor([ids])).logprobs.tolist()


def _full_logp(model: Any, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-softmax of one uncached forward over the whole sequence."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0].float(), dim=-1)


def _strip_eos(tokens: list[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] == 2 else tokens


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


# --------------------------------------------------------------------------- chat logprobs
def test_chat_logprobs_equal_teacher_forced(client: Any, model: Any, tokenizer: Any) -> None:
    ids = _chat_ids(tokenizer, "Tell me something")
    tokens = _strip_eos(_reference(model, ids, 20))
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me something"}],
                                           max_tokens=20, temperature=0, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert len(content) == len(tokens)
    expected = _teacher_forced(model, ids + tokens)[len(ids) - 1:]
    errors = [abs(entry.logprob - lp) for entry, lp in zip(content, expected)]
    assert max(errors) < TOL, f"max |served - teacher-forced| = {max(errors):.2e}"
    full = _full_logp(model, ids + tokens)
    raw = tokenizer.token_table.raw
    for i, (entry, token) in enumerate(zip(content, tokens)):
        assert bytes(entry.bytes) == raw[token]
        values, alternatives = full[len(ids) - 1 + i].topk(5)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [raw[t] for t in alternatives.tolist()]
        assert max(abs(t.logprob - v) for t, v in zip(entry.top_logprobs, values.tolist())) < TOL
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the chosen token is the most likely


def test_chat_logprobs_stream_per_chunk(client: Any) -> None:
    messages = [{"role": "user", "content": _prompt(4)}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                           logprobs=True, top_logprobs=2)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    assert all(len(e.top_logprobs) == 2 for e in streamed)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


# --------------------------------------------------------------------------- completions: echo, lists
def test_lm_eval_shaped_request_scores_prompts(client: Any, model: Any, tokenizer: Any) -> None:
    """lm-eval's loglikelihood request: token-id lists, echo, logprobs 1, max_tokens 1, temperature 0."""
    prompts = [tokenizer.encode(_prompt(i)) for i in (1, 5, 9)]
    out = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    worst = 0.0
    for ids, choice in zip(prompts, out.choices):
        generated = _reference(model, ids, 1)
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + len(_strip_eos(generated))
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = _teacher_forced(model, ids + generated)[: len(lp.token_logprobs) - 1]
        worst = max(worst, *(abs(a - b) for a, b in zip(lp.token_logprobs[1:], expected)))
        full = _full_logp(model, ids)
        for i in range(1, len(ids)):  # the alternatives plus the token itself, as OpenAI lists them
            best = int(full[i - 1].argmax())
            assert abs(max(lp.top_logprobs[i].values()) - float(full[i - 1, best])) < TOL
            assert lp.tokens[i] in lp.top_logprobs[i] and len(lp.top_logprobs[i]) <= 2
        assert choice.text == tokenizer.decode(ids + generated, skip_special_tokens=True)
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert worst < TOL, f"max |served - teacher-forced| = {worst:.2e}"
    assert out.usage.prompt_tokens == sum(map(len, prompts))


def test_echo_with_max_tokens_zero(client: Any, model: Any, tokenizer: Any) -> None:
    text = "The quick brown fox jumps"
    ids = tokenizer.encode(text)
    out = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=0, max_tokens=0)
    choice = out.choices[0]
    assert (choice.text, choice.finish_reason, out.usage.completion_tokens) == (text, "length", 0)
    expected = _teacher_forced(model, ids)
    assert max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs[1:], expected)) < TOL
    raw = tokenizer.token_table.raw
    assert choice.logprobs.tokens == [raw[t].decode() for t in ids]
    decoded = [tokenizer.decode(ids[:i], skip_special_tokens=True) for i in range(len(ids))]
    assert choice.logprobs.text_offset == [len(d) for d in decoded]  # characters before each token
    no_logprobs = client.completions.create(model=MODEL, prompt=text, echo=True, max_tokens=0)
    assert no_logprobs.choices[0].text == text and no_logprobs.choices[0].logprobs is None


def test_echo_streams_the_same_as_whole(client: Any) -> None:
    body = dict(model=MODEL, prompt=_prompt(3), echo=True, logprobs=2, max_tokens=6, temperature=0)
    whole = client.completions.create(**body).choices[0]
    chunks = list(client.completions.create(**body, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs


@pytest.mark.parametrize("shape", ["strings", "ids"])
def test_prompt_lists_give_n_choices_per_prompt_in_order(client: Any, model: Any, tokenizer: Any, shape: str) -> None:
    texts = [_prompt(i) for i in (0, 2, 6)]
    prompts: list[Any] = texts if shape == "strings" else [tokenizer.encode(t) for t in texts]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=8, temperature=0)
    assert [c.index for c in out.choices] == list(range(6))
    for k, choice in enumerate(out.choices):
        ids = tokenizer.encode(texts[k // 2])
        assert choice.text == _text(tokenizer, _reference(model, ids, 8))


# --------------------------------------------------------------------------- penalties and bias
def _penalized_greedy(model: Any, ids: list[int], steps: int, presence: float, frequency: float) -> list[int]:
    """Greedy decoding by uncached forwards, OpenAI's formula applied in a loop over the vocabulary counts."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out]), use_cache=False).logits[0, -1].double()
            for token in set(out):
                c = out.count(token)
                logits[token] -= c * frequency + (1.0 if c > 0 else 0.0) * presence
            out.append(int(logits.argmax()))
            if out[-1] == 2:
                break
    return out


def test_penalties_follow_openai_formula(client: Any, model: Any, tokenizer: Any) -> None:
    text = _prompt(2)
    ids = tokenizer.encode(text)
    plain = _reference(model, ids, 24)
    changed = 0
    # Negative penalties reward repeats: this random model's answers never repeat on their own.
    for presence, frequency in ((0.0, -2.0), (-2.0, 0.0), (1.0, -1.5)):
        expected = _penalized_greedy(model, ids, 24, presence, frequency)
        changed += expected != plain
        out = client.completions.create(model=MODEL, prompt=text, max_tokens=24, temperature=0,
                                        presence_penalty=presence, frequency_penalty=frequency)
        assert out.choices[0].text == _text(tokenizer, expected), (presence, frequency)
    assert changed >= 2, "the penalties did not change the greedy answers: the test would prove nothing"


def test_logit_bias_steers_but_logprobs_stay_raw(client: Any, model: Any, tokenizer: Any) -> None:
    ids = tokenizer.encode(_prompt(1))
    target = 1000
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, logprobs=0,
                                    logit_bias={str(target): 100})
    assert out.choices[0].logprobs.tokens == [token_text(tokenizer, target)] * 5
    expected = _teacher_forced(model, ids + [target] * 5)[len(ids) - 1:]
    assert max(abs(a - b) for a, b in zip(out.choices[0].logprobs.token_logprobs, expected)) < TOL


def token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.token_table.raw[token].decode()


# --------------------------------------------------------------------------- the smaller surface
def test_developer_role_is_system(client: Any) -> None:
    def ask(role: str) -> str:
        messages = [{"role": role, "content": "Answer in French."}, {"role": "user", "content": "Hello"}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                              temperature=0).choices[0].message.content
    assert ask("developer") == ask("system")


def test_models_by_id_and_unknown_model(client: Any, server: str) -> None:
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-4")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert err.value.code == "model_not_found" and err.value.param == "model"


def test_bad_fields_are_400s_and_the_engine_keeps_serving(client: Any, server: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"messages": messages, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": messages, "logit_bias": {"99999": 1}}, "logit_bias"),
        ({"messages": messages, "presence_penalty": 2.5}, "presence_penalty"),
    ]
    for body, param in bad:
        response = _post(server, "/v1/chat/completions", {"model": MODEL, **body})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    response = _post(server, "/v1/completions", {"model": MODEL, "prompt": [[1, 2], [40000]], "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = _post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True, "max_tokens": 0,
                                                  "logprobs": 30})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logprobs"
    reply = client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=3, temperature=0, logprobs=1)
    assert len(reply.choices) == 2 and all(len(c.logprobs.tokens) > 0 for c in reply.choices)


def test_tokenizer_endpoints(server: str, tokenizer: Any) -> None:
    text = "Hello world, once more"
    ids = tokenizer.encode(text)
    out = _post(server, "/tokenize", {"prompt": text}).json()
    assert (out["tokens"], out["count"], out["max_model_len"]) == (ids, len(ids), 512)
    bare = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True}).json()
    assert bare["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert "".join(bare["token_strs"]) == "".join(tokenizer.token_table.raw[t].decode() for t in bare["tokens"])
    chat = _post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == _chat_ids(tokenizer, "hi")
    assert _post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}
    info = httpx.get(server + "/tokenizer_info", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert (info["eos_token"], info["bos_token"]) == (tokenizer.eos_token, tokenizer.bos_token)
    for path, body in (("/tokenize", {"prompt": 3}), ("/tokenize", {}), ("/detokenize", {"tokens": ["a"]}),
                       ("/detokenize", {"tokens": [10**6]})):
        response = _post(server, path, body)
        assert response.status_code == 400 and response.json()["error"]["param"], (path, body, response.text)


def test_lm_eval_remote_tokenizer_accepts_the_server(server: str, tokenizer: Any) -> None:
    utils = pytest.importorskip("lm_eval.utils")
    assert utils.check_remote_tokenizer_support(server + "/v1/completions", auth_token=API_KEY)
    remote = utils.RemoteTokenizer(server + "/v1/completions", auth_token=API_KEY)
    assert remote.eos_token_id == tokenizer.eos_token_id
    assert remote.encode("Hello there") == tokenizer.encode("Hello there", add_special_tokens=False)


def test_cors_origin_option(model: Any, tokenizer: Any) -> None:
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    for origins, allowed in ((["http://app.example"], True), (None, False)):
        running = _Server(create_app(Engine(model, tokenizer), MODEL, cors_origins=origins))
        try:
            response = httpx.options(running.url + "/v1/chat/completions", headers=preflight)
        finally:
            running.close()
        assert (response.headers.get("access-control-allow-origin") == "http://app.example") == allowed


def test_serve_without_fastapi_names_the_extra() -> None:
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "from mistral_lm.cli import main\n"
            "sys.exit(main(['serve', '--model', 'unused']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mistral_lm[serve]" in lines[0] and "Traceback" not in result.stderr


def test_serve_loads_like_the_cli(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    """`serve` and `mistral-lm generate` load through one function with one set of defaults."""
    from mistral_lm import cli, runtime
    from mistral_lm.server import app

    calls: list[tuple[Any, ...]] = []

    class Stop(Exception):
        pass

    def fake(*args: Any) -> Any:
        calls.append(args)
        raise Stop

    monkeypatch.setattr(runtime, "load_for_inference", fake)
    with pytest.raises(Stop):
        app.serve(model_dir, quantize="int8")
    with pytest.raises(Stop):
        cli.load(str(model_dir), None, "int8")
    assert calls == [(model_dir, None, "int8", None), (model_dir, None, "int8", None)]
    assert runtime.load_options(Path("m.gguf"))["gguf_native"] is True
    assert runtime.load_options(model_dir) == {"gguf_native": False}
    assert cli.build_parser().parse_args(["serve"]).quantize == "auto"


@pytest.fixture(autouse=True)
def _no_leftover_rows(engine: Engine) -> Iterator[None]:
    """Whatever a test sent, the shared engine ends idle (no row or request leaks)."""
    yield
    import time

    deadline = time.monotonic() + 20
    while engine.stats()["active_rows"] or engine.stats()["waiting"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.02)
    assert engine.counts["failed"] == 0
