"""PPO's memory options against the default, one PPO iteration each, on the CPU.

    python benchmarks/bench_ppo.py                          # 6 layers, width 384, 2 threads
    python benchmarks/bench_ppo.py --threads 1              # on a machine where other processes run
    python benchmarks/bench_ppo.py --layers 2 --width 128   # a quick look

A full run takes about 2 minutes on 2 cores (110 s with --threads 1 beside another busy process;
2 threads sharing the machine with one took 7 minutes and gave timings worth nothing).

What is measured. The script makes everything in a temporary directory, downloading nothing: the
built-in world's corpus (half a megabyte) and a byte-level BPE tokenizer trained on it, the built-in
RL prompts, and an "SFT" policy and a reward model with random weights of the stated size (speed
and memory do not depend on what the weights are). Each configuration then runs in a fresh
process, so one's peak memory cannot hide another's:

    baseline      --frozen-dtype float32, a separate value model (the defaults)
    bf16 frozen   --frozen-dtype bfloat16: reference and reward model in bf16
    shared head   --shared-value-head: the value head on the policy's trunk
    both          the two together

Each process builds the models and the trainer as `chatforge ppo` does (`build_models`,
`fit_prompts`, `PPOStep`) and runs `--warmup` untimed PPO iterations, then `--iterations` timed
ones, calling `PPOStep.run` directly (no evaluation, no checkpoint). Figures are means over
the timed iterations:

- rollout tokens/s: generated answer tokens / the rollout's wall time, where the rollout is the
  sampling through the engine plus the scoring passes that turn answers into experience (old
  log-probs and values, reference log-probs, reward-model scores). Sampling runs the policy only,
  so it is the same work in every configuration; the options act on the scoring.
- update tokens/s: tokens (prompt + answer, padding excluded) times `--ppo-epochs`, over the wall
  time of the PPO epochs (forward, backward and AdamW step of every minibatch).
- peak RSS: `ru_maxrss` of the process, its whole life (imports, models, the iterations); "above
  start" subtracts the RSS just after the imports, leaving what the PPO run itself added. The
  engine's KV cache has one slot per prompt of the rollout (`val_prompts` is set to
  `--rollout-batch`: nothing is evaluated), the same in every configuration.

The ratio columns divide each configuration's figure by the baseline's from the same run (for
tokens/s above 1 is faster, for memory below 1 is smaller). The machine line gives the CPU, and
each row the share of the machine's CPU time other processes used while it was timed: on a
shared 2-core machine that share slows a 2-thread job by far more than itself, so read the
timings of a row with a large share with care; peak memory does not depend on it.
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

from machine import cpu_model, cpu_ticks, load_average  # benchmarks/machine.py

CONFIGS = {  # name: PPOSettings fields
    "baseline": {},
    "bf16 frozen": {"frozen_dtype": "bfloat16"},
    "shared head": {"shared_value_head": True},
    "both": {"frozen_dtype": "bfloat16", "shared_value_head": True},
}

QUIET = 0.05  # other processes' share of the CPU under which a row's timings are trusted
RUN_SETTINGS = ("rollout_batch", "minibatch", "ppo_epochs", "max_new_tokens", "warmup", "iterations", "threads")


# ---- the inputs, made once in the parent ------------------------------------------------------------


def make_inputs(root: Path, args) -> dict:
    """Tokenizer, RL prompts, and random-weight policy and reward-model checkpoints under root."""
    import torch

    from chatforge.checkpoint import save_checkpoint
    from chatforge.data.readers import iter_documents
    from chatforge.data.tasks import write_tasks
    from chatforge.data.world import World, write_corpus
    from chatforge.model import GPT, GPTConfig, ScalarHeadModel
    from chatforge.tokenizer import Tokenizer

    corpus = write_corpus(root / "corpus.jsonl", num_bytes=500_000)
    tokenizer = Tokenizer.train(iter_documents([corpus]), vocab_size=args.vocab)
    prompts = write_tasks(root / "tasks", World.build(seed=0), seed=0)["rl_train"]
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=args.context, n_layer=args.layers,
                       n_head=args.heads, n_embd=args.width)
    torch.manual_seed(0)
    save_checkpoint(root / "sft", GPT(config), tokenizer=tokenizer)
    save_checkpoint(root / "rm", ScalarHeadModel(GPT(config)), tokenizer=tokenizer)
    return {"prompts": str(prompts), "vocab": tokenizer.vocab_size}


# ---- one configuration, in its own process ----------------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def wrap_timed(trainer, name: str, totals: dict[str, float], last: dict) -> None:
    """Replace trainer.<name> by a version that adds its wall time to totals[name] and keeps its result."""
    method = getattr(trainer, name)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = method(*a, **kw)
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
        last[name] = out
        return out

    setattr(trainer, name, timed)


def worker(args) -> dict:
    """Run warm-up and timed PPO iterations of one configuration; return its figures."""
    import torch

    from chatforge.chat import ChatTemplate
    from chatforge.data.chat_readers import read_prompts
    from chatforge.train.config import PPOConfig, PPOSettings, TrainConfig
    from chatforge.train.distributed import DistInfo
    from chatforge.train.ppo import PPOStep, build_models
    from chatforge.train.rollout import fit_prompts, reward_model_scores

    torch.set_num_threads(args.threads)
    start_rss = rss_mb()
    root = Path(args.root)
    settings = PPOSettings(rollout_batch=args.rollout_batch, minibatch=args.minibatch, ppo_epochs=args.ppo_epochs,
                           max_new_tokens=args.max_new_tokens, val_prompts=args.rollout_batch,  # engine slots
                           **CONFIGS[args.worker])
    cfg = PPOConfig(prompts=[args.prompts], policy=str(root / "sft"), reward_model=str(root / "rm"),
                    out=str(root / "runs" / args.worker.replace(" ", "_")), ppo=settings,
                    train=TrainConfig(max_steps=args.warmup + args.iterations, batch_size=1, lr=1e-5, warmup_steps=0,
                                      weight_decay=0.0, progress=False))
    dist = DistInfo()
    torch.manual_seed(0)
    model, reference, rm, tokenizer = build_models(cfg, dist.device)
    prompts = fit_prompts(read_prompts(cfg.prompts).messages, cfg.prompts, "--prompts", ChatTemplate(tokenizer),
                          model.policy.config.context_length, settings.max_new_tokens)
    trainer = PPOStep(model, reference, reward_model_scores(rm), tokenizer, prompts, [], settings, cfg.train, dist)
    for step in range(args.warmup):
        trainer.run(step)
    totals: dict[str, float] = {}
    last: dict = {}
    for name in ("rollout", "score_rollout", "optimize"):
        wrap_timed(trainer, name, totals, last)
    generated = tokens = 0
    busy0, mine0 = cpu_ticks()
    t0 = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.iterations):
        trainer.run(step)
        generated += int(last["rollout"].mask.sum())
        tokens += int(last["rollout"].lengths.sum())
    seconds = time.perf_counter() - t0
    busy1, mine1 = cpu_ticks()
    capacity = seconds * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    rollout_s = totals["rollout"] + totals["score_rollout"]
    return {"rollout_tok_s": generated / rollout_s, "update_tok_s": tokens * args.ppo_epochs / totals["optimize"],
            "sample_s": totals["rollout"] / args.iterations, "score_s": totals["score_rollout"] / args.iterations,
            "update_s": totals["optimize"] / args.iterations,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "start_mb": start_rss,
            "others": max(0.0, (busy1 - busy0) - (mine1 - mine0)) / capacity,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


# ---- the parent: inputs, one process per configuration, the table ---------------------------------------


def run_config(name: str, args, inputs: dict, root: Path) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--root", str(root), "--prompts", inputs["prompts"]]
    command += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in RUN_SETTINGS]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: dict[str, dict]) -> None:
    base = results["baseline"]
    print(f"| {'configuration':<13} | {'rollout tok/s':>13} | {'x base':>6} | {'update tok/s':>12} | {'x base':>6} | "
          f"{'peak RSS MB':>11} | {'x base':>6} | {'above start MB':>14} | {'x base':>6} | {'others CPU':>10} |")
    print(f"|{'-' * 15}|{'-' * 14}:|{'-' * 7}:|{'-' * 13}:|{'-' * 7}:|{'-' * 12}:|{'-' * 7}:|{'-' * 15}:|{'-' * 7}:|"
          f"{'-' * 11}:|")
    for name, r in results.items():
        above, base_above = r["peak_mb"] - r["start_mb"], base["peak_mb"] - base["start_mb"]
        print(f"| {name:<13} | {r['rollout_tok_s']:13.1f} | {r['rollout_tok_s'] / base['rollout_tok_s']:6.2f} | "
              f"{r['update_tok_s']:12.1f} | {r['update_tok_s'] / base['update_tok_s']:6.2f} | {r['peak_mb']:11.0f} | "
              f"{r['peak_mb'] / base['peak_mb']:6.2f} | {above:14.0f} | {above / base_above:6.2f} | "
              f"{r['others']:10.0%} |")
    print("\nseconds per iteration (sampling / scoring / update), trained parameters:")
    for name, r in results.items():
        print(f"  {name:<13} {r['sample_s']:6.2f} / {r['score_s']:5.2f} / {r['update_s']:6.2f} s, "
              f"{r['params_m']:.1f}M trained")
    busiest = max(r["others"] for r in results.values())
    if busiest > QUIET:
        print(f"\nWARNING: other processes used up to {busiest:.0%} of the CPU while rows were timed, so the "
              "tokens/s figures are unreliable (threads of one job stall each other whenever one is descheduled); "
              "rerun on a quiet machine. Peak memory does not depend on it.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Run by hand (not in the tests); the module docstring explains the figures.")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048, help="tokenizer size asked for (the corpus may give fewer)")
    p.add_argument("--rollout-batch", type=int, default=16, help="prompts answered per iteration")
    p.add_argument("--minibatch", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--warmup", type=int, default=1, help="untimed PPO iterations first")
    p.add_argument("--iterations", type=int, default=1, help="timed PPO iterations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="configurations to run (baseline is always run: the ratios need it)")
    p.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)  # internal: run one configuration
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--prompts", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); torch {torch.__version__}; {args.threads} threads")
    print(f"load average at start: {load_average()}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        root = Path(tmp)
        inputs = make_inputs(root, args)
        print(f"model: {args.layers} layers, width {args.width}, {args.heads} heads, context {args.context}, "
              f"vocab {inputs['vocab']} (random weights); {args.rollout_batch} prompts x up to {args.max_new_tokens} "
              f"new tokens, {args.ppo_epochs} epochs of minibatches of {args.minibatch}; {args.warmup} warm-up + "
              f"{args.iterations} timed iteration(s) per configuration, each in its own process\n")
        results = {}
        for name in ["baseline"] + [c for c in args.configs if c != "baseline"]:
            results[name] = run_config(name, args, inputs, root)
            print(f"  {name}: done ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    print()
    print_table(results)
    print(f"\nload average at end: {load_average()}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
