"""native/nf4: NF4Linear's CPU kernel == x @ dequantize().T within float32 accumulation, for every
instruction set here; batch-invariant (rows, threads, N slices); the native quantizer == the torch
one bit for bit; a quantized model's top-1 == the float model built from its dequantized weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mistral_lm import BitsAndBytesConfig, MistralForCausalLM
from mistral_lm.native import nf4
from mistral_lm.quantization import NF4Linear, quantize_model
from mistral_lm.quantization.functional import CODEBOOKS, pack_nibbles, quantize_4bit_codebook

from .conftest import INDUCTOR, capped_isa, isa_levels, tiny_config, torch_threads

needs_lib = pytest.mark.skipif(not nf4.available(), reason="nf4 C library not built here")


def caps() -> list[int]:
    return isa_levels(nf4.library())


def isa(cap: int):
    return capped_isa(nf4.library(), cap)


threads = torch_threads


def layer(k: int, n: int, quant_type: str = "nf4", dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
          seed: int = 0) -> NF4Linear:
    linear = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))
        linear.weight[0, :blocksize] = 0.0  # an all-zero block: absmax 0
    return NF4Linear.from_linear(linear, quant_type, blocksize, dtype)


@needs_lib
@pytest.mark.parametrize("cap", caps())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_is_x_times_dequantized_weight(cap, quant_type, dtype):
    module = layer(192, 77, quant_type, dtype)
    w = module.dequantize().double()
    for m in (1, 3, 17, 70):
        x = torch.randn(m, 192).to(dtype)
        with isa(cap):
            y = nf4.mm(x, module.weight_packed, module.weight_absmax, CODEBOOKS[quant_type], 64)
        exact = x.double() @ w.T
        # float32 sums of K products (|error| <= K u sum|x w|), then rounding to the output dtype
        bound = 192 * 2.0**-24 * (x.double().abs() @ w.abs().T) + torch.finfo(dtype).eps * exact.abs() + 1e-30
        assert y.dtype == dtype and y.shape == (m, 77)
        assert bool(((y.double() - exact).abs() <= bound).all()), (m, float((y.double() - exact).abs().max()))


@needs_lib
@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_block_sizes(blocksize):
    module = layer(512, 33, "nf4", torch.float32, blocksize)
    x = torch.randn(5, 512)
    exact = x.double() @ module.dequantize().double().T
    torch.testing.assert_close(module._matmul(x).double(), exact, rtol=1e-5, atol=1e-4)


@needs_lib
@pytest.mark.parametrize("cap", caps())
def test_batch_invariant_across_rows_threads_and_slices(cap):
    module = layer(256, 301, "nf4", torch.bfloat16)
    packed, absmax, codebook = module.weight_packed, module.weight_absmax, CODEBOOKS["nf4"]
    x = torch.randn(17, 256).bfloat16()
    with isa(cap):
        with threads(1):
            one_thread = nf4.mm(x, packed, absmax, codebook, 64)
        with threads(2):
            both = nf4.mm(x, packed, absmax, codebook, 64)
            rows = torch.cat([nf4.mm(x[i:i + 1], packed, absmax, codebook, 64) for i in range(17)])
            five = nf4.mm(x[4:9], packed, absmax, codebook, 64)
            sliced = nf4.mm(x, packed[37:250], absmax[37:250], codebook, 64)
    assert torch.equal(one_thread, both)
    assert torch.equal(rows, both)
    assert torch.equal(five, both[4:9])
    assert torch.equal(sliced, both[:, 37:250])


@needs_lib
@pytest.mark.parametrize("cap", caps())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_native_quantizer_equals_torch_quantizer(cap, quant_type):
    w = torch.randn(40, 256) * torch.rand(40, 1) * 3
    w[0] = 0.0
    w[1, :64] = torch.linspace(-1, 1, 64)  # values on the codebook and between entries
    w[2, :64] = CODEBOOKS[quant_type].repeat(4)
    w[3, :64] = -w[3, :64].abs()  # absmax from a negative weight
    values = CODEBOOKS[quant_type].sort().values
    w[4, :15], w[4, 15] = (values[1:] + values[:-1]) / 2, 1.0  # exactly on the mid-points (absmax 1)
    w[5, :2] = torch.tensor([float.fromhex("-0x1.42p-1"), float.fromhex("0x1.14p+0")])  # w / absmax != w * (1 / absmax)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # 16-bit weights are widened in C, by rows
        held = w.to(dtype)
        q, absmax = quantize_4bit_codebook(held, CODEBOOKS[quant_type], 64)
        with isa(cap):
            packed, absmax_native = nf4.quantize(held, CODEBOOKS[quant_type], 64)
        assert torch.equal(packed, pack_nibbles(q)) and torch.equal(absmax_native, absmax), dtype
        with isa(cap), torch_threads(2):  # 40 rows: strips of 16 over two threads, the last one partial
            assert torch.equal(nf4.quantize(held, CODEBOOKS[quant_type], 64)[0], packed), dtype


@needs_lib
def test_module_takes_kernel_below_threshold_and_torch_path_above(monkeypatch):
    module = layer(128, 64)
    calls = []
    real = nf4.mm
    monkeypatch.setattr(nf4, "mm", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    x = torch.randn(NF4Linear.native_max_rows, 128)
    small, large = module(x[:3]), module(x)
    assert calls == [3]
    assert float((small - large[:3]).norm() / small.norm()) < 1e-2  # the torch path rounds W to bfloat16


@needs_lib
def test_input_gradient_through_the_kernel():
    module = layer(128, 64, dtype=torch.float32)
    x = torch.randn(3, 128, requires_grad=True)
    module(x).square().sum().backward()
    w = module.dequantize()
    torch.testing.assert_close(x.grad, (2 * (x.detach() @ w.T)) @ w, rtol=1e-4, atol=1e-4)


@needs_lib
def test_custom_op_for_torch_compile():
    module = layer(128, 64)
    args = (torch.randn(2, 128).bfloat16(), module.weight_packed, module.weight_absmax, CODEBOOKS["nf4"], 64)
    torch.library.opcheck(nf4.nf4_mm, args)
    assert torch.equal(nf4.nf4_mm(*args), nf4.mm(*args))


# Measured over seeds 0-2 (512 positions): compute dtype float32, top-1 100% and relative logit error
# 5e-7 (the kernel is x @ dequantize().T); bfloat16, 99.2-99.6% and 4.7e-3 on either path: the
# compute dtype rounds every layer's input and output, which a float32 reference model does not.
@needs_lib
@pytest.mark.parametrize("compute_dtype, top1, error", [(torch.float32, 0.995, 1e-5), (torch.bfloat16, 0.985, 1e-2)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("max_rows", [1 << 30, 0], ids=["kernel", "torch-path"])
def test_top1_agrees_with_float_model_of_dequantized_weights(compute_dtype, top1, error, max_rows, monkeypatch):
    monkeypatch.setattr(NF4Linear, "native_max_rows", max_rows)
    model = MistralForCausalLM(tiny_config(hidden_size=128, intermediate_size=256)).eval()
    for p in model.parameters():  # weights of a trained model's scale, not 0.02-std init noise
        p.data.normal_(0, 0.2)
    reference = copy.deepcopy(model)
    quantized = quantize_model(model, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_compute_dtype=compute_dtype))
    for name, module in quantized.named_modules():
        if isinstance(module, NF4Linear):
            reference.get_submodule(name).weight.data = module.dequantize()
    ids = torch.randint(0, 128, (8, 64))
    with torch.no_grad():
        ours, theirs = quantized(input_ids=ids).logits, reference(input_ids=ids).logits
    assert float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()) >= top1
    assert float((ours - theirs).norm() / theirs.norm()) < error


@needs_lib
@INDUCTOR
@pytest.mark.one_isa  # the graph, not its numbers: 20 s of compiling again under the AVX2 cap
def test_compiled_module_calls_the_kernel_in_one_graph():
    module = layer(128, 64)
    x = torch.randn(2, 128)
    expected = module(x)
    with torch.inference_mode():
        assert torch.equal(torch.compile(module, fullgraph=True)(x), expected)
