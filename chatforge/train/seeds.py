"""Does RLHF help beyond seed noise? PPO, PPO with beta = 0, GRPO, RLOO and DPO from one run's SFT model, over seeds.

Each method trains from the run's SFT model (PPO, GRPO and RLOO against its reward model, or GRPO and
RLOO against the verifier with `group_reward`) with the demo's settings, once per seed, into
RUN/seeds/<method>[-tag]-<seed>/. Every model then answers the run's held-out
prompts (RUN/tasks/eval.jsonl) greedily, and three figures are taken on those answers:

- the checked score: the world's scorer, a program the training never saw;
- the reward model's mean score of the same answers;
- the KL to the SFT model: per answer, the sum over its tokens of log pi - log pi_sft.

The SFT model answers greedily, so its figures have no spread. `Verdict` says whether PPO raised
the checked score over SFT by more than its spread across seeds. `benchmarks/rlhf_seeds.py` is the
command line; `tests/test_rlhf_proof.py` runs it on a freshly trained demo run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chatforge.chat import ChatTemplate
from chatforge.checkpoint import load_checkpoint
from chatforge.data.chat_readers import read_prompts
from chatforge.data.tasks import Scorer
from chatforge.data.world import World
from chatforge.evaluate import EvalConfig, generate_answers
from chatforge.files import strict_json
from chatforge.train.config import (
    DPOConfig,
    GRPOConfig,
    GRPOSettings,
    PPOConfig,
    PPOSettings,
    RLOOConfig,
    RLOOSettings,
    TrainConfig,
)
from chatforge.train.distributed import DistInfo
from chatforge.train.dpo import run_dpo
from chatforge.train.group_rl import run_grpo, run_rloo
from chatforge.train.ppo import run_ppo
from chatforge.train.reward import score_texts
from chatforge.train.rollout import make_rollout, response_logprobs

METHODS = ("ppo", "ppo-beta0", "grpo", "rloo", "dpo")
GROUP_METHODS = ("grpo", "rloo")


@dataclass(frozen=True)
class SeedSettings:
    """How each method trains: the demo's PPO (40 iterations, lr 3e-5 constant) and DPO (150 steps); GRPO and
    RLOO as PPO (`ppo_steps` iterations at lr 3e-5 constant, temperature) with their own defaults otherwise
    (32 answers an iteration: 4 prompts x 8 for GRPO, 8 x 4 for RLOO) and the reward `group_reward`."""

    ppo_steps: int = 40
    beta0_steps: int = 0  # iterations of PPO with beta = 0 ("ppo-beta0"); 0: ppo_steps
    dpo_steps: int = 150
    dpo_prompts: int = 0  # DPO trains on the first n preference prompts of RUN/tasks (0: all of them)
    dpo_beta: float = 0.5  # the demo's DPO: beta 0.5 and the chosen answer's NLL at weight 1 (RPO)
    rpo_alpha: float = 1.0
    beta: float = PPOSettings.init_kl_coef  # method "ppo" starts here; "ppo-beta0" always uses 0
    temperature: float = PPOSettings.temperature
    ptx_coef: float = 0.0  # on the run's own token shards (RUN/data)
    rollout_batch: int = PPOSettings.rollout_batch
    group_reward: str = GRPOSettings.reward  # GRPO's and RLOO's --reward: "model", "verifier" or "both"

    def out_dir(self, run: Path, method: str, seed: int) -> Path:
        """RUN/seeds/<method>[-tag]-<seed>: a tag for each setting away from its default."""
        if method == "dpo":
            tag = f"-p{self.dpo_prompts}" if self.dpo_prompts else ""
            tag += f"-b{self.dpo_beta:g}" if self.dpo_beta != SeedSettings.dpo_beta else ""
            tag += f"-rpo{self.rpo_alpha:g}" if self.rpo_alpha != SeedSettings.rpo_alpha else ""
            return run / "seeds" / f"dpo{tag}-{seed}"
        tag = f"-t{self.temperature:g}" if self.temperature != PPOSettings.temperature else ""
        if method in GROUP_METHODS:
            tag += f"-{self.group_reward}" if self.group_reward != GRPOSettings.reward else ""
            return run / "seeds" / f"{method}{tag}-{seed}"
        tag += f"-ptx{self.ptx_coef:g}" if self.ptx_coef else ""
        tag += f"-beta{self.beta:g}" if method == "ppo" and self.beta != PPOSettings.init_kl_coef else ""
        tag += f"-r{self.rollout_batch}" if self.rollout_batch != PPOSettings.rollout_batch else ""
        tag += f"-i{self.beta0_steps}" if method == "ppo-beta0" and self.beta0_steps else ""
        return run / "seeds" / f"{method}{tag}-{seed}"


def train_ppo(run: Path, out: Path, seed: int, settings: SeedSettings, beta: float) -> None:
    if (out / "checkpoint" / "trainer_state.json").exists():
        return
    s = settings
    steps = s.beta0_steps if beta == 0 and s.beta0_steps else s.ppo_steps
    cfg = PPOConfig(prompts=[str(run / "tasks/rl_train.jsonl")], val=[str(run / "tasks/rl_val.jsonl")],
                    policy=str(run / "sft"), reward_model=str(run / "rm"), out=str(out),
                    ppo=PPOSettings(init_kl_coef=beta, adaptive_kl=beta > 0, temperature=s.temperature,
                                    rollout_batch=s.rollout_batch, ptx_coef=s.ptx_coef,
                                    ptx_data=str(run / "data") if s.ptx_coef else ""),
                    train=TrainConfig(max_steps=steps, batch_size=1, lr=3e-5, warmup_steps=0, min_lr_ratio=1.0,
                                      weight_decay=0.0, eval_every=steps, save_every=steps, seed=seed,
                                      progress=False))
    run_ppo(cfg, DistInfo())


def train_group(run: Path, out: Path, seed: int, settings: SeedSettings, method: str) -> None:
    """GRPO or RLOO from the run's SFT model, PPO's budget and learning rate, each method's own defaults."""
    if (out / "checkpoint" / "trainer_state.json").exists():
        return
    s = settings
    paths = dict(prompts=[str(run / "tasks/rl_train.jsonl")], val=[str(run / "tasks/rl_val.jsonl")],
                 policy=str(run / "sft"), reward_model=str(run / "rm"), out=str(out),
                 train=TrainConfig(max_steps=s.ppo_steps, batch_size=1, lr=3e-5, warmup_steps=0, min_lr_ratio=1.0,
                                   weight_decay=0.0, eval_every=s.ppo_steps, save_every=s.ppo_steps, seed=seed,
                                   progress=False))
    if method == "grpo":
        run_grpo(GRPOConfig(**paths, grpo=GRPOSettings(temperature=s.temperature, reward=s.group_reward)), DistInfo())
    else:
        run_rloo(RLOOConfig(**paths, rloo=RLOOSettings(temperature=s.temperature, reward=s.group_reward)), DistInfo())


