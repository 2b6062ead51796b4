"""How many chat answers start with whitespace, decoded raw and as chatforge serves them.

    python benchmarks/chat_leading_space.py --run runs/demo                    # sft, ppo and dpo, T = 0.7
    python benchmarks/chat_leading_space.py --run runs/demo --temperature 0

A first token may carry a space (" Kesh"); the chat template renders a reply's content from its
first character, so the served answer drops that whitespace (`SamplingParams.strip_leading_whitespace`,
on in /v1/chat/completions, the web page and `chatforge chat`). This answers the run's held-out
prompts (`tasks/eval.jsonl`) at the web page's default temperature and counts answers that start
with whitespace both ways: the second count must be 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chatforge.chat import ChatTemplate, Message
from chatforge.checkpoint import load_checkpoint
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams


def count_leading_space(run: Path, stage: str, temperature: float, max_tokens: int) -> dict[bool, tuple[int, int]]:
    """{strip: (answers starting with whitespace, answers)} for one stage of the run."""
    records = [json.loads(line) for line in (run / "tasks" / "eval.jsonl").read_text().splitlines() if line]
    ckpt = load_checkpoint(run / stage)
    template = ChatTemplate(ckpt.tokenizer)
    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch_size=16, stop_token_ids=template.stop_ids)
    context = ckpt.model.config.context_length
    prompts = [template.generation_prompt([Message(m["role"], m["content"]) for m in r["prompt"]]) for r in records]
    counts = {}
    for strip in (False, True):
        params = [SamplingParams(max_tokens=min(max_tokens, context - len(ids)), temperature=temperature, seed=k,
                                 strip_leading_whitespace=strip) for k, ids in enumerate(prompts)]
        outputs = engine.generate(prompts, params)
        counts[strip] = (sum(o.outputs[0].text[:1].isspace() for o in outputs), len(outputs))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished `chatforge demo` run directory")
    parser.add_argument("--stages", nargs="+", default=["sft", "ppo", "dpo"])
    parser.add_argument("--temperature", type=float, default=0.7, help="the web page's default")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    for stage in args.stages:
        counts = count_leading_space(args.run, stage, args.temperature, args.max_tokens)
        (raw, n), (served, _) = counts[False], counts[True]
        print(f"{stage}: {raw} of {n} answers start with whitespace decoded raw, {served} as served")


if __name__ == "__main__":
    main()
