"""The kernel build that `make install` runs (`python -m mistral_lm.native`)."""

from __future__ import annotations

import pytest

from mistral_lm.native import build


def test_build_all_maps_each_source_to_its_own_library():
    """Built in parallel, largest first: each name still gets its own source's library."""
    names = sorted(p.stem for p in build.SOURCE_DIR.glob("*.c"))
    built = build.build_all()
    assert list(built) == names
    for name, path in built.items():
        assert path == build.shared_object(name)
        assert path is None or path.name.startswith(f"{name}-")


@pytest.mark.parametrize("env, cap", [
    ({}, 3),
    ({"MISTRAL_LM_NATIVE_ISA": "avx512"}, 2),
    ({"MISTRAL_LM_NATIVE_ISA": "amx", "ONEDNN_MAX_CPU_ISA": "AVX2"}, 3),  # ours, when given, wins
    ({"ATEN_CPU_CAPABILITY": "avx2"}, 1),
    ({"ATEN_CPU_CAPABILITY": "avx512"}, 3),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, 2),  # AMX off for oneDNN: off for ours
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, 3),
    ({"ONEDNN_MAX_CPU_ISA": "avx2_vnni"}, 1),
    ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, 0),
    ({"ONEDNN_MAX_CPU_ISA": "ALL"}, 3),
    ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, 1),  # the lower cap
])
def test_isa_cap_follows_the_environment(monkeypatch, env, cap):
    """make test's second pass and an AMX-off measurement cap our kernels through the same
    variables that cap torch's (build.py's docstring)."""
    for name in ("MISTRAL_LM_NATIVE_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert build.isa_cap() == cap


def test_the_retry_build_has_no_tile_instructions(tmp_path):
    """Where the first compile fails (an assembler older than AMX), build.py compiles again with
    RETRY_FLAGS: that assembly must hold no tile instruction, and the first one must."""
    import re
    import subprocess

    cc = build.compiler()
    if cc is None:
        pytest.skip("no C compiler here")
    tile = re.compile(r"\b(ldtilecfg|tilerelease|tilezero|tileloadd|tilestored|tdpb[su][su]d)\b")
    for extra, wanted in (([], True), (build.RETRY_FLAGS, False)):
        out = tmp_path / "ggml.s"
        flags = [{"-O3": "-O0"}.get(f, f) for f in build.FLAGS if f not in ("-shared", "-fPIC")]  # seconds, not 15
        subprocess.run([cc, *flags, *extra, "-S",
                        f"-I{build.SOURCE_DIR}", str(build.SOURCE_DIR / "ggml.c"), "-o", str(out)],
                       check=True, capture_output=True, timeout=300)
        assert bool(tile.search(out.read_text())) is wanted, extra
