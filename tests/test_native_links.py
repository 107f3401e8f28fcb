"""native/links.c, the fused step's module check, against its Python definition."""

from __future__ import annotations

import collections
import random

import pytest

from mistral_lm.native import links


def _case(seed: int) -> tuple[tuple, tuple, tuple, bool]:
    """Random links over a few dicts: present keys, absent keys read as None, values that are
    equal but not the same object, and the outcome the definition gives."""
    rng = random.Random(seed)
    pool = [object(), None, 1.5, "a", (1,), [2]]
    dicts = [dict(), collections.OrderedDict(), {"x": None}]
    for d in dicts:
        for k in "abcdef":
            if rng.random() < 0.6:
                d[k] = rng.choice(pool)
    triples = []
    for _ in range(rng.randrange(0, 40)):
        d, k = rng.choice(dicts), rng.choice("abcdefx")
        v = d.get(k)
        roll = rng.random()
        if roll < 0.03:
            v = object()  # a changed value
        elif roll < 0.05 and isinstance(v, float):
            v = float(str(v))  # equal, another object: not the same link
        triples.append((d, k, v))
    ds, ks, vs = (tuple(x) for x in zip(*triples)) if triples else ((), (), ())
    return ds, ks, vs, links.reference_current(ds, ks, vs)


@pytest.mark.parametrize("seed", range(200))
def test_current_equals_the_definition(seed):
    dicts, keys, values, want = _case(seed)
    assert links.current(dicts, keys, values) is want


def test_the_check_runs_in_c_where_a_compiler_is():
    from mistral_lm.native import build

    if build.compiler() is None or not build.enabled():
        pytest.skip("no C compiler here")
    assert links._lib() is not None


def test_an_absent_key_is_none_and_a_present_none_is_none():
    d = {"bias": None}
    assert links.current((d, d), ("bias", "weight"), (None, None))
    d["weight"] = object()  # a parameter appears where there was none
    assert not links.current((d, d), ("bias", "weight"), (None, None))


@pytest.mark.parametrize("check", [links.current, links.reference_current], ids=["current", "definition"])
def test_unequal_lengths_are_refused(check):
    d = {"a": 1}
    with pytest.raises(TypeError, match="one length"):
        check((d, d), ("a",), (1,))
