"""PPO's memory with LoRA on one shared base model, against full PPO, one PPO iteration each, on the CPU.

    python benchmarks/lora_memory.py                          # 6 layers, width 384, random weights
    python benchmarks/lora_memory.py --run runs/demo          # the demo's SFT and reward models
    python benchmarks/lora_memory.py --layers 12 --width 768 --heads 12   # GPT-2 small's shape

What is compared (each in a fresh process, so one's peak cannot hide another's):

    full              `chatforge ppo`'s defaults: the policy, a float32 copy of it as the reference, the reward
                      model, and a value model started as a copy of the reward model; policy and value train
    full, shared head --shared-value-head: the value head on the policy's trunk (no value backbone)
    LoRA r=R          --lora-rank R --shared-value-head: one frozen base is the policy (adapters on), the reference
                      (adapters off) and the value model's trunk; only the adapters and the value head train

Figures, after one PPO iteration (rollout, scoring, `ppo_epochs` of minibatch updates):
- weights MB: every distinct parameter and buffer storage held by the policy, value model, reference and reward
  model (a tensor shared by two of them counts once);
- train state MB: gradients and AdamW's two moments of what trains (3x its bytes): held through each update;
- tensors MB: the two together, the part of memory the configuration decides (activations and the engine's KV
  cache are the same work in each);
- peak RSS MB: the process's `ru_maxrss` above its RSS after the imports: the same plus activations, the KV cache
  and allocator slack, measured. Every configuration imports PEFT (and what its first injection imports) before
  that baseline, and keeps freed memory as `chatforge ppo` does (`keep_freed_memory`), so RSS is the high-water
  mark of what the iteration allocated.
The "saved" columns are 1 - the row's figure / the full row's. Random weights (the default) are as good as trained
ones for memory; the rollouts then run to --max-new-tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_ppo import make_inputs  # benchmarks/bench_ppo.py: tokenizer, RL prompts, random-weight models
from machine import cpu_model, load_average  # benchmarks/machine.py

CONFIGS = ("full", "full, shared head", "LoRA")


def warm_up_peft() -> None:
    """Import PEFT and what its first injection imports (its optional integrations) in every configuration
    before the RSS baseline, so that LoRA's rows are not charged for imports."""
    import peft
    from torch import nn

    peft.inject_adapter_in_model(peft.LoraConfig(r=1, target_modules=["0"]), nn.Sequential(nn.Linear(2, 2)))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def tensor_mb(*modules) -> float:
    """MB of the distinct storages of the modules' parameters and buffers."""
    seen: dict[int, int] = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / 2**20


def worker(args) -> dict:
    """One PPO iteration of one configuration; its figures."""
    import torch

    from chatforge.chat import ChatTemplate
    from chatforge.data.chat_readers import read_prompts
    from chatforge.lora import trainable_parameters
    from chatforge.train.config import LoRASettings, PPOConfig, PPOSettings, TrainConfig
    from chatforge.train.distributed import DistInfo
    from chatforge.train.loop import keep_freed_memory
    from chatforge.train.ppo import PPOStep, build_models
    from chatforge.train.rollout import fit_prompts, reward_model_scores

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `chatforge ppo` runs (the harness sets it on the CPU)
    warm_up_peft()
    start = rss_mb()
    settings = PPOSettings(rollout_batch=args.rollout_batch, minibatch=args.minibatch, ppo_epochs=args.ppo_epochs,
                           max_new_tokens=args.max_new_tokens, val_prompts=args.rollout_batch,
                           shared_value_head=args.worker != "full")
    cfg = PPOConfig(prompts=[args.prompts], policy=args.policy, reward_model=args.reward_model, out=args.out,
                    ppo=settings, lora=LoRASettings(rank=args.rank if args.worker == "LoRA" else 0),
                    train=TrainConfig(max_steps=1, batch_size=1, lr=1e-5, warmup_steps=0, weight_decay=0.0,
                                      progress=False))
    dist = DistInfo()
    torch.manual_seed(0)
    model, reference, rm, tokenizer = build_models(cfg, dist.device)
    prompts = fit_prompts(read_prompts(cfg.prompts).messages, cfg.prompts, "--prompts", ChatTemplate(tokenizer),
                          model.policy.config.context_length, settings.max_new_tokens)
    step = PPOStep(model, reference, reward_model_scores(rm), tokenizer, prompts, [], settings, cfg.train, dist)
    t0 = time.perf_counter()
    step.run(0)
    seconds = time.perf_counter() - t0
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    weights = tensor_mb(model, reference, rm)
    return {"weights_mb": weights, "state_mb": 3 * trained, "tensors_mb": weights + 3 * trained,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start,
            "trainable": trainable_parameters(model), "seconds": seconds}


