"""fusion.py: q/k/v and gate/up as one matmul each, invisible to state dicts and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mistral_lm import MistralForCausalLM
from mistral_lm.fusion import fuse_projections
from mistral_lm.quantization import BitsAndBytesConfig, quantize_model

from .conftest import tiny_config

transformers = pytest.importorskip("transformers")


def _pair(quant: dict | None = None, dtype: torch.dtype = torch.float32):
    """Two copies of one random model (optionally quantized); the second one fused."""
    plain = MistralForCausalLM(tiny_config(hidden_size=64, intermediate_size=128)).to(dtype).eval()
    if quant is not None:
        plain = quantize_model(plain, BitsAndBytesConfig(**quant))
    fused = MistralForCausalLM(plain.config).to(dtype).eval()
    if quant is not None:
        fused = quantize_model(fused, BitsAndBytesConfig(**quant))
    fused.load_state_dict(plain.state_dict())
    assert fuse_projections(fused) == 2 * plain.config.num_hidden_layers
    return plain, fused


QUANTS = [None, dict(load_in_8bit=True), dict(load_in_4bit=True, bnb_4bit_quant_type="int4"),
          dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")]


@pytest.mark.parametrize("quant", QUANTS)
def test_fused_model_computes_what_the_parts_did(quant):
    plain, fused = _pair(quant)
    layer = fused.model.layers[0]
    assert {"qkv_proj"} <= set(layer.self_attn._modules) and "q_proj" not in layer.self_attn._modules
    assert {"gate_up_proj"} <= set(layer.mlp._modules) and "gate_proj" not in layer.mlp._modules
    ids = torch.randint(0, plain.config.vocab_size, (2, 11))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(fused.generate(ids, max_new_tokens=6), plain.generate(ids, max_new_tokens=6))


@pytest.mark.parametrize("quant", QUANTS)
def test_state_dict_keeps_transformers_names_and_values(quant):
    plain, fused = _pair(quant)
    ours, theirs = fused.state_dict(), plain.state_dict()
    assert list(sorted(ours)) == list(sorted(theirs))
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    # and a Transformers-shaped state dict loads back into the fused model
    fused.load_state_dict(theirs)
    assert fused.model.layers[1].mlp.gate_up_proj.out_features == 2 * plain.config.intermediate_size


def test_fused_checkpoint_loads_in_transformers(tmp_path):
    plain, fused = _pair()
    fused.save_pretrained(tmp_path)
    reference = transformers.MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, plain.config.vocab_size, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(reference(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_parts_that_differ_or_carry_hooks_stay_separate():
    model = MistralForCausalLM(tiny_config()).eval()
    # q_proj left in float by the skip list while k/v are quantized: no fusion of attention
    quantize_model(model, BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["q_proj", "lm_head"]))
    seen = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *args: seen.append(1))
    fused = fuse_projections(model)
    assert fused == model.config.num_hidden_layers - 1  # only the MLPs of the layers without a hook
    assert "q_proj" in model.model.layers[0].self_attn._modules
    model(torch.tensor([[1, 2, 3]]))
    assert seen == [1]


def test_from_pretrained_opt_out_keeps_the_separate_modules(tmp_path):
    plain, _ = _pair(dict(load_in_8bit=True))
    MistralForCausalLM(plain.config).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_8bit=True)
    assert "qkv_proj" in MistralForCausalLM.from_pretrained(tmp_path, quantization_config=q).model.layers[0].self_attn._modules
    kept = MistralForCausalLM.from_pretrained(tmp_path, quantization_config=q, fuse_projections=False)
    assert "q_proj" in kept.model.layers[0].self_attn._modules


def test_quantized_loading_fuses_before_quantizing_and_respects_the_skip_list(tmp_path):
    """from_pretrained fuses float q/k/v and gate/up first (one quantization per group), except
    groups with a part the skip list keeps in full precision; results equal the unfused load."""
    MistralForCausalLM(tiny_config()).save_pretrained(tmp_path)
    q = dict(load_in_8bit=True, llm_int8_skip_modules=["q_proj", "lm_head"])
    fused = MistralForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**q))
    plain = MistralForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**q),
                                               fuse_projections=False)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert isinstance(attn.q_proj, nn.Linear) and "qkv_proj" not in attn._modules  # float: Linear or MatvecLinear
    assert type(mlp.gate_up_proj).__name__ == "Int8Linear"
    ids = torch.randint(0, fused.config.vocab_size, (1, 7))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
