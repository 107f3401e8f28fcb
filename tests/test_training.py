"""Training sees the whole model: every checkpoint weight trainable under its Transformers name,
whatever the loader fused for speed; gradient checkpointing; Transformers' pipeline on our model."""

from __future__ import annotations

import pytest
import torch

from mistral_lm import MistralConfig, MistralForCausalLM
from mistral_lm.fusion import fuse_projections, fused_names

from .conftest import default_model_or_skip, hf_gguf_tokenizer, tiny_config

transformers = pytest.importorskip("transformers")


def _theirs(config: MistralConfig):
    """Transformers' model class for our config, built on meta (names only)."""
    their_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.to_dict().items()
                                                        if k not in ("id2label", "label2id")})
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(their_config)


def test_full_finetune_step_changes_every_checkpoint_tensor():
    """The default GGUF loads with q/k/v and gate/up fused; every parameter gets a gradient and one
    optimizer step on parameters() moves every tensor of the checkpoint; the names are Transformers'."""
    path = default_model_or_skip()
    model = MistralForCausalLM.from_pretrained(path)
    assert fused_names(model)  # the fast path is installed ...
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in _theirs(model.config).named_parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    model(ids, labels=ids).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []
    torch.optim.SGD(model.parameters(), lr=1.0).step()  # no weight decay: only gradients move weights
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    model.eval()
    with torch.no_grad():  # ... and the fused inference path computes with the new weights:
        fast = model(ids).logits
    slow = model(ids).logits  # autograd on, trainable parts: the parts run one by one
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-4)


def test_requires_grad_reaches_every_parameter_of_a_fused_model():
    model = MistralForCausalLM(tiny_config()).eval()
    fuse_projections(model)
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())
    model.requires_grad_(True)
    n_weights = sum(p.numel() for p in _theirs(model.config).parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_weights


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    model = MistralForCausalLM(tiny_config(sliding_window=5)).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    if reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 2  # the layer ran again in the backward pass
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_transformers_surface():
    model = MistralForCausalLM(tiny_config())
    assert MistralForCausalLM.can_generate() and model.can_generate()
    assert model.config.get_text_config() is model.config
    assert model.generation_config.eos_token_id == model.config.eos_token_id
    ids = torch.tensor([[5, 6, 7, 8]])
    cache = model.make_cache(1)
    with torch.no_grad():
        model(ids[:, :3], past_key_values=cache)
    step = model.prepare_inputs_for_generation(ids, past_key_values=cache, attention_mask=torch.ones_like(ids))
    assert step["input_ids"].tolist() == [[8]] and step["past_key_values"] is cache


def test_text_generation_pipeline_matches_transformers_model(tmp_path):
    """transformers.pipeline("text-generation") runs on our model and returns the text the same
    pipeline returns on Transformers' model with the same weights (greedy)."""
    path = default_model_or_skip()
    tokenizer = hf_gguf_tokenizer(path)
    ours = MistralForCausalLM(tiny_config(vocab_size=len(tokenizer), sliding_window=6)).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    texts = []
    for model in (ours, theirs):
        pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
        texts.append(pipe("The harbour town wakes", max_new_tokens=8, do_sample=False)[0]["generated_text"])
    assert texts[0] == texts[1] and texts[0].startswith("The harbour town wakes")


@pytest.mark.parametrize("quant", [dict(load_in_8bit=True), dict(load_in_4bit=True, bnb_4bit_quant_type="int4"),
                                   dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")])
def test_quantized_layers_pass_gradients_to_their_input(quant):
    """Frozen quantized layers below LoRA adapters: d(out)/d(x) is the dequantized weight's, also
    on the bfloat16 kernel paths that have no derivative of their own (one row: the kernel path)."""
    from mistral_lm.quantization import BitsAndBytesConfig, quantize_model

    layer = quantize_model(torch.nn.Linear(128, 192, bias=False), BitsAndBytesConfig(**quant))
    for rows in (1, 40):
        x = torch.randn(rows, 128, requires_grad=True)
        g = torch.randn(rows, 192)
        (layer(x) * g).sum().backward()
        torch.testing.assert_close(x.grad, g @ layer.dequantize(), rtol=2e-2, atol=2e-2)


def test_trainer_refuses_a_purely_quantized_model_and_trains_its_adapters(tmp_path):
    """A quantized model's codes are frozen buffers: Transformers' Trainer refuses to fine-tune it
    without adapters (instead of silently training only norms and embeddings); with LoRA it trains."""
    peft = pytest.importorskip("peft")
    from mistral_lm.quantization import BitsAndBytesConfig, quantize_model
    from mistral_lm.training import register_lora_layers

    model = quantize_model(MistralForCausalLM(tiny_config()), BitsAndBytesConfig(load_in_8bit=True))
    ids = torch.randint(0, model.config.vocab_size, (4, 9))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(model=model, args=args, train_dataset=data)
    lora = peft.get_peft_model(model, register_lora_layers(peft.LoraConfig(target_modules=["q_proj", "v_proj"])))
    transformers.Trainer(model=lora, args=args, train_dataset=data).train()


@pytest.mark.parametrize("ggml", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_pass_gradients_to_their_input(ggml):
    """GGUFLinear (Q8_0 runs as two 4-bit planes over x repeated): d(out)/d(x) = grad @ W with
    W gguf's own dequantization of the blocks."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from types import SimpleNamespace

    from mistral_lm.quantization.gguf import GGUFLinear

    kind = gguf.GGMLQuantizationType[ggml]
    weight = np.random.default_rng(0).standard_normal((192, 128)).astype(np.float32)
    blocks = gguf.quants.quantize(weight, kind)
    layer = GGUFLinear.from_quantized(SimpleNamespace(ggml_type=int(kind), shape=(192, 128), data=blocks),
                                      compute_dtype=torch.float32)
    reference = torch.from_numpy(gguf.quants.dequantize(blocks, kind).reshape(192, 128))
    for rows in (1, 40):
        x = torch.randn(rows, 128, requires_grad=True)
        g = torch.randn(rows, 192)
        (layer(x) * g).sum().backward()
        torch.testing.assert_close(x.grad, g @ reference, rtol=1e-4, atol=1e-4)
