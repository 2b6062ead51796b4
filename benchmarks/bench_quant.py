"""Int8 weights for inference: decode speed, memory and accuracy, against fp32 and the library peers.

    python benchmarks/bench_quant.py                          # GPT-2 small's shape, 3 rounds
    python benchmarks/bench_quant.py --run /work/exp/demo3    # + the demo's models, fp32 against int8

What is measured. One GPT-2-small-size model (12 layers, width 768, 12 heads, vocabulary 50257; random
weights, as benchmarks/bench_decode.py builds it), 2 threads, batch 1. Contenders, each through
`Engine(..., fused=True).generate` (chatforge's default engine path; the fused fp32 step where it runs):
- fp32: the model as it is;
- int8 (ours): `chatforge.accel.quantize.quantize_model` (weight-only, per output channel; every product
  through `chatforge.accel.int8.int8_linear`, so its figure is whatever that function does on this machine);
- torchao int8: torchao's `Int8WeightOnlyConfig` (`quantize_` on a copy), the library peer;
- torchao int4 (unpacked): `IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))`, the
  one 4-bit weight-only form torchao 0.18 runs on this CPU (its packed 4-bit forms are tried first and
  the reason each fails is printed);
- llama.cpp q8_0 when llama-cpp-python is importable: the same weights exported by
  `export_gguf(..., dtype="q8_0")`, greedy by argmax after each single-token decode.
A torchao layer is wrapped so the engine's `fast_view` does not hand its weight (a tensor subclass) to
torch's fp32 kernels (see "torchao and fast_view" in the printout).

Decode tokens/s excludes prefill by difference, as bench_decode.py does: t(prompt + N new) - t(prompt + 1)
covers N - 1 steps. Rounds alternate the order; figures are medians over rounds, ratios medians of each
round's ratio (paired). "Products alone": every linear product of one decode token at one row, nothing
else (fp32 through `accel.linear.fast_linear`, int8 through `int8_linear`). Memory: bytes of every
distinct tensor a model holds (a tied matrix once; a torchao tensor's inner tensors).

With --run DIR (a `chatforge demo` run): for its sft and ppo models, the held-out checked score (the
world's scorer on tasks/eval.jsonl, greedy) and the validation loss on tasks/sft_val.jsonl, fp32 against
each quantized form, and the loss of int8 with an fp32 copy of the embedding for its lookup (the
alternative to dequantizing rows of the int8 one).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_decode import CONFIG, StubTokenizer, bandwidth, timed  # benchmarks/bench_decode.py
from llama_peer import llama_decoder  # benchmarks/llama_peer.py
from machine import cpu_model, cpu_ticks, load_average  # benchmarks/machine.py
from torch import nn

from chatforge.accel.int8 import int8_linear
from chatforge.accel.linear import fast_linear
from chatforge.accel.quantize import Int8Linear, quantize_model
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.model import GPT

med = statistics.median


class LibraryLinear(nn.Module):
    """A linear layer whose weight is a torchao tensor, called through F.linear (torchao's own dispatch):
    not an nn.Linear, so the engine's fast_view leaves it alone."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def torchao_model(model: GPT, config: object) -> GPT:
    """A copy of `model` with torchao's `config` applied to every nn.Linear (the LM head too: it then holds
    its own quantized copy, the embedding stays fp32), each wrapped in LibraryLinear."""
    from torchao.quantization import quantize_

    out = copy.deepcopy(model)
    quantize_(out, config)
    for module in list(out.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, LibraryLinear(child))
    return out


def int4_configs() -> dict[str, Callable[[], object]]:
    """torchao 0.18's 4-bit weight-only forms, packed ones first; the last one is the one that runs here."""
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return {
        "Int4WeightOnlyConfig(tile_packed_to_4d)": lambda: Int4WeightOnlyConfig(
            group_size=32, int4_packing_format="tile_packed_to_4d"),
        "Int4WeightOnlyConfig(plain)": lambda: Int4WeightOnlyConfig(group_size=32, int4_packing_format="plain"),
        "Int4WeightOnlyConfig(plain_int32)": lambda: Int4WeightOnlyConfig(
            group_size=32, int4_packing_format="plain_int32"),
        "IntxWeightOnlyConfig(int4, opaque_torchao_auto)": lambda: IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(32), intx_packing_format="opaque_torchao_auto"),
        "IntxWeightOnlyConfig(int4, unpacked_to_int8)": lambda: IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(32)),
    }


