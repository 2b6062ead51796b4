"""What this CPU offers, asked of torch where torch knows: its vector instruction level
(`torch.backends.cpu.get_cpu_capability()`, which is right on Linux, macOS, Windows and ARM and
follows ATEN_CPU_CAPABILITY), and its vendor, which picks between MKL's and oneDNN's products."""

from __future__ import annotations

import os
import platform
import sys

import torch


def capability() -> str:
    """The vector instruction set torch's own kernels use here: "AVX512", "AVX2", "SVE256", "DEFAULT"..."""
    return torch.backends.cpu.get_cpu_capability()


def kernels_unsupported_reason() -> str | None:
    """Why chatforge's own AVX-512 kernels cannot be built and run here, or None when they can."""
    if os.environ.get("CHATFORGE_CPU_KERNELS", "1") == "0":
        return "CHATFORGE_CPU_KERNELS=0"
    if capability() != "AVX512":
        return (f"they need AVX-512; this {platform.machine() or 'CPU'} offers {capability()} "
                "(torch.backends.cpu.get_cpu_capability())")
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
