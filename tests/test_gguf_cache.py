"""Loading GGUF blocks straight into the int4 kernel's layout, and the kernel cache beside the file.

References: `reference_kernel_state` (the block decoders + Int4Linear's own packing, the path
loading took before), the `gguf` package's own dequantization, and loads with the cache off.
Files are tiny random models written here with gguf.GGUFWriter, one per block type, with row
counts that are not whole 64-row blocks and input sizes that are not multiples of 256.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from mistral_lm import MistralForCausalLM  # noqa: E402
from mistral_lm.checkpoints.gguf import load_gguf  # noqa: E402
from mistral_lm.errors import CheckpointError  # noqa: E402
from mistral_lm.quantization import gguf as qgguf  # noqa: E402
from mistral_lm.quantization.gguf import GGUFLinear, kernel_state, reference_kernel_state  # noqa: E402

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q8_0]
needs_layout = pytest.mark.skipif(qgguf._block_rows() is None, reason="no recognised CPU int4 layout")


pytestmark = pytest.mark.usefixtures("torch_int4_gguf_path")  # these tests cover GGUFLinear

def random_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """(rows, bytes) of valid blocks: random codes, small finite float16 scales (and mins)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    d = (rng.standard_normal((rows, cols // block)) * 0.01).astype(np.float16)
    at = size - 2 if qtype == Q.Q6_K else 0  # Q6_K's d ends its block
    data[..., at:at + 2] = d.view(np.uint8).reshape(rows, -1, 2)
    if qtype in (Q.Q4_1, Q.Q4_K):  # Q4_1's min, Q4_K's dmin
        data[..., 2:4] = (np.abs(d) * 3).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    return data.reshape(rows, -1)


# hidden 256 (a K-quant's super-block), 4 heads of 64, 1 kv head; vocab 100 and (but for K-quants) ffn 352
# are not whole 64-row blocks, and 352 inputs are not a multiple of 256
SHAPE = dict(hidden=256, heads=4, kv=1, layers=2, vocab=100)


def write_model(path: Path, qtype: Q, seed: int = 0, tied: bool = False) -> None:
    h, v, ff = SHAPE["hidden"], SHAPE["vocab"], 768 if qtype in (Q.Q4_K, Q.Q6_K) else 352
    kv_rows = SHAPE["kv"] * h // SHAPE["heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(ff)
    writer.add_block_count(SHAPE["layers"])
    writer.add_head_count(SHAPE["heads"])
    writer.add_head_count_kv(SHAPE["kv"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(v)
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (v, h), "output_norm.weight": (h,), **({} if tied else {"output.weight": (v, h)})}
    for i in range(SHAPE["layers"]):
        shapes.update({f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                       f"blk.{i}.attn_q.weight": (h, h), f"blk.{i}.attn_k.weight": (kv_rows, h),
                       f"blk.{i}.attn_v.weight": (kv_rows, h), f"blk.{i}.attn_output.weight": (h, h),
                       f"blk.{i}.ffn_gate.weight": (ff, h), f"blk.{i}.ffn_up.weight": (ff, h),
                       f"blk.{i}.ffn_down.weight": (h, ff)})
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            writer.add_tensor(name, random_blocks(*shape, qtype, rng), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def refuse_new_files(monkeypatch) -> None:
    """The cache writer cannot even create its file (a read-only folder, a full disk)."""
    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qgguf.tempfile, "mkstemp", refuse)


def cache_file(path: Path) -> Path:
    return path.with_name(path.name + ".mistral_lm-cache")


def logits(model: MistralForCausalLM) -> torch.Tensor:
    ids = torch.arange(3, 27).remainder(SHAPE["vocab"])[None]
    with torch.inference_mode():
        return model(ids).logits


def load(path: Path, **kwargs) -> MistralForCausalLM:
    return MistralForCausalLM.from_pretrained(path, gguf_native=True, fuse_projections=False, **kwargs)


# ------------------------------------------------------------------ blocks -> kernel layout
@needs_layout
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows, cols", [(64, 256), (7, 512), (100, 768), (4160, 256), (130, 96)])
def test_kernel_state_equals_the_reference_packing(qtype, rows, cols):
    if cols % gguf.GGML_QUANT_SIZES[qtype][0]:
        pytest.skip("not a whole number of blocks")
    qt = SimpleNamespace(ggml_type=int(qtype), shape=(rows, cols),
                         data=random_blocks(rows, cols, qtype, np.random.default_rng(rows)))
    for dtype in (torch.bfloat16, torch.float32):
        fast, ref = kernel_state(qt, dtype), reference_kernel_state(qt, dtype)
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    # and both mean what the gguf package decodes: float32 scales make the module exact
    module = GGUFLinear.from_kernel_state(int(qtype), cols, rows, *kernel_state(qt, torch.float32), torch.float32)
    expected = gguf.quants.dequantize(qt.data, qtype).reshape(rows, cols)
    assert torch.equal(module.dequantize(), torch.from_numpy(expected))


# ------------------------------------------------------------------ whole files, cache on and off
@needs_layout
@pytest.mark.parametrize("qtype", TYPES)
def test_cached_load_equals_the_copying_load(tmp_path, monkeypatch, qtype):
    path = tmp_path / f"{qtype.name}.gguf"
    write_model(path, qtype, tied=qtype == Q.Q8_0)
    monkeypatch.setenv(qgguf.CACHE_ENV, "0")
    copied = load(path)
    assert not cache_file(path).exists()
    monkeypatch.delenv(qgguf.CACHE_ENV)
    built = load(path)  # miss: repacked, written, mapped back
    assert cache_file(path).exists()
    mapped = load(path)  # hit
    want = logits(copied)
    assert torch.equal(logits(built), want) and torch.equal(logits(mapped), want)
    # every kept weight is the reference packing of the file's blocks (the path loading used to take)
    raw = load_gguf(path, dequantize=False).tensors
    for name, module in mapped.named_modules():
        if isinstance(module, GGUFLinear):
            source = raw.get(name + ".weight", raw["model.embed_tokens.weight"])
            packed, scale_and_zero = reference_kernel_state(source)
            assert torch.equal(module.packed, packed) and torch.equal(module.scale_and_zero, scale_and_zero)
    assert torch.equal(mapped.model.embed_tokens.weight, copied.model.embed_tokens.weight)


@needs_layout
def test_cache_is_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    write_model(path, Q.Q4_0, seed=0)
    old = logits(load(path))
    stat = path.stat()
    write_model(path, Q.Q4_0, seed=1)  # same size, other weights
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # even within one clock tick
    assert path.stat().st_size == stat.st_size
    new = logits(load(path))
    monkeypatch.setenv(qgguf.CACHE_ENV, "0")
    assert torch.equal(new, logits(load(path))) and not torch.equal(new, old)


@needs_layout
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "header"])
def test_a_damaged_cache_is_a_miss(tmp_path, monkeypatch, damage):
    path = tmp_path / "m.gguf"
    write_model(path, Q.Q4_1)
    want = logits(load(path))
    cache = cache_file(path)
    data = cache.read_bytes()
    cache.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(len(data)), "empty": b"",
                       "header": data[:-40] + b"x" * 24 + data[-16:]}[damage])
    assert torch.equal(logits(load(path)), want)
    assert cache.stat().st_size == len(data)  # rewritten whole
    assert not list(tmp_path.glob("*.tmp"))


