"""fusion.py: q/k/v and gate/up as one matmul each for inference, invisible to training,
state dicts and checkpoints (the parts stay the model's modules and view the fused storage)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mistral_lm import MistralForCausalLM
from mistral_lm.fusion import end_fusions, exact_fusions, fuse_projections, fused_module, fused_names
from mistral_lm.quantization import BitsAndBytesConfig, quantize_model

from .conftest import tiny_config

transformers = pytest.importorskip("transformers")

PARTS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def _pair(quant: dict | None = None, dtype: torch.dtype = torch.float32):
    """Two copies of one random model (optionally quantized); the second one fused."""
    # k/v rows a multiple of 64: int4 parts view whole 64-row blocks of the fused codes
    plain = MistralForCausalLM(tiny_config(hidden_size=128, intermediate_size=128)).to(dtype).eval()
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


def _exact(parent: nn.Module, name: str) -> nn.Module | None:
    """What a decode step would use for `parent`'s group `name` (validated as a step does)."""
    previous = exact_fusions([parent])
    try:
        return fused_module(parent, name)
    finally:
        end_fusions(previous)


def _storage(module: nn.Module) -> int:
    tensor = module.weight if isinstance(module, nn.Linear) else next(module.buffers())
    return tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("quant", QUANTS)
def test_fused_model_computes_what_the_parts_did(quant):
    plain, fused = _pair(quant)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert all(name in attn._modules for name in PARTS[:3]) and all(name in mlp._modules for name in PARTS[3:])
    assert len(fused_names(fused)) == 2 * plain.config.num_hidden_layers
    with torch.no_grad():
        qkv, gate_up = _exact(attn, "qkv_proj"), _exact(mlp, "gate_up_proj")
    assert qkv is not None and gate_up is not None
    # the memory is held once: every part views the fused module's storage
    assert _storage(attn.q_proj) == _storage(attn.v_proj) == _storage(qkv)
    assert _storage(mlp.gate_proj) == _storage(mlp.up_proj) == _storage(gate_up)
    calls = []
    qkv.register_forward_hook(lambda *args: calls.append(1))  # the fused matmul is what runs
    ids = torch.randint(0, plain.config.vocab_size, (2, 11))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
        assert calls == [1]
        assert torch.equal(fused.generate(ids, max_new_tokens=6), plain.generate(ids, max_new_tokens=6))


@pytest.mark.parametrize("quant", QUANTS)
def test_state_dict_and_parameters_keep_transformers_names_and_values(quant):
    plain, fused = _pair(quant)
    ours, theirs = fused.state_dict(), plain.state_dict()
    assert list(sorted(ours)) == list(sorted(theirs))
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in plain.named_parameters()]
    fused.load_state_dict(theirs)  # a Transformers-shaped state dict loads back


