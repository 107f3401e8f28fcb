"""The kernel build that `make install` runs (`python -m mistral_lm.native`)."""

from __future__ import annotations

from mistral_lm.native import build


def test_build_all_maps_each_source_to_its_own_library():
    """Built in parallel, largest first: each name still gets its own source's library."""
    names = sorted(p.stem for p in build.SOURCE_DIR.glob("*.c"))
    built = build.build_all()
    assert list(built) == names
    for name, path in built.items():
        assert path == build.shared_object(name)
        assert path is None or path.name.startswith(f"{name}-")
