"""`torchrun --nproc-per-node 2 -m mistral_lm generate ...`: the CLI's answer under tensor parallel
equals the single-process CLI's (sampled with the seed it printed, fp32), printed once; commands
that cannot run in step are refused with one line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .test_parallel import _write_folder

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_model_v1) -> Path:
    path = tmp_path_factory.mktemp("tp-cli")
    _write_folder(path, dict(vocab_size=32000, num_attention_heads=4, num_key_value_heads=2))
    shutil.copy(tokenizer_model_v1, path / "tokenizer.model")
    return path


def test_torchrun_generate_equals_one_process(folder: Path) -> None:
    """The CLI samples by default with a seed of its own: under torchrun rank 0's seed is every
    rank's (ranks that drew different tokens would sum different activations), so the answer
    equals one process's with the seed it printed."""
    args = ["-m", "mistral_lm", "generate", "--model", str(folder), "--max-new-tokens", "12", "--raw",
            "Once upon a time"]
    parallel = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args])
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    seeds = re.findall(r"; seed (\d+)\]", parallel.stderr)
    assert len(seeds) == 2 and seeds[0] == seeds[1], parallel.stderr[-3000:]  # each rank's stats line
    single = _run([sys.executable, *args, "--seed", seeds[0]])
    assert single.returncode == 0, single.stderr[-2000:]
    assert single.stdout.strip() and parallel.stdout == single.stdout  # rank 0 alone writes the answer


def test_interactive_commands_are_refused_under_torchrun(folder: Path) -> None:
    run = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "mistral_lm", "chat", "--model", str(folder)], timeout=120)
    assert run.returncode != 0 and "only `generate` and `serve` run tensor parallel" in run.stderr
