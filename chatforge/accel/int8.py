"""Weight-only int8 products: y = x @ (q * scale[:, None]).T + bias, with q an (out, in) int8 matrix and
one fp32 scale per output channel.

Decode reads every weight once a token, so a weight stored in 8 bits streams four times faster than
in fp32. This is the reference product (dequantize, then torch's fp32 product); chatforge's CPU
kernels replace it where they are built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) times the int8 weight (out, in) with per-output-channel scales (out,), plus bias."""
    weight = qweight.to(x.dtype) * scale.to(x.dtype)[:, None]
    return F.linear(x, weight, bias)