def first_int4_that_runs() -> tuple[str | None, dict[str, str]]:
    """The name of the first 4-bit config that quantizes and runs a small linear layer here, and why
    each one before it failed."""
    failures = {}
    for name, make in int4_configs().items():
        probe = nn.Sequential(nn.Linear(64, 32))
        try:
            torchao_model(probe, make())(torch.randn(1, 64))  # type: ignore[arg-type]
            return name, failures
        except Exception as e:  # noqa: BLE001 - the reason is the finding
            failures[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None, failures


def tensor_bytes(t: torch.Tensor, seen: dict[int, int]) -> None:
    """Record the storages behind `t` (the inner tensors of a tensor subclass)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for name in names:
            tensor_bytes(getattr(t, name), seen)
        return
    storage = t.untyped_storage()
    seen[storage.data_ptr()] = storage.nbytes()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor `model` holds (parameters and buffers; shared storage once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        tensor_bytes(t, seen)
    return sum(seen.values())


def engine_runner(model: nn.Module) -> Callable[[list[int], int], list[int]]:
    """Greedy decode of one prompt through the default engine (fused where it runs)."""
    engine = Engine(model, StubTokenizer(), max_batch_size=1, stop_token_ids=[], fused=True)
    engine.warm_up()

    def run(prompt: list[int], n: int) -> list[int]:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        return engine.generate([prompt], params)[0].outputs[0].token_ids

    run.describe = engine.describe_decode()  # type: ignore[attr-defined]
    return run


def build_contenders(model: GPT, args: argparse.Namespace, tmp: str) -> tuple[dict, dict, dict[str, str]]:
    """(name -> decode function, name -> model (for memory), int4 failures) for every contender here."""
    from torchao.quantization import Int8WeightOnlyConfig

    models: dict[str, nn.Module] = {"fp32": model, "int8 (ours)": quantize_model(copy.deepcopy(model))}
    failures: dict[str, str] = {}
    try:
        models["torchao int8"] = torchao_model(model, Int8WeightOnlyConfig())
    except Exception as e:  # noqa: BLE001
        failures["Int8WeightOnlyConfig"] = f"{type(e).__name__}: {e}"
    if not args.no_int4:
        name, failures4 = first_int4_that_runs()
        failures |= failures4
        if name is not None:
            models[f"torchao int4 ({name.split(', ')[-1].rstrip(')')})"] = torchao_model(model, int4_configs()[name]())
    runs = {k: engine_runner(m) for k, m in models.items()}
    llama = None if args.no_llama_cpp else llama_decoder(model, args.threads, tmp, dtype="q8_0")
    if llama is not None:
        runs["llama.cpp q8_0"] = llama
    return runs, models, failures


def measure_decode(runs: dict[str, Callable], prompt: list[int], n: int, rounds: int) -> dict[str, list[float]]:
    """Batch-1 decode tokens/s of each contender per round (prefill excluded by difference), order alternating."""
    for run in runs.values():  # warm-up: allocator, thread pool, first-call paths
        run(prompt, 2)
    tps: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t_n, t_1 = timed(lambda k=k: runs[k](prompt, n)), timed(lambda k=k: runs[k](prompt, 1))
            tps[k].append((n - 1) / (t_n - t_1))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in tps.items()) + " tokens/s")
    return tps


def products_alone(fp32: GPT, int8: GPT, passes: int, rounds: int) -> tuple[list[float], list[float]]:
    """Passes/s over every linear product of one decode token at one row: fp32 (fast_linear) and int8."""
    lin = [m for m in fp32.modules() if isinstance(m, nn.Linear)]
    q8 = [m for m in int8.modules() if isinstance(m, Int8Linear)]
    rows = {c: torch.randn(1, c) for c in {m.in_features for m in lin}}

    @torch.no_grad()
    def run_fp32() -> None:
        for _ in range(passes):
            for m in lin:
                fast_linear(m, rows[m.in_features])

    @torch.no_grad()
    def run_int8() -> None:
        for _ in range(passes):
            for m in q8:
                int8_linear(rows[m.in_features], m.qweight, m.scale, m.bias)

    run_fp32(), run_int8()
    a, b = [], []
    for _ in range(rounds):
        a.append(passes / timed(run_fp32))
        b.append(passes / timed(run_int8))
    return a, b


def greedy_agreement(runs: dict[str, Callable], prompt: list[int], n: int) -> dict[str, int]:
    """How many leading greedy tokens each contender shares with fp32 (quantization may flip a near tie)."""
    ref = runs["fp32"](prompt, n)
    out = {}
    for k, run in runs.items():
        got = run(prompt, n)
        out[k] = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), n)
    return out


def quantized_forms(int4_name: str | None) -> dict[str, Callable[[GPT], nn.Module]]:
    """How the demo's models are quantized for the accuracy table."""
    from torchao.quantization import Int8WeightOnlyConfig

    forms: dict[str, Callable[[GPT], nn.Module]] = {
        "int8 (ours)": lambda m: quantize_model(copy.deepcopy(m)),
        "torchao int8": lambda m: torchao_model(m, Int8WeightOnlyConfig()),
    }
    if int4_name is not None:
        forms["torchao int4"] = lambda m: torchao_model(m, int4_configs()[int4_name]())
    return forms


def fp32_lookup_variant(model: GPT) -> GPT:
    """int8 everywhere, but the embedding lookup reads an fp32 copy of the embedding (the alternative)."""
    out = quantize_model(copy.deepcopy(model))
    out.wte = copy.deepcopy(model.wte).requires_grad_(False)
    return out


def demo_section(run: Path, forms: dict[str, Callable[[GPT], nn.Module]]) -> None:
    """The demo's sft and ppo models: held-out checked score and validation loss, fp32 against each form."""
    from dataclasses import replace

    from chatforge.checkpoint import load_checkpoint
    from chatforge.data.world import World
    from chatforge.evaluate import EvalConfig, evaluate, validation_loss

    tasks = run / "tasks"
    world = World.load(run / "corpus" / "world.json")
    cfg = EvalConfig(prompts=[str(tasks / "eval.jsonl")], conversations=[str(tasks / "sft_val.jsonl")])
    print(f"\ndemo run {run}: held-out checked score (greedy, {tasks / 'eval.jsonl'}) and validation loss "
          f"({tasks / 'sft_val.jsonl'})")
    for stage in ("sft", "ppo"):
        if not (run / stage).exists():
            print(f"  {stage}: not in the run")
            continue
        ckpt = load_checkpoint(run / stage)
        t0 = time.perf_counter()
        base = evaluate(cfg, ckpt, world).overall
        print(f"  {stage} fp32: score {base['score']:.4f}, val loss {base['val_loss']:.4f} "
              f"({model_bytes(ckpt.model) / 1e6:.2f} MB of weights; {time.perf_counter() - t0:.0f} s)")
        for name, make in forms.items():
            q = replace(ckpt, model=make(ckpt.model))
            t0 = time.perf_counter()
            got = evaluate(cfg, q, world).overall
            print(f"  {stage} {name}: score {got['score']:.4f} ({got['score'] - base['score']:+.4f}), "
                  f"val loss {got['val_loss']:.4f} ({got['val_loss'] - base['val_loss']:+.4f}) "
                  f"({model_bytes(q.model) / 1e6:.2f} MB; {time.perf_counter() - t0:.0f} s)")
        alt = validation_loss(replace(ckpt, model=fp32_lookup_variant(ckpt.model)), cfg.conversations)["val_loss"]
        print(f"  {stage} int8 with an fp32 embedding for the lookup: val loss {alt:.4f} "
              f"({alt - base['val_loss']:+.4f}), {model_bytes(fp32_lookup_variant(ckpt.model)) / 1e6:.2f} MB")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--new", type=int, default=32, help="new tokens per decode run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bw-gib", type=float, default=1.0, help="size of the bandwidth tensor")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when it is installed")
    ap.add_argument("--no-int4", action="store_true", help="skip torchao's 4-bit form")
    ap.add_argument("--no-speed", action="store_true", help="only the demo run's accuracy table")
    ap.add_argument("--run", type=Path, default=None, help="a `chatforge demo` run directory: accuracy table")
    ap.add_argument("--small", action="store_true", help="a 2-layer width-128 model instead (a smoke run)")
    return ap.parse_args()


