"""Fact knowledge of each stage's model, by lm-evaluation-harness through our API and in-process, side by side.

    python benchmarks/lm_eval_facts.py --world runs/demo/corpus/world.json runs/demo/pretrain runs/demo/sft \\
        runs/demo/ppo runs/demo/dpo
    python benchmarks/lm_eval_facts.py --world runs/demo/corpus/world.json runs/demo/ppo --json facts.json

Alignment should keep what pretraining learned. Every fact of the world becomes a multiple-choice item
("The capital of Veloria is" with the right city among three wrong ones, `chatforge.knowledge`); each
checkpoint is served by the OpenAI-compatible server in-process and lm-evaluation-harness scores the
items through it (`local-completions`, log-likelihoods from echoed prompt logprobs, tokenized with the
checkpoint's exported Hugging Face tokenizer, nothing downloaded). The same items are scored in-process
by `fact_knowledge`: the two must agree (the max |difference| of the per-choice log-likelihoods is shown).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from chatforge.checkpoint import export_hf, load_checkpoint
from chatforge.data.world import World
from chatforge.generate.engine import Engine
from chatforge.knowledge import TARGET_DELIMITER, fact_choices, fact_knowledge, loglikelihoods, write_lm_eval_task
from chatforge.serve.app import ServeConfig, create_app
from chatforge.serve.server import ServerThread

TASK = "chatforge_facts"


def offline(cache: Path) -> None:
    """Switch every Hugging Face download off before lm_eval (and datasets) are imported."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def measure(checkpoint: Path, world: World, task_dir: Path, work: Path, args: argparse.Namespace) -> dict:
    """lm-eval's and our figures for one checkpoint, and how far apart their log-likelihoods are."""
    import lm_eval.evaluator
    from lm_eval.tasks import TaskManager

    ckpt = load_checkpoint(checkpoint)
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    name = checkpoint.name if checkpoint.name != "checkpoint" else checkpoint.parent.name
    hf_dir = export_hf(model, tok, work / f"hf-{name}")  # lm-eval tokenizes as we do
    app = create_app(Engine(model, tok, max_batch_size=args.batch_size), ServeConfig(model_name=name, web=False))
    start = time.perf_counter()
    with ServerThread(app) as server:
        out = lm_eval.evaluator.simple_evaluate(
            model="local-completions",
            model_args={"model": name, "base_url": server.url + "/v1/completions", "tokenizer": str(hf_dir),
                        "tokenizer_backend": "huggingface", "max_retries": 1, "batch_size": args.batch_size,
                        "max_length": model.config.context_length},
            tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
            log_samples=True, num_fewshot=0, bootstrap_iters=0)
    lm_eval_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = fact_knowledge(model, tok, world, args.num_choices, args.seed)
    ours_s = time.perf_counter() - start
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    theirs_ll = [resp[0][0] for s in samples for resp in s["resps"]]
    items = fact_choices(world, args.num_choices, args.seed)
    ours_ll = loglikelihoods(model, tok, [(i.context, TARGET_DELIMITER + c) for i in items for c in i.choices])
    if len(theirs_ll) != len(ours_ll):
        raise SystemExit(f"{checkpoint}: lm-eval scored {len(theirs_ll)} choices, we scored {len(ours_ll)}")
    results = out["results"][TASK]
    return {"checkpoint": str(checkpoint), "name": name, "n": ours["n"], "chance": ours["chance"],
            "lm_eval": {"acc": results["acc,none"], "acc_norm": results["acc_norm,none"], "seconds": lm_eval_s},
            "in_process": {"acc": ours["acc"], "acc_norm": ours["acc_norm"], "seconds": ours_s},
            "max_abs_ll_diff": max(abs(a - b) for a, b in zip(theirs_ll, ours_ll))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint or stage directories (RUN/pretrain …)")
    ap.add_argument("--world", required=True, type=Path, help="the world the models learned (RUN/corpus/world.json)")
    ap.add_argument("--num-choices", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="which wrong values, and where the right one goes")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per API request, and engine slots")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    world = World.load(args.world)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lm-eval-facts-") as tmp:
        work = Path(tmp)
        offline(work / "hf-datasets-cache")
        task_dir = write_lm_eval_task(world, work / "tasks", TASK, args.num_choices, args.seed)
        for checkpoint in args.checkpoints:
            rows.append(measure(checkpoint, world, task_dir, work, args))
    n, chance = rows[0]["n"], rows[0]["chance"]
    print(f"\nfact knowledge: {n} facts of {args.world}, {args.num_choices} choices (chance {chance:.3f})")
    print(f"{'checkpoint':<12} {'lm-eval acc':>11} {'acc_norm':>9} {'ours acc':>9} {'acc_norm':>9} "
          f"{'max|Δll|':>9} {'lm-eval s':>9} {'ours s':>7}")
    for r in rows:
        le, us = r["lm_eval"], r["in_process"]
        print(f"{r['name']:<12} {le['acc']:>11.3f} {le['acc_norm']:>9.3f} {us['acc']:>9.3f} {us['acc_norm']:>9.3f} "
              f"{r['max_abs_ll_diff']:>9.1e} {le['seconds']:>9.1f} {us['seconds']:>7.1f}")
    if args.json:
        args.json.write_text(json.dumps({"world": str(args.world), "num_choices": args.num_choices,
                                         "seed": args.seed, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
