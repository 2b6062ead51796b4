"""Decode and prefill speed of chatforge's Engine against transformers' generate, on the CPU.

    python benchmarks/bench_decode.py                     # prompt 16, 64 new tokens, 5 rounds
    python benchmarks/bench_decode.py --rounds 3 --new 32 # quicker
    python benchmarks/bench_decode.py --isa avx2          # the kernels' AVX2 build, on an AVX-512 CPU too

What is measured. One GPT-2-small-size model (12 layers, width 768, 12 heads, vocabulary 50257,
context 1024; 124M weights, random), fp32, 2 threads. The weights are exported with
`chatforge.checkpoint.export_hf` and loaded into `transformers.GPT2LMHeadModel`, so both contenders run
the same weights; before timing, the script checks that both produce the same greedy tokens.

Ours: `Engine(model, stub_tokenizer, max_batch_size=16, fused=True)`, `engine.generate(prompts,
SamplingParams(max_tokens=N, temperature=0, ignore_eos=True))`, the full engine path
(scheduler, logits pipeline, sampling, incremental text), as `chatforge generate` runs by default:
on an AVX-512 or AVX2 CPU chatforge's fused decode step (chatforge/accel/fused_step.py; its kernels
are built the first time, about 40 s, for the widest of the two the CPU has, or the one `--isa`
names), elsewhere torch's products; `--compile` adds torch.compile's
graphs (`engine.warm_up()` prepares them before the rounds; the time is printed). Beside it, the
same engine with neither ("ours, eager", `--no-fused`). The peer:
`model.generate(input_ids, do_sample=False, max_new_tokens=N, min_new_tokens=N)` with its default
cache and attention.

Decode tokens/s excludes prefill by difference: t(prompt + N new tokens) - t(prompt + 1 new
token) covers exactly N - 1 decode steps (the first token comes from the prefill's logits), so
decode tokens/s = rows x (N - 1) / difference. Both runs of a pair are taken back to back in the
same round. (a) is that figure at batch 1, ours over the peer's; (c) is ours at batch 16 (16
different random prompts of the same length, one request each) over ours at batch 1. (d) prefill:
one 512-token prompt, `engine.generate(..., max_tokens=1)` (prefill, one sample, the engine's
bookkeeping) and, for reference, the peer's `generate(max_new_tokens=1)`; tokens/s = 512 / time.

(b) The memory-bandwidth bound. Batch-1 decode must read every weight once a token, so
tokens/s <= bandwidth / bytes per token. Bytes per token = 4 x (all parameters, the tied
embedding counted once as the LM head's read, the position table left out: one row a token)
+ the KV cache read at the mean decode context (prompt + N/2 positions: 2 x layers x context x
width x 4 bytes). Bandwidth is measured in the same run, at the same 2 threads, as the best of
several `torch.sum` over a 1 GiB fp32 tensor (bytes read / time; a sum reads and writes nothing
else, like decode streaming weights); a `copy_` of the same tensor is printed beside it, counting
bytes read + written. The fraction is our median batch-1 decode tokens/s over the bound. Beside it,
"the matmuls alone": 16 passes over every linear layer of the model on one row through the kernel
decode uses (`chatforge.accel.linear.fast_linear`), nothing else, as passes/s — how close the best kernel
PyTorch offers comes to the bound, and how much of that ceiling the whole engine keeps.

llama.cpp, when llama-cpp-python is installed (`--no-llama-cpp` skips it): the same weights exported
with `chatforge export --format gguf`'s writer (f32, a tokenizer trained on the built-in world;
its ids past the tokenizer's are unused), `llama_cpp.Llama(n_threads=2, n_threads_batch=2)`,
greedy by argmax over its logits after each single-token `llama_decode`, timed like ours: the
tokens/s of decode excluding prefill, and its share of the bound. Its greedy tokens are checked
against ours first.

Rounds. Each round measures the bandwidth, then every timed run once, in an order that is
reversed every other round so nothing always goes first. Figures are medians over rounds;
ratios are medians over rounds of that round's ratio (paired). The share of the machine's CPU
time other processes used during the run (from /proc/stat) and the load average are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from llama_peer import llama_decoder  # benchmarks/llama_peer.py
from machine import cpu_model, cpu_ticks, load_average  # benchmarks/machine.py

from chatforge.accel.linear import fast_linear
from chatforge.checkpoint import export_hf
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.model import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, n_embd=768)


class StubTokenizer:
    """All the engine needs: bytes for a token id (every token is b"a"), no special tokens."""

    special_ids: dict[str, int] = {}

    def token_bytes(self, token_id: int) -> bytes:
        return b"a"


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bandwidth(tensor: torch.Tensor, out: torch.Tensor, reps: int) -> tuple[float, float]:
    """(read GB/s of a sum, read + written GB/s of a copy), each the best of `reps`."""
    nbytes = tensor.numel() * tensor.element_size()
    best_sum = min(timed(lambda: tensor.sum()) for _ in range(reps))
    best_copy = min(timed(lambda: out.copy_(tensor)) for _ in range(reps))
    return nbytes / best_sum / 1e9, 2 * nbytes / best_copy / 1e9


def make_engines(model: GPT, args: argparse.Namespace) -> tuple[Engine, Engine, str]:
    """The engine under test (fused, with --compile compiled), the eager one, and what starting the first
    took until its first token: making it (loading the kernels; the first run builds them), `warm_up`
    (packing the fused step's weights; compiling the graphs), then a first one-token request."""
    t0 = time.perf_counter()
    engine = Engine(model, StubTokenizer(), max_batch_size=args.batch, stop_token_ids=[], fused=True,
                    compile=args.compile)
    t1 = time.perf_counter()
    engine.warm_up()
    t2 = time.perf_counter()
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    t3 = time.perf_counter()
    eager = Engine(model, StubTokenizer(), max_batch_size=args.batch, stop_token_ids=[])
    return engine, eager, (f"first token {t3 - t0:.2f} s after the engine was made: Engine() {t1 - t0:.2f} s "
                           f"(the kernels' load; their build on a first run), warm_up {t2 - t1:.2f} s, "
                           f"the request {t3 - t2:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens for the decode runs")
    ap.add_argument("--new", type=int, default=64, help="new tokens per decode run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bw-gib", type=float, default=1.0, help="size of the bandwidth tensor")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when it is installed")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager engine's reference rows")
    ap.add_argument("--compile", action="store_true", help="ours with torch.compile's graphs too")
    ap.add_argument("--isa", choices=["avx512", "avx2"], help="which build of chatforge's kernels (CHATFORGE_CPU_ISA)")
    args = ap.parse_args()
    if args.isa:
        os.environ["CHATFORGE_CPU_ISA"] = args.isa

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    torch.manual_seed(args.seed)
    ours = GPT(CONFIG).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, None, tmp)
        peer = GPT2LMHeadModel.from_pretrained(tmp).eval()
    engine, eager, startup = make_engines(ours, args)
    gguf_dir = tempfile.TemporaryDirectory()
    run_llama = None if args.no_llama_cpp else llama_decoder(ours, args.threads, gguf_dir.name)

    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(0, CONFIG.vocab_size, (args.batch, args.prompt), generator=g).tolist()
    long_prompt = torch.randint(0, CONFIG.vocab_size, (1, args.prefill), generator=g).tolist()

    def run_ours(batch_prompts: list[list[int]], n: int, on: Engine = engine) -> list[list[int]]:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return [c.outputs[0].token_ids for c in on.generate(batch_prompts, params)]

    @torch.no_grad()
    def run_peer(prompt: list[int], n: int) -> list[int]:
        ids = torch.tensor([prompt])
        out = peer.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
        return out[0, len(prompt) :].tolist()

    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {__import__('transformers').__version__}, "
        f"python {platform.python_version()}"
    )
    print(
        f"model: GPT-2 small shape, {ours.num_params() / 1e6:.1f}M parameters, fp32; prompt {args.prompt}, "
        f"{args.new} new tokens, batch {args.batch}, prefill {args.prefill}; {args.rounds} rounds"
    )
    print(f"load average at start: {load_average()}")
    print(f"our decode steps: {engine.describe_decode()}")
    print(f"start-up: {startup}")

    check = 16
    a, b = run_ours(prompts[:1], check)[0], run_peer(prompts[0], check)
    print(f"greedy check ({check} tokens): ours {a}")
    if run_ours(prompts[:1], check, eager)[0] != a:
        raise SystemExit("the fast and eager engines disagree on greedy tokens")
    print(f"                               hf   {b}  -> {'MATCH' if a == b else 'MISMATCH'}")
    if a != b:
        raise SystemExit("the two models disagree on greedy tokens; timings would not be comparable")
    if run_llama is not None:
        c = run_llama(prompts[0], check)
        print(f"                               llama.cpp {c}  -> {'MATCH' if a == c else 'MISMATCH'}")
        if a != c:
            raise SystemExit("llama.cpp disagrees on greedy tokens; timings would not be comparable")
    else:
        print("llama.cpp: not measured (pip install llama-cpp-python to add it)")

    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    row = {c: torch.randn(1, c) for c in {m.in_features for m in linears}}
    gemv_passes = 16

    @torch.no_grad()
    def run_gemv() -> None:
        # the matmuls of one decode token and nothing else: each weight read once through the same
        # kernel decode uses (chatforge.accel.linear); its speed is the ceiling for decode through it
        for _ in range(gemv_passes):
            for m in linears:
                fast_linear(m, row[m.in_features])

    n = args.new
    runs: dict[str, Callable[[], object]] = {
        "ours b1 N": lambda: run_ours(prompts[:1], n),
        "ours b1 1": lambda: run_ours(prompts[:1], 1),
        "hf b1 N": lambda: run_peer(prompts[0], n),
        "hf b1 1": lambda: run_peer(prompts[0], 1),
        f"ours b{args.batch} N": lambda: run_ours(prompts, n),
        f"ours b{args.batch} 1": lambda: run_ours(prompts, 1),
        "ours prefill": lambda: run_ours(long_prompt, 1),
        "hf prefill": lambda: run_peer(long_prompt[0], 1),
        "gemv only": run_gemv,
    }
    if not args.no_eager:
        runs["eager b1 N"] = lambda: run_ours(prompts[:1], n, eager)
        runs["eager b1 1"] = lambda: run_ours(prompts[:1], 1, eager)
        runs[f"eager b{args.batch} N"] = lambda: run_ours(prompts, n, eager)
        runs[f"eager b{args.batch} 1"] = lambda: run_ours(prompts, 1, eager)
    if run_llama is not None:
        runs["llama b1 N"] = lambda: run_llama(prompts[0], n)
        runs["llama b1 1"] = lambda: run_llama(prompts[0], 1)
    t0 = time.perf_counter()
    for fn in runs.values():  # warm-up: allocator, thread pool, first-call paths
        fn()
    print(f"warm-up: {time.perf_counter() - t0:.1f} s")

    big = torch.ones(int(args.bw_gib * 2**30) // 4, dtype=torch.float32)
    dst = torch.empty_like(big)
    names = list(runs)
    secs: dict[str, list[float]] = {k: [] for k in names}
    bw_read, bw_copy = [], []
    busy0, mine0 = cpu_ticks()
    for r in range(args.rounds):
        rd, cp = bandwidth(big, dst, reps=5)
        bw_read.append(rd)
        bw_copy.append(cp)
        order = names if r % 2 == 0 else list(reversed(names))
        # keep each N / 1 pair adjacent whatever the order: the pairs are consecutive in `names`
        for k in order:
            secs[k].append(timed(runs[k]))
        print(f"  round {r + 1}: bandwidth {rd:.1f} GB/s (sum), " + ", ".join(f"{k} {secs[k][-1]:.2f}s" for k in names))
    busy1, mine1 = cpu_ticks()
    others = (busy1 - busy0 - (mine1 - mine0)) / max(busy1 - busy0, 1)
    del big, dst

    B = args.batch

    def decode_tps(key: str, rows: int) -> list[float]:
        return [rows * (n - 1) / (tn - t1) for tn, t1 in zip(secs[f"{key} N"], secs[f"{key} 1"])]

    ours1, peer1, oursB = decode_tps("ours b1", 1), decode_tps("hf b1", 1), decode_tps(f"ours b{B}", B)
    pre_ours = [args.prefill / t for t in secs["ours prefill"]]
    pre_peer = [args.prefill / t for t in secs["hf prefill"]]
    med = statistics.median

    c = CONFIG
    weight_bytes = 4 * (ours.num_params() - ours.wpe.weight.numel())
    context = args.prompt + n / 2
    kv_bytes = 4 * 2 * c.n_layer * context * c.n_embd
    per_token = weight_bytes + kv_bytes
    bounds = [bw * 1e9 / per_token for bw in bw_read]
    frac_ours = [o / bd for o, bd in zip(ours1, bounds)]
    frac_peer = [p / bd for p, bd in zip(peer1, bounds)]
    gemv_tps = [gemv_passes / t for t in secs["gemv only"]]
    frac_gemv = [g / bd for g, bd in zip(gemv_tps, bounds)]

    print()
    print(
        f"bandwidth (2 threads, 1 GiB fp32): sum {med(bw_read):.1f} GB/s read (best {max(bw_read):.1f}); "
        f"copy {med(bw_copy):.1f} GB/s read+written"
    )
    print(
        f"bytes per token: weights {weight_bytes / 1e6:.1f} MB + KV cache at context {context:.0f} "
        f"{kv_bytes / 1e6:.1f} MB = {per_token / 1e6:.1f} MB -> bound {med(bounds):.1f} tokens/s"
    )
    print()
    rows = [
        (
            "(a) decode b1 tokens/s: ours",
            f"{med(ours1):.1f}",
            f"ratio {med([o / p for o, p in zip(ours1, peer1)]):.2f}x vs transformers",
            "goal >= 1.35x",
        ),
        ("    decode b1 tokens/s: transformers", f"{med(peer1):.1f}", "", ""),
    ]
    if run_llama is not None:
        llama1 = decode_tps("llama b1", 1)
        rows.append((
            "    decode b1 tokens/s: llama.cpp",
            f"{med(llama1):.1f}",
            f"ours {med([o / q for o, q in zip(ours1, llama1)]):.2f}x of it; it is "
            f"{med([q / p for q, p in zip(llama1, peer1)]):.2f}x transformers, "
            f"{med([q / bd for q, bd in zip(llama1, bounds)]):.0%} of the bound",
            "",
        ))
    if not args.no_eager:
        eager1, eagerB = decode_tps("eager b1", 1), decode_tps(f"eager b{B}", B)
        rows.append((
            "    decode b1 tokens/s: ours, eager",
            f"{med(eager1):.1f}",
            f"{med([o / p for o, p in zip(eager1, peer1)]):.2f}x transformers, "
            f"{med([o / bd for o, bd in zip(eager1, bounds)]):.0%} of the bound; "
            f"b{B} {med(eagerB):.1f} ({med([x / y for x, y in zip(eagerB, eager1)]):.2f}x b1)",
            "",
        ))
    rows += [
        (
            "(b) bandwidth bound tokens/s",
            f"{med(bounds):.1f}",
            f"ours {med(frac_ours):.0%}, transformers {med(frac_peer):.0%}",
            "goal >= 85%",
        ),
        (
            "    the matmuls alone (ceiling), passes/s",
            f"{med(gemv_tps):.1f}",
            f"{med(frac_gemv):.0%} of the bound; ours is {med([o / g for o, g in zip(ours1, gemv_tps)]):.0%} of it",
            "",
        ),
        (
            f"(c) decode b{B} aggregate tokens/s: ours",
            f"{med(oursB):.1f}",
            f"{med([x / y for x, y in zip(oursB, ours1)]):.2f}x batch 1",
            "goal >= 8x",
        ),
        (
            f"(d) prefill {args.prefill} tokens/s: ours",
            f"{med(pre_ours):.0f}",
            f"{med([x / y for x, y in zip(pre_ours, pre_peer)]):.2f}x transformers",
            "",
        ),
        (f"    prefill {args.prefill} tokens/s: transformers", f"{med(pre_peer):.0f}", "", ""),
    ]
    w = max(len(r[0]) for r in rows)
    for name, value, note, goal in rows:
        print(f"{name:<{w}}  {value:>8}  {note:<36} {goal}")
    print()
    print(
        f"per round, ours b1 decode: {', '.join(f'{x:.1f}' for x in ours1)}; "
        f"transformers: {', '.join(f'{x:.1f}' for x in peer1)}"
    )
    print(f"other processes' share of CPU time during the rounds: {others:.1%}; load average at end: {load_average()}")


if __name__ == "__main__":
    main()
