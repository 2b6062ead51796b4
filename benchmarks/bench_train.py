"""Training throughput of chatforge's GPT against transformers' GPT2LMHeadModel, on the CPU.

    python benchmarks/bench_train.py                          # vocab 4096; ours eager and compiled
    python benchmarks/bench_train.py --vocab 4096 50257       # also at GPT-2's vocabulary
    python benchmarks/bench_train.py --peer eager compiled    # also transformers under torch.compile
    python benchmarks/bench_train.py --peer-malloc glibc      # the peer only as transformers runs it

What is measured. Both models get the same shapes (6 layers, width 384, 6 heads, context 256,
batch 8, fp32, no dropout, 2 threads) and the same training step: forward, mean cross-entropy over
every position, backward, AdamW step, zero_grad. Both optimizers come from the trainer's own
`build_optimizer`, so their settings (decay groups, betas, fused kernel) are identical.

Ours runs the way `Trainer` runs it on a CPU: the plain module ("eager", the default) or
`torch.compile(model)` ("compiled", what `TrainConfig.compile` does), in a process where
`keep_freed_memory()` has tuned glibc's malloc, as `Trainer` does. The peer runs as transformers
runs by default: eager, its default attention implementation, default malloc. The ratio column
is every row against that peer ("transformers eager"). For like-for-like figures the peer also
runs with our malloc setting by default ("trainer malloc"; `--peer-malloc glibc` drops it),
`--peer eager compiled` adds it under torch.compile, and `--ours-malloc trainer glibc` adds ours
with glibc's defaults. Below the table, each of our rows is compared with every peer row.

Each contender runs in its own process (the malloc setting is process-wide, and separate
processes keep one model's memory from shaping another's), started and warmed up one at a time;
warm-up includes any compilation. Then the parent drives them in rounds: it measures the matmul
peak, then asks each contender in turn for one timed step (A, B, ..., then the reverse order in
the next round, so no one always goes first). Step times are medians over rounds; a speed-up is
the median over rounds of that round's ratio (paired, so a machine that drifts faster or slower
between rounds does not tilt it).

FLOP/s. Achieved FLOP/s is tokens/s x `GPT.flops_per_token(context)` (6 FLOPs per weight, LM head
included, plus causal attention counted as half of PaLM's 12·L·T·C), the same count for both
models. The peak is the best rate of a square fp32 `torch.mm` (`--peak-size`, 2048) on the same
number of threads, over the rounds; the fraction is the median step's FLOP/s over that peak.

A shared CPU. Other processes slow a 2-thread job far more than their share of CPU time (a
descheduled thread stalls its partner at every parallel region), so every sample also records,
from /proc/stat, the share of the machine's CPU time other processes used while it ran. A round
is "clean" when that share is under `--quiet` (5%) in all its samples; the table uses only clean
rounds when there are at least 3 and says so, else all rounds and says that. The load average is
printed at the start and end. What /proc/stat cannot see (other virtual machines on the same host
competing for memory bandwidth and cache, clock changes) still moves step times by up to ~15%
between runs; the paired ratios move much less.

Vocabulary: 4096 by default, the size of chatforge's built-in tokenizer, i.e. what this trainer
actually trains. At GPT-2's 50257 the tied LM head alone is about 60% of the FLOPs and the logits
take 400 MB a step, so the benchmark then mostly measures one big matmul and the loss;
`--vocab 4096 50257` prints both.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing as mp
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from machine import cpu_model, cpu_ticks, load_average  # benchmarks/machine.py

from chatforge.model import GPT, GPTConfig, lm_loss
from chatforge.train.config import TrainConfig
from chatforge.train.loop import build_optimizer, keep_freed_memory

MODES = ("eager", "compiled")
MALLOCS = ("trainer", "glibc")  # keep_freed_memory() as Trainer does, or glibc's defaults
PEER = "transformers eager"


@dataclass(frozen=True)
class Contender:
    model: str  # "chatforge" or "transformers"
    mode: str  # "eager" or "compiled"
    malloc: str  # "trainer" or "glibc"

    @property
    def name(self) -> str:
        usual = "trainer" if self.model == "chatforge" else "glibc"  # how each one normally runs
        return f"{self.model} {self.mode}" + ("" if self.malloc == usual else f", {self.malloc} malloc")


# ---- the machine ---------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds of fn(), and the share of the machine's CPU time other processes used meanwhile."""
    busy0, mine0 = cpu_ticks()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    busy1, mine1 = cpu_ticks()
    capacity = seconds * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    return seconds, max(0.0, (busy1 - busy0) - (mine1 - mine0)) / capacity


