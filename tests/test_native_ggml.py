"""native/ggml: kernels on GGUF blocks == their pure-torch definition, which == dequantize @ x within
the activation-quantization bound; bit-identical across ISAs, batch sizes, threads and slices."""

from __future__ import annotations


import gguf
import numpy as np
import pytest
import torch

from mistral_lm.errors import CheckpointError, InputError
from mistral_lm.native import ggml

from .conftest import capped_isa, isa_levels, torch_threads

Q = gguf.GGMLQuantizationType
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K]
needs_lib = pytest.mark.skipif(not ggml.available(), reason="ggml C library not built here")


def random_blocks(ggml_type: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Blocks of random weights; K-quants (no quantizer in gguf-py) as random bytes with sane scales."""
    rng = np.random.default_rng(seed)
    if ggml_type in (Q.Q4_K, Q.Q6_K):
        size = gguf.GGML_QUANT_SIZES[Q(ggml_type)][1]
        b = rng.integers(0, 256, (n, k // 256, size), dtype=np.uint8)
        scale = lambda: (rng.random((n, k // 256, 1)) * 0.02).astype(np.float16).view(np.uint8)  # noqa: E731
        if ggml_type == Q.Q4_K:
            b[..., 0:2], b[..., 2:4] = scale(), scale()
        else:
            b[..., 208:210] = scale()
        return torch.from_numpy(b.reshape(n, -1))
    return torch.from_numpy(gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), Q(ggml_type)))


def activations(m: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[0, :32] = 0.0                      # an all-zero block: d = 0, codes 0
    x[-1, 32:64] = torch.arange(32) - 15.5  # halfway cases: amax 16.5 ... ties round to even
    return x


def caps() -> list[int]:
    return isa_levels(ggml._lib())


def isa(cap: int):
    return capped_isa(ggml._lib(), cap)


threads = torch_threads


def k_for(ggml_type: int) -> int:
    return 512 if ggml_type in (Q.Q4_K, Q.Q6_K) else 160


# ------------------------------------------------------------------ reference (no C needed)
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_decode_matches_gguf(ggml_type):
    blocks = random_blocks(ggml_type, 9, 512)
    want = gguf.quants.dequantize(blocks.numpy(), Q(ggml_type))
    torch.testing.assert_close(ggml.dequantize(blocks, ggml_type, 512), torch.from_numpy(want), rtol=1e-6, atol=0)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_reference_within_activation_quantization_bound(ggml_type):
    """|reference - dequantize(w) @ x| <= sum_i |w_i| d_i (1/2 + 2^-17): each x_i differs from its
    decoded d q by at most half a step d (plus the rounding of x/d); the dot products are exact."""
    k = k_for(ggml_type)
    blocks, x = random_blocks(ggml_type, 33, k), activations(5, k)
    w = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), Q(ggml_type))).double()
    exact = x.double() @ w.T
    _, d = ggml._quantize_torch(x)
    step = d.double().repeat_interleave(32, dim=1)  # (M, K): the activation scale of each element
    bound = (step * (0.5 + 2.0 ** -17)) @ w.abs().T
    err = (ggml._reference(x, blocks, ggml_type) - exact).abs()
    assert (err <= bound + 1e-12).all(), (err - bound).max()
    assert (bound > 0).all()


def test_reference_linear_shapes_and_bias():
    blocks = random_blocks(Q.Q8_0, 6, 64)
    x, bias = torch.randn(2, 3, 64), torch.randn(6)
    y = ggml.reference_linear(x, blocks, Q.Q8_0, bias)
    assert y.shape == (2, 3, 6)
    torch.testing.assert_close(y, ggml.reference_linear(x, blocks, Q.Q8_0) + bias)


# ------------------------------------------------------------------ kernels
@needs_lib
def test_quantize_activations_bit_identical_to_torch():
    x = activations(37, 1024)
    want = ggml._pack(*ggml._quantize_torch(x))
    for cap in caps():
        with isa(cap):
            assert torch.equal(ggml.quantize_activations(x), want), cap


@needs_lib
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_kernel_matches_reference_on_every_isa(ggml_type):
    """Within the float32 accumulation bound: per lane about 2 roundings per block (the product
    cw*dx and the fma; the min term's two) plus the 3-level lane sum, each at most 2^-24 of the sum
    of the magnitudes; and all ISAs bit-identical."""
    k = k_for(ggml_type)
    x = activations(70, k)
    for n in (1, 7, 33, 200):
        blocks = random_blocks(ggml_type, n, k, seed=n)
        ref = ggml._reference(x, blocks, ggml_type)
        bound = (k // 32 * 2 + 8) * 2.0 ** -24 * ggml._reference(x, blocks, ggml_type, absolute=True)
        first = None
        for cap in caps():
            with isa(cap):
                for m in (1, 3, 17, 70):
                    y = ggml.linear(x[:m], blocks, ggml_type)
                    assert y.shape == (m, n)
                    assert ((y.double() - ref[:m]).abs() <= bound[:m]).all(), (ggml_type, n, m, cap)
                    if m == 70:
                        first = y if first is None else first
                        assert torch.equal(y, first), f"ISA {cap} differs from the scalar path"


@needs_lib
@pytest.mark.parametrize("m", [1, 40], ids=["decode", "prefill"])
def test_a_scratch_the_kernel_cannot_allocate_raises_memory_error(m):
    """Each thread's panel is scratch kept across calls. Where it cannot be allocated, that thread's
    output rows were left as torch.empty left them, and the call returned garbage. A 1-byte cap on
    the scratch stands in for a failed allocation, on every ISA and with 1 and 2 threads; lifted,
    the same call gives the reference's result."""
    lib = ggml._lib()
    k, ggml_type = 160, Q.Q4_0
    x, blocks = activations(m, k), random_blocks(ggml_type, 37, k)
    xq = ggml.quantize_activations(x)
    for cap in caps():
        with isa(cap):
            old = lib.mlm_ggml_scratch_limit(1)
            try:
                for n_threads in (1, 2):
                    with threads(n_threads):
                        with pytest.raises(MemoryError, match="scratch"):
                            ggml.linear(x, blocks, ggml_type)
                        with pytest.raises(MemoryError, match="scratch"):
                            ggml.matmul(xq, blocks, ggml_type, k, torch.empty(m, 37))
            finally:
                lib.mlm_ggml_scratch_limit(old)
            y = ggml.linear(x, blocks, ggml_type)
            bound = (k // 32 * 2 + 8) * 2.0 ** -24 * ggml._reference(x, blocks, ggml_type, absolute=True)
            assert ((y.double() - ggml._reference(x, blocks, ggml_type)).abs() <= bound).all(), cap


@needs_lib
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_scalar_row_loads_equal_the_gather(ggml_type):
    """The tiles read each block's scales from 16 rows by scalar loads on AMD CPUs and by a gather
    elsewhere: the same bytes, so the same outputs, decode and prefill, on every ISA."""
    lib = ggml._lib()
    k = k_for(ggml_type)
    x = activations(70, k)
    blocks = random_blocks(ggml_type, 37, k, seed=5)
    old = lib.mlm_ggml_row_loads(-1)
    try:
        for cap in caps():
            with isa(cap):
                outs = []
                for mode in (0, 1):
                    lib.mlm_ggml_row_loads(mode)
                    outs.append([ggml.linear(x[:m], blocks, ggml_type) for m in (1, 2, 70)])
                assert all(torch.equal(a, b) for a, b in zip(*outs)), (ggml_type, cap)
    finally:
        lib.mlm_ggml_row_loads(old)


def amx_usable() -> bool:
    lib = ggml._lib()
    if lib is None:
        return False
    old = lib.mlm_ggml_amx(1)
    usable = lib.mlm_ggml_amx(old) == 1
    return usable


@needs_lib
@pytest.mark.skipif(not amx_usable(), reason="no AMX-INT8 here (or the OS withholds the tile state)")
@pytest.mark.parametrize("ggml_type", [t for t in TYPES if t != Q.Q6_K], ids=lambda t: t.name)  # Q6_K: no tiles
def test_amx_prefill_equals_the_vector_kernel(ggml_type):
    """On a CPU with AMX the prefill multiplies each 16-row group's codes in tiles: the same exact
    int32 sums and then the vector kernel's float steps in its order, so the same bits. Row
    counts around the 16-row groups and the M chunks (whole groups), a partial last tile of
    weight rows, K not a multiple of 256 for the 32-value types, 1 and 2 threads, one weight
    tile per pass and three (8 tiles: a partial tile last in a pass of three)."""
    lib = ggml._lib()
    k = 768 if ggml_type in (Q.Q4_K, Q.Q6_K) else 800
    x = activations(100, k)
    blocks = random_blocks(ggml_type, 117, k, seed=7)
    old, old_chunk, old_panels = lib.mlm_ggml_amx(-1), lib.mlm_ggml_chunk_bytes(-1), lib.mlm_ggml_amx_panels(0)
    try:
        for chunk, panels in ((0, 1), (0, 3), (16 * 3 * 64 * (k // 32), 3)):  # default chunks, and 48 rows
            lib.mlm_ggml_chunk_bytes(chunk)
            lib.mlm_ggml_amx_panels(panels)
            for n_threads in (1, 2):
                with threads(n_threads):
                    outs = []
                    for mode in (0, 1):
                        lib.mlm_ggml_amx(mode)
                        outs.append([ggml.linear(x[:m], blocks, ggml_type) for m in (15, 16, 17, 33, 48, 100)])
                    for m, a, b in zip((15, 16, 17, 33, 48, 100), *outs):
                        assert torch.equal(a, b), (ggml_type, m, chunk, panels, n_threads, (a - b).abs().max())
    finally:
        lib.mlm_ggml_amx(old)
        lib.mlm_ggml_chunk_bytes(old_chunk)
        lib.mlm_ggml_amx_panels(old_panels)


@needs_lib
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_batch_invariance(ggml_type):
    """Row m of an M-row call == a 1-row call of row m; 1 thread == 2 threads; a strided row slice
    of the blocks and a column slice of a wider out == the full call. Bit for bit, every ISA."""
    k, n = k_for(ggml_type), 37
    x, blocks = activations(21, k), random_blocks(ggml_type, n, k)
    rb = ggml.row_bytes(ggml_type, k)
    big = torch.zeros(n + 6, rb + 16, dtype=torch.uint8)
    big[3:3 + n, :rb] = blocks
    for cap in caps():
        with isa(cap):
            with threads(2):
                full = ggml.linear(x, blocks, ggml_type)
            for m in (0, 5, 20):
                assert torch.equal(ggml.linear(x[m:m + 1], blocks, ggml_type), full[m:m + 1]), (cap, m)
            with threads(1):
                assert torch.equal(ggml.linear(x, blocks, ggml_type), full), cap
            wide = torch.full((21, n + 9), -1.0)
            ggml.matmul(ggml.quantize_activations(x), big[3:3 + n, :rb], ggml_type, k, wide[:, 4:4 + n])
            assert torch.equal(wide[:, 4:4 + n], full), cap
            assert (wide[:, :4] == -1).all() and (wide[:, 4 + n:] == -1).all()
            part = torch.empty(21, 10)
            ggml.matmul(ggml.quantize_activations(x), blocks[13:23], ggml_type, k, part)
            assert torch.equal(part, full[:, 13:23]), cap


@needs_lib
def test_linear_leading_dims_bias_and_compile():
    blocks, bias = random_blocks(Q.Q4_1, 12, 96), torch.randn(12)
    x = torch.randn(2, 3, 96)
    y = ggml.linear(x, blocks, Q.Q4_1, bias)
    assert y.shape == (2, 3, 12)
    torch.testing.assert_close(y, ggml.reference_linear(x, blocks, Q.Q4_1, bias), rtol=1e-5, atol=1e-5)
    compiled = torch.compile(lambda t: ggml.linear(t, blocks, Q.Q4_1, bias), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), y)


# ------------------------------------------------------------------ errors
def test_errors_name_the_problem():
    blocks = random_blocks(Q.Q4_0, 4, 64)
    with pytest.raises(CheckpointError, match="Q5_K"):
        ggml.row_bytes(Q.Q5_K, 256)
    with pytest.raises(CheckpointError, match="multiple of 256"):
        ggml.row_bytes(Q.Q4_K, 320)
    with pytest.raises(InputError, match="float32"):
        ggml.quantize_activations(torch.zeros(2, 64, dtype=torch.float64))
    with pytest.raises(InputError, match="K % 32"):
        ggml.quantize_activations(torch.zeros(2, 48))
    with pytest.raises(CheckpointError, match=r"\(N, 36\)"):
        ggml.reference_linear(torch.zeros(1, 64), blocks[:, :30], Q.Q4_0)
    with pytest.raises(CheckpointError, match="uint8"):
        ggml.reference_linear(torch.zeros(1, 64), blocks.float(), Q.Q4_0)


@needs_lib
def test_kernel_errors_before_c():
    blocks = random_blocks(Q.Q4_0, 4, 64)
    xq = ggml.quantize_activations(torch.zeros(2, 64))
    with pytest.raises(InputError, match="out must be"):
        ggml.matmul(xq, blocks, Q.Q4_0, 64, torch.empty(2, 5))
    with pytest.raises(InputError, match="out must be"):
        ggml.matmul(xq, blocks, Q.Q4_0, 64, torch.empty(2, 4, dtype=torch.float64))
    with pytest.raises(InputError, match="quantized activations"):
        ggml.matmul(xq[:, :64], blocks, Q.Q4_0, 64, torch.empty(2, 4))
    with pytest.raises(CheckpointError, match="Q6_K"):
        ggml.matmul(xq, blocks, Q.Q6_K, 64, torch.empty(2, 4))
    with pytest.raises(CheckpointError, match="contiguous rows"):
        ggml.matmul(xq, blocks.t().contiguous().t(), Q.Q4_0, 64, torch.empty(2, 4))
    with pytest.raises(InputError):
        ggml.linear(torch.zeros(2, 60), blocks, Q.Q4_0)


@needs_lib
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_panel_and_chunk_boundaries(ggml_type):
    """K over several weight panels (16 blocks each) with a partial last one, M over several M chunks
    and register tiles with remainders, N not a multiple of the panel rows: within the bound, every
    ISA bit-identical, each row equal to its own 1-row call, and the default chunk size giving the
    same bits as the small one that makes these M cross chunks."""
    lib = ggml._lib()
    big = 256 * 64  # 512 blocks: the M chunk shrinks to a few register tiles
    for k, ms in (((768 if ggml_type in (Q.Q4_K, Q.Q6_K) else 576), (1, 2, 4, 5, 8, 9, 13, 16, 17, 33)),
                  (big, (1, 4, 15, 16, 17, 41))):
        n = 37
        x, blocks = activations(max(ms), k, seed=k), random_blocks(ggml_type, n, k, seed=k)
        ref = ggml._reference(x, blocks, ggml_type)
        bound = (k // 32 * 2 + 8) * 2.0 ** -24 * ggml._reference(x, blocks, ggml_type, absolute=True)
        whole = ggml.linear(x, blocks, ggml_type)  # the default chunk: at least 128 rows, these M in one
        old = lib.mlm_ggml_chunk_bytes(16 << 10)  # 8-12 rows at k = 576 / 768; big k: 4 tiles (12-16)
        try:
            assert torch.equal(ggml.linear(x, blocks, ggml_type), whole), (ggml_type, k)
            _each_isa_row_by_row(ggml_type, x, blocks, ref, bound, ms, k)
        finally:
            lib.mlm_ggml_chunk_bytes(old)


def _each_isa_row_by_row(ggml_type, x, blocks, ref, bound, ms, k) -> None:
    """Every ISA: within the bound of the float64 reference, bit-identical, and each M prefix equal to its rows."""
    first = None
    for cap in caps():
        with isa(cap):
            rows = torch.cat([ggml.linear(x[i:i + 1], blocks, ggml_type) for i in range(x.shape[0])])
            assert ((rows.double() - ref).abs() <= bound).all(), (ggml_type, k, cap)
            first = rows if first is None else first
            assert torch.equal(rows, first), (ggml_type, k, cap)
            for m in ms:
                assert torch.equal(ggml.linear(x[:m], blocks, ggml_type), rows[:m]), (ggml_type, k, m, cap)
            with threads(2):
                assert torch.equal(ggml.linear(x, blocks[3:], ggml_type), rows[:, 3:]), (ggml_type, k, cap)
            # 30 rows: an even count of 8-row tiles, the last one partial (AVX2 takes Q4 tiles in pairs)
            assert torch.equal(ggml.linear(x, blocks[7:], ggml_type), rows[:, 7:]), (ggml_type, k, cap)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_c_decode_is_the_torch_definition_bit_for_bit(ggml_type):
    """ggml.dequantize in C (the embedding lookup of every decode step) equals the float64 torch
    definition exactly: whole tables, picked rows in any order, and repeated rows."""
    if not ggml.available():
        pytest.skip("the ggml library could not be built here")
    blocks = random_blocks(ggml_type, 13, 512)
    want = ggml.reference_dequantize(blocks, ggml_type, 512)
    torch.testing.assert_close(want, torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), Q(ggml_type))),
                               rtol=1e-6, atol=0)
    bits = want.view(torch.int32)  # signs of zero included
    assert torch.equal(ggml.dequantize(blocks, ggml_type, 512).view(torch.int32), bits)
    rows = torch.tensor([12, 0, 5, 5, 7])
    assert torch.equal(ggml.dequantize(blocks, ggml_type, 512, rows=rows).view(torch.int32), bits[rows])
    assert ggml.dequantize(blocks, ggml_type, 512, rows=torch.tensor([], dtype=torch.long)).shape == (0, 512)
    with pytest.raises(InputError, match="out of range"):
        ggml.dequantize(blocks, ggml_type, 512, rows=torch.tensor([13]))
    # into 16-bit outputs (a loader decoding into its dtype): the definition rounded by torch
    for dtype in (torch.bfloat16, torch.float16):
        out = torch.empty(5, 512, dtype=dtype)
        ggml.dequantize(blocks, ggml_type, 512, rows=rows, out=out)
        assert torch.equal(out.view(torch.int16), want[rows].to(dtype).view(torch.int16)), dtype
    big = blocks.clone()  # scales near float16's top: values past 65504 must become infinity as torch rounds them
    if ggml_type in (Q.Q4_0, Q.Q8_0, Q.Q6_K):
        at = {Q.Q4_0: 0, Q.Q8_0: 0, Q.Q6_K: 208}[ggml_type]
        big.view(-1, blocks.shape[1])[:, at:at + 2] = torch.tensor([0x7BFF], dtype=torch.int16).view(torch.uint8)
        out = torch.empty(13, 512, dtype=torch.float16)
        ggml.dequantize(big, ggml_type, 512, out=out)
        assert torch.equal(out.view(torch.int16), ggml.reference_dequantize(big, ggml_type, 512).half().view(torch.int16))
    with pytest.raises(InputError, match="contiguous float32, bfloat16 or float16"):
        ggml.dequantize(blocks, ggml_type, 512, out=torch.empty(13, 512, dtype=torch.float64))


# ------------------------------------------------------------------ the tiled layout
TILEABLE = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q6_K]


def k_tiled(ggml_type: int, k32: int) -> int:
    """A K for the tiled tests: k32 for the 32-value types (not a multiple of 256), else 768."""
    return 768 if ggml_type == Q.Q6_K else k32


@pytest.mark.parametrize("ggml_type", TILEABLE, ids=lambda t: t.name)
def test_tile_is_a_permutation_of_the_rows_bytes(ggml_type):
    """`tile` keeps every byte (same shape, same multiset), puts row r's block b codes where the
    kernels read them, and `untile` gives the file's rows back."""
    k = k_tiled(ggml_type, 160)
    blocks = random_blocks(ggml_type, 48, k, seed=3)
    tiled = ggml.tile(blocks, ggml_type, k)
    assert tiled.shape == blocks.shape and not torch.equal(tiled, blocks)
    assert torch.equal(tiled.flatten().sort().values, blocks.flatten().sort().values)
    assert torch.equal(ggml.untile(tiled, ggml_type | ggml.TILED, k), blocks)
    assert torch.equal(ggml.reference_tile(blocks, ggml_type, k), tiled)  # C's copy == torch's definition
    # the torch definitions read the tiled layout too (the path taken where C cannot be built)
    x = activations(3, k)
    assert torch.equal(ggml.reference_linear(x, tiled, ggml_type | ggml.TILED), ggml.reference_linear(x, blocks, ggml_type))
    assert torch.equal(ggml.reference_dequantize(ggml.untile(tiled, ggml_type | ggml.TILED, k), ggml_type, k),
                       ggml.reference_dequantize(blocks, ggml_type, k))
    kb = k_tiled(ggml_type, 32 * 41)
    big = random_blocks(ggml_type, 16 * 37, kb, seed=4)  # several groups a thread, K not a multiple of 256
    want = ggml.reference_tile(big, ggml_type, kb)
    for cap in caps() if ggml.available() else ():  # the AVX-512 transposes and the scalar copy
        with isa(cap), threads(2):
            assert torch.equal(ggml.tile(big, ggml_type, kb), want), cap
    g, row = 1, 5
    flat = tiled[16 * g:16 * (g + 1)].flatten()
    if ggml_type == Q.Q6_K:
        # superblock 1 of group 1: 4-byte column 33 (qh bytes 4..7) of row 5, the decode's 8th
        # vector (the scales, then ql and qh columns alternating), then row 5's d
        sb, rb = 1, ggml.row_bytes(ggml_type, k)
        start = sb * 16 * 210 + 7 * 64 + 4 * row
        source = blocks[16 * g + row, :rb].view(-1, 210)[sb]
        assert torch.equal(flat[start:start + 4], source[132:136])
        d = sb * 16 * 210 + 52 * 64 + 2 * row
        assert torch.equal(flat[d:d + 2], source[208:210])
        return
    # the first 4-byte code group of group 1, row 5, block 2: right after the 16 rows' groups before it
    head, cb = (4, 16) if ggml_type == Q.Q4_1 else (2, 32 if ggml_type == Q.Q8_0 else 16)
    b = 2
    start = b * 16 * cb + 4 * row
    assert torch.equal(flat[start:start + 4], blocks[16 * g + row, b * (head + cb) + head:b * (head + cb) + head + 4])


@needs_lib
@pytest.mark.parametrize("ggml_type", TILEABLE, ids=lambda t: t.name)
def test_tiled_kernels_equal_the_row_kernels_bit_for_bit(ggml_type):
    """Same exact integer sums and the row kernels' float steps in their order: the tiled layout
    gives the same bits on every ISA, for decode (1-2 rows), the vector prefill and AMX's (where
    present), at 1 and 2 threads, K not a multiple of 256, and row counts around the groups."""
    lib = ggml._lib()
    k = k_tiled(ggml_type, 800)
    x = activations(40, k)
    amx_old = lib.mlm_ggml_amx(-1)
    try:
        for n in (16, 48, 144):
            blocks = random_blocks(ggml_type, n, k, seed=n)
            tiled = ggml.tile(blocks, ggml_type, k)
            for cap in caps():
                with isa(cap):
                    for amx in ((0, 1) if amx_usable() and cap >= 3 else (amx_old,)):
                        lib.mlm_ggml_amx(amx)
                        for n_threads in (1, 2):
                            with threads(n_threads):
                                for m in (1, 2, 3, 15, 17, 40):
                                    want = ggml.linear(x[:m], blocks, ggml_type)
                                    got = ggml.linear(x[:m], tiled, ggml_type | ggml.TILED)
                                    assert torch.equal(got, want), (ggml_type, n, cap, amx, n_threads, m)
                with isa(cap):
                    assert torch.equal(ggml.dequantize(tiled, ggml_type | ggml.TILED, k),
                                       ggml.dequantize(blocks, ggml_type, k))
                    rows = torch.tensor([n - 1, 0, 17 % n, 5])
                    assert torch.equal(ggml.dequantize(tiled, ggml_type | ggml.TILED, k, rows=rows),
                                       ggml.dequantize(blocks, ggml_type, k, rows=rows))
    finally:
        lib.mlm_ggml_amx(amx_old)


@needs_lib
def test_tiled_layout_refuses_what_it_cannot_hold():
    """Row counts that are not whole groups, K-quants and row slices refuse with a typed error
    before any C runs, and so does C itself when reached directly."""
    k = 160
    blocks = random_blocks(Q.Q4_0, 40, k)
    with pytest.raises(CheckpointError, match="16"):
        ggml.tile(blocks, Q.Q4_0, k)
    with pytest.raises(CheckpointError, match="Q4_K"):
        ggml.tile(random_blocks(Q.Q4_K, 16, 512), Q.Q4_K, 512)
    tiled = ggml.tile(random_blocks(Q.Q4_0, 32, k), Q.Q4_0, k)
    with pytest.raises(CheckpointError, match="16-row groups"):
        ggml.linear(torch.randn(1, k), tiled[:8], Q.Q4_0 | ggml.TILED)
    with pytest.raises(CheckpointError, match="16-row groups"):
        ggml.linear(torch.randn(1, k), tiled.t().contiguous().t(), Q.Q4_0 | ggml.TILED)  # not row-major
    xq = ggml.quantize_activations(torch.randn(1, k))
    out = torch.empty(1, 40)
    lib = ggml._lib()
    import ctypes
    rc = lib.mlm_ggml_matmul(int(Q.Q4_0) | ggml.TILED, ctypes.c_void_p(xq.data_ptr()), 1, k,
                             ctypes.c_void_p(blocks.data_ptr()), 40, blocks.shape[1], ctypes.c_void_p(out.data_ptr()), 40, 1)
    assert rc == -1
