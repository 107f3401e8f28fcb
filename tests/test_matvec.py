"""matvec.py: the CPU's half-precision linear (one row as torch.mv, many rows without a native
GEMM as float32 GEMMs), installed by the loader as a module swap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mistral_lm import MistralForCausalLM, matvec
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


class _Products(TorchDispatchMode):
    """The dtypes of the matrix products dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func == torch.ops.aten.linear.default:  # not decomposed under inference_mode
            self.dtypes.append(args[1].dtype)
        elif func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.dtypes.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


_UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_many_rows_without_a_native_gemm_are_float32_gemms_rounded_once(dtype, bias, monkeypatch):
    """Where the CPU has no GEMM in the dtype (AVX2: bfloat16, float16), a prefill-sized product
    runs in float32 (3-4x faster than ATen's fallback) and equals the exact product rounded once
    to the dtype, up to float32 accumulation error; weight slices of 32 rows leave a ragged last one."""
    monkeypatch.setattr(matvec, "native_gemm", lambda dtype, device: False)
    module = install_matvec(nn.Linear(96, 70, bias=bias).to(dtype))
    module.float_chunk_rows = 32
    x = torch.randn(2, MatvecLinear.float_min_rows // 2, 96, dtype=dtype)
    with torch.inference_mode(), _Products() as products:
        y = module(x)
    assert products.dtypes and set(products.dtypes) == {torch.float32}, products.dtypes
    assert y.dtype == dtype and y.shape == (2, MatvecLinear.float_min_rows // 2, 70)
    w, b = module.weight.double(), None if module.bias is None else module.bias.double()
    exact = F.linear(x.double(), w, b)
    magnitude = F.linear(x.double().abs(), w.abs(), None if b is None else b.abs())
    bound = _UNIT_ROUNDOFF[dtype] * exact.abs() + 97 * 2.0 ** -24 * magnitude + 2.0 ** -24
    assert ((y.double() - exact).abs() <= bound).all()


def test_few_rows_or_a_native_gemm_keep_the_dtype_product(monkeypatch):
    module = install_matvec(nn.Linear(96, 70, bias=False).bfloat16())
    x = torch.randn(MatvecLinear.float_min_rows, 96, dtype=torch.bfloat16)
    monkeypatch.setattr(matvec, "native_gemm", lambda dtype, device: False)
    rows = MatvecLinear.float_min_rows - 1
    with torch.inference_mode(), _Products() as products:
        y = module(x[:rows])
    assert set(products.dtypes) == {torch.bfloat16} and torch.equal(y, F.linear(x[:rows], module.weight))
    monkeypatch.setattr(matvec, "native_gemm", lambda dtype, device: True)
    with torch.inference_mode(), _Products() as products:
        module(x)
    assert set(products.dtypes) == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_without_a_native_gemm_runs_float32_products_forward_and_backward(dtype, monkeypatch):
    """Autograd through the layer (full fine-tuning: weight, bias and input gradients) takes float32
    products too: autograd's own backward runs grad @ W with W row-major, ATen's scalar loop on an
    AVX2 CPU. Every product recorded is float32, and every gradient is the float64 one rounded to
    the dtype, up to float32 accumulation error; slices of 32 rows leave ragged last ones."""
    monkeypatch.setattr(matvec, "native_gemm", lambda dtype, device: False)
    module = install_matvec(nn.Linear(80, 70).to(dtype))
    module.float_chunk_rows = 32
    x = torch.randn(2, MatvecLinear.float_min_rows // 2, 80, dtype=dtype, requires_grad=True)
    grad = torch.randn(2, MatvecLinear.float_min_rows // 2, 70, dtype=dtype)
    with _Products() as products:
        y = module(x)
        y.backward(grad)
    assert products.dtypes and set(products.dtypes) == {torch.float32}, products.dtypes
    xd, w, g = x.detach().double().reshape(-1, 80), module.weight.detach().double(), grad.double().reshape(-1, 70)
    u = _UNIT_ROUNDOFF[dtype]
    for got, exact, magnitude, depth in (
            (y.reshape(-1, 70), xd @ w.T + module.bias.detach().double(),
             xd.abs() @ w.abs().T + module.bias.detach().double().abs(), 81),
            (x.grad.reshape(-1, 80), g @ w, g.abs() @ w.abs(), 70),
            (module.weight.grad, g.T @ xd, g.abs().T @ xd.abs(), xd.shape[0]),
            (module.bias.grad, g.sum(0), g.abs().sum(0), xd.shape[0])):
        assert got.dtype == dtype
        bound = u * exact.abs() + depth * 2.0 ** -24 * magnitude + 2.0 ** -24
        assert ((got.double() - exact).abs() <= bound).all()


def test_a_bfloat16_prefill_without_a_native_gemm_has_no_bfloat16_product(monkeypatch):
    """Every projection of a loaded bfloat16 model (fused or not, lm_head included) takes the path."""
    monkeypatch.setattr(matvec, "native_gemm", lambda dtype, device: False)
    model = install_matvec(MistralForCausalLM(tiny_config()).bfloat16())
    ids = torch.arange(1, 1 + MatvecLinear.float_min_rows).unsqueeze(0)
    with torch.inference_mode(), _Products() as products:
        logits = model(ids).logits
    assert products.dtypes and torch.bfloat16 not in products.dtypes and logits.isfinite().all()


def test_native_gemm_is_onednn_answer_on_the_cpu():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert matvec.native_gemm(torch.float32, cpu) and matvec.native_gemm(torch.bfloat16, meta)
    assert matvec.native_gemm(torch.bfloat16, cpu) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert matvec.native_gemm(torch.float16, cpu) == bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
