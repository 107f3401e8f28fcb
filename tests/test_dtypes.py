"""One dtype name table for every framework (dtypes.py): torch's loaders, the quantization config
and the Flax twin accept the same spellings and refuse the same non-float dtypes."""

from __future__ import annotations

import pytest
import torch

from mistral_lm.dtypes import FLOAT_NAMES, float_name, resolve_dtype
from mistral_lm.errors import ConfigError


@pytest.mark.parametrize("spelling", [*FLOAT_NAMES, *(f"torch.{n}" for n in FLOAT_NAMES)])
def test_every_spelling_names_the_torch_dtype_it_says(spelling):
    dtype = resolve_dtype(spelling)
    assert dtype.is_floating_point and torch.finfo(dtype).bits == {"float32": 32, "float16": 16, "bfloat16": 16}[
        float_name(spelling)]
    assert resolve_dtype(dtype) is dtype


@pytest.mark.parametrize("bad", [torch.float64, torch.int8, "float64", "auto", None, 3])
def test_other_values_name_the_field(bad):
    with pytest.raises(ConfigError, match="bnb_4bit_compute_dtype"):
        resolve_dtype(bad, "bnb_4bit_compute_dtype")


def test_flax_dtype_uses_the_same_table():
    jnp = pytest.importorskip("jax.numpy")
    from mistral_lm.flax.modeling import _float_dtype

    for spelling in FLOAT_NAMES:
        assert _float_dtype(spelling, "dtype") == jnp.dtype(float_name(spelling))
    assert _float_dtype(jnp.bfloat16, "dtype") == jnp.bfloat16
    for bad in (jnp.float64, "int8", object()):
        with pytest.raises(ConfigError, match="param_dtype"):
            _float_dtype(bad, "param_dtype")
