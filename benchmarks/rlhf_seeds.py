"""Does RLHF help, beyond seed noise? PPO (beta > 0 and beta = 0) and DPO from a demo's SFT model, several seeds.

    python benchmarks/rlhf_seeds.py --run runs/demo                 # seeds 0 1 2
    python benchmarks/rlhf_seeds.py --run runs/demo --seeds 0 1 2 3 --ppo-steps 40

Needs a finished `chatforge demo` run directory (its sft/, rm/ and tasks/). For each seed it trains
PPO with the demo's settings (adaptive beta from 0.1), PPO with beta = 0 (no KL penalty: free to
hack the reward model), and DPO, each from the same SFT model, into RUN/seeds/<method>-<seed>/;
then every model answers the held-out prompts greedily and the world's scorer judges them. It
prints, per method: the checked score (mean ± std over seeds), its difference to SFT, the reward
model's mean score of the same answers, and the mean KL to the SFT model per answer
(sum over answer tokens of log pi - log pi_sft, on the greedy answers). The SFT model is
deterministic under greedy decoding, so its figure has no spread. Results go in the README.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from chatforge.chat import ChatTemplate
from chatforge.checkpoint import load_checkpoint
from chatforge.data.chat_readers import read_prompts
from chatforge.data.tasks import Scorer
from chatforge.data.world import World
from chatforge.evaluate import generate_answers
from chatforge.train.distributed import DistInfo
from chatforge.train.dpo import DPOConfig, run_dpo
from chatforge.train.loop import TrainConfig
from chatforge.train.ppo import PPOConfig, PPOSettings, make_rollout, response_logprobs, run_ppo
from chatforge.train.reward import score_texts


def train_ppo(run: Path, out: Path, seed: int, steps: int, beta: float, temperature: float = 1.0,
              ptx_coef: float = 0.0, rollout_batch: int = PPOSettings.rollout_batch) -> None:
    if (out / "checkpoint" / "trainer_state.json").exists():
        return
    cfg = PPOConfig(prompts=[str(run / "tasks/rl_train.jsonl")], val=[str(run / "tasks/rl_val.jsonl")],
                    policy=str(run / "sft"), reward_model=str(run / "rm"), out=str(out),
                    ppo=PPOSettings(init_kl_coef=beta, adaptive_kl=beta > 0, temperature=temperature,
                                    rollout_batch=rollout_batch, ptx_coef=ptx_coef,
                                    ptx_data=str(run / "data") if ptx_coef else ""),
                    train=TrainConfig(max_steps=steps, batch_size=1, lr=3e-5, warmup_steps=0, min_lr_ratio=1.0,
                                      weight_decay=0.0, eval_every=steps, save_every=steps, seed=seed, progress=False))
    run_ppo(cfg, DistInfo())


def train_dpo(run: Path, out: Path, seed: int, steps: int) -> None:
    if (out / "checkpoint" / "trainer_state.json").exists():
        return
    cfg = DPOConfig(data=[str(run / "tasks/prefs_train.jsonl")], val=[str(run / "tasks/prefs_val.jsonl")],
                    init_from=str(run / "sft"), out=str(out),
                    train=TrainConfig(max_steps=steps, batch_size=16, lr=5e-5, warmup_steps=10, weight_decay=0.0,
                                      eval_every=steps, save_every=steps, seed=seed, progress=False))
    run_dpo(cfg, DistInfo())


@torch.no_grad()
def judge(run: Path, model_dir: Path, world: World, sft, rm) -> dict[str, float]:
    """Checked score, RM score and KL to the SFT model of the greedy answers to the held-out prompts."""
    ckpt = load_checkpoint(model_dir)
    prompts = [r.messages for r in read_prompts([str(run / "tasks/eval.jsonl")]).prompts]
    texts = [text for text, _ in generate_answers(ckpt, prompts, max_tokens=48, batch_size=32)]
    scorer, template = Scorer(world), ChatTemplate(ckpt.tokenizer)
    checked = [scorer.score(p, t).value for p, t in zip(prompts, texts)]
    rm_scores = score_texts(rm, template, prompts, texts)
    kls = []
    model = ckpt.model.eval()
    for p, t in zip(prompts, texts):
        r = make_rollout([template.generation_prompt(p)], [ckpt.tokenizer.encode(t) + [template.end_id]], [True],
                         template.eot_id)
        ids = r.ids[:, -model.config.context_length :]
        mask = r.mask[:, -(ids.shape[1] - 1) :]
        kls.append(float(((response_logprobs(model(ids), ids, 1.0) - response_logprobs(sft(ids), ids, 1.0))
                          * mask).sum()))
    return {"score": statistics.fmean(checked), "rm": statistics.fmean(rm_scores), "kl": statistics.fmean(kls)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a finished `chatforge demo` directory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ppo-steps", type=int, default=40)
    ap.add_argument("--dpo-steps", type=int, default=150)
    ap.add_argument("--temperature", type=float, default=PPOSettings.temperature,
                    help="PPO's rollout temperature (also the one its log-probs are recomputed at)")
    ap.add_argument("--beta", type=float, default=PPOSettings.init_kl_coef,
                    help="the KL coefficient PPO starts from (method ppo; ppo-beta0 always uses 0)")
    ap.add_argument("--ptx-coef", type=float, default=0.0,
                    help="PPO's pretraining-loss weight, on the run's own token shards (RUN/data)")
    ap.add_argument("--rollout-batch", type=int, default=PPOSettings.rollout_batch,
                    help="answers PPO samples per iteration")
    ap.add_argument("--methods", nargs="+", default=["ppo", "ppo-beta0", "dpo"], choices=["ppo", "ppo-beta0", "dpo"])
    args = ap.parse_args()
    torch.set_num_threads(2)

    run, world = args.run, World.load(args.run / "corpus/world.json")
    sft = load_checkpoint(run / "sft").model.eval()
    rm = load_checkpoint(run / "rm").model.eval()
    figures: dict[str, list[dict]] = {"sft": [judge(run, run / "sft", world, sft, rm)]}
    for seed in args.seeds:
        for method in args.methods:
            tag = "" if method == "dpo" or args.temperature == PPOSettings.temperature else f"-t{args.temperature:g}"
            tag += f"-ptx{args.ptx_coef:g}" if method != "dpo" and args.ptx_coef else ""
            tag += f"-beta{args.beta:g}" if method == "ppo" and args.beta != PPOSettings.init_kl_coef else ""
            if method != "dpo" and args.rollout_batch != PPOSettings.rollout_batch:
                tag += f"-r{args.rollout_batch}"
            out = run / "seeds" / f"{method}{tag}-{seed}"
            if method == "dpo":
                train_dpo(run, out, seed, args.dpo_steps)
            else:
                train_ppo(run, out, seed, args.ppo_steps, beta=args.beta if method == "ppo" else 0.0,
                          temperature=args.temperature, ptx_coef=args.ptx_coef, rollout_batch=args.rollout_batch)
            figures.setdefault(method, []).append(judge(run, out, world, sft, rm))
            print(f"{method} seed {seed}: {figures[method][-1]}", flush=True)

    base = figures["sft"][0]["score"]
    print(f"\nseeds {args.seeds}; PPO {args.ppo_steps} steps of {args.rollout_batch} answers at temperature "
          f"{args.temperature:g}, ptx "
          f"{args.ptx_coef:g}, DPO {args.dpo_steps} "
          f"steps; held-out prompts of {run}")
    print(f"{'method':<10} {'checked score':>22} {'vs SFT':>8} {'RM score':>16} {'KL to SFT':>16}")
    for method, rows in figures.items():
        delta = statistics.fmean(r["score"] for r in rows) - base
        print(f"{method:<10} {stat(rows, 'score'):>22} {delta:>+8.3f} {stat(rows, 'rm'):>16} {stat(rows, 'kl'):>16}")


def stat(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}"


if __name__ == "__main__":
    main()