def matmul(size: int, calls: int) -> Callable[[], None]:
    a, b, out = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)

    def run() -> None:
        for _ in range(calls):
            torch.mm(a, b, out=out)

    run()
    return run


# ---- the contenders, each in its own process -------------------------------------------------------


def our_config(args, vocab: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, context_length=args.seq, n_layer=args.layers, n_head=args.heads,
                     n_embd=args.width, dropout=0.0)


def build_step(c: Contender, args, vocab: int) -> Callable[[], None]:
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (args.batch, args.seq))
    y = torch.randint(0, vocab, (args.batch, args.seq))
    if c.model == "chatforge":
        model = GPT(our_config(args, vocab)).train()
        loss = lm_loss
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab, n_positions=args.seq, n_layer=args.layers, n_head=args.heads, n_embd=args.width,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )).train()

        def loss(out, targets):
            return F.cross_entropy(out.logits.reshape(-1, vocab), targets.reshape(-1))

    forward = torch.compile(model) if c.mode == "compiled" else model  # what Trainer._wrap does
    optimizer = build_optimizer(model, TrainConfig())

    def step() -> None:
        loss(forward(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def worker(conn, c: Contender, args, vocab: int) -> None:
    """Build and warm up one contender, send the warm-up time, then run one timed step per request."""
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if c.malloc == "trainer":
        keep_freed_memory()
    step = build_step(c, args, vocab)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    conn.send(time.perf_counter() - t0)
    while conn.recv():
        conn.send(timed(step))


# ---- measuring -----------------------------------------------------------------------------------


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # other processes' share of the CPU meanwhile

    def add(self, sample: tuple[float, float]) -> None:
        self.seconds.append(sample[0])
        self.others.append(sample[1])

    def clean(self, quiet: float) -> list[bool]:
        return [o < quiet for o in self.others]


def run_rounds(contenders: list[Contender], args, vocab: int) -> tuple[dict[str, Samples], Samples, int]:
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads, allocator or caches
    conns = {}
    try:
        for c in contenders:
            conn, child = ctx.Pipe()
            ctx.Process(target=worker, args=(child, c, args, vocab), daemon=True).start()
            conns[c.name] = conn
            print(f"  warm-up {c.name}: {conn.recv():.1f} s for {args.warmup} steps", flush=True)
        peak_calls = 4
        peak_run, peak = matmul(args.peak_size, peak_calls), Samples()
        samples = {name: Samples() for name in conns}
        for r in range(args.rounds):
            peak.add(timed(peak_run))
            order = list(conns) if r % 2 == 0 else list(reversed(conns))  # no one is always first
            for name in order:
                conns[name].send(True)
                samples[name].add(conns[name].recv())
            line = "  ".join(f"{n} {s.seconds[-1]:.2f}s ({s.others[-1]:.0%})" for n, s in samples.items())
            print(f"  round {r + 1:2d}/{args.rounds}, others' CPU share in brackets: {line}", flush=True)
    finally:
        for conn in conns.values():
            with contextlib.suppress(OSError):  # a worker that died has printed its error already
                conn.send(False)
    return samples, peak, peak_calls


def bench(args, vocab: int) -> None:
    product = itertools.product
    contenders = [Contender("chatforge", m, malloc) for m, malloc in product(args.ours, args.ours_malloc)]
    contenders += [Contender("transformers", m, malloc) for m, malloc in product(args.peer, args.peer_malloc)]
    samples, peak, peak_calls = run_rounds(contenders, args, vocab)

    # A round counts when every sample in it is clean; without 3 such rounds, all rounds count.
    clean_rounds = [all(c) for c in zip(peak.clean(args.quiet), *(s.clean(args.quiet) for s in samples.values()))]
    use_clean = sum(clean_rounds) >= 3
    rounds = [r for r in range(args.rounds) if clean_rounds[r] or not use_clean]
    seconds = {name: [s.seconds[r] for r in rounds] for name, s in samples.items()}
    peak_flops = 2 * args.peak_size**3 * peak_calls / min(peak.seconds[r] for r in rounds)
    with torch.device("meta"):
        flops = GPT(our_config(args, vocab)).flops_per_token(args.seq)
    tokens = args.batch * args.seq

    def speedup(name: str, over: str) -> float:  # paired: each round's ratio, then the median
        return statistics.median(b / a for a, b in zip(seconds[name], seconds[over], strict=True))

    print(f"\nvocab {vocab}: {flops / 1e6:.1f} MFLOP per token, {flops * tokens / 1e9:.1f} GFLOP per step")
    print(f"{sum(clean_rounds)} of {args.rounds} rounds were clean (other processes < {args.quiet:.0%} of the CPU "
          "in every sample); the table uses "
          + ("those" if use_clean else "ALL rounds (too few clean ones: the machine was busy)"))
    print(f"matmul peak: {peak_flops / 1e9:.1f} GFLOP/s ({args.peak_size}^3 fp32 torch.mm, best round)\n")
    w = max(len(n) for n in seconds)
    print(f"| {'model':<{w}} | {'step s':>6} | {'tokens/s':>8} | {'vs ' + PEER:>21} | {'GFLOP/s':>7} | "
          f"{'of peak':>7} |")
    print(f"|{'-' * (w + 2)}|{'-' * 7}:|{'-' * 9}:|{'-' * 22}:|{'-' * 8}:|{'-' * 8}:|")
    for name, ts in seconds.items():
        step_s = statistics.median(ts)
        achieved = tokens / step_s * flops
        print(f"| {name:<{w}} | {step_s:6.3f} | {tokens / step_s:8.0f} | {speedup(name, PEER):20.2f}x | "
              f"{achieved / 1e9:7.1f} | {achieved / peak_flops:7.1%} |")
    peers = [n for n in seconds if n.startswith("transformers")]
    for ours in (n for n in seconds if n.startswith("chatforge")):
        print(f"{ours}: " + ", ".join(f"{speedup(ours, n):.2f}x {n}" for n in peers))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[4096], help="vocabulary size(s) to run")
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds (one timed step each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ours", nargs="+", choices=MODES, default=list(MODES),
                   help="how to run chatforge's GPT: the module, or torch.compile as TrainConfig.compile does")
    p.add_argument("--peer", nargs="+", choices=MODES, default=["eager"],
                   help="how to run transformers' GPT2LMHeadModel (its default is eager)")
    p.add_argument("--ours-malloc", nargs="+", choices=MALLOCS, default=["trainer"],
                   help="malloc setting for ours: the trainer's keep_freed_memory(), or glibc's defaults")
    p.add_argument("--peer-malloc", nargs="+", choices=MALLOCS, default=list(reversed(MALLOCS)),
                   help="malloc setting for the peer: glibc's defaults (as transformers runs), and ours")
    p.add_argument("--peak-size", type=int, default=2048)
    p.add_argument("--quiet", type=float, default=0.05,
                   help="a sample is clean when other processes used less than this share of the CPU")
    args = p.parse_args()
    if "eager" not in args.peer or "glibc" not in args.peer_malloc:
        p.error("the ratios are against transformers eager with glibc malloc: keep it in --peer/--peer-malloc")

    torch.set_num_threads(args.threads)
    import transformers

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {args.threads} threads; fp32")
    print(f"config: {args.layers} layers, width {args.width}, {args.heads} heads, context {args.seq}, "
          f"batch {args.batch}; {args.rounds} rounds after {args.warmup} warm-up steps")
    print(f"load average at start: {load_average()}")
    for vocab in args.vocab:
        bench(args, vocab)
    print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()
