"""lm-evaluation-harness `local-completions` runs a multiple-choice task through the server.

The task (tests/data/lm_eval_tiny: 10 questions, 4 choices) is scored by lm-eval the way it scores
MMLU or HellaSwag against vLLM: token-id prompt lists with `echo`, `logprobs: 1`, `max_tokens: 1`,
its tokenizer served by /tokenizer_info and /tokenize. The oracle is a direct teacher-forced
computation by the library (`evaluation.token_logprobs`) on the same token ids: every
continuation's log-likelihood within 1e-4, the same greedy flags, hence the same accuracy; and
`lm_eval --model hf` (Transformers) on the same checkpoint folder gives that accuracy too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import shutil

from .test_server import _one_intra_op_thread, _Server, model, model_dir, tokenizer  # noqa: F401

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("datasets")
pytest.importorskip("tenacity")  # lm-eval's [api] extra

from mistral_lm.evaluation import token_logprobs  # noqa: E402
from mistral_lm.server.app import create_app  # noqa: E402
from mistral_lm.server.engine import Engine  # noqa: E402

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_tiny"


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's rule: trailing spaces of the context move to the continuation; the continuation's
    ids are those of the whole text after the context's (no special tokens, as its remote tokenizer)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def _direct(model: Any, tokenizer: Any, context: str, continuation: str) -> tuple[float, bool]:
    ctx, cont = _encode_pair(tokenizer, context, continuation)
    scores = token_logprobs(model, torch.tensor([ctx + cont]))
    tail = slice(len(ctx) - 1, None)
    greedy = bool((scores.predictions[tail] == scores.targets[tail]).all())
    return float(scores.logprobs[tail].sum()), greedy


def test_lm_eval_multiple_choice_equals_teacher_forced(model: Any, tokenizer: Any, model_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = (TASK_DIR / "tiny_mc.yaml").read_text().replace("DATA_FILE", str(TASK_DIR / "tiny_mc.jsonl"))
    (tasks / "tiny_mc.yaml").write_text(task)

    def evaluate(model_name: str, model_args: dict[str, Any]) -> dict[str, Any]:
        return simple_evaluate(model=model_name, model_args=model_args, tasks=["tiny_mc"], log_samples=True,
                               task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                               bootstrap_iters=0)

    running = _Server(create_app(Engine(model, tokenizer), "tiny-mistral"))
    try:
        results = evaluate("local-completions", {
            "base_url": running.url + "/v1/completions", "model": "tiny-mistral", "tokenizer_backend": "remote",
            "batch_size": 8, "max_retries": 1, "max_length": 512})
    finally:
        running.close()
    folder = tmp_path / "hf"  # the checkpoint with a tokenizer Transformers reads
    shutil.copytree(model_dir, folder)
    tokenizer.save_pretrained(folder)
    # lm-eval's remote tokenizer encodes without special tokens; its hf backend adds BOS unless told not to.
    hf = evaluate("hf", {"pretrained": str(folder), "dtype": "float32", "device": "cpu", "batch_size": 8,
                         "add_bos_token": False})
    samples = results["samples"]["tiny_mc"]
    assert len(samples) == 10
    worst, correct = 0.0, 0
    for sample in samples:
        direct = [_direct(model, tokenizer, *args) for args in sample["arguments"]]
        served = [tuple(r[0]) for r in sample["resps"]]
        worst = max(worst, *(abs(s[0] - d[0]) for s, d in zip(served, direct)))
        assert [s[1] for s in served] == [d[1] for d in direct]
        correct += max(range(len(direct)), key=lambda i: direct[i][0]) == sample["target"]
    print(f"lm-eval tiny_mc: acc {correct / len(samples):.2f}, max |served - direct| {worst:.2e}")
    assert worst < 1e-4, f"max |lm-eval via server - teacher-forced| = {worst:.2e}"
    assert results["results"]["tiny_mc"]["acc,none"] == correct / len(samples)
    assert hf["results"]["tiny_mc"]["acc,none"] == results["results"]["tiny_mc"]["acc,none"]
    hf_worst = max(abs(a[0][0] - b[0][0]) for x, y in zip(hf["samples"]["tiny_mc"], samples)
                   for a, b in zip(x["resps"], y["resps"]))
    print(f"lm-eval tiny_mc: max |server - hf| {hf_worst:.2e}")
    assert hf_worst < 1e-4
