"""Does the reward model pick better answers among the policy's own samples? Best-of-n, judged by the scorer.

    python benchmarks/rm_best_of_n.py --run runs/demo                       # the demo's sft/ and rm/
    python benchmarks/rm_best_of_n.py --run runs/demo --rm other/rm --n 8 --temperature 0.8

PPO can only be as good as the reward model is on the policy's own samples, not on the rule-made
rankings it was trained on. This measures that directly: the SFT model samples n answers to each
held-out prompt of a finished `chatforge demo` run, the reward model picks its favourite, and the
world's scorer judges the pick. If the checked score does not rise with n, PPO against this reward
model has nothing to climb (and rising RM scores during PPO are reward hacking). It also prints the
oracle (the scorer's own best of n: the headroom) and how often the reward model orders two samples
of different checked score the way the scorer does.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from chatforge.chat import ChatTemplate
from chatforge.checkpoint import load_checkpoint
from chatforge.data.chat_readers import read_prompts
from chatforge.data.tasks import Scorer
from chatforge.data.world import World
from chatforge.train.reward import sample_answers, score_texts


def by_family(values: list[float], families: list[str]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for v, f in zip(values, families):
        groups[f].append(v)
        groups["all"].append(v)
    return {f: statistics.fmean(v) for f, v in groups.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a finished `chatforge demo` directory")
    ap.add_argument("--rm", type=Path, help="reward model (default: RUN/rm)")
    ap.add_argument("--policy", type=Path, help="policy that samples (default: RUN/sft)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    records = read_prompts([str(args.run / "tasks/eval.jsonl")]).prompts
    prompts, families = [r.messages for r in records], [r.family for r in records]
    scorer = Scorer(World.load(args.run / "corpus/world.json"))
    policy = load_checkpoint(args.policy or args.run / "sft")
    rm = load_checkpoint(args.rm or args.run / "rm", tokenizer=False).model.eval()
    template = ChatTemplate(policy.tokenizer)

    samples = [sample_answers(policy, prompts, args.temperature, seed=1000 * k, max_tokens=48) for k in range(args.n)]
    with torch.no_grad():
        rewards = [score_texts(rm, template, prompts, s) for s in samples]
    checked = [[scorer.score(p, t).value for p, t in zip(prompts, s)] for s in samples]

    names = ["all", *sorted(set(families))]
    print(f"{len(prompts)} held-out prompts of {args.run}; {args.n} samples each at temperature {args.temperature}")
    print(f"{'pick':<14}" + "".join(f"{n:>11}" for n in names))
    sizes = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.n]
    for n in sizes:
        best = [max(range(n), key=lambda k, i=i: rewards[k][i]) for i in range(len(prompts))]
        row = by_family([checked[k][i] for i, k in enumerate(best)], families)
        print(f"{f'RM best of {n}':<14}" + "".join(f"{row[c]:>11.3f}" for c in names))
    oracle = by_family([max(checked[k][i] for k in range(args.n)) for i in range(len(prompts))], families)
    print(f"{'oracle':<14}" + "".join(f"{oracle[c]:>11.3f}" for c in names))

    agree = total = 0
    for i in range(len(prompts)):
        for a, b in itertools.combinations(range(args.n), 2):
            if checked[a][i] != checked[b][i]:
                total += 1
                agree += (rewards[a][i] - rewards[b][i]) * (checked[a][i] - checked[b][i]) > 0
    print(f"the RM orders {agree / max(total, 1):.1%} of {total} sample pairs of different checked score as the "
          "scorer does")


if __name__ == "__main__":
    main()
