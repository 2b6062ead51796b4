"""What the benchmarks report about the machine: CPU model, load, and CPU time used by others."""

from __future__ import annotations

import os

from chatforge.accel.cpu import model_name


def cpu_model() -> str:
    return model_name() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process); (0, 0) where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            utime, stime = map(int, f.read().rsplit(")", 1)[1].split()[11:13])
    except (OSError, ValueError):
        return 0, 0
    return user + nice + system + irq + softirq + steal, utime + stime
