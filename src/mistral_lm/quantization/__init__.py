"""Weight-only quantization: options (config), numerics (functional), torch kernels (kernels),
quantized Linear modules and the module swap (modules), llama.cpp blocks (gguf)."""

from __future__ import annotations

from .config import BitsAndBytesConfig
from .functional import (dequantize_4bit_codebook, dequantize_int4, dequantize_int8, quantize_4bit_codebook,
                         quantize_int4, quantize_int8)
from .gguf import GGUFLinear
from .modules import (Int4Linear, Int8Linear, NF4Linear, QuantizedLinear, load_quantized_state_dict,
                      quantize_linear, quantize_model)

__all__ = [
    "BitsAndBytesConfig", "GGUFLinear", "Int4Linear", "Int8Linear", "NF4Linear", "QuantizedLinear",
    "dequantize_4bit_codebook", "dequantize_int4", "dequantize_int8", "load_quantized_state_dict",
    "quantize_4bit_codebook", "quantize_int4", "quantize_int8", "quantize_linear", "quantize_model",
]
