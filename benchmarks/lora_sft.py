"""Full fine-tuning against LoRA at two ranks on the demo's SFT: trainable parameters, memory, tokens/s and the
held-out checked score.

    chatforge demo --no-serve --out runs/demo           # once: the pretrained model and the SFT data
    python benchmarks/lora_sft.py --run runs/demo       # about 10 minutes on 2 quiet cores
    python benchmarks/lora_sft.py --run runs/demo --steps 100 --limit 100 --ranks 8   # a quick look

What runs. Each configuration trains in a fresh process (so its peak memory is its own): the demo's SFT exactly
as `chatforge demo` runs it for the run's preset (`chatforge.demo.sft_config`: RUN/tasks' conversations, replayed
pretraining text, steps, batch, learning rate), from RUN/pretrain, into a temporary directory; then the demo's
evaluation of the result (`chatforge.evaluate`: greedy answers to RUN/tasks/eval.jsonl judged by the world's
scorer, and the loss on the held-out conversations). Nothing is written into RUN.

    full          every weight trains, at the demo's learning rate
    LoRA r=R      --lora-rank R, --lora-alpha 2R (so B·A is scaled by 2 at every rank), --lora-dropout 0.05, targets
                  c_attn, c_proj, c_fc, and the six chat tokens' embedding rows (sft's default): the base frozen,
                  at --lora-lr, 10x the demo's (LoRA wants a larger learning rate than full fine-tuning: on the
                  demo, 100 steps at r=8, chat tokens frozen, ended at a held-out loss of 2.51 with 1e-2 and
                  3.21 with 3e-3; training the chat tokens took 3.21 to 2.98)

Columns:
- trainable: parameters the optimizer updates (LoRA: r·(in + out) per adapted layer);
- train state MB: bytes of the weights plus, for the trainable ones, their gradients and AdamW's two moments
  (what training holds beside activations; exact, not measured);
- peak RSS MB: the process's `ru_maxrss` above its RSS just after the imports (weights, activations, optimizer,
  allocator slack; the evaluation's engine runs after training and is smaller);
- tokens/s: training tokens (conversation rows and replayed text) over the wall time of the training steps,
  the first two left out (warm-up);
- score: mean checked score on the held-out prompts; val loss: on the held-out conversations (assistant tokens).

The machine line names the CPU; each row says how much CPU time other processes took while it trained: on a shared
machine tokens/s are then unreliable (memory and score are not).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model, cpu_ticks, load_average  # benchmarks/machine.py

QUIET = 0.05  # other processes' share of the CPU under which a row's tokens/s are trusted


def warm_up_peft() -> None:
    """Import PEFT and what its first injection imports (its optional integrations) in every configuration
    before the RSS baseline, so that LoRA's rows are not charged for imports."""
    import peft
    from torch import nn

    peft.inject_adapter_in_model(peft.LoraConfig(r=1, target_modules=["0"]), nn.Sequential(nn.Linear(2, 2)))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def train_state_mb(model) -> float:
    """Weights, and gradients and two AdamW moments of the trainable ones, in MB (tied weights once)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return (weights + 3 * trained) / 2**20


def worker(args) -> dict:
    """Train one configuration and evaluate it; its figures as a dict."""
    import torch

    from chatforge import lora
    from chatforge.checkpoint import load_checkpoint
    from chatforge.data.world import World
    from chatforge.demo import PRESETS, sft_config
    from chatforge.evaluate import EvalConfig, evaluate
    from chatforge.train import sft as sft_module
    from chatforge.train.config import LoRASettings
    from chatforge.train.distributed import DistInfo

    torch.set_num_threads(args.threads)
    warm_up_peft()
    start = rss_mb()
    run = Path(args.run)
    budget = PRESETS[(run / "preset.txt").read_text().strip()]
    cfg = sft_config(run, run / "tasks", budget)
    train = dataclasses.replace(cfg.train, progress=False, max_steps=args.steps or cfg.train.max_steps,
                                eval_every=10**6, save_every=10**6, lr=args.lora_lr if args.rank else cfg.train.lr)
    cfg = dataclasses.replace(cfg, out=args.out, train=train,
                              lora=LoRASettings(rank=args.rank, alpha=args.lora_alpha or 2.0 * max(args.rank, 1),
                                                dropout=args.lora_dropout))
    held: dict = {}
    real_add = sft_module.add_adapters

    def add_and_keep(model, options, base="", tokens=()):  # the model the run trains, for its counts
        held["model"] = real_add(model, options, base, tokens)
        return held["model"]

    sft_module.add_adapters = add_and_keep
    busy0, mine0 = cpu_ticks()
    t0 = time.perf_counter()
    result = sft_module.run_sft(cfg, DistInfo())
    seconds = time.perf_counter() - t0
    busy1, mine1 = cpu_ticks()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start
    steps = result.metrics[2:]
    tokens = sum(m["tokens_per_s"] * m["step_time_s"] for m in steps)
    model = held["model"]
    figures = {"trainable": lora.trainable_parameters(model), "total": model.num_params(),
               "state_mb": train_state_mb(model), "peak_mb": peak,
               "tok_s": tokens / sum(m["step_time_s"] for m in steps), "train_s": seconds,
               "others": max(0.0, (busy1 - busy0) - (mine1 - mine0))
               / (seconds * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1))}
    del model, held["model"]
    eval_cfg = EvalConfig(prompts=[str(run / "tasks" / "eval.jsonl")],
                          conversations=[str(run / "tasks" / "sft_val.jsonl")], limit=args.limit)
    t0 = time.perf_counter()
    scored = evaluate(eval_cfg, load_checkpoint(args.out), World.load(run / "corpus" / "world.json"))
    figures |= {"score": scored.overall["score"], "val_loss": scored.overall["val_loss"],
                "prompts": scored.overall["n"], "eval_s": time.perf_counter() - t0}
    return figures


def run_config(name: str, rank: int, args, root: Path) -> dict:
    command = [sys.executable, __file__, "--worker", "--rank", str(rank), "--out", str(root / name.replace(" ", "_")),
               "--run", args.run, "--steps", str(args.steps), "--limit", str(args.limit),
               "--lora-lr", str(args.lora_lr), "--lora-alpha", str(args.lora_alpha), "--lora-dropout",
               str(args.lora_dropout), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: dict[str, dict]) -> None:
    full = results["full"]
    print(f"| {'fine-tuning':<11} | {'trainable':>10} | {'share':>6} | {'train state MB':>14} | {'peak RSS MB':>11} | "
          f"{'tokens/s':>8} | {'x full':>6} | {'score':>6} | {'val loss':>8} | {'others CPU':>10} |")
    print(f"|{'-' * 13}|{'-' * 11}:|{'-' * 7}:|{'-' * 15}:|{'-' * 12}:|{'-' * 9}:|{'-' * 7}:|{'-' * 7}:|{'-' * 9}:|"
          f"{'-' * 11}:|")
    for name, r in results.items():
        print(f"| {name:<11} | {r['trainable']:>10,} | {r['trainable'] / r['total']:6.1%} | {r['state_mb']:14.1f} | "
              f"{r['peak_mb']:11.0f} | {r['tok_s']:8.0f} | {r['tok_s'] / full['tok_s']:6.2f} | {r['score']:6.3f} | "
              f"{r['val_loss']:8.3f} | {r['others']:10.0%} |")
    print("\nseconds: " + "; ".join(f"{n} {r['train_s']:.0f} training, {r['eval_s']:.0f} evaluating "
                                    f"{r['prompts']} prompts" for n, r in results.items()))
    busiest = max(r["others"] for r in results.values())
    if busiest > QUIET:
        print(f"\nWARNING: other processes used up to {busiest:.0%} of the CPU while rows trained: tokens/s are "
              "unreliable there (memory, parameters and scores are not).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Run by hand (not in the tests); the module docstring explains the figures.")
    p.add_argument("--run", required=True, help="a `chatforge demo` run directory (pretrain/, tasks/, data/)")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 32], help="LoRA ranks to compare with full")
    p.add_argument("--steps", type=int, default=0, help="SFT steps (0: the demo's)")
    p.add_argument("--lora-lr", type=float, default=1e-2, help="learning rate of the LoRA runs (10x the demo's SFT lr)")
    p.add_argument("--lora-alpha", type=float, default=0.0,
                   help="alpha of every LoRA run; 0: twice its rank (the same scale alpha/r = 2 at every rank)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N held-out prompts (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one configuration
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not (Path(args.run) / "pretrain").exists() or not (Path(args.run) / "tasks" / "eval.jsonl").exists():
        sys.exit(f"{args.run}: expected a demo run directory with pretrain/ and tasks/ (chatforge demo --no-serve)")

    import torch

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}; {args.threads} threads; "
          f"load average at start: {load_average()}")
    print(f"run: {args.run} ({(Path(args.run) / 'preset.txt').read_text().strip()} preset); steps "
          f"{args.steps or 'as the demo'}; LoRA lr {args.lora_lr}, alpha {args.lora_alpha or '2 x rank'}, dropout "
          f"{args.lora_dropout}; eval prompts "
          f"{args.limit or 'all'}\n")
    t0 = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="lora_sft_") as tmp:
        for name, rank in [("full", 0)] + [(f"LoRA r={r}", r) for r in args.ranks]:
            results[name] = run_config(name, rank, args, Path(tmp))
            print(f"  {name}: done ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    print()
    print_table(results)
    print(f"\nload average at end: {load_average()}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
