"""The RLHF proof: on held-out prompts of the built-in world, PPO from the SFT model raises the
program-checked score by more than its spread across seeds, with the KL to the SFT model bounded;
without the KL penalty (beta = 0) the policy games the reward model; DPO is reported beside them.

The slow test trains the demo's full pipeline (demo.FULL: pretraining, SFT, the reward model on
labelled SFT samples), then the demo's PPO (40 iterations) for three seeds, PPO with beta = 0 (80), and DPO
for 30 steps on 100 preference prompts. With the current recipe (SFT replaying pretraining text, a task
mix as rich in harmless requests as in harmful ones), the same pipeline's PPO scored 0.466, 0.436 and
0.471 over seeds 0-2 against SFT's 0.419 (2026-12-06, 2 cores of an Intel Xeon with AVX-512; KL 1.9-2.4).
With the recipe before it: 9 min 40 s; SFT 0.353, PPO 0.380 +- 0.005 (0.384, 0.374, 0.381; KL 2.3),
beta = 0 0.221 (RM -0.20 -> 0.82, KL 31), DPO 0.341. `chatforge demo --seeds 0 --seeds 1 --seeds 2`
runs the same comparison on a demo run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatforge import demo
from chatforge.train.config import PPOSettings
from chatforge.train.seeds import (
    SeedSettings,
    Verdict,
    compare_seeds,
    format_table,
    load_results,
    ppo_against_sft,
    save_results,
)

SEEDS = (0, 1, 2)
# nats per answer: the adaptive KL controller's target; the demo's PPO stays near 2 (step-by-step answers
# are long, and every token adds to an answer's KL)
KL_BOUND = PPOSettings.kl_target
# The demo's PPO (40 iterations) for the claim; beta = 0 for twice as long, because with the current recipe
# 40 iterations were not yet enough to game the reward model (checked 0.435 against SFT's 0.419, KL 4.8)
# while 80 were (checked 0.030, KL 53); DPO only has to train and move the policy here, so 30 steps on 100
# preference prompts
SETTINGS = SeedSettings(dpo_steps=30, dpo_prompts=100, beta0_steps=80)


def train_and_compare(run: str) -> None:
    """The demo's pipeline up to the reward model, then the comparison, into RUN/seeds/results.json."""
    run_dir, budget = Path(run), demo.FULL
    corpus = demo.make_corpus(run_dir, budget)
    tokenizer = demo.make_tokenizer(run_dir, corpus, budget)
    demo.pretrain(run_dir, demo.make_shards(run_dir, corpus, tokenizer), budget)
    tasks = demo.make_tasks(run_dir, budget)
    demo.sft(run_dir, tasks, budget)
    demo.reward_model(run_dir, demo.label_sft_samples(run_dir, tasks, budget), budget)
    figures = ppo_against_sft(run_dir, SEEDS, once=["ppo-beta0", "dpo"], settings=SETTINGS)
    save_results(run_dir, figures, SEEDS, SETTINGS)
    print(format_table(figures))  # shown with -s, and in the failure report


def test_the_verdict_compares_the_mean_gain_with_the_spread_and_the_worst_seed() -> None:
    sft = [{"score": 0.30, "rm": 0.0, "kl": 0.0}]
    steady = {"sft": sft, "ppo": [{"score": s, "rm": 0.0, "kl": 1.0} for s in (0.33, 0.34, 0.35)]}
    v = Verdict.of(steady)
    assert v.gain == pytest.approx(0.04) and v.spread == pytest.approx(0.01) and v.worst_gain == pytest.approx(0.03)
    assert v.beyond_noise
    noisy = {"sft": sft, "ppo": [{"score": s, "rm": 0.0, "kl": 1.0} for s in (0.25, 0.34, 0.43)]}
    assert Verdict.of(noisy).spread == pytest.approx(0.09) and not Verdict.of(noisy).beyond_noise
    one_below = {"sft": sft, "ppo": [{"score": s, "rm": 0.0, "kl": 1.0} for s in (0.29, 0.40, 0.41)]}
    v = Verdict.of(one_below)
    assert v.gain > v.spread and not v.beyond_noise  # a seed below SFT is not a proof


def test_settings_name_each_runs_directory_by_what_differs_from_the_defaults(tmp_path) -> None:
    assert SeedSettings().out_dir(tmp_path, "ppo", 2) == tmp_path / "seeds" / "ppo-2"
    assert SeedSettings(beta=0.3).out_dir(tmp_path, "ppo-beta0", 0) == tmp_path / "seeds" / "ppo-beta0-0"
    both = SeedSettings(beta=0.3, rollout_batch=64)
    assert both.out_dir(tmp_path, "ppo", 1) == tmp_path / "seeds" / "ppo-beta0.3-r64-1"
    assert SeedSettings(temperature=0.7).out_dir(tmp_path, "dpo", 0) == tmp_path / "seeds" / "dpo-0"
    assert SeedSettings(dpo_prompts=100).out_dir(tmp_path, "dpo", 1) == tmp_path / "seeds" / "dpo-p100-1"
    assert SeedSettings(dpo_prompts=100).out_dir(tmp_path, "ppo", 1) == tmp_path / "seeds" / "ppo-1"
    longer = SeedSettings(beta0_steps=80)  # only beta = 0 trains longer, and its directory says so
    assert longer.out_dir(tmp_path, "ppo-beta0", 0) == tmp_path / "seeds" / "ppo-beta0-i80-0"
    assert longer.out_dir(tmp_path, "ppo", 0) == tmp_path / "seeds" / "ppo-0"


def test_an_unknown_method_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown method.*'sac'"):
        compare_seeds(tmp_path, [0], ["ppo", "sac"])


@pytest.mark.slow
def test_ppo_beats_sft_beyond_seed_noise_and_without_the_kl_penalty_games_the_reward_model(tmp_path) -> None:
    # In a fresh interpreter, as `chatforge demo` runs: inside the suite's process, after the other tests,
    # pretraining came out with other weights (a state an earlier test leaves; not found yet), and the
    # claim is about what users get
    run = tmp_path / "demo"
    subprocess.run([sys.executable, "-c", f"import test_rlhf_proof as t; t.train_and_compare({str(run)!r})"],
                   cwd=Path(__file__).parent, check=True)
    figures = {method: record["figures"] for method, record in load_results(run).items()}

    verdict = Verdict.of(figures)
    assert verdict.beyond_noise, verdict
    assert all(r["kl"] < KL_BOUND for r in figures["ppo"]), figures["ppo"]
    # beta = 0: the reward model's score rises over SFT's while the checked score falls below SFT's or the
    # policy drifts far from the SFT model (measured on the demo run: checked 0.419 -> 0.030, KL 53)
    sft, hacked = figures["sft"][0], figures["ppo-beta0"][0]
    assert hacked["rm"] > sft["rm"] and all(r["rm"] > sft["rm"] for r in figures["ppo"])
    assert hacked["score"] < sft["score"] or hacked["kl"] > 3 * max(r["kl"] for r in figures["ppo"])
    assert figures["dpo"][0]["kl"] > 0  # DPO trained and moved the policy; its score is reported, not claimed
