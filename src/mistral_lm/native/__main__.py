"""`python -m mistral_lm.native`: compile the C kernels now (make install runs this), so the
first generation of a fresh install does not pause for a compiler."""

from .build import build_all, cache_dir

if __name__ == "__main__":
    built = build_all()
    for name, path in built.items():
        print(f"{name}: {path if path else 'not built (pure-torch path will be used)'}")
    if not built:
        print(f"no kernel sources; cache {cache_dir()}")