def train_dpo(run: Path, out: Path, seed: int, steps: int, prompts: int = 0, beta: float = 0.1,
              rpo_alpha: float = 0.0) -> None:
    if (out / "checkpoint" / "trainer_state.json").exists():
        return
    data = run / "tasks/prefs_train.jsonl"
    if prompts:  # DPO first computes the reference's log-probs of every pair: fewer prompts, less of that
        out.mkdir(parents=True, exist_ok=True)
        (out / data.name).write_text("".join(data.read_text().splitlines(keepends=True)[:prompts]))
        data = out / data.name
    cfg = DPOConfig(data=[str(data)], val=[str(run / "tasks/prefs_val.jsonl")],
                    init_from=str(run / "sft"), out=str(out), beta=beta, rpo_alpha=rpo_alpha,
                    train=TrainConfig(max_steps=steps, batch_size=16, lr=5e-5, warmup_steps=10, weight_decay=0.0,
                                      eval_every=steps, save_every=steps, seed=seed, progress=False))
    run_dpo(cfg, DistInfo())


@torch.no_grad()
def judge(run: Path, model_dir: Path, world: World, sft: torch.nn.Module, rm: torch.nn.Module) -> dict[str, float]:
    """Checked score, RM score and KL to the SFT model of the greedy answers to the held-out prompts."""
    ckpt = load_checkpoint(model_dir)
    prompts = [r.messages for r in read_prompts([str(run / "tasks/eval.jsonl")]).prompts]
    texts = [text for text, _ in generate_answers(ckpt, prompts, max_tokens=EvalConfig.max_tokens, batch_size=32)]
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


