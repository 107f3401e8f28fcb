"""peft, unchanged, on our models: LoRA numerics equal peft on Transformers' model, merging,
adapter folders Transformers + peft load, and QLoRA over our quantized layers."""

from __future__ import annotations

import pytest
import torch

from mistral_lm import MistralForCausalLM
from mistral_lm.fusion import fuse_projections, fused_names
from mistral_lm.quantization import BitsAndBytesConfig, quantize_model

from .conftest import default_model_or_skip, tiny_config

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(**overrides) -> peft.LoraConfig:
    # init_lora_weights=False: B starts random too, so A's gradients and the adapters' effect are not zero
    return peft.LoraConfig(**{"task_type": "CAUSAL_LM", "target_modules": TARGETS, "r": 4, "lora_alpha": 8,
                              "lora_dropout": 0.0, "init_lora_weights": False, **overrides})


def _pair(tmp_path, **config):
    """Our fused model and Transformers' MistralForCausalLM with the same weights, both under peft
    with the same adapter weights."""
    ours = MistralForCausalLM(tiny_config(hidden_size=128, intermediate_size=128, **config)).eval()
    ours.save_pretrained(tmp_path)
    theirs = transformers.MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert fuse_projections(ours) == 2 * ours.config.num_hidden_layers
    theirs = peft.get_peft_model(theirs, _lora())
    ours = peft.get_peft_model(ours, _lora())
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded as a collator pads, its pad labels ignored."""
    ids = torch.randint(0, vocab, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_lora_training_equals_peft_on_transformers(tmp_path):
    """Oracle: loss and every LoRA gradient equal peft on Transformers' model within 1e-5 (float32)
    for 3 optimizer steps."""
    ours, theirs = _pair(tmp_path, sliding_window=6)
    batch = _batch(ours.config.vocab_size)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n for n in trainable)
    for _ in range(3):
        losses = []
        for model, optimizer in zip((ours, theirs), optimizers):
            model.train()
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
        grads = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-5, msg=name)
        for optimizer in optimizers:
            optimizer.step()


def test_merge_and_unload_computes_what_the_adapted_model_did(tmp_path):
    ours, theirs = _pair(tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (1, 9))
    with torch.no_grad():
        adapted = ours(input_ids=ids).logits
        torch.testing.assert_close(adapted, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        merged = ours.merge_and_unload()
        assert type(merged) is MistralForCausalLM
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert len(fused_names(merged)) == 2 * merged.config.num_hidden_layers  # the fast path is back


def test_adapter_folder_loads_in_transformers_on_the_converted_model(tmp_path):
    """Train-free but non-trivial adapters on the default GGUF, saved by peft; Transformers + peft
    load them onto the `mistral-lm convert` folder and give the same logits within 1e-4."""
    from mistral_lm.cli import main

    path = default_model_or_skip()
    ours = peft.get_peft_model(MistralForCausalLM.from_pretrained(path), _lora(target_modules=["q_proj", "v_proj"]))
    ours.save_pretrained(tmp_path / "adapter")
    assert main(["convert", str(tmp_path / "hf"), "--model", str(path), "--dtype", "float32"]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, ours.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


QUANTS = {"int8": dict(load_in_8bit=True), "int4": dict(load_in_4bit=True, bnb_4bit_quant_type="int4"),
          "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")}


def _qlora_pair(quant: str):
    """Our model quantized (float32 compute, fused) under peft with our layers registered, and
    Transformers' model holding our dequantized weights under peft, with the same adapters."""
    from mistral_lm.quantization.modules import QuantizedLinear
    from mistral_lm.training import register_lora_layers

    config = tiny_config(hidden_size=128, intermediate_size=128, sliding_window=6)
    ours = quantize_model(MistralForCausalLM(config).eval(), BitsAndBytesConfig(
        **QUANTS[quant], bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["lm_head"]))
    assert fuse_projections(ours) == 2 * config.num_hidden_layers
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith(("_scale", "_zero", "_absmax", "_packed"))}
    state.update({f"{name}.weight": m.dequantize() for name, m in ours.named_modules() if isinstance(m, QuantizedLinear)})
    their_config = transformers.MistralConfig(**{k: v for k, v in config.to_dict().items()
                                                 if k not in ("id2label", "label2id")})
    theirs = transformers.MistralForCausalLM(their_config).eval()
    theirs.load_state_dict(state)
    theirs = peft.get_peft_model(theirs, _lora())
    ours = peft.get_peft_model(ours, register_lora_layers(_lora()))
    adapters = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    missing = set(adapters) - set(ours.state_dict())
    assert not missing
    ours.load_state_dict(adapters, strict=False)
    return ours, theirs


@pytest.mark.parametrize("quant", QUANTS)
def test_qlora_equals_lora_on_the_dequantized_weights(quant):
    """QLoRA on our Int8Linear / Int4Linear / NF4Linear: peft's own recipe plus our layers'
    registration; loss and adapter gradients equal peft's LoRA on Transformers' model holding the
    dequantized weights (float32 compute)."""
    ours, theirs = _qlora_pair(quant)
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
    batch = _batch(ours.config.vocab_size)
    losses = []
    for model in (ours, theirs):
        model.train()
        losses.append(model(**batch).loss)
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_qlora_merge_requantizes_within_half_a_step():
    """Merging into an Int8Linear re-quantizes base + delta: every weight within half of its row's
    quantization step of the exact merged weight."""
    ours, _ = _qlora_pair("int8")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    exact = layer.get_base_layer().dequantize() + layer.get_delta_weight("default")
    merged = ours.merge_and_unload()
    base = merged.model.layers[0].self_attn.q_proj
    step = exact.abs().amax(dim=1, keepdim=True) / 127
    assert ((base.dequantize() - exact).abs() <= step / 2 + 1e-6).all()


def test_qlora_on_gguf_blocks_trains_and_refuses_to_merge():
    from mistral_lm.errors import ConfigError
    from mistral_lm.training import register_lora_layers

    path = default_model_or_skip()
    model = MistralForCausalLM.from_pretrained(path, gguf_native=True)  # bfloat16: the int4 kernel path
    ours = peft.get_peft_model(model, register_lora_layers(_lora(target_modules=["q_proj", "v_proj"])))
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    ours.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in ours.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.any() for g in grads)
    with pytest.raises(ConfigError, match="GGUF"):
        ours.merge_and_unload()


def test_load_adapter_equals_peft_and_refuses_another_base(tmp_path):
    from mistral_lm.errors import CheckpointError
    from mistral_lm.training import load_adapter

    ours, theirs = _pair(tmp_path)
    ours.save_pretrained(tmp_path / "adapter")
    base = transformers.MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    fresh = MistralForCausalLM.from_pretrained(tmp_path)
    loaded = load_adapter(fresh, tmp_path / "adapter").eval()
    ids = torch.randint(0, fresh.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    other = MistralForCausalLM(tiny_config(hidden_size=64, intermediate_size=128))
    with pytest.raises(CheckpointError, match="another base model"):
        load_adapter(other, tmp_path / "adapter")
    assert not any("lora" in n for n, _ in other.named_modules())  # refused before anything loaded
