"""What pruning costs in quality and gives in speed, on a finished demo run's chat model.

    python benchmarks/prune_quality.py --run runs/demo            # the PPO model, all methods, 50% and 2:4
    python benchmarks/prune_quality.py --run runs/demo --limit 60 --no-gpt2-shape   # quicker

Quality. The demo's served chat model (`--stage ppo`, its default; `--stage sft` for the SFT model) is
pruned by magnitude, Wanda and SparseGPT at 50% unstructured and 2:4, each from the same calibration: 128
windows of the model's context length (`--samples`, `--seq-len`) drawn from the pretraining data's train
split (RUN/data), as `chatforge prune --calibration RUN/data` does. For the dense model and each pruned
one: the loss on the pretraining validation shard (every window of 128 tokens, pretraining's length),
the loss on the held-out SFT conversations, and the held-out checked score and accuracy as the demo
computes them (`chatforge.evaluate.evaluate` on RUN/tasks/eval.jsonl, judged by the world's scorer).
Pruned checkpoints are written to RUN/prune/STAGE/<method>-<sparsity>/ (for a later LoRA recovery),
the table's figures to RUN/prune/STAGE/results.json.

After a short LoRA recovery (`--recover-steps N`, e.g. 100): each pruned model fine-tuned with LoRA
(`--recover-rank`, alpha 2r, targets c_attn, c_proj, c_fc, chat-token rows frozen) for N steps of the
demo's own SFT (its conversations, replayed text, batch; `--recover-lr`, LoRA's 10x learning rate), then
evaluated twice:
- `+lora`: with its adapters, as `chatforge sft --lora-rank` saves it (model.safetensors holds W + B·A,
  which equals the sparse base plus unmerged adapters: the zeros live on in the base, the adapters add
  r·(in + out) dense numbers a layer);
- `+lora masked`: merged, then pruned again with the base's own mask (B·A fills the zeros; a checkpoint
  that must stay sparse keeps only the adapters' values at the surviving weights).

Speed, measured, not assumed (`--rounds`, interleaved, medians): batch-1 decode tokens/s through the
engine of the dense and the Wanda-50% model; the same on a random model of GPT-2 small's shape
(124M, dense against magnitude 50%: memory-bound, where zeros would matter if anything used them;
`--no-gpt2-shape` skips it); and one layer of GPT-2 small's shape (mlp.c_fc, 768 -> 3072) as torch's
CSR sparse product against the dense one at 50% and 90% zeros, 1 and 16 rows, one thread.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import cpu_model, load_average  # benchmarks/machine.py
from torch.utils import benchmark as tbench

from chatforge.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, write_json
from chatforge.data.shards import TokenDataset
from chatforge.data.world import World
from chatforge.demo import PRESETS, sft_config
from chatforge.evaluate import EvalConfig, evaluate
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.model import GPT, GPTConfig, lm_loss
from chatforge.prune import PruneConfig, Sparsity, calibration_tokens, prune_model, pruned_linears, sparsity_summary
from chatforge.train.config import LoRASettings
from chatforge.train.distributed import DistInfo
from chatforge.train.sft import run_sft

TWO_FOUR = Sparsity(0.5, 2, 4)
GPT2_SMALL = GPTConfig(vocab_size=50257, context_length=1024, n_layer=12, n_head=12, n_embd=768)


@torch.no_grad()
def shard_loss(model: GPT, data: Path, seq_len: int = 128, batch_size: int = 16) -> float:
    """Mean next-token loss over every window of the validation split (pretraining's window length)."""
    total, count = 0.0, 0
    for x, y in TokenDataset(data, "val").iter_eval_batches(batch_size, seq_len):
        total += float(lm_loss(model(x), y, reduction="sum"))
        count += y.numel()
    return total / count


def quality(ckpt: Checkpoint, run: Path, world: World, limit: int) -> dict[str, float]:
    """Pretraining val loss, held-out conversation loss, checked score and accuracy of a chat model."""
    cfg = EvalConfig(prompts=[str(run / "tasks" / "eval.jsonl")],
                     conversations=[str(run / "tasks" / "sft_val.jsonl")], limit=limit)
    overall = evaluate(cfg, ckpt, world).overall
    return {"val_loss": shard_loss(ckpt.model.eval(), run / "data"), "chat_loss": overall["val_loss"],
            "score": overall["score"], "accuracy": overall["accuracy"]}


def recover(pruned: Checkpoint, run: Path, world: World, args: argparse.Namespace) -> dict[str, dict]:
    """A short LoRA fine-tuning of a pruned model on the demo's SFT data: the quality rows of the result
    with its adapters (`+lora`) and merged then re-masked to the pruned model's zeros (`+lora masked`)."""
    budget = PRESETS[(run / "preset.txt").read_text().strip()]
    cfg = sft_config(run, run / "tasks", budget)
    out = pruned.path / "recovered"
    train = dataclasses.replace(cfg.train, max_steps=args.recover_steps, lr=args.recover_lr, progress=False,
                                warmup_steps=max(1, args.recover_steps // 10), eval_every=10**6,
                                save_every=args.recover_steps)
    cfg = dataclasses.replace(cfg, init_from=str(pruned.path), out=str(out), train=train, lora_chat_tokens=False,
                              lora=LoRASettings(rank=args.recover_rank, alpha=2.0 * args.recover_rank, dropout=0.05))
    t0 = time.perf_counter()
    run_sft(cfg, DistInfo(), overwrite=True)
    seconds = time.perf_counter() - t0
    tuned = load_checkpoint(out)
    rows = {"+lora": quality(tuned, run, world, args.limit) | {"zeros": sparsity_summary(tuned.model)["pruned_layers"],
                                                               "seconds": seconds}}
    masks = {name: linear.weight == 0 for name, linear in pruned_linears(pruned.model)}
    with torch.no_grad():
        for name, linear in pruned_linears(tuned.model):
            linear.weight.masked_fill_(masks[name], 0.0)
    rows["+lora masked"] = quality(tuned, run, world, args.limit) | {
        "zeros": sparsity_summary(tuned.model)["pruned_layers"], "seconds": seconds}
    return rows


def prune_all(ckpt: Checkpoint, run: Path, args: argparse.Namespace,
              world: World) -> tuple[dict[str, dict], dict[str, GPT]]:
    """Every method at every setting from one calibration: quality, sparsity and time of each, and the
    pruned models."""
    seq_len = args.seq_len or ckpt.model.config.context_length
    calib = calibration_tokens(str(run / "data"), ckpt.tokenizer, args.samples, seq_len, seed=0)
    print(f"calibration: {args.samples} x {seq_len} tokens from {run / 'data'} (train split)", flush=True)
    rows = {"dense": quality(ckpt, run, world, args.limit) | {"zeros": 0.0, "seconds": 0.0}}
    print(f"  dense: {rows['dense']}", flush=True)
    models = {}
    for method in args.methods:
        for label, sparsity in settings(args.ratios).items():
            model = copy.deepcopy(ckpt.model)
            t0 = time.perf_counter()
            prune_model(model, calib, PruneConfig(method=method, sparsity=sparsity, seq_len=seq_len))
            seconds = time.perf_counter() - t0
            out = run / "prune" / args.stage / f"{method}-{label.replace(':', 'of').replace('%', '')}"
            save_checkpoint(out, model, ckpt.tokenizer, generation_config=ckpt.generation_config,
                            extra_config={"pruning": {"method": method, "setting": label}})
            pruned = Checkpoint(out, model, ckpt.tokenizer, ckpt.generation_config)
            row = quality(pruned, run, world, args.limit)
            row |= {"zeros": sparsity_summary(model)["pruned_layers"], "seconds": seconds}
            rows[f"{method} {label}"], models[f"{method} {label}"] = row, model
            print(f"  {method} {label}: {row}", flush=True)
            if args.recover_steps:
                for suffix, recovered in recover(pruned, run, world, args).items():
                    rows[f"{method} {label} {suffix}"] = recovered
                    print(f"  {method} {label} {suffix}: {recovered}", flush=True)
    return rows, models


def settings(ratios: list[float]) -> dict[str, Sparsity]:
    """The sparsities measured, by label: each unstructured ratio, then 2:4."""
    return {f"{r:.0%}": Sparsity(r) for r in ratios} | {"2:4": TWO_FOUR}


class StubTokenizer:
    """All the engine needs to decode a random model: bytes for a token id, no special tokens."""

    special_ids: dict[str, int] = {}

    def token_bytes(self, token_id: int) -> bytes:
        return b"a"


def decode_rates(models: dict[str, GPT], tokens: int, rounds: int) -> dict[str, float]:
    """Median batch-1 greedy decode tokens/s of each model through the engine, rounds interleaved
    (order reversed every other round); one 8-token prompt, `tokens` new tokens, ends ignored."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    engines = {name: Engine(m, StubTokenizer(), max_batch_size=1, stop_token_ids=[]) for name, m in models.items()}
    prompt = list(range(1, 9))
    for engine in engines.values():
        engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        for name in list(engines)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            engines[name].generate([prompt], params)
            rates[name].append(tokens / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in rates.items()}


def csr_product(zeros: float, rows: int) -> tuple[float, float]:
    """(dense µs, CSR µs) of one GPT-2-small mlp.c_fc product (3072 x 768 weight) on `rows` input rows,
    with a random `zeros` share of the weight zero, one thread, torch.utils.benchmark medians."""
    torch.manual_seed(0)
    weight = torch.randn(3072, 768)
    weight[torch.rand_like(weight) < zeros] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
        sparse = weight.to_sparse_csr()
    x = torch.randn(rows, 768)
    assert torch.allclose(torch.sparse.mm(sparse, x.T).T, F.linear(x, weight), atol=1e-3)
    timers = {"dense": tbench.Timer("F.linear(x, w)", globals={"F": F, "x": x, "w": weight}, num_threads=1),
              "csr": tbench.Timer("torch.sparse.mm(s, x.T)", globals={"torch": torch, "s": sparse, "x": x},
                                  num_threads=1)}
    return tuple(timers[k].blocked_autorange(min_run_time=1.0).median * 1e6 for k in ("dense", "csr"))


def speed(dense: GPT, pruned: dict[str, GPT], args: argparse.Namespace) -> list[str]:
    """The speed lines: the demo's model (dense and its first 50% pruning) and GPT-2 small's shape through
    the engine, and one layer's CSR product."""
    name = "wanda 50%" if "wanda 50%" in pruned else next(n for n in pruned if n.endswith("50%"))
    rates = decode_rates({"dense": dense, name: pruned[name]}, args.decode_tokens, args.rounds)
    lines = [f"decode, demo model, batch 1: dense {rates['dense']:.1f} tokens/s, {name} {rates[name]:.1f} "
             f"({rates[name] / rates['dense']:.2f}x)"]
    if args.gpt2_shape:
        torch.manual_seed(0)
        dense = GPT(GPT2_SMALL).eval()
        sparse = copy.deepcopy(dense)
        prune_model(sparse, None, PruneConfig(method="magnitude"))
        rates = decode_rates({"dense": dense, "magnitude 50%": sparse}, args.decode_tokens, args.rounds)
        lines.append(f"decode, GPT-2 small shape (random), batch 1: dense {rates['dense']:.1f} tokens/s, magnitude "
                     f"50% {rates['magnitude 50%']:.1f} ({rates['magnitude 50%'] / rates['dense']:.2f}x)")
    for zeros in (0.5, 0.9):
        for rows in (1, 16):
            d, s = csr_product(zeros, rows)
            lines.append(f"one layer 768->3072, {zeros:.0%} zeros, {rows:>2} row(s): dense {d:8.1f} us, "
                         f"CSR {s:8.1f} us ({d / s:.2f}x)")
    return lines


def table(rows: dict[str, dict]) -> str:
    """One line per model: zeros, each figure and its change from the dense model."""
    base = rows["dense"]
    head = (f"{'model':<28} {'zeros':>6} {'val loss':>9} {'Δ':>7} {'chat loss':>9} {'Δ':>7} "
            f"{'score':>7} {'Δ':>7} {'accuracy':>8} {'Δ':>7} {'prune s':>7}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cells = [f"{r['zeros']:>6.1%}"]
        for key, width, fmt in (("val_loss", 9, ".3f"), ("chat_loss", 9, ".3f"), ("score", 7, ".3f"),
                                ("accuracy", 8, ".1%")):
            delta = "" if name == "dense" or math.isnan(r[key]) else format(r[key] - base[key], "+" + fmt)
            cells.append(f"{format(r[key], fmt):>{width}} {delta:>7}")
        lines.append(f"{name:<28} " + " ".join(cells) + f" {r['seconds']:>7.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="A finished `chatforge demo` run directory.")
    parser.add_argument("--stage", default="ppo", choices=["ppo", "sft", "dpo"], help="Which chat model.")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5], help="Unstructured sparsities (2:4 too).")
    parser.add_argument("--samples", type=int, default=128, help="Calibration sequences.")
    parser.add_argument("--seq-len", type=int, default=0, help="Tokens per calibration sequence (0: the context).")
    parser.add_argument("--limit", type=int, default=0, help="Evaluate only the first N held-out prompts (0: all).")
    parser.add_argument("--recover-steps", type=int, default=0, help="LoRA recovery steps after each pruning.")
    parser.add_argument("--recover-rank", type=int, default=8, help="LoRA rank of the recovery.")
    parser.add_argument("--recover-lr", type=float, default=1e-2, help="Learning rate of the recovery.")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpt2-shape", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    ckpt = load_checkpoint(args.run / args.stage)
    world = World.load(args.run / "corpus" / "world.json")
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} threads, load {load_average()}")
    print(f"model: {args.run / args.stage} ({ckpt.model.num_params():,} parameters)", flush=True)
    t0 = time.perf_counter()
    rows, pruned = prune_all(ckpt, args.run, args, world)
    print("\n" + table(rows) + "\n", flush=True)
    lines = speed(ckpt.model, pruned, args)
    print("\n".join(lines))
    results = args.run / "prune" / args.stage / "results.json"
    write_json(results, {"stage": args.stage, "rows": rows, "speed": lines,
                                                      "machine": cpu_model(), "seconds": time.perf_counter() - t0})
    print(f"\nload {load_average()}; {time.perf_counter() - t0:.0f}s -> {results}")


if __name__ == "__main__":
    main()
