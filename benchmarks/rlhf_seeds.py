"""Does RLHF help, beyond seed noise? PPO (beta > 0 and beta = 0), GRPO, RLOO and DPO from a demo's SFT model.

    python benchmarks/rlhf_seeds.py --run runs/demo                 # seeds 0 1 2; ppo, ppo-beta0, dpo
    python benchmarks/rlhf_seeds.py --run runs/demo --seeds 0 1 2 3 --ppo-steps 40
    python benchmarks/rlhf_seeds.py --run runs/demo --methods ppo grpo rloo
    python benchmarks/rlhf_seeds.py --run runs/demo --methods grpo rloo --group-reward verifier

Needs a finished `chatforge demo` run directory (its sft/, rm/ and tasks/). For each seed it trains
PPO with the demo's settings (adaptive beta from 0.1), PPO with beta = 0 (no KL penalty: free to
hack the reward model), and DPO, each from the same SFT model, into RUN/seeds/<method>-<seed>/
(`--methods` adds GRPO and RLOO: the same iterations and learning rate as PPO, 32 answers an
iteration, rewarded by the reward model or, with `--group-reward`, the verifier);
then every model answers the held-out prompts greedily and the world's scorer judges them. It
prints, per method: the checked score (mean ± std over seeds), its difference to SFT, the reward
model's mean score of the same answers, and the mean KL to the SFT model per answer
(sum over answer tokens of log pi - log pi_sft, on the greedy answers), and whether PPO's gain is
beyond the seeds' spread. The SFT model is deterministic under greedy decoding, so its figure has
no spread. The figures also go to RUN/seeds/results.json. The work is `chatforge.train.seeds`,
which `tests/test_rlhf_proof.py` runs on a freshly trained demo run. Results go in the README.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from chatforge.train.config import REWARD_SOURCES
from chatforge.train.seeds import METHODS, SeedSettings, Verdict, compare_seeds, format_table


def main() -> None:
    d = SeedSettings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a finished `chatforge demo` directory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ppo-steps", type=int, default=d.ppo_steps)
    ap.add_argument("--dpo-steps", type=int, default=d.dpo_steps)
    ap.add_argument("--dpo-beta", type=float, default=d.dpo_beta)
    ap.add_argument("--rpo-alpha", type=float, default=d.rpo_alpha,
                    help="DPO's weight of the chosen answer's NLL (0: plain DPO)")
    ap.add_argument("--temperature", type=float, default=d.temperature,
                    help="the rollout temperature of PPO, GRPO and RLOO (also the one their log-probs are "
                         "recomputed at)")
    ap.add_argument("--beta", type=float, default=d.beta,
                    help="the KL coefficient PPO starts from (method ppo; ppo-beta0 always uses 0)")
    ap.add_argument("--ptx-coef", type=float, default=d.ptx_coef,
                    help="PPO's pretraining-loss weight, on the run's own token shards (RUN/data)")
    ap.add_argument("--rollout-batch", type=int, default=d.rollout_batch, help="answers PPO samples per iteration")
    ap.add_argument("--methods", nargs="+", default=["ppo", "ppo-beta0", "dpo"], choices=list(METHODS))
    ap.add_argument("--group-reward", default=d.group_reward, choices=list(REWARD_SOURCES),
                    help="GRPO's and RLOO's reward: the reward model, the verifier, or both")
    args = ap.parse_args()
    torch.set_num_threads(2)

    settings = SeedSettings(ppo_steps=args.ppo_steps, dpo_steps=args.dpo_steps, beta=args.beta,
                            temperature=args.temperature, ptx_coef=args.ptx_coef, rollout_batch=args.rollout_batch,
                            group_reward=args.group_reward, dpo_beta=args.dpo_beta, rpo_alpha=args.rpo_alpha)
    figures = compare_seeds(args.run, args.seeds, args.methods, settings, log=lambda line: print(line, flush=True))
    print(f"\nseeds {args.seeds}; PPO {args.ppo_steps} steps of {args.rollout_batch} answers at temperature "
          f"{args.temperature:g}, ptx {args.ptx_coef:g}, DPO {args.dpo_steps} steps; held-out prompts of {args.run}")
    print(format_table(figures))
    for method in ("ppo", "grpo", "rloo"):
        if method in figures:
            v = Verdict.of(figures, method)
            print(f"\n{method.upper()} vs SFT: {v.gain:+.3f} (worst seed {v.worst_gain:+.3f}), spread across seeds "
                  f"{v.spread:.3f} -> {'beyond' if v.beyond_noise else 'within'} seed noise")


if __name__ == "__main__":
    main()
