"""Public home of the quantization API (`mistral_lm.quantization.BitsAndBytesConfig`, ...).

The implementation lives in the `quant` package, one concern per file; this module keeps the
import path the rest of the library and users rely on.
"""

from __future__ import annotations

from .quant import *  # noqa: F403
from .quant import __all__  # noqa: F401
