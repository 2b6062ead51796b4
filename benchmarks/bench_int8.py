"""chatforge's weight-only int8 kernel (chatforge/accel/kernels_int8.cpp) against fp32 and int8 peers.

    python benchmarks/bench_int8.py                     # rows 1 2 4 8 16 32, 8 rounds
    python benchmarks/bench_int8.py --rows 1 16 --rounds 4

One pass = GPT-2 small's 49 decode products (12 layers x qkv 768->2304, attention out 768->768,
MLP 768->3072 and 3072->768, then the LM head 768->50257), random weights with biases (none on the
head), so every pass streams all the weights from memory as decode does: 124 MB in int8, 498 MB in
fp32. The weights are quantized symmetrically per output channel (scale = max |w| / 127). At each row
count every contender runs the same pass in the same process, in an order rotated every round:

- int8: `torch.ops.chatforge_cpu.int8_linear` where `kernels.load()` builds chatforge's kernels, else
  kernels_int8.cpp built alone for this CPU (`accel.int8.standalone()`);
- fp32 ours: `accel.linear.fast_linear` with chatforge's fp32 kernels (where they build);
- fp32 peer: `fast_linear` without them (what `accel.linear.fast_kernel` picks: MKL's gemv, MKL's
  packed gemm or oneDNN's linear, by CPU and row count);
- F.linear: torch's fp32 product (MKL);
- int8pack: torch's `aten._weight_int8pack_mm` (int8 weight, per-channel scales) plus the bias;
- torchao: the nn.Linear after torchao's `quantize_(layer, Int8WeightOnlyConfig())`.

Printed: the median per-pass time of each, and the median over rounds of the paired ratio
(the other's time / int8's time: how many times faster the int8 kernel is).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.accel import int8, kernels
from chatforge.accel.linear import fast_linear

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12 + [(768, 50257)]


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def torchao_layers(layers: list[nn.Linear]) -> list[nn.Module] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        out = []
        for layer in layers:
            q = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            q.load_state_dict(layer.state_dict())
            quantize_(q, Int8WeightOnlyConfig())
            out.append(q)
        return out
    except Exception as e:  # noqa: BLE001 - torchao missing or its API moved: the rest still runs
        print(f"torchao: skipped ({type(e).__name__}: {e})")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2, help="passes per timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], help="contenders to leave out (e.g. int8pack torchao)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ours_fp32 = kernels.load()
    op = torch.ops.chatforge_cpu.int8_linear if ours_fp32 else int8.standalone().int8_linear
    isa = (torch.ops.chatforge_cpu if ours_fp32 else int8.standalone()).int8_isa()
    torch.manual_seed(0)
    layers = [nn.Linear(k, o, bias=o != 50257) for k, o in SHAPES]
    for layer in layers:
        layer.weight.data.normal_(0, 0.02)
    quant = [quantize(layer.weight.detach()) for layer in layers]
    biases = [None if layer.bias is None else layer.bias.detach() for layer in layers]
    with torch.no_grad():  # the kernel is the dequantized product (to fp32 rounding)
        x = torch.randn(3, 768)
        got, want = op(x, *quant[0], biases[0]), int8.reference(x, *quant[0], biases[0])
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    ao = None if "torchao" in args.skip else torchao_layers(layers)

    def int8_pass(xs):
        for (q, s), b in zip(quant, biases):
            op(xs[q.shape[1]], q, s, b)

    def fp32_pass(xs):
        for layer in layers:
            fast_linear(layer, xs[layer.in_features])

    def flinear_pass(xs):
        for layer in layers:
            F.linear(xs[layer.in_features], layer.weight, layer.bias)

    def int8pack_pass(xs):
        for (q, s), b in zip(quant, biases):
            y = torch.ops.aten._weight_int8pack_mm(xs[q.shape[1]], q, s)
            if b is not None:
                y += b

    def torchao_pass(xs):
        for layer in ao:
            layer(xs[layer.in_features])

    contenders = {"int8": (int8_pass, None), "fp32 ours": (fp32_pass, True), "fp32 peer": (fp32_pass, False),
                  "F.linear": (flinear_pass, False), "int8pack": (int8pack_pass, False),
                  "torchao": (torchao_pass, False)}
    if not ours_fp32:
        del contenders["fp32 ours"]
    if ao is None:
        contenders.pop("torchao", None)
    for name in args.skip:
        contenders.pop(name, None)
    fp32_mb = sum(p.numel() for m in layers for p in m.parameters()) * 4 / 1e6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, int8 kernel: {isa}; one pass = 49 "
          f"products, {sum(q.numel() for q, _ in quant) / 1e6:.0f} MB of int8 weights, {fp32_mb:.0f} MB in fp32")
    names = list(contenders)
    print(f"{'rows':>4} " + " ".join(f"{n + ' ms':>13}" for n in names) + "   int8 speed over: "
          + " ".join(f"{n:>10}" for n in names[1:]))
    with torch.no_grad():
        for n in args.rows:
            xs = {f: torch.randn(n, f) for f in (768, 3072)}
            times: dict[str, list[float]] = {name: [] for name in names}
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    run, active = contenders[name]
                    if active is not None and ours_fp32:
                        kernels.set_active(active)
                    run(xs)  # warm: packs, caches
                    t = time.perf_counter()
                    for _ in range(args.reps):
                        run(xs)
                    times[name].append((time.perf_counter() - t) / args.reps)
            ratios = [statistics.median(o / i for o, i in zip(times[name], times["int8"])) for name in names[1:]]
            print(f"{n:>4} " + " ".join(f"{statistics.median(times[name]) * 1e3:>13.1f}" for name in names)
                  + "                    " + " ".join(f"{r:>9.2f}x" for r in ratios), flush=True)


if __name__ == "__main__":
    main()
