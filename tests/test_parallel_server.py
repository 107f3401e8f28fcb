"""`mistral-lm serve` under tensor parallel (2 gloo ranks): rank 0 serves HTTP and runs the engine,
rank 1 replays its steps on its shard (server/runner.py). Greedy answers equal `generate()` on the
whole model, batched requests included; a clean stop ends both ranks; a lost rank stops rank 0."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from .test_parallel import _free_port, _write_folder  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROMPTS = ["Once upon a time", "The capital of France", "1, 2, 3,", "Hello there, my friend"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_model_v1) -> Path:
    path = tmp_path_factory.mktemp("tp-serve")
    _write_folder(path, dict(vocab_size=32000, num_attention_heads=4, num_key_value_heads=2, sliding_window=8))
    shutil.copy(tokenizer_model_v1, path / "tokenizer.model")
    return path


def _start(folder: Path) -> tuple[str, list[subprocess.Popen]]:
    port, master = _free_port(), _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master)}
        procs.append(subprocess.Popen([sys.executable, "-m", "mistral_lm", "serve", "--model", str(folder),
                                       "--port", str(port)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url, procs
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError("the tensor-parallel server did not start:\n" +
                                 "\n".join((p.communicate()[0] or "")[-2000:] for p in procs))
        time.sleep(0.3)


def _complete(url: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 20, "temperature": 0}
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def test_served_answers_equal_generate_and_stop_cleanly(folder: Path) -> None:
    from mistral_lm import MistralForCausalLM
    from mistral_lm.tokenizer import MistralTokenizer

    model = MistralForCausalLM.from_pretrained(folder).eval()
    tok = MistralTokenizer.from_pretrained(folder)
    expected = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id)
        expected.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    url, procs = _start(folder)
    try:
        with ThreadPoolExecutor(4) as pool:  # concurrent: rows join and leave the batch on both ranks
            answers = list(pool.map(lambda p: _complete(url, p), PROMPTS))
        assert answers == expected
        assert [_complete(url, p) for p in PROMPTS[:2]] == expected[:2]  # again: the prefix cache's copies
    finally:
        procs[0].send_signal(signal.SIGINT)
        outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)


def test_a_lost_rank_stops_the_server(folder: Path) -> None:
    url, procs = _start(folder)
    try:
        procs[1].kill()
        procs[1].wait()
        start = time.monotonic()
        with pytest.raises(httpx.HTTPError):
            _complete(url, "Anyone there?")
        output = procs[0].communicate(timeout=60)[0]
        assert time.monotonic() - start < 60 and procs[0].returncode == 2, output[-3000:]
        assert "error: a tensor-parallel rank failed, so the server stopped" in output
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
