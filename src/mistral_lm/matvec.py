"""MatvecLinear: a single half-precision row on the CPU runs as `torch.mv`.

torch vectorizes bfloat16/float16 matrix-vector products on the CPU but not the (1, K) matmul
that `F.linear` becomes, so batch-1 decoding streams weights faster through `mv`
(bench/RESULTS.md). The loader installs it as its last module swap (`install_matvec`), after
fusion and quantization; the module keeps nn.Linear's parameters and state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HALF = (torch.bfloat16, torch.float16)


@torch.library.custom_op("mistral_lm::matvec", mutates_args=())
def matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torch.mv behind an opaque op: inductor would otherwise lower it to a generic reduction,
    slower than its own bfloat16 linear, instead of calling the vectorized kernel."""
    return torch.mv(weight, x)


@matvec.register_fake
def _(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape[0])


class MatvecLinear(nn.Linear):
    """nn.Linear whose forward takes `torch.mv` for one half-precision row on the CPU.

    >>> layer = install_matvec(nn.Linear(8, 4, bias=False).to(torch.bfloat16))
    >>> type(layer).__name__, layer(torch.ones(1, 1, 8, dtype=torch.bfloat16)).shape
    ('MatvecLinear', torch.Size([1, 1, 4]))
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype in _HALF and x.device.type == "cpu" and self.bias is None and x.numel() == x.shape[-1]
                and self.weight.dtype == x.dtype):
            mv = matvec if torch.compiler.is_compiling() else torch.mv
            return mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


def install_matvec(model: nn.Module) -> nn.Module:
    """Turn every plain nn.Linear of `model` (or `model` itself) into a MatvecLinear in place;
    returns `model`. The swap changes the class only: parameters, hooks and state-dict keys are
    the same objects, so ties (lm_head to the embedding) and memory maps survive it."""
    for module in model.modules():  # model itself included
        if type(module) is nn.Linear:
            module.__class__ = MatvecLinear
    return model