def compare_seeds(run: Path, seeds: Sequence[int], methods: Sequence[str] = METHODS,
                  settings: SeedSettings | None = None, log: Callable[[str], None] = print,
                  once: Sequence[str] = ()) -> dict[str, list[dict[str, float]]]:
    """Train each method once per seed, and each method of `once` at the first seed only (a reference
    point, not a claim over seeds), and judge them: {"sft": [figures], method: [figures per seed]}.
    Finished runs under RUN/seeds are reused. The figures also go to RUN/seeds/results.json."""
    settings = settings or SeedSettings()
    unknown = [m for m in [*methods, *once] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: expected some of {list(METHODS)}")
    world = World.load(run / "corpus/world.json")
    sft = load_checkpoint(run / "sft").model.eval()
    rm = load_checkpoint(run / "rm").model.eval()
    figures: dict[str, list[dict[str, float]]] = {"sft": [judge(run, run / "sft", world, sft, rm)]}
    for seed, method in [(seed, m) for seed in seeds for m in methods] + [(seeds[0], m) for m in once]:
        out = settings.out_dir(run, method, seed)
        train_method(run, out, seed, settings, method)
        figures.setdefault(method, []).append(judge(run, out, world, sft, rm))
        log(f"{method} seed {seed}: {figures[method][-1]}")
    save_results(run, figures, seeds, settings, once)
    return figures


def train_method(run: Path, out: Path, seed: int, settings: SeedSettings, method: str) -> None:
    """One method's run from the run's SFT model into `out` (kept when it finished before)."""
    if method == "dpo":
        train_dpo(run, out, seed, settings.dpo_steps, settings.dpo_prompts, settings.dpo_beta, settings.rpo_alpha)
    elif method in GROUP_METHODS:
        train_group(run, out, seed, settings, method)
    else:
        train_ppo(run, out, seed, settings, beta=settings.beta if method == "ppo" else 0.0)


def ppo_against_sft(run: Path, seeds: Sequence[int], once: Sequence[str] = ("ppo-beta0",),
                    settings: SeedSettings | None = None,
                    log: Callable[[str], None] = print) -> dict[str, list[dict[str, float]]]:
    """The RLHF proof's comparison: PPO once per seed, and each method of `once` at the first seed only."""
    return compare_seeds(run, seeds, ["ppo"], settings, log, once)


def save_results(run: Path, figures: dict[str, list[dict[str, float]]], seeds: Sequence[int],
                 settings: SeedSettings, once: Sequence[str] = ()) -> None:
    """Merge into RUN/seeds/results.json ({method: {"seeds", "settings", "figures"}}), so methods run
    with different seeds in separate calls all stay on record; the run report shows them. The methods
    of `once` ran at the first seed only."""
    path = run / "seeds" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results = load_results(run)
    for method, rows in figures.items():
        ran = [] if method == "sft" else list(seeds[:1] if method in once else seeds)
        results[method] = {"seeds": ran, "settings": asdict(settings), "figures": rows}
    path.write_text(strict_json(results, indent=1) + "\n")


def load_results(run: Path) -> dict:
    path = run / "seeds" / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def mean_and_spread(rows: Sequence[dict[str, float]], key: str) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0 for one seed)."""
    values = [r[key] for r in rows]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Verdict:
    """PPO against SFT on the checked score: the gain of the mean over seeds, and its spread."""

    gain: float
    spread: float
    worst_gain: float  # of the worst seed

    @property
    def beyond_noise(self) -> bool:
        """The mean gain exceeds the spread across seeds, and no seed is below SFT."""
        return self.gain > self.spread and self.worst_gain > 0

    @classmethod
    def of(cls, figures: dict[str, list[dict[str, float]]], method: str = "ppo") -> Verdict:
        base = figures["sft"][0]["score"]
        mean, spread = mean_and_spread(figures[method], "score")
        return cls(mean - base, spread, min(r["score"] for r in figures[method]) - base)


def format_table(figures: dict[str, list[dict[str, float]]]) -> str:
    """Per method: checked score, its difference to SFT, RM score and KL, each mean ± std over seeds."""
    base = figures["sft"][0]["score"]
    lines = [f"{'method':<10} {'checked score':>16} {'vs SFT':>8} {'RM score':>16} {'KL to SFT':>16}"]
    for method, rows in figures.items():
        cells = []
        for key in ("score", "rm", "kl"):
            mean, spread = mean_and_spread(rows, key)
            cells.append(f"{mean:.3f} ± {spread:.3f}")
        delta = mean_and_spread(rows, "score")[0] - base
        lines.append(f"{method:<10} {cells[0]:>16} {delta:>+8.3f} {cells[1]:>16} {cells[2]:>16}")
    return "\n".join(lines)