def speed_section(args: argparse.Namespace) -> str | None:
    """The speed and memory table on GPT-2 small's shape; returns the 4-bit config that runs here (or None)."""
    from dataclasses import replace

    config = replace(CONFIG, n_layer=2, n_embd=128, n_head=2) if args.small else CONFIG
    torch.manual_seed(args.seed)
    model = GPT(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        runs, models, failures = build_contenders(model, args, tmp)
        int4 = next((k for k in int4_configs() if k not in failures), None) if not args.no_int4 else None
        print(f"model: {'small smoke shape' if args.small else 'GPT-2 small shape'}, {model.num_params() / 1e6:.1f}M "
              f"parameters; prompt {args.prompt}, {args.new} new tokens, batch 1; {args.rounds} rounds")
        for k, run in runs.items():
            print(f"  {k}: {getattr(run, 'describe', 'llama.cpp, argmax after each llama_decode')}")
        for k, why in failures.items():
            print(f"  not runnable here: torchao {k}: {why}")
        g = torch.Generator().manual_seed(args.seed + 1)
        prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=g).tolist()
        agree = greedy_agreement(runs, prompt, 16)
        print("greedy tokens shared with fp32 (of 16): " + ", ".join(f"{k} {v}" for k, v in agree.items()))
        big = torch.ones(int(args.bw_gib * 2**30) // 4)
        bw = bandwidth(big, torch.empty_like(big), reps=5)[0]
        del big
        busy0, mine0 = cpu_ticks()
        tps = measure_decode(runs, prompt, args.new, args.rounds)
        fp_passes, q8_passes = products_alone(model, models["int8 (ours)"], 4, args.rounds)
        busy1, mine1 = cpu_ticks()
    sizes = {k: model_bytes(m) for k, m in models.items()}
    sizes |= {k: run.size for k, run in runs.items() if hasattr(run, "size")}
    print_speed_table(model, sizes, tps, bw, args, fp_passes, q8_passes)
    others = (busy1 - busy0 - (mine1 - mine0)) / max(busy1 - busy0, 1)
    print(f"other processes' share of CPU time during the rounds: {others:.1%}; load average {load_average()}")
    return int4


def print_speed_table(model: GPT, sizes: dict[str, int], tps: dict[str, list[float]], bw: float,
                      args: argparse.Namespace, fp_passes: list[float], q8_passes: list[float]) -> None:
    """One row per contender: decode tokens/s, paired ratios to fp32 and to ours, share of its own bandwidth
    bound (its weight bytes, less the position table, + the KV cache read once a token), weight memory
    (llama.cpp's: its GGUF file, which holds the tied head twice, as llama.cpp's converter writes it)."""
    c = model.config
    kv = 4 * 2 * c.n_layer * (args.prompt + args.new / 2) * c.n_embd
    wpe = model.wpe.weight.numel() * 4  # one row a token: not streamed

    def paired(a: str, b: str) -> float:
        return med([x / y for x, y in zip(tps[a], tps[b])])

    print(f"\nbandwidth (sum over {args.bw_gib:g} GiB, {args.threads} threads): {bw:.1f} GB/s")
    print(f"{'':<44}{'tokens/s':>9}  {'vs fp32':>8}  {'ours vs it':>10}  {'of bound':>8}  {'weights MB':>10}")
    for k, v in tps.items():
        size = sizes.get(k)
        bound = bw * 1e9 / (size - wpe + kv) if size else None
        print(f"{'decode b1: ' + k:<44}{med(v):>9.1f}  {paired(k, 'fp32'):>7.2f}x  "
              f"{paired('int8 (ours)', k):>9.2f}x  {f'{med(v) / bound:.0%}' if bound else '-':>8}  "
              f"{f'{size / 1e6:.1f}' if size else '-':>10}")
    ratio = paired("int8 (ours)", "fp32")
    print(f"int8 (ours) over fp32: {ratio:.2f}x (goal >= 1.8x once int8_linear has fast kernels)")
    if "llama.cpp q8_0" in tps:
        print(f"int8 (ours) over llama.cpp q8_0: {paired('int8 (ours)', 'llama.cpp q8_0'):.2f}x (goal >= 1.0x)")
    products = 4 * model.config.n_layer + 1
    print(f"products alone ({products} one-row products, passes/s): fp32 {med(fp_passes):.1f}, int8_linear "
          f"{med(q8_passes):.1f} ({med([b / a for a, b in zip(fp_passes, q8_passes)]):.2f}x)")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import torchao

    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({args.threads} threads), "
          f"torchao {torchao.__version__}; load average at start {load_average()}")
    int4 = None
    if not args.no_speed:
        int4 = speed_section(args)
    elif not args.no_int4:
        int4, failures = first_int4_that_runs()
        for k, why in failures.items():
            print(f"  not runnable here: torchao {k}: {why}")
    if args.run is not None:
        demo_section(args.run, quantized_forms(int4))


if __name__ == "__main__":
    main()
