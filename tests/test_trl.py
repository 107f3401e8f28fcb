"""trl's SFTTrainer, unchanged, trains our model with a peft LoRA config: the same run as on
Transformers' model with the same weights (losses equal step by step); and with our tokenizer as
`processing_class`, past trl's isinstance gate (full fine-tuning, LoRA, assistant_only_loss)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mistral_lm import MistralForCausalLM

from .conftest import default_model_or_skip, hf_gguf_tokenizer, tiny_config

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
    tokenizer = hf_gguf_tokenizer(path)
    ours = MistralForCausalLM(tiny_config(vocab_size=len(tokenizer), sliding_window=8))
    ours.save_pretrained(tmp_path / "base")
    theirs = transformers.MistralForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    our_losses = _train(ours, tokenizer, tmp_path / "ours")
    their_losses = _train(theirs, tokenizer, tmp_path / "theirs")
    assert len(our_losses) == 3 and our_losses[-1] < our_losses[0]
    torch.testing.assert_close(torch.tensor(our_losses), torch.tensor(their_losses), rtol=1e-5, atol=1e-5)


# ----- our tokenizer as trl's processing_class -------------------------------------------------

GENERATION_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
                       "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}\n{% else %}{{ m.content }}"
                       "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                       "{% endif %}")
CHATS = [[{"role": "user", "content": "Where do the boats go?"},
          {"role": "assistant", "content": "Out past the harbour wall, before the sun."}],
         [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who bakes?"},
          {"role": "assistant", "content": "The bakers, 東京 to Brest 😀"}, {"role": "user", "content": "And?"},
          {"role": "assistant", "content": "They pull loaves."}]]


def _recognised(tokenizer):
    """Our tokenizer behind trl's one hard gate, `isinstance(processing_class, PreTrainedTokenizerBase)`:
    a subclass that adds no behaviour (Transformers' attribute hooks are switched back to Python's), and
    records every attribute trl or Transformers' Trainer reads that only PreTrainedTokenizerBase defines."""
    from mistral_lm.tokenizer import MistralTokenizer

    base = transformers.PreTrainedTokenizerBase

    class Recognised(MistralTokenizer, base):
        borrowed: set[str] = set()
        __setattr__ = object.__setattr__

        def __getattribute__(self, name):
            if not name.startswith("__") and hasattr(base, name) and not hasattr(MistralTokenizer, name):
                Recognised.borrowed.add(name)
            return object.__getattribute__(self, name)

        def __getattr__(self, name):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    tokenizer.__class__ = Recognised
    return tokenizer


@pytest.fixture(scope="module")
def smol_tokenizers():
    from mistral_lm.tokenizer import MistralTokenizer

    path = default_model_or_skip()
    theirs = hf_gguf_tokenizer(path)
    return MistralTokenizer.from_pretrained(path), theirs


def _sft(model, tokenizer, folder, data, peft_config=None, **config):
    args = trl.SFTConfig(output_dir=str(folder), max_steps=3, per_device_train_batch_size=2, report_to=[],
                         logging_steps=1, use_cpu=True, save_strategy="no", learning_rate=1e-2,
                         dataloader_num_workers=0, **config)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft_config)
    trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_refuses_our_tokenizer_class_by_isinstance(smol_tokenizers, tmp_path):
    """The one gap left: trl checks the class, not the protocol (see the test below for the rest)."""
    ours, _ = smol_tokenizers
    model = MistralForCausalLM(tiny_config(vocab_size=len(ours), sliding_window=8))
    data = datasets.Dataset.from_dict({"text": ["The harbour town wakes."] * 2})
    with pytest.raises(TypeError, match="PreTrainedTokenizerBase"):
        _sft(model, ours, tmp_path, data)
    # a copy (datasets.map workers pickle it) keeps special-token strings in text as text
    assert copy.deepcopy(ours)("wakes<|im_end|>").input_ids == ours("wakes<|im_end|>").input_ids
    assert ours.eos_token_id not in ours("wakes<|im_end|>").input_ids


def test_sft_trainer_full_fine_tuning_with_our_tokenizer(smol_tokenizers, tmp_path):
    """trl appends the eos_token string to each text and tokenizes it: our default keeps it text (no
    injected control tokens), so trained text needs `split_special_tokens = False` to end on EOS."""
    ours, _ = smol_tokenizers
    tokenizer = _recognised(copy.deepcopy(ours))
    tokenizer.split_special_tokens = False
    model = MistralForCausalLM(tiny_config(vocab_size=len(ours), sliding_window=8))
    data = datasets.Dataset.from_dict({"text": ["The harbour town wakes before the sun."] * 8})
    trainer, losses = _sft(model, tokenizer, tmp_path, data, optim="sgd")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    row = trainer.train_dataset[0]["input_ids"]
    assert row == ours("The harbour town wakes before the sun.").input_ids + [ours.eos_token_id]
    assert type(tokenizer).borrowed == set()


def test_sft_trainer_lora_assistant_only_loss_with_our_tokenizer(smol_tokenizers, tmp_path):
    """assistant_only_loss: our masks equal transformers' on the same template and file, the labels
    keep exactly the assistant tokens, and the LoRA weights move."""
    ours, theirs = smol_tokenizers
    for messages in CHATS:
        mine = ours.apply_chat_template(messages, chat_template=GENERATION_TEMPLATE, return_dict=True,
                                        return_assistant_tokens_mask=True)
        reference = theirs.apply_chat_template(messages, chat_template=GENERATION_TEMPLATE, return_dict=True,
                                               return_assistant_tokens_mask=True)
        assert mine["input_ids"] == reference["input_ids"]
        assert mine["assistant_masks"] == reference["assistant_masks"] and 0 < sum(mine["assistant_masks"])
    tokenizer = _recognised(copy.deepcopy(ours))
    tokenizer.chat_template = GENERATION_TEMPLATE
    model = MistralForCausalLM(tiny_config(vocab_size=len(ours), sliding_window=8))
    data = datasets.Dataset.from_dict({"messages": CHATS * 4})
    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    before = {}

    class Snapshot(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            before.update({k: v.detach().clone() for k, v in model.named_parameters() if "lora_B" in k})

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                         logging_steps=1, use_cpu=True, save_strategy="no", learning_rate=1e-2,
                         dataloader_num_workers=0, assistant_only_loss=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=config, callbacks=[Snapshot()])
    row = trainer.train_dataset[1]
    mask = ours.apply_chat_template(CHATS[1], chat_template=GENERATION_TEMPLATE, return_dict=True,
                                    return_assistant_tokens_mask=True)["assistant_masks"]
    assert [label != -100 for label in row["labels"]] == [bool(x) for x in mask]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    after = {k: v for k, v in trainer.model.named_parameters() if "lora_B" in k}
    assert before and all(not torch.equal(before[k], after[k]) for k in before)
    assert type(tokenizer).borrowed == set()
