"""Decode speed with and without a JSON Schema grammar (structured output), on GPT-2 small's shape.

    python benchmarks/bench_grammar.py                        # 32 decode steps, batch 1 and 8, 5 rounds
    python benchmarks/bench_grammar.py --steps 16 --rounds 3  # quicker
    python benchmarks/bench_grammar.py --tokenizer path/to/gpt2/tokenizer.json

What is measured. One GPT-2-small-size model (12 layers, width 768, 12 heads, vocabulary 50257, context
1024; random weights), fp32, 2 threads, in our `Engine` as `chatforge generate` runs it (the fused
decode step where chatforge's CPU kernels build, `--no-fused`: torch's products). The tokenizer: with
`--tokenizer`, that file (GPT-2's own tokenizer.json, say); without it, a byte-level BPE trained here to
exactly 50257 ids on the Python standard library's sources (GPT-2's merges need a download; the
vocabulary size, which is what the mask's cost scales with, is the same), cached in the temp directory.

The grammar: `GrammarSpec.json_schema(RECORD)` (strings, an integer, a number, an array of strings, a
nested object with a required field). Two engines share the model: one decodes rows without a grammar,
the other the same rows (same prompts, seeds) with it. They step in lockstep, one step each, the order
swapped every step, each step timed alone; so a change in the machine's load falls on both alike. Rows
sample at temperature 1 with `ignore_eos`, so both decode one token a row a step (a row whose document
is complete decodes on unconstrained: the mask no longer applies to it; the share of row steps that were
constrained is printed). The first step (prefill) is not timed.

Figures, the grammar engine's decode tokens/s over the plain one's, per round, and the median over rounds:

  (a) batch 1, steady: max_tokens 900, so the landing near max_tokens never starts.
  (b) batch `--batch`, steady: the same with that many rows.
  (c) batch 1, landing: max_tokens = `--steps` + 1, so the row must land: in its last tokens it may only
      take tokens after which the shortest completion still fits (grammar.py).

Beside them, the share of the grammar engine's time spent in the mask (GrammarMask.__call__: catching
up, llguidance's bitmask, the landing search, applying it). Goal: each ratio >= 0.90 (at most 10%
slower). The share of CPU time other processes used during the rounds and the load average are printed.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sysconfig
import tempfile
import time
from dataclasses import replace

import torch
from machine import cpu_model, cpu_ticks, load_average  # benchmarks/machine.py

from chatforge.generate import grammar
from chatforge.generate.engine import Engine
from chatforge.generate.grammar import GrammarMask, GrammarSpec
from chatforge.generate.params import SamplingParams
from chatforge.model import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer

CONFIG = GPTConfig(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, n_embd=768)
RECORD = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "rating": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "author": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                   "required": ["name"]},
    },
    "required": ["title", "year", "tags", "author"],
}


def stdlib_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` ids trained on the Python standard library (about 40 s), cached."""
    path = os.path.join(tempfile.gettempdir(), f"chatforge-bench-grammar-{vocab_size}.json")
    if os.path.exists(path):
        return Tokenizer.from_file(path)
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))

    def texts():
        for f in files:
            try:
                with open(f, encoding="utf-8") as fh:
                    yield fh.read()
            except (OSError, UnicodeDecodeError):
                continue

    tok = Tokenizer.train(texts(), vocab_size=vocab_size)
    if tok.vocab_size != vocab_size:
        raise SystemExit(f"the standard library gave {tok.vocab_size} ids, not {vocab_size}")
    tok.save(path)
    return tok


class MaskClock:
    """Adds up the time GrammarMask.__call__ takes (`seconds`: since the last reset, `total`: all along)."""

    def __init__(self) -> None:
        self.seconds, self.total, self.calls = 0.0, 0.0, 0
        inner = GrammarMask.__call__

        def timed_call(mask, logits, history):
            t0 = time.perf_counter()
            out = inner(mask, logits, history)
            took = time.perf_counter() - t0
            self.seconds += took
            self.total += took
            self.calls += 1
            return out

        GrammarMask.__call__ = timed_call


def constrained_rows(engine: Engine) -> int:
    """Rows of the engine's current batch still under their grammar."""
    masks = [p for p in engine.pipeline.processors if isinstance(p, GrammarMask)] if engine.pipeline else []
    return sum(not s.free for m in masks for s in m.states)


