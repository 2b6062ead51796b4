"""The RLHF proof: on held-out prompts of the built-in world, PPO from the SFT model raises the
program-checked score by more than its spread across seeds, with the KL to the SFT model bounded;
without the KL penalty (beta = 0) the policy games the reward model; DPO is reported beside them.

The slow test trains the demo's pipeline at a smaller setting (`PROOF`: the full demo's recipe with a
model of width 128 instead of 192 and the reward model trained 100 steps instead of 150), then PPO
with the demo's settings for 30 iterations (the demo trains 40) for three seeds, PPO with beta = 0 for
as long, and DPO for 30 steps on 100 preference prompts. Measured on 2 cores of an Intel Xeon with
AVX-512 (2026-12-06), alone: about 6 min 30 s; SFT 0.307; PPO 0.375, 0.366, 0.395 (+0.072 +- 0.015,
the worst seed +0.059; KL 1.3-1.8); beta = 0 0.261 (the reward model's score 0.41 -> 1.10, KL 10.5);
DPO 0.306. On 2 cores of an AMD EPYC (AVX2, 2026-12-07), alone: 10.5 min (pretraining 147 s, PPO 55 s a
seed); SFT 0.306; PPO 0.349, 0.333, 0.389 (+0.051 +- 0.029, the worst seed +0.027; KL 1.4-2.1); beta = 0
0.170 (KL 10.3); DPO 0.286: the same verdict on other products' rounding, by a thinner margin.
The full demo's comparison (`chatforge demo --seeds 0 --seeds 1 --seeds 2`, docs/rlhf.md)
gave SFT 0.419, PPO 0.466, 0.436, 0.471.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from chatforge import demo
from chatforge.train.config import ModelSize, PPOSettings
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
# nats per answer: the adaptive KL controller's target; the proof's PPO stays under 2
KL_BOUND = PPOSettings.kl_target
# About half the full demo's training cost, and still beyond seed noise: a narrower model (0.79M parameters
# outside the embeddings instead of 1.8M), a reward model trained 100 steps. With 400 pretraining steps
# PPO's KL reached 4-5.5, near the bound; with 150 reward-model steps beta = 0 did not game it within 40
# iterations (2026-12-06, Xeon; docs/rlhf.md)
PROOF = replace(demo.FULL, model=ModelSize(n_layer=4, n_head=4, n_embd=128, context_length=512), rm_steps=100,
                sft_steps=300)
# PPO for 30 iterations (at 40: +0.075 +- 0.019), and beta = 0 for as long; DPO only has to train and move
# the policy here, so 30 steps on 100 preference prompts
SETTINGS = SeedSettings(ppo_steps=30, dpo_steps=30, dpo_prompts=100)


def train_and_compare(run: str) -> None:
    """The pipeline at PROOF's setting up to the reward model, then the comparison, into RUN/seeds/results.json."""
    run_dir, budget = Path(run), PROOF
    corpus = demo.make_corpus(run_dir, budget)
    tokenizer = demo.make_tokenizer(run_dir, corpus, budget)
    demo.pretrain(run_dir, demo.make_shards(run_dir, corpus, tokenizer), budget)
    tasks = demo.make_tasks(run_dir, budget)
    demo.sft(run_dir, tasks, budget)
    demo.reward_model(run_dir, demo.label_sft_samples(run_dir, tasks, budget), budget)
    figures = ppo_against_sft(run_dir, SEEDS, once=["ppo-beta0", "dpo"], settings=SETTINGS)  # and results.json
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


def test_the_results_record_the_seeds_each_method_ran(tmp_path) -> None:
    row = {"score": 0.3, "rm": 0.0, "kl": 1.0}
    figures = {"sft": [row], "ppo": [row, row, row], "ppo-beta0": [row]}
    save_results(tmp_path, figures, SEEDS, SETTINGS, once=["ppo-beta0"])
    results = load_results(tmp_path)
    assert [results[m]["seeds"] for m in ("sft", "ppo", "ppo-beta0")] == [[], [0, 1, 2], [0]]
    assert results["ppo"]["settings"]["dpo_prompts"] == 100


def test_an_unknown_method_is_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown method.*'sac'"):
        compare_seeds(tmp_path, [0], ["ppo", "sac"])
    with pytest.raises(ValueError, match="unknown method.*'sac'"):
        compare_seeds(tmp_path, [0], ["ppo"], once=["sac"])


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
    # policy drifts far from the SFT model (measured: checked 0.307 -> 0.261, KL 10.5 against PPO's 1.8 at most)
    sft, hacked = figures["sft"][0], figures["ppo-beta0"][0]
    assert hacked["rm"] > sft["rm"] and all(r["rm"] > sft["rm"] for r in figures["ppo"])
    assert hacked["score"] < sft["score"] or hacked["kl"] > 3 * max(r["kl"] for r in figures["ppo"])
    assert figures["dpo"][0]["kl"] > 0  # DPO trained and moved the policy; its score is reported, not claimed