@needs_layout
def test_unwritable_folder_or_full_disk_loads_in_memory(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    write_model(path, Q.Q4_K)
    monkeypatch.setenv(qgguf.CACHE_ENV, "0")
    want = logits(load(path))
    monkeypatch.delenv(qgguf.CACHE_ENV)
    refuse_new_files(monkeypatch)
    assert torch.equal(logits(load(path)), want) and not cache_file(path).exists()
    monkeypatch.undo()
    calls = []

    def fail_later(self, tensors):  # the disk fills up after a few tensors
        calls.append(1)
        if len(calls) > 3:
            self.abort()
            return False
        return real_add(self, tensors)

    real_add = qgguf._CacheWriter.add
    monkeypatch.setattr(qgguf._CacheWriter, "add", fail_later)
    assert torch.equal(logits(load(path)), want)
    assert not cache_file(path).exists() and not list(tmp_path.glob("*.tmp"))


@needs_layout
def test_a_killed_writers_leftover_is_removed(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path, Q.Q4_0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f"{cache_file(path).name}.{int(dead.stdout)}.abc123.tmp"
    leftover.write_bytes(b"half a cache")
    mine = tmp_path / f"{cache_file(path).name}.{os.getpid()}.live.tmp"  # a writer still running
    mine.write_bytes(b"in progress")
    load(path)
    assert not leftover.exists() and mine.exists() and cache_file(path).exists()


@needs_layout
def test_a_truncated_gguf_fails_before_anything_loads(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path, Q.Q4_0)
    load(path)  # a valid cache sits beside it
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load(path)
    assert not list(tmp_path.glob("*.tmp"))


@needs_layout
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc")
def test_loaded_weights_are_views_of_the_cache_file(tmp_path):
    """Zero-copy: a cached load's kept weights lie in the cache file's mapping (/proc/self/maps)."""
    path = tmp_path / "m.gguf"
    write_model(path, Q.Q4_0)
    load(path)
    model = load(path)
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(cache_file(path)):
            spans.append(tuple(int(x, 16) for x in fields[0].split("-")))
    kept = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert spans and len(kept) == 2 * 7 + 1
    for module in kept:
        for tensor in (module.packed, module.scale_and_zero):
            assert any(lo <= tensor.data_ptr() < hi for lo, hi in spans)
