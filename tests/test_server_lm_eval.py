"""lm-evaluation-harness `local-completions` runs a multiple-choice task through the server.

The task (tests/data/lm_eval_tiny: 10 questions, 4 choices) is scored by lm-eval the way it scores
MMLU or HellaSwag against vLLM: token-id prompt lists with `echo`, `logprobs: 1`, `max_tokens: 1`,
its tokenizer served by /tokenizer_info and /tokenize. The oracle is a direct teacher-forced
computation by the library (`evaluation.token_logprobs`) on the same token ids: every
continuation's log-likelihood within 1e-4, the same greedy flags, hence the same accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

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


def test_lm_eval_multiple_choice_equals_teacher_forced(model: Any, tokenizer: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = (TASK_DIR / "tiny_mc.yaml").read_text().replace("DATA_FILE", str(TASK_DIR / "tiny_mc.jsonl"))
    (tmp_path / "tiny_mc.yaml").write_text(task)
    running = _Server(create_app(Engine(model, tokenizer), "tiny-mistral"))
    try:
        results = simple_evaluate(
            model="local-completions",
            model_args={"base_url": running.url + "/v1/completions", "model": "tiny-mistral",
                        "tokenizer_backend": "remote", "batch_size": 8, "max_retries": 1, "max_length": 512},
            tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            log_samples=True, bootstrap_iters=0,
        )
    finally:
        running.close()
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
