"""Training throughput of chatforge's GPT against transformers' GPT2LMHeadModel, on the CPU.

    python benchmarks/bench_train.py                      # vocab 4096, ours as the trainer runs it
    python benchmarks/bench_train.py --vocab 4096 50257   # also at GPT-2's vocabulary
    python benchmarks/bench_train.py --peer-compile       # also transformers under torch.compile

What is measured. Both models get the same shapes (6 layers, width 384, 6 heads, context 256,
batch 8, fp32, no dropout) and the same training step: forward, mean cross-entropy over every
position, backward, AdamW step, zero_grad. The optimizer comes from the trainer's own
`build_optimizer` for both, so its settings (decay groups, betas, implementation) are identical.
Ours runs the way `Trainer` runs it: `torch.compile(model)` when `--compile` (the trainer's
`TrainConfig.compile`), the plain module otherwise. The peer runs as transformers runs by default
(eager, its default attention implementation); `--peer-compile` adds it under torch.compile too.

Method. The CPU is shared, so nothing is measured once: after warm-up (which includes any
compilation), each round measures the matmul peak, then every contender for `--steps` steps, in
the same order (A, B, A, B, ...); figures are medians over all timed steps of all rounds. Tokens/s
is batch x context / step time. Achieved FLOP/s is tokens/s x `GPT.flops_per_token(context)`
(6 FLOPs per weight including the LM head, causal attention as half of PaLM's 12·L·T·C), the
same count for both models. The peak is a square fp32 `torch.mm` (`--peak-size`, 2048) on the
same threads: the best of a few calls per round, median over rounds. The machine's load average
is printed at the start and end; other work on the machine lowers every figure, but interleaving
keeps the ratios comparable.

Vocabulary: 4096 by default, the size of chatforge's built-in tokenizer, i.e. what this trainer
actually trains. At GPT-2's 50257 the LM head and the loss dominate the step (the head alone is
about 2/3 of the FLOPs), which measures one big matmul more than the model; `--vocab 4096 50257`
prints both.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from chatforge.model import GPT, GPTConfig, lm_loss
from chatforge.train.loop import TrainConfig, build_optimizer

Step = Callable[[], None]
MODES = ("eager", "compiled")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def matmul_peak(size: int, calls: int) -> float:
    """Best fp32 GFLOP/s of a size x size x size matmul over `calls` calls."""
    a, b, out = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def training_step(model: torch.nn.Module, forward: Callable, loss: Callable, x, y) -> Step:
    optimizer = build_optimizer(model, TrainConfig())

    def step() -> None:
        loss(forward(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def ours(args, vocab: int, x, y, compile: bool) -> tuple[Step, GPT]:
    config = GPTConfig(vocab_size=vocab, context_length=args.seq, n_layer=args.layers, n_head=args.heads,
                       n_embd=args.width, dropout=0.0)
    model = GPT(config).train()
    forward = torch.compile(model) if compile else model  # exactly what Trainer._wrap does
    return training_step(model, forward, lm_loss, x, y), model


def peer(args, vocab: int, x, y, compile: bool) -> Step:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=args.seq, n_layer=args.layers, n_head=args.heads,
                        n_embd=args.width, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).train()
    forward = torch.compile(model) if compile else model

    def loss(out, targets):
        return F.cross_entropy(out.logits.reshape(-1, vocab), targets.reshape(-1))

    return training_step(model, forward, loss, x, y)


def bench(args, vocab: int) -> None:
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (args.batch, args.seq))
    y = torch.randint(0, vocab, (args.batch, args.seq))
    contenders: dict[str, Step] = {}
    for mode in args.ours:
        contenders[f"chatforge {mode}"], model = ours(args, vocab, x, y, compile=mode == "compiled")
    for mode in args.peer:
        contenders[f"transformers {mode}"] = peer(args, vocab, x, y, compile=mode == "compiled")

    for name, step in contenders.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s for {args.warmup} steps", flush=True)

    times: dict[str, list[float]] = {name: [] for name in contenders}
    peaks = []
    for r in range(args.rounds):
        peaks.append(matmul_peak(args.peak_size, args.peak_calls))
        for name, step in contenders.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        line = "  ".join(f"{n} {times[n][-1]:.2f}s" for n in contenders)
        print(f"  round {r + 1}/{args.rounds}: peak {peaks[-1]:.0f} GFLOP/s  {line}", flush=True)

    tokens = args.batch * args.seq
    flops = model.flops_per_token(args.seq)
    peak = statistics.median(peaks)
    base = next((n for n in times if n.startswith("transformers")), None)
    print(f"\nvocab {vocab}: {flops / 1e6:.1f} MFLOP per token, {flops * tokens / 1e9:.1f} GFLOP per step; "
          f"matmul peak {peak:.1f} GFLOP/s ({args.peak_size}^3 fp32, median of per-round bests)")
    print(f"| {'model':<22} | {'step s':>6} | {'tokens/s':>8} | {'vs ' + (base or '-'):>20} | {'GFLOP/s':>7} | "
          f"{'of peak':>7} |")
    print(f"|{'-' * 24}|{'-' * 7}:|{'-' * 9}:|{'-' * 21}:|{'-' * 8}:|{'-' * 8}:|")
    for name, ts in times.items():
        step_s = statistics.median(ts)
        ratio = f"{statistics.median(times[base]) / step_s:.2f}x" if base else "-"
        gflops = tokens / step_s * flops / 1e9
        print(f"| {name:<22} | {step_s:6.3f} | {tokens / step_s:8.0f} | {ratio:>20} | {gflops:7.1f} | "
              f"{gflops / peak:6.1%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[4096], help="vocabulary size(s) to run")
    p.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours", nargs="+", choices=MODES, default=["eager", "compiled"],
                   help="how to run chatforge's GPT: plain module, or torch.compile as TrainConfig.compile does")
    p.add_argument("--peer", nargs="+", choices=MODES, default=["eager"],
                   help="how to run transformers' GPT2LMHeadModel (its default is eager)")
    p.add_argument("--peak-size", type=int, default=2048)
    p.add_argument("--peak-calls", type=int, default=5)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {torch.get_num_threads()} threads; fp32")
    print(f"config: {args.layers} layers, width {args.width}, {args.heads} heads, context {args.seq}, "
          f"batch {args.batch}; {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up")
    print(f"load average at start: {load()}")
    for vocab in args.vocab:
        bench(args, vocab)
    print(f"\nload average at end: {load()}")


if __name__ == "__main__":
    main()
