"""matvec.py: one half-precision row on the CPU as torch.mv, installed by the loader as a module swap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistral_lm import MistralForCausalLM
from mistral_lm.matvec import MatvecLinear, install_matvec

from .conftest import tiny_config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_single_half_precision_row_with_autograd_takes_mv_and_equals_linear(dtype, monkeypatch):
    """With autograd on (the weight requires grad) a row takes torch.mv; without it, bfloat16 rows
    take the native kernel (tests/test_native_dense.py)."""
    module = install_matvec(nn.Linear(96, 200, bias=False).to(dtype))
    assert torch.is_grad_enabled() and module.weight.requires_grad
    x = torch.randn(1, 1, 96, dtype=dtype)
    expected = F.linear(x, module.weight)
    calls = []
    monkeypatch.setattr(torch, "mv", lambda w, v: calls.append(1) or F.linear(v, w))
    y = module(x)
    assert calls == [1] and y.shape == (1, 1, 200)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("make", [
    lambda: (nn.Linear(96, 200, bias=False), torch.randn(1, 96)),                        # float32
    lambda: (nn.Linear(96, 200, bias=False).bfloat16(), torch.randn(3, 96).bfloat16()),  # several rows
    lambda: (nn.Linear(96, 200).bfloat16(), torch.randn(1, 96).bfloat16()),              # a bias
    lambda: (nn.Linear(96, 200, bias=False).bfloat16(), torch.randn(1, 96).half()),      # dtypes differ
])
def test_every_other_case_is_exactly_linear(make, monkeypatch):
    linear, x = make()
    module = install_matvec(linear)
    monkeypatch.setattr(torch, "mv", lambda *args: pytest.fail("took the mv shortcut"))
    if x.dtype != module.weight.dtype:
        with pytest.raises(RuntimeError):  # as F.linear itself
            module(x)
        return
    assert torch.equal(module(x), F.linear(x, module.weight, module.bias))


def test_install_keeps_parameters_hooks_and_state_dict_keys():
    model = MistralForCausalLM(tiny_config(tie_word_embeddings=True)).bfloat16()
    before = model.state_dict(keep_vars=True)
    calls = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
    install_matvec(model)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)
    assert type(model.model.layers[0].self_attn.q_proj) is MatvecLinear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    assert calls == [1]


def test_from_pretrained_in_bfloat16_installs_matvec_projections(tmp_path):
    MistralForCausalLM(tiny_config()).save_pretrained(tmp_path)
    for fuse in (True, False):
        model = MistralForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16, fuse_projections=fuse)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is MatvecLinear for m in linears)
        assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
