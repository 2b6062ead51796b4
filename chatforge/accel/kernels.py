"""chatforge's own CPU kernels for decode (fp32 and int8 weights), built where the CPU has AVX-512 or AVX2.

Decoding one token reads every weight once, so a one-row product is as fast as the weight stream
from memory, and a product of a few dozen rows not much slower when its arithmetic hides under that
stream. MKL (what torch calls) falls short of both on this project's Xeon (Sapphire Rapids, 2
threads); `kernels.cpp` prefetches the weight stream 4 KB ahead into L2 and, for 2-32 rows,
reads a copy of the weight packed once in panels of 16 outputs, 16 rows to a tile, broadcasting x
one element at a time. Measured on GPT-2 small's 49 decode products (`python
benchmarks/bench_kernels.py`, two runs, paired in one process, against what
`accel.linear.fast_kernel` picks without them):

    rows                1      2      4      8      16     32
    speed over MKL's    1.18-  1.07-  1.28-  1.32-  1.36-  1.06-
                        1.19x  1.12x  1.31x  1.36x  1.40x  1.08x
    (MKL's gemv through F.linear for 1-2 rows, its gemm on a packed weight from 3)

At 64 rows an earlier packed product (panels of 32 outputs, 12-row tiles) was 0.88x MKL's, so past
32 rows MKL's stays.

On those products `DecodeStep` (a torch custom class) runs the whole one-token forward of
`chatforge.model.GPT` for 1-32 rows in one call: see chatforge/accel/fused_step.py.

`load()` builds the extension once (about 40 s; torch's extension cache keeps it) and from then on
`accel.linear` uses it in this process; `Engine(fused=True)` calls it (and then decodes through
`DecodeStep`). One source, built for the widest of AVX-512 and AVX2 + FMA the CPU has (`ISA_FLAGS`,
`cpu.kernels_isa`; CHATFORGE_CPU_ISA picks one). Nothing is built where torch reports neither
(`cpu.kernels_unsupported_reason`: ARM, say), where there is no C++ compiler (a warning says why), or
where CHATFORGE_CPU_KERNELS=0.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from chatforge.accel.cpu import kernels_isa, kernels_unsupported_reason, vendor

SOURCES = [Path(__file__).with_name("kernels.cpp"),
           Path(__file__).with_name("kernels_int8.cpp")]  # + the weight-only int8 products (accel/int8.py)
# One build per instruction set, each under its own name so torch's extension cache keeps both. Not
# -march=native: the cached build must run on any CPU with that instruction set.
ISA_FLAGS = {"avx512": ["-mavx512f", "-mfma"], "avx2": ["-mavx2", "-mfma"]}
MAX_ROWS = 32  # where accel.linear uses them: past it MKL's packed gemm is faster
_STATE = {"active": False}
# the build this process loaded, and whether it built: one at most, since both register chatforge_cpu's ops
_LOADED: dict[str, bool] = {}


def unsupported_reason() -> str | None:
    """Why the kernels cannot be built here, or None when they can."""
    return kernels_unsupported_reason()


def isa() -> str | None:
    """The build this process loaded ("avx512", "avx2"), else the one it would load, else None."""
    return next(iter(_LOADED), None) or kernels_isa()


def load() -> bool:
    """Build (once a process) and use the kernels; False where they cannot be built here."""
    _STATE["active"] = unsupported_reason() is None and _build()
    return _STATE["active"]


def _build() -> bool:
    chosen = kernels_isa()
    if _LOADED:
        loaded, ok = next(iter(_LOADED.items()))
        if loaded != chosen:
            warnings.warn(f"chatforge's {loaded} kernels are loaded in this process; the {chosen} build takes "
                          "a new process", stacklevel=3)
        return ok and loaded == chosen
    _LOADED[chosen] = _compile(chosen)
    return _LOADED[chosen]


def _compile(chosen: str) -> bool:
    from torch.utils.cpp_extension import load as build

    try:
        build(f"chatforge_cpu_kernels_{chosen}", [str(s) for s in SOURCES],
              extra_cflags=["-O3", *ISA_FLAGS[chosen], "-fopenmp"], is_python_module=False)
    except Exception as e:  # noqa: BLE001 - no compiler, or a failed build: torch's products stay
        warnings.warn(f"chatforge's CPU kernels were not built ({type(e).__name__}: {e}); decode uses torch's "
                      "products", stacklevel=4)
        return False
    _register_fakes(torch.ops.chatforge_cpu.panel_width())
    torch.ops.chatforge_cpu.gemv_prefetch(vendor() != "AuthenticAMD")  # measured: see kernels.cpp
    return True


def active() -> bool:
    """Whether `accel.linear` uses these kernels in this process."""
    return _STATE["active"]


def set_active(flag: bool) -> None:
    """Use the loaded kernels, or torch's products again (tests compare both); only after a successful load."""
    if flag and not any(_LOADED.values()):
        raise RuntimeError("chatforge's CPU kernels are not loaded: call chatforge.accel.kernels.load()")
    _STATE["active"] = flag


def _register_fakes(panel: int) -> None:
    # shapes for torch.compile's tracing
    @torch.library.register_fake("chatforge_cpu::linear")
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("chatforge_cpu::packed_linear")
    def _(x: torch.Tensor, packed: torch.Tensor, outputs: int, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], outputs))

    @torch.library.register_fake("chatforge_cpu::int8_linear")
    def _(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake("chatforge_cpu::pack")
    def _(weight: torch.Tensor) -> torch.Tensor:
        return weight.new_empty(((weight.shape[0] + panel - 1) // panel, weight.shape[1], panel))
