"""Loading GGUF blocks into the tiled layout (`ggml.tile`), kept in a cache file beside the GGUF.

The reference is the same file loaded with the file's rows (`MISTRAL_LM_GGUF_TILED=0`): the
kernels give the same bits on either layout (test_native_ggml.py), so whole models must too,
for a prefill and for greedy decoding through the fused step. Files are the tiny random models
of test_gguf_cache.py: vocab 100 (not whole 16-row groups: the head stays in rows) and ffn 352.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from mistral_lm.checkpoints.gguf import load_gguf  # noqa: E402
from mistral_lm.errors import CheckpointError  # noqa: E402
from mistral_lm.native import ggml  # noqa: E402
from mistral_lm.quantization import gguf as qgguf  # noqa: E402
from mistral_lm.quantization import gguf_install  # noqa: E402
from mistral_lm.quantization.gguf_blocks import GGUFBlockLinear  # noqa: E402

from .test_gguf_cache import load, logits, refuse_new_files, write_model  # noqa: E402

pytestmark = pytest.mark.skipif(not ggml.available(), reason="ggml C library not built here")


def tiled_file(path):
    return path.with_name(path.name + ".mistral_lm-tiled")


def _in_file(tensor: torch.Tensor, path) -> bool:
    """Whether `tensor`'s memory is a map of `path` (/proc/self/maps)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if start <= address < end:
                return len(fields) > 5 and fields[5] == str(path)
    return False


def greedy(model, steps: int = 6) -> torch.Tensor:
    ids = torch.arange(5, 17)[None]
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=steps, do_sample=False, output_logits=True,
                              return_dict_in_generate=True).logits


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_tiled_load_gives_the_rows_bits(tmp_path, monkeypatch, qtype):
    path = tmp_path / f"{qtype.name}.gguf"
    write_model(path, qtype, tied=qtype == Q.Q8_0)
    monkeypatch.setenv(gguf_install.TILED_ENV, "0")
    rows = load(path)
    assert not tiled_file(path).exists()
    monkeypatch.delenv(gguf_install.TILED_ENV)
    built = load(path)  # a miss: tiled in memory, the cache written behind the load
    gguf_install.wait_for_cache_writes()
    assert tiled_file(path).exists() == (qtype != Q.Q4_K)  # Q4_K has no tiled layout: nothing to cache
    written = tiled_file(path).exists() and tiled_file(path).stat().st_mtime_ns
    mapped = load(path)  # a hit: nothing written
    gguf_install.wait_for_cache_writes()
    assert not written or tiled_file(path).stat().st_mtime_ns == written
    if written:  # the hit's tiles are views of the cache file: nothing copied
        assert _in_file(mapped.model.layers[0].mlp.up_proj.blocks, tiled_file(path))
    raw = load_gguf(path, dequantize=False).tensors
    layers = {name: m for name, m in mapped.named_modules() if isinstance(m, GGUFBlockLinear)}
    for name, module in layers.items():
        source = raw.get(name + ".weight", raw["model.embed_tokens.weight"])
        assert module.tiled == (qtype != Q.Q4_K and source.shape[0] % 16 == 0), name
    assert not layers["lm_head"].tiled and layers["model.layers.0.mlp.up_proj"].tiled == (qtype != Q.Q4_K)
    want = logits(rows)
    assert torch.equal(logits(built), want) and torch.equal(logits(mapped), want)
    steps = greedy(rows)
    assert all(torch.equal(a, b) for a, b in zip(greedy(mapped), steps))
    assert all(torch.equal(a, b) for a, b in zip(greedy(built), steps))


def test_the_tiled_cache_follows_the_file(tmp_path, monkeypatch):
    """A changed file (same size, newer mtime) or a damaged cache is a miss and is rebuilt."""
    path = tmp_path / "m.gguf"
    write_model(path, Q.Q4_0, seed=0)
    old = logits(load(path))
    gguf_install.wait_for_cache_writes()
    stat = path.stat()
    write_model(path, Q.Q4_0, seed=1)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    new = logits(load(path))
    gguf_install.wait_for_cache_writes()
    monkeypatch.setenv(gguf_install.TILED_ENV, "0")
    assert torch.equal(new, logits(load(path))) and not torch.equal(new, old)
    monkeypatch.delenv(gguf_install.TILED_ENV)
    cache = tiled_file(path)
    size = cache.stat().st_size
    cache.write_bytes(os.urandom(size))
    assert torch.equal(logits(load(path)), new)
    gguf_install.wait_for_cache_writes()
    assert cache.stat().st_size == size and _in_file(load(path).model.layers[1].mlp.down_proj.blocks, cache)