def test_fused_checkpoint_loads_in_transformers(tmp_path):
    plain, fused = _pair()
    fused.save_pretrained(tmp_path)  # parts sharing one storage are written as separate tensors
    reference = transformers.MistralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, plain.config.vocab_size, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(reference(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_training_sees_the_parts_and_inference_sees_the_update():
    """With autograd on, the parts run (gradients reach their Parameters, equal to the unfused
    model's); an optimizer's in-place step reaches the fused inference path."""
    plain, fused = _pair()
    ids = torch.randint(0, plain.config.vocab_size, (2, 9))
    for model in (plain, fused):
        model.train()
        model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in fused.named_parameters():
        assert p.requires_grad and p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6)
    for model in (plain, fused):
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        model.eval()
    with torch.no_grad():
        assert _exact(fused.model.layers[0].self_attn, "qkv_proj") is not None
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


def test_frozen_parts_keep_the_fused_path_under_autograd():
    _, fused = _pair()
    attn = fused.model.layers[0].self_attn
    assert _exact(attn, "qkv_proj") is None  # trainable parts: no fused path with grad on
    fused.requires_grad_(False)
    assert _exact(attn, "qkv_proj") is not None
    assert fused_module(attn, "qkv_proj") is None  # a layer called outside a step runs its parts


def test_wrapped_or_hooked_parts_run_themselves():
    """A part replaced (peft's LoRA wrapper) or hooked is called, not bypassed by the fused matmul."""
    plain, fused = _pair()
    ids = torch.randint(0, plain.config.vocab_size, (1, 7))
    for model in (plain, fused):
        attn = model.model.layers[1].self_attn
        attn.q_proj = _Scaled(attn.q_proj)
    seen = []
    fused.model.layers[0].mlp.up_proj.register_forward_hook(lambda *args: seen.append(1))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert seen == [1]


class _Scaled(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.base_layer(x)


@pytest.mark.parametrize("quant", [None, dict(load_in_8bit=True)])
def test_parts_given_new_storage_are_fused_again(quant):
    """load_state_dict(assign=True), `.to()` and `p.data = ...` give parts new storage; the
    fused path follows the parts, never a stale copy."""
    plain, fused = _pair(quant)
    ids = torch.randint(0, plain.config.vocab_size, (1, 7))
    new = MistralForCausalLM(plain.config).eval()
    if quant is not None:
        new = quantize_model(new, BitsAndBytesConfig(**quant))
    fused.load_state_dict(new.state_dict(), assign=True)
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, new(ids).logits, rtol=1e-5, atol=1e-5)
    assert len(fused_names(fused)) == 2 * plain.config.num_hidden_layers  # fused again, lazily
    if quant is None:
        fused.model.layers[0].mlp.up_proj.weight.data = torch.zeros_like(new.model.layers[0].mlp.up_proj.weight)
        new.model.layers[0].mlp.up_proj.weight.data.zero_()
        fused.to(torch.float64)
        new.to(torch.float64)
        with torch.inference_mode():
            torch.testing.assert_close(fused(ids, use_cache=False).logits, new(ids, use_cache=False).logits)


def test_parts_that_differ_or_carry_hooks_stay_separate():
    model = MistralForCausalLM(tiny_config()).eval()
    # q_proj left in float by the skip list while k/v are quantized: no fusion of attention
    quantize_model(model, BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["q_proj", "lm_head"]))
    seen = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *args: seen.append(1))
    fused = fuse_projections(model)
    assert fused == model.config.num_hidden_layers - 1  # only the MLPs of the layers without a hook
    assert fuse_projections(model) == fused  # idempotent
    model(torch.tensor([[1, 2, 3]]))
    assert seen == [1]


def test_from_pretrained_opt_out_fuses_nothing(tmp_path):
    MistralForCausalLM(tiny_config()).save_pretrained(tmp_path)
    q = BitsAndBytesConfig(load_in_8bit=True)
    assert fused_names(MistralForCausalLM.from_pretrained(tmp_path, quantization_config=q))
    kept = MistralForCausalLM.from_pretrained(tmp_path, quantization_config=q, fuse_projections=False)
    assert fused_names(kept) == []


def test_quantized_loading_respects_the_skip_list(tmp_path):
    """from_pretrained quantizes the parts, then fuses groups whose parts are all quantized alike;
    a part the skip list keeps in full precision keeps its group apart. Results equal the unfused load."""
    MistralForCausalLM(tiny_config()).save_pretrained(tmp_path)
    q = dict(load_in_8bit=True, llm_int8_skip_modules=["q_proj", "lm_head"])
    fused = MistralForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**q))
    plain = MistralForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**q),
                                               fuse_projections=False)
    assert sorted(fused_names(fused)) == [f"model.layers.{i}.mlp.gate_up_proj" for i in range(2)]
    assert isinstance(fused.model.layers[0].self_attn.q_proj, nn.Linear)
    ids = torch.randint(0, fused.config.vocab_size, (1, 7))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", [None, dict(load_in_8bit=True), dict(load_in_4bit=True, bnb_4bit_quant_type="int4")])
def test_training_mode_releases_the_fused_storage(tmp_path, quant):
    """model.train() gives the parts their own storage (savers that refuse shared memory, such as
    safetensors behind Trainer.save_model, work); the next eval-mode step fuses again."""
    from safetensors.torch import save_file

    plain, fused = _pair(quant)
    fused.train()
    assert fused_names(fused) == []
    save_file(fused.state_dict(), str(tmp_path / "weights.safetensors"))
    ids = torch.randint(0, plain.config.vocab_size, (1, 7))
    fused.eval()
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
    assert len(fused_names(fused)) == 2 * plain.config.num_hidden_layers
    attn = fused.model.layers[0].self_attn
    with torch.no_grad():
        assert _storage(attn.q_proj) == _storage(_exact(attn, "qkv_proj"))


