"""How strong must the watermark be on the demo's model? delta against detection and the checked score.

    python benchmarks/watermark_strength.py --run runs/demo                       # deltas 1 2 4 8, the PPO model
    python benchmarks/watermark_strength.py --run runs/demo --stage sft --deltas 2 4 --scheme selfhash

Needs a finished `chatforge demo` run directory. The model answers the held-out prompts of six
families greedily (`chatforge.detect.measure`), once plain and once per delta; each answer is scored
with its prompt as context, and documents pool the green counts of `--group` answers. It prints,
per delta: the checked score of the watermarked answers, the share of single answers and of
documents found watermarked (z > 4), their mean z, and the share of plain documents flagged (the
false positives). Results go in the README.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from chatforge.checkpoint import load_checkpoint
from chatforge.data.world import World
from chatforge.detect.measure import DetectionSettings, answer, checked_scores, plain_tasks, watermark_figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--stage", default="ppo")
    parser.add_argument("--deltas", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--scheme", choices=["lefthash", "selfhash"], default="lefthash")
    parser.add_argument("--context-width", type=int, default=1)
    parser.add_argument("--group", type=int, default=4)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.run / args.stage)
    world = World.load(args.run / "corpus" / "world.json")
    settings = DetectionSettings(group=args.group)
    tasks = plain_tasks(world, settings.families)
    plain_texts, plain_ids = answer(ckpt, tasks, settings, None)
    human = [t.answer if isinstance(t.answer, str) else "" for t in tasks]
    print(f"{len(tasks)} prompts; plain answers' checked score {checked_scores(world, tasks, plain_texts):.3f}")
    print("delta | checked score | answers found | mean z | documents found | mean z | plain documents flagged")
    for delta in args.deltas:
        run = replace(settings, delta=delta)
        config = replace(run.watermark(), seeding_scheme=args.scheme, context_width=args.context_width)
        texts, ids = answer(ckpt, tasks, run, config)
        figures = watermark_figures(ckpt, tasks, ids, plain_ids, human, run, config)
        marked = figures["watermarked"]
        row = [f"{delta:g}", f"{checked_scores(world, tasks, texts):.3f}", f"{marked['answers']['detected']:.1%}",
               f"{marked['answers']['mean_z']:.2f}", f"{marked['documents']['detected']:.1%}",
               f"{marked['documents']['mean_z']:.2f}", f"{figures['plain']['documents']['detected']:.1%}"]
        print(" | ".join(row))
        with open(args.run / "watermark_strength.jsonl", "a") as out:
            out.write(json.dumps({"delta": delta, **figures}) + "\n")


if __name__ == "__main__":
    main()