def test_without_a_writable_folder_the_tiles_stay_in_memory(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    write_model(path, Q.Q4_1)
    monkeypatch.setenv(gguf_install.TILED_ENV, "0")
    want = logits(load(path))
    monkeypatch.delenv(gguf_install.TILED_ENV)
    refuse_new_files(monkeypatch)
    model = load(path)
    gguf_install.wait_for_cache_writes()
    assert model.model.layers[0].mlp.up_proj.tiled and not tiled_file(path).exists()
    assert torch.equal(logits(model), want)
    monkeypatch.undo()
    monkeypatch.setattr(qgguf._CacheWriter, "add", lambda self, tensors: self.abort() or False)  # disk full midway
    assert torch.equal(logits(load(path)), want)
    gguf_install.wait_for_cache_writes()
    assert not tiled_file(path).exists() and not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    monkeypatch.setenv(qgguf.CACHE_ENV, "0")  # caches off: tiled in memory, nothing written
    assert torch.equal(logits(load(path)), want)
    gguf_install.wait_for_cache_writes()
    assert not tiled_file(path).exists()


def test_a_layer_built_from_tiled_blocks_must_say_so():
    """Tiled blocks are a permutation of the rows: a layer refuses a layout it cannot hold, and one
    built from another's blocks with its `tiled` flag computes the same bits."""
    blocks = torch.from_numpy(gguf.quants.quantize(torch.randn(48, 128).numpy(), Q.Q4_0))
    layer = GGUFBlockLinear.tiled_from(blocks, Q.Q4_0, 128)
    twin = GGUFBlockLinear(layer.blocks, layer.ggml_type, 128, tiled=layer.tiled)
    x = torch.randn(3, 128)
    assert torch.equal(twin(x), GGUFBlockLinear(blocks, Q.Q4_0, 128)(x)) and torch.equal(twin(x), layer(x))
    with pytest.raises(CheckpointError, match="16"):
        GGUFBlockLinear(blocks[:40], Q.Q4_0, 128, tiled=True)
    assert "layout=tiled" in repr(layer)
    # LoRA below a tiled layer: the input gradient multiplies by the same dequantized rows
    rows = GGUFBlockLinear(blocks, Q.Q4_0, 128)
    grads = []
    for module in (layer, rows):
        xg = x.clone().requires_grad_(True)
        module(xg).backward(torch.ones(3, 48))
        grads.append(xg.grad)
    assert torch.equal(*grads) and torch.equal(layer.dequantize(), rows.dequantize())


def test_a_tied_heads_tiles_are_cached(tmp_path, monkeypatch):
    """Regression: with a tied head in whole 16-row groups (the default model), the loader added
    the embedding's entry to the dict the cache writer was iterating on its thread; the write
    ended in an error and no cache was kept. Here the writer is inside its first `add` before
    the loader goes on, and stays there until the load has returned: the old code failed every
    time."""
    from . import test_gguf_cache

    monkeypatch.setitem(test_gguf_cache.SHAPE, "vocab", 112)
    path = tmp_path / "tied.gguf"
    write_model(path, Q.Q8_0, tied=True)
    writing, loaded = threading.Event(), threading.Event()
    add, tiled_tensors = qgguf._CacheWriter.add, gguf_install._tiled_tensors

    def add_after_the_load(self, tensors):
        writing.set()
        loaded.wait(30)
        return add(self, tensors)

    def tiles_then_wait_for_the_writer(*args):
        made = tiled_tensors(*args)
        writing.wait(30)
        return made

    monkeypatch.setattr(qgguf._CacheWriter, "add", add_after_the_load)
    monkeypatch.setattr(gguf_install, "_tiled_tensors", tiles_then_wait_for_the_writer)
    model = load(path)
    loaded.set()
    gguf_install.wait_for_cache_writes()
    assert writing.is_set() and model.lm_head.tiled and tiled_file(path).exists()
    monkeypatch.undo()
    mapped = load(path)
    assert _in_file(mapped.lm_head.blocks, tiled_file(path))
    assert torch.equal(logits(mapped), logits(model))


# The cache writer held until the script's work is done (`done.set()`), and half a second
# more: the exit then finds the write under way, however busy the machine.
HELD_WRITER = """
import sys, threading, time
from mistral_lm.quantization import gguf as qgguf
add, done, held = qgguf._CacheWriter.add, threading.Event(), []
def held_add(self, tensors):
    if not held:
        held.append(done.wait(120))
        time.sleep(0.5)
    return add(self, tensors)
qgguf._CacheWriter.add = held_add
"""


@pytest.mark.one_isa  # no numbers: not again under the AVX2 cap
def test_a_process_that_exits_after_its_first_load_leaves_the_cache(tmp_path):
    """The cache is written behind the load, and a script that loads and ends (as a one-shot
    command does) used to exit first: the writer was cut, and every later load tiled again."""
    path = tmp_path / "m.gguf"
    write_model(path, Q.Q4_0)
    code = HELD_WRITER + ("from mistral_lm import MistralForCausalLM\n"
                          "MistralForCausalLM.from_pretrained(sys.argv[1], gguf_native=True)\n"
                          "done.set()\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert tiled_file(path).exists() and not list(tmp_path.glob("*.tmp"))
    mapped = load(path)
    assert _in_file(mapped.model.layers[0].mlp.up_proj.blocks, tiled_file(path))