def run_config(name: str, args, inputs: dict, root: Path) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--policy", inputs["policy"], "--reward-model",
               inputs["reward_model"], "--prompts", inputs["prompts"], "--out", str(root / name.replace(" ", "_")),
               "--rank", str(args.rank), "--threads", str(args.threads), "--rollout-batch", str(args.rollout_batch),
               "--minibatch", str(args.minibatch), "--ppo-epochs", str(args.ppo_epochs),
               "--max-new-tokens", str(args.max_new_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: dict[str, dict]) -> None:
    full = results["full"]
    print(f"| {'PPO':<17} | {'trainable':>11} | {'weights MB':>10} | {'train state MB':>14} | {'tensors MB':>10} | "
          f"{'saved':>6} | {'peak RSS MB':>11} | {'saved':>6} | {'s/iter':>6} |")
    print(f"|{'-' * 19}|{'-' * 12}:|{'-' * 11}:|{'-' * 15}:|{'-' * 11}:|{'-' * 7}:|{'-' * 12}:|{'-' * 7}:|{'-' * 7}:|")
    for name, r in results.items():
        print(f"| {name:<17} | {r['trainable']:>11,} | {r['weights_mb']:10.1f} | {r['state_mb']:14.1f} | "
              f"{r['tensors_mb']:10.1f} | {1 - r['tensors_mb'] / full['tensors_mb']:6.0%} | {r['peak_mb']:11.0f} | "
              f"{1 - r['peak_mb'] / full['peak_mb']:6.0%} | {r['seconds']:6.1f} |")


def demo_inputs(run: Path, root: Path) -> dict:
    """The demo run's SFT and reward models and its RL prompts."""
    for needed in ("sft", "rm", "tasks/rl_train.jsonl"):
        if not (run / needed).exists():
            sys.exit(f"{run}: expected {needed} (a finished `chatforge demo` run)")
    return {"policy": str(run / "sft"), "reward_model": str(run / "rm"),
            "prompts": str(run / "tasks" / "rl_train.jsonl")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Run by hand (not in the tests); the module docstring explains the figures.")
    p.add_argument("--run", help="a finished `chatforge demo` run: its SFT and reward models instead of random ones")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer size asked for (the corpus may give fewer)")
    p.add_argument("--rank", type=int, default=8, help="the LoRA rank")
    p.add_argument("--rollout-batch", type=int, default=16)
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)  # internal: run one configuration
    for hidden in ("--policy", "--reward-model", "--prompts", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}; {args.threads} threads; "
          f"load average {load_average()}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora_memory_") as tmp:
        root = Path(tmp)
        if args.run:
            inputs = demo_inputs(Path(args.run), root)
            print(f"models: {args.run}/sft and {args.run}/rm")
        else:
            made = make_inputs(root, args)
            inputs = {"policy": str(root / "sft"), "reward_model": str(root / "rm"), "prompts": made["prompts"]}
            print(f"models: {args.layers} layers, width {args.width}, {args.heads} heads, context {args.context}, "
                  f"vocab {made['vocab']} (random weights)")
        print(f"{args.rollout_batch} prompts x up to {args.max_new_tokens} new tokens, {args.ppo_epochs} epochs of "
              f"minibatches of {args.minibatch}; LoRA rank {args.rank} on c_attn, c_proj, c_fc\n")
        results = {}
        for name in CONFIGS:
            label = f"LoRA r={args.rank}" if name == "LoRA" else name
            results[label] = run_config(name, args, inputs, root)
            print(f"  {label}: done ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    print()
    print_table(results)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
