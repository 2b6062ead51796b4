"""chatforge's CPU kernels (chatforge/accel/kernels.cpp) against the torch products they replace.

    python benchmarks/bench_kernels.py                  # rows 1 2 4 8 16 32 64, 8 rounds
    python benchmarks/bench_kernels.py --rows 1 16 --rounds 4
    python benchmarks/bench_kernels.py --isa avx2       # the AVX2 build, on an AVX-512 CPU too

One pass = GPT-2 small's 49 decode products (12 layers x qkv 768->2304, attention out 768->768,
MLP 768->3072 and 3072->768, then the LM head 768->50257), fp32, random weights with biases
(none on the head), 2 threads, so every pass streams all 494 MB of weights from memory as
decode does. At each row count both contenders run through `chatforge.accel.linear`: the peer is
what it picks without our kernels (on Intel MKL's gemv through F.linear for 1-2 rows, MKL's gemm on a
weight packed once in MKL's layout for 3-64; on AMD oneDNN's linear), ours is `kernels.load()`'s (the
one-row gemv, the panel-packed product for 2-32 rows; past 32 rows both are the peer's), in the build
for this CPU (`--isa` or CHATFORGE_CPU_ISA picks another it can run). Each round times both, in an
order reversed every other round; printed are the medians of the per-pass times and the median
over rounds of the paired ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from machine import cpu_model  # benchmarks/machine.py
from torch import nn

from chatforge.accel import kernels
from chatforge.accel.linear import fast_kernel, fast_linear


def gpt2_small_products() -> list[nn.Linear]:
    torch.manual_seed(0)
    layers = []
    for _ in range(12):
        layers += [nn.Linear(768, 2304), nn.Linear(768, 768), nn.Linear(768, 3072), nn.Linear(3072, 768)]
    return layers + [nn.Linear(768, 50257, bias=False)]


def pass_seconds(layers: list[nn.Linear], rows: dict[int, torch.Tensor], reps: int) -> float:
    with torch.no_grad():
        for layer in layers:
            fast_linear(layer, rows[layer.in_features])
        t = time.perf_counter()
        for _ in range(reps):
            for layer in layers:
                fast_linear(layer, rows[layer.in_features])
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=4, help="passes per timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", choices=["avx512", "avx2"], help="which build of the kernels (CHATFORGE_CPU_ISA)")
    args = ap.parse_args()
    if args.isa:
        os.environ["CHATFORGE_CPU_ISA"] = args.isa
    torch.set_num_threads(args.threads)
    if not kernels.load():
        raise SystemExit(f"chatforge's CPU kernels are not available here: {kernels.unsupported_reason()}")
    layers = gpt2_small_products()
    print(f"{cpu_model()}; chatforge's {kernels.isa()} build; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; one pass = 49 products, "
          f"{sum(p.numel() for m in layers for p in m.parameters()) * 4 / 1e6:.0f} MB of weights")
    print(f"{'rows':>5} {'peer':>12} {'ours':>17} {'peer ms':>8} {'ours ms':>8} {'ours / peer speed':>18}")
    for n in args.rows:
        rows = {f: torch.randn(n, f) for f in (768, 3072)}
        kernels.set_active(True)
        ours_name = fast_kernel(n)
        kernels.set_active(False)
        peer = fast_kernel(n)
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.rounds):
            for ours in ((True, False) if r % 2 == 0 else (False, True)):
                kernels.set_active(ours)
                times[ours].append(pass_seconds(layers, rows, args.reps))
        ratio = statistics.median(p / o for o, p in zip(times[True], times[False]))
        print(f"{n:>5} {peer:>12} {ours_name:>17} {statistics.median(times[False]) * 1e3:>8.1f} "
              f"{statistics.median(times[True]) * 1e3:>8.1f} {ratio:>17.2f}x", flush=True)


if __name__ == "__main__":
    main()