@pytest.mark.parametrize("rows", [(128, 64, 64), (64, 192)])
def test_int4_parts_stack_in_the_kernel_layout_as_the_portable_path_does(rows):
    """Int4Linear.concat stacks whole 64-row blocks as stored; QuantizedLinear.concat (the portable
    round trip) is the reference: same buffers, and the fused module computes cat of the parts."""
    from mistral_lm.quantization.modules import Int4Linear, QuantizedLinear

    torch.manual_seed(0)
    parts = [Int4Linear.from_linear(nn.Linear(128, n, bias=False)) for n in rows]
    if not parts[0].can_view_rows(0):
        pytest.skip("this device's int4 layout is not stored row block by row block")
    fast, reference = Int4Linear.concat(parts), QuantizedLinear.concat.__func__(Int4Linear, parts)
    assert torch.equal(fast.packed, reference.packed)
    assert torch.equal(fast.scale_and_zero, reference.scale_and_zero)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fast(x), torch.cat([p(x) for p in parts], dim=-1))


def test_stacked_view_is_cat_without_a_copy_only_for_adjacent_rows():
    """`stacked_view` equals `torch.cat` of row blocks that follow each other in one storage,
    and refuses (None) anything else: a gap, another storage, another dtype or row shape, a
    non-contiguous part."""
    from mistral_lm.quantization.modules import stacked_view

    buffer = torch.randn(10, 4)
    parts = [buffer[0:3], buffer[3:4], buffer[4:10]]
    view = stacked_view(parts)
    assert view is not None and view.data_ptr() == buffer.data_ptr() and torch.equal(view, torch.cat(parts))
    assert torch.equal(stacked_view([buffer[2:5], buffer[5:7]]), buffer[2:7])
    for refused in ([buffer[0:3], buffer[4:6]],                        # a gap
                    [buffer[0:3], buffer[3:6].clone()],                # another storage
                    [buffer[0:3], buffer[3:6].view(torch.int32)],      # another dtype
                    [buffer.view(-1)[:12].view(3, 4), buffer.view(-1)[12:18].view(3, 2)],  # another row shape
                    [buffer[0:3, :2], buffer[3:6, :2]]):               # not contiguous
        assert stacked_view(refused) is None


@pytest.mark.parametrize("source, quantization_config", [("gguf", None), ("gguf", {"load_in_8bit": True}),
                                                         ("folder", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"})])
def test_a_group_read_at_once_is_fused_without_a_copy(source, quantization_config, monkeypatch, tmp_path):
    """A GGUF loaded in floats (or quantized as read) decodes a layer's q/k/v and gate/up into one
    buffer, and a quantizing load copies a folder's mapped parts into one: fusing takes the parts'
    rows as they are, with no copy (no `torch.cat` from fusion.py or the quantized modules'
    concat, which fusing parts of their own storage does call), and every weight equals an
    unfused load's."""
    import sys

    from .conftest import default_model_or_skip

    if source == "gguf":
        path, options = default_model_or_skip(), dict(gguf_native=False, quantization_config=quantization_config)
    else:
        MistralForCausalLM(tiny_config()).save_pretrained(tmp_path)
        path, options = tmp_path, dict(quantization_config=quantization_config)
    calls: list[str] = []
    cat = torch.cat

    def counting(*args, **kwargs):
        calls.append(sys._getframe(1).f_code.co_filename)
        return cat(*args, **kwargs)

    def fusing_copies() -> int:
        return sum(f.endswith(("fusion.py", "modules.py")) for f in calls)

    monkeypatch.setattr(torch, "cat", counting)
    fused = MistralForCausalLM.from_pretrained(path, **options)
    assert fusing_copies() == 0 and fuse_projections(fused) == 2 * fused.config.num_hidden_layers
    plain = MistralForCausalLM.from_pretrained(path, fuse_projections=False, **options)
    apart = MistralForCausalLM(plain.config)  # parts in storage of their own: fusing copies them
    apart = quantize_model(apart, quantization_config) if quantization_config else apart
    apart.load_state_dict({k: v.clone() for k, v in plain.state_dict().items()})
    calls.clear()
    fuse_projections(apart.eval())
    assert fusing_copies() >= 2 * fused.config.num_hidden_layers
    monkeypatch.undo()
    ours, theirs = fused.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
