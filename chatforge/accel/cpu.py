"""What this CPU offers, asked of torch where torch knows: its vector instruction level
(`torch.backends.cpu.get_cpu_capability()`, which is right on Linux, macOS, Windows and ARM and
follows ATEN_CPU_CAPABILITY), which build of chatforge's kernels runs here, and its vendor, which picks
between MKL's and oneDNN's products."""

from __future__ import annotations

import os
import platform
import sys

import torch


def capability() -> str:
    """The vector instruction set torch's own kernels use here: "AVX512", "AVX2", "SVE256", "DEFAULT"..."""
    return torch.backends.cpu.get_cpu_capability()


# chatforge's kernels are built once per instruction set (chatforge/accel/kernels.py): torch's name for
# what the CPU offers -> the build that runs on it
KERNEL_ISAS = {"AVX512": "avx512", "AVX2": "avx2"}


def kernels_isa() -> str | None:
    """Which build of chatforge's kernels runs here: CHATFORGE_CPU_ISA when set ("avx512", "avx2"),
    else the one that matches `capability()`; None where neither does (ARM, or an x86 without AVX2)."""
    return os.environ.get("CHATFORGE_CPU_ISA", "").lower() or KERNEL_ISAS.get(capability())


def kernels_unsupported_reason() -> str | None:
    """Why chatforge's own kernels (AVX-512 or AVX2 + FMA) cannot be built and run here, or None when they can."""
    if os.environ.get("CHATFORGE_CPU_KERNELS", "1") == "0":
        return "CHATFORGE_CPU_KERNELS=0"
    isa, offered = kernels_isa(), capability()
    if isa is None:
        return (f"they need AVX2 or AVX-512; this {platform.machine() or 'CPU'} offers {offered} "
                "(torch.backends.cpu.get_cpu_capability())")
    if isa not in KERNEL_ISAS.values():
        return f"CHATFORGE_CPU_ISA={isa} is not one of {', '.join(KERNEL_ISAS.values())}"
    ranks = list(KERNEL_ISAS.values())  # the widest first: an AVX-512 CPU runs the AVX2 build too
    if offered not in KERNEL_ISAS or ranks.index(isa) < ranks.index(KERNEL_ISAS[offered]):
        return f"CHATFORGE_CPU_ISA={isa} asks for more than this CPU offers ({offered})"
    if not sys.platform.startswith("linux"):
        return f"they are built with GCC's flags on Linux; this is {sys.platform}"
    return None


def vendor() -> str:
    """The CPU's vendor id on Linux ("GenuineIntel", "AuthenticAMD"), else "" (torch does not say)."""
    return _cpuinfo_field("vendor_id")


def model_name() -> str:
    """The CPU's model name where Linux tells it, else what `platform` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
