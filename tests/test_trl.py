"""trl's SFTTrainer, unchanged, trains our model with a peft LoRA config: the same run as on
Transformers' model with the same weights (losses equal step by step)."""

from __future__ import annotations

import pytest
import torch

from mistral_lm import MistralForCausalLM

from .conftest import default_model_or_skip, tiny_config

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")


def _train(model, tokenizer, folder) -> list[float]:
    data = datasets.Dataset.from_dict({"text": ["The harbour town wakes before the sun.",
                                                "Fishermen check their nets, bakers pull loaves."] * 4})
    args = trl.SFTConfig(output_dir=str(folder), max_steps=3, per_device_train_batch_size=2, report_to=[],
                         logging_steps=1, use_cpu=True, save_strategy="no", learning_rate=1e-2, optim="sgd",
                         gradient_checkpointing=True, dataloader_num_workers=0)
    # the same LoRA initialization for both models; SGD, as Adam's first steps are sign(grad): a
    # gradient element of 1e-12 in one model and -1e-12 in the other moves a weight by 2 * lr
    torch.manual_seed(0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_with_lora_equals_the_run_on_transformers(tmp_path):
    path = default_model_or_skip()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = MistralForCausalLM(tiny_config(vocab_size=len(tokenizer), sliding_window=8))
    ours.save_pretrained(tmp_path / "base")
    theirs = transformers.MistralForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    our_losses = _train(ours, tokenizer, tmp_path / "ours")
    their_losses = _train(theirs, tokenizer, tmp_path / "theirs")
    assert len(our_losses) == 3 and our_losses[-1] < our_losses[0]
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(their_losses), rtol=1e-5, atol=1e-5)
