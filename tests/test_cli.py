"""The command line end to end, in subprocesses (error paths also in-process), on the embedded default model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import default_model_or_skip, gguf_reader

default_model_or_skip()


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistral_lm", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)


def test_generate_greedy_matches_library_call():
    from mistral_lm import runtime

    result = _run("generate", "Name a colour.", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    model, tok = runtime.load_for_inference(None)  # the CLI's defaults: the GGUF's own blocks
    ids = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                  return_tensors="pt")
    out = model.generate(ids, max_new_tokens=12, eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert result.stdout.strip() == expected.strip()


def test_chat_from_stdin_keeps_conversation_and_resets():
    result = _run("chat", "--max-new-tokens", "8", stdin="Hello!\nWhat did I just say?\n/reset\nHi\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert "conversation cleared" in result.stderr
    assert len(result.stdout.strip().splitlines()) >= 3


def test_info_prints_config_and_parameter_count():
    import numpy as np

    from mistral_lm.defaults import default_model_path

    result = _run("info")
    assert result.returncode == 0, result.stderr
    reader = gguf_reader(str(default_model_path()))  # independent count: every tensor in the file
    expected = sum(int(np.prod(t.shape)) for t in reader.tensors)
    assert '"model_type": "llama"' in result.stdout and f"parameters: {expected:,}" in result.stdout


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00garbage", b"not a model at all"])
def test_bad_model_file_is_one_clear_line(content, tmp_path, capsys):
    """In-process, `main` as the console script calls it: an exception escaping it fails the
    test as its traceback would fail the user (the subprocess path: the missing-model test)."""
    from mistral_lm.cli import main

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    assert main(["generate", "hi", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:")


def test_missing_model_is_one_clear_line(tmp_path):
    result = _run("info", "--model", str(tmp_path / "nope.gguf"))
    assert result.returncode == 2 and "not found" in result.stderr and "Traceback" not in result.stderr


def test_kv_cache_dtype_reaches_the_model_from_every_command(monkeypatch):
    """--kv-cache-dtype is parsed by generate, chat and serve and reaches the loader they share;
    without it a GGUF's own blocks get the float16 cache from_pretrained gives them."""
    import torch

    from mistral_lm import cli
    from mistral_lm.runtime import load_for_inference

    parser = cli.build_parser()
    for command in (["generate", "hi"], ["chat"], ["serve"]):
        assert parser.parse_args([*command, "--kv-cache-dtype", "float32"]).kv_cache_dtype == "float32"
        assert parser.parse_args(command).kv_cache_dtype is None
    path = default_model_or_skip()
    assert load_for_inference(path)[0].kv_cache_dtype == torch.float16
    assert load_for_inference(path, kv_cache_dtype="float32")[0].make_cache(1).keys[0].dtype == torch.float32
