"""Weight-only int8 products: y = x @ (q * scale[:, None]).T + bias, with q an (out, in) int8 matrix and
one fp32 scale per output channel.

Decode reads every weight once a token, so a weight stored in 8 bits streams four times faster than
in fp32. `int8_linear` runs chatforge's own kernel (chatforge/accel/kernels_int8.cpp, built into the
extension `kernels.load()` builds) for 1-MAX_ROWS fp32 rows once the kernels are active and nothing
needs a gradient, and otherwise the reference: dequantize, then torch's fp32 product. Both give the
dequantized product to fp32 rounding (the kernel sums x times the int8 values in fp32 and scales each
output once).

Measured on GPT-2 small's 49 decode products (`python benchmarks/bench_int8.py --threads 1 --rounds 6
--reps 1`: 124 MB of int8 weights a pass, every contender paired in one process) on an AMD EPYC
(Zen 3, AVX2, the kernel's AVX2 build), one thread, the machine shared with other jobs (load ~10 on
2 cores: absolute times are slow, the ratios are medians of paired rounds):

    rows                                     1      2      4      8      16     32
    int8 kernel, ms a pass                   19.1   20.6   36.1   74.7   143.7  258.3
    its speed over fp32 (accel.linear's      4.5x   7.1x   4.5x   2.7x   1.9x   1.4x
      pick without chatforge's kernels)
    over torch's _weight_int8pack_mm         16x    30x    34x    43x    43x    41x
    over torchao's Int8WeightOnlyConfig      17x    19x    12x    7.7x   5.3x   2.6x

So libraries do not serve here: torch's int8 product and torchao's int8 weight-only layout are both
4x slower than fp32 MKL even at one row. At one row the kernel streams its int8 weights at the byte
rate MKL's fp32 gemv streams fp32 (6.5 and 6.9 GB/s on that loaded core; 12 GB/s int8 on a quieter
moment), so it is near 4x; from 8 rows the product is bound by its arithmetic (fp32 FMAs over
widened weights), which int8 does not shrink, so the lead narrows.
Past 32 rows the kernel still beats the reference (which dequantizes every call): 3.3x at 64 rows,
1.4x at 256, even at 512, 0.6x at 1024 (one thread, 12 of the products), hence MAX_ROWS = 256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatforge.accel import kernels
from chatforge.accel.cpu import capability

MAX_ROWS = 256  # rows up to which the kernel runs (faster than dequantizing for MKL, measured); past them the reference


def reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product as torch computes it: the weight dequantized to x's dtype, then F.linear."""
    weight = qweight.to(x.dtype) * scale.to(x.dtype)[:, None]
    return F.linear(x, weight, bias)


def uses_kernel(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `int8_linear` runs chatforge's kernel on these operands (else the reference)."""
    tensors = (x, qweight, scale) if bias is None else (x, qweight, scale, bias)
    return (
        kernels.active()
        and all(t.device.type == "cpu" for t in tensors)
        and x.dtype == torch.float32
        and qweight.dtype == torch.int8
        and qweight.dim() == 2
        and qweight.is_contiguous()
        and scale.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.dim() >= 1
        and x.shape[-1] == qweight.shape[1]
        and x.numel() // max(x.shape[-1], 1) <= MAX_ROWS
        # the kernel has no gradient: where autograd would record, the reference runs
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    )


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) times the int8 weight (out, in) with per-output-channel scales (out,), plus bias."""
    if uses_kernel(x, qweight, scale, bias):
        return torch.ops.chatforge_cpu.int8_linear(x, qweight, scale, bias)
    return reference(x, qweight, scale, bias)


# ---- the kernel on its own, for tests and benchmarks ------------------------------------------------------
_STANDALONE_FLAGS = {"avx512": ["-mavx512f", "-mfma"], "avx2": ["-mavx2", "-mfma"], "scalar": []}


def standalone(isa: str | None = None):
    """kernels_int8.cpp alone, built for `isa` ("avx512", "avx2" or "scalar"; by default what this CPU
    runs) as its own extension with the op `torch.ops.chatforge_int8_<isa>.int8_linear`: for tests of
    each instruction set's code, and for benchmarks where `kernels.load()` does not build here. It runs
    only where the CPU has that instruction set. About 40 s the first time (torch's extension cache)."""
    from pathlib import Path

    from torch.utils.cpp_extension import load as build

    if isa is None:
        isa = {"AVX512": "avx512", "AVX2": "avx2"}.get(capability(), "scalar")
    namespace = f"chatforge_int8_{isa}"
    if not hasattr(torch.ops, namespace) or not hasattr(getattr(torch.ops, namespace), "int8_linear"):
        source = Path(__file__).with_name("kernels_int8.cpp")
        build(namespace, [str(source)], is_python_module=False,
              extra_cflags=["-O3", "-fopenmp", f"-DCHATFORGE_INT8_NS={namespace}", *_STANDALONE_FLAGS[isa]])

        @torch.library.register_fake(f"{namespace}::int8_linear")
        def _(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    return getattr(torch.ops, namespace)
