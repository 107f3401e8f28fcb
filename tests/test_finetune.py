"""`mistral-lm finetune` on a tiny random model: the loss on the training chats falls, a resumed
run ends with the same adapter as an uninterrupted one, bad data lines are named, and
`generate --adapter` uses what was trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from mistral_lm.cli import main  # noqa: E402
from mistral_lm.finetune import DataError, FinetuneConfig, finetune, read_conversations  # noqa: E402

from .conftest import tiny_config  # noqa: E402

CHATS = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                       {"role": "assistant", "content": f"Ahoy! The answer is {a + b}."}]}
         for a, b in [(2, 3), (4, 5), (7, 1), (6, 6), (9, 2), (3, 8), (5, 5), (1, 1)]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer_model_v1) -> Path:
    from mistral_lm import MistralForCausalLM

    path = tmp_path_factory.mktemp("ft-model")
    torch.manual_seed(0)
    MistralForCausalLM(tiny_config(vocab_size=32000)).save_pretrained(path)
    shutil.copy(tokenizer_model_v1, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ft-data") / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    return path


def _config(folder, data, out, **kw) -> FinetuneConfig:
    defaults = dict(data=str(data), out=str(out), model=str(folder), steps=12, batch_size=4, lr=5e-3,
                    save_every=6, eval_data=str(data), lora_r=4, seed=0)
    return FinetuneConfig(**{**defaults, **kw})


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_the_loss_on_the_chats_falls(folder, data, tmp_path, mode):
    results = finetune(_config(folder, data, tmp_path / mode, mode=mode, lr=1e-2 if mode == "lora" else 5e-3))
    assert results["eval_loss_after"] < results["eval_loss_before"] - 0.5, results  # from ~ln(32000)
    saved = tmp_path / mode / ("adapter_model.safetensors" if mode == "lora" else "config.json")
    assert saved.is_file() and (tmp_path / mode / "checkpoint-6" / "optimizer.pt").is_file()


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(folder, data, tmp_path):
    from safetensors.torch import load_file

    finetune(_config(folder, data, tmp_path / "whole", eval_data=None))
    finetune(_config(folder, data, tmp_path / "split", steps=6, eval_data=None))  # stops at its checkpoint
    finetune(_config(folder, data, tmp_path / "split", resume=True, eval_data=None))
    whole = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    split = load_file(str(tmp_path / "split" / "adapter_model.safetensors"))
    assert whole.keys() == split.keys()
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=1e-5, atol=1e-6)


def test_bad_lines_are_named_or_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CHATS[0]) + "\n{not json\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not JSON"):
        read_conversations(path)
    log = tmp_path / "log.txt"
    with log.open("w") as sink:
        assert len(read_conversations(path, skip_bad_lines=True, log=sink)) == 1
    assert "bad.jsonl:2 skipped" in log.read_text() and "bad.jsonl:3 skipped" in log.read_text()


def test_cli_finetune_then_generate_with_the_adapter(folder, data, tmp_path, capsys):
    """The CLI trains an adapter, and `generate --adapter` answers as the adapted model does: the same
    text as peft's PeftModel on our model with that folder, and not the base model's text."""
    import peft

    from mistral_lm import MistralForCausalLM
    from mistral_lm.tokenizer import MistralTokenizer

    out = tmp_path / "adapter"
    assert main(["finetune", "--model", str(folder), "--data", str(data), "--out", str(out), "--steps", "10",
                 "--lr", "1e-2", "--batch-size", "8", "--lora-r", "4"]) == 0
    capsys.readouterr()
    assert main(["generate", "What is 2 plus 3?", "--model", str(folder), "--adapter", str(out),
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    tuned = capsys.readouterr().out
    assert main(["generate", "What is 2 plus 3?", "--model", str(folder), "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    plain = capsys.readouterr().out
    tok = MistralTokenizer.from_pretrained(folder)
    adapted = peft.PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(folder), str(out)).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True,
                                  return_tensors="pt")
    expected = tok.decode(adapted.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:],
                          skip_special_tokens=True)
    assert tuned.strip() == expected.strip() and tuned != plain, (tuned, plain, expected)
    assert main(["finetune", "--model", str(folder), "--data", str(tmp_path / "missing.jsonl"),
                 "--out", str(out)]) == 2
