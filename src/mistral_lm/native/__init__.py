"""Native CPU kernels (C, loaded with ctypes) and the pure-torch references they are tested against.

`build` compiles and caches the libraries; each kernel family has its own module here.
"""

from .build import build_all, enabled, isa_cap, library


def families() -> dict[str, bool]:
    """Whether each kernel family's library is loaded in this process, looking it up now if it
    was not yet. Each is looked up once per process, so a family first looked up while
    ``MISTRAL_LM_NATIVE=0`` is set stays off here: call this before setting it for subprocesses."""
    from . import attention, dense, draw, ggml, links, nf4, step

    return {"attention": attention.available(), "dense": dense.available(), "draw": draw.library() is not None,
            "ggml": ggml._lib() is not None, "links": links._lib() is not None, "nf4": nf4.available(),
            "step": step._lib() is not None}


__all__ = ["build_all", "enabled", "families", "isa_cap", "library"]