def run_pair(plain: Engine, constrained: Engine, prompts: list[list[int]], spec: GrammarSpec, steps: int,
             max_tokens: int, seed: int, clock: MaskClock) -> dict[str, float]:
    """`steps` decode steps of both engines in lockstep over the same rows, without and with `spec`."""
    engines = {"plain": plain, "grammar": constrained}
    ids = {}
    for name, engine in engines.items():
        ids[name] = [engine.add_request(p, SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=seed + i, ignore_eos=True,
            grammar=spec if name == "grammar" else None)) for i, p in enumerate(prompts)]
        engine.step()  # prefill and the first token: not timed
    secs = dict.fromkeys(engines, 0.0)
    tokens = dict.fromkeys(engines, 0)
    live = 0
    clock.seconds = 0.0
    for step in range(steps):
        live += constrained_rows(constrained)
        for name in (("plain", "grammar") if step % 2 == 0 else ("grammar", "plain")):
            engine = engines[name]
            if not engine.has_unfinished():
                continue
            t0 = time.perf_counter()
            events = engine.step()
            secs[name] += time.perf_counter() - t0
            tokens[name] += sum(len(e.token_ids) for e in events)
    for name, engine in engines.items():
        for i in ids[name]:
            engine.cancel(i)
        while engine.has_unfinished():
            engine.step()
        for i in ids[name]:
            engine.requests.pop(i, None)
    plain_tps, grammar_tps = tokens["plain"] / secs["plain"], tokens["grammar"] / secs["grammar"]
    return {"plain": plain_tps, "grammar": grammar_tps, "ratio": grammar_tps / plain_tps,
            "mask": clock.seconds / secs["grammar"], "share": live / max(tokens["grammar"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens (random ids)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="a tokenizer.json (or a directory with one) instead of the stdlib BPE")
    ap.add_argument("--no-fused", action="store_true", help="torch's products, not chatforge's fused decode step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    tok = Tokenizer.from_pretrained_dir(args.tokenizer) if args.tokenizer else stdlib_tokenizer(CONFIG.vocab_size)
    tok_s = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    model = GPT(replace(CONFIG, vocab_size=max(CONFIG.vocab_size, tok.vocab_size))).eval()
    plain = Engine(model, tok, max_batch_size=args.batch, fused=not args.no_fused)
    engine = Engine(model, tok, max_batch_size=args.batch, fused=not args.no_fused)
    plain.warm_up()
    engine.warm_up()
    spec = GrammarSpec.json_schema(RECORD)
    t0 = time.perf_counter()
    grammar.compiled_tokenizer(tok)
    compile_s = time.perf_counter() - t0
    shortest = grammar.shortest_output(spec, tok)
    clock = MaskClock()

    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(7, tok.vocab_size, (args.batch, args.prompt), generator=g).tolist()
    n, steady = args.steps, 900
    cases = {  # name: (prompts, max_tokens)
        "(a) b1 steady": (prompts[:1], steady),
        f"(b) b{args.batch} steady": (prompts, steady),
        "(c) b1 landing": (prompts[:1], n + 1),
    }

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), llguidance {grammar.llguidance.__version__}")
    print(f"model: GPT-2 small shape, {model.num_params() / 1e6:.1f}M parameters, fp32, vocabulary "
          f"{model.config.vocab_size}; decode: {engine.describe_decode()}")
    print(f"tokenizer: {args.tokenizer or 'byte-level BPE trained on the Python stdlib'}, {tok.vocab_size} ids "
          f"(loaded/trained in {tok_s:.1f} s); llguidance's compile of it {compile_s:.2f} s")
    print(f"grammar: json_schema RECORD; shortest document {len(shortest)} tokens: {tok.decode(shortest)}")
    print(f"{n} timed decode steps a run, {args.rounds} rounds; load average at start: {load_average()}")

    for ps, mt in cases.values():  # warm-up
        run_pair(plain, engine, ps, spec, 4, mt, args.seed, clock)

    results: dict[str, dict[str, list]] = {k: {} for k in cases}
    busy0, mine0 = cpu_ticks()
    for r in range(args.rounds):
        line = []
        for name, (ps, mt) in (cases.items() if r % 2 == 0 else reversed(cases.items())):
            got = run_pair(plain, engine, ps, spec, n, mt, args.seed + 100 * r, clock)
            for key, value in got.items():
                results[name].setdefault(key, []).append(value)
            line.append(f"{name} {got['ratio']:.3f}")
        print(f"  round {r + 1}: " + ", ".join(line))
    busy1, mine1 = cpu_ticks()
    others = (busy1 - busy0 - (mine1 - mine0)) / max(busy1 - busy0, 1)

    med = statistics.median
    print()
    print(f"{'':18} {'plain tok/s':>11} {'grammar tok/s':>13} {'ratio':>6} {'goal':>7}  in the mask  constrained")
    for name, res in results.items():
        print(f"{name:18} {med(res['plain']):11.1f} {med(res['grammar']):13.1f} {med(res['ratio']):6.3f} "
              f"{'>= 0.90':>7}  {med(res['mask']):10.1%}  {med(res['share']):10.0%}")
    print("in the mask: the share of the grammar engine's decode time spent in GrammarMask.__call__")
    print(f"mask time: {1e3 * clock.total / max(clock.calls, 1):.2f} ms per grammar step on average "
          f"({clock.calls} steps, all cases)")
    print(f"CPU time used by other processes during the rounds: {others:.0%}; load average at end: "
          f"{load_average()}")


if __name__ == "__main__":
    main()
