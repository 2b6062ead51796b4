"""`chatforge demo`: the whole pipeline, on the built-in world, in minutes on a CPU.

Stages run in order, each writing into the run directory; a stage whose output is already
complete is skipped, so an interrupted demo continues where it stopped.

    corpus/     the built-in world (world.json) and its text (corpus.jsonl)
    tokenizer/  byte-level BPE trained on the corpus
    data/       token shards
    pretrain/   the GPT: checkpoint/ and metrics.jsonl
    then probes (validation loss, fact completion) and samples
    tasks/      the world's chat data: SFT conversations, preferences, RL prompts, held-out eval prompts
    sft/        the chat model fine-tuned on the SFT conversations
    rm_data/    the preference prompts' rankings with the SFT model's own samples added (the labeler ranks them)
    rm/         the reward model trained on those rankings
    ppo/        the SFT model optimized by PPO against the reward model (KL to the SFT model)
    dpo/        the SFT model optimized by DPO on the same preferences
    eval.json   base, SFT, PPO and DPO models on the held-out prompts, judged by the world's scorer
    detection.json  the watermark and zero-shot detectors on the PPO model's answers
    ppo-int8/, int8.json  the PPO model in weight-only int8, and its figures beside the fp32 model's
    timings.json  each stage's wall time
    report.md, report.html, report/   the run report (`chatforge report`): configs, curves, eval, samples
    chatforge.db  the web chat's conversations and feedback, once `chatforge demo` serves (serve_demo)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import click
import torch

from chatforge.chat import Message
from chatforge.checkpoint import TRAINER_FILE, load_checkpoint, read_json, resolve_checkpoint_dir, write_json
from chatforge.data.readers import iter_documents
from chatforge.data.shards import prepare_shards, read_meta
from chatforge.data.tasks import Labeler, Scorer, TaskConfig, write_tasks
from chatforge.data.world import CorpusMix, World, write_corpus
from chatforge.errors import ConfigError
from chatforge.evaluate import EvalConfig, EvalResult, evaluate, format_table, measure_int8
from chatforge.files import atomic_write, atomic_write_text, strict_json
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.knowledge import cloze_prefix
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer
from chatforge.train.config import (
    DPOConfig,
    ModelSize,
    PPOConfig,
    PPOSettings,
    PretrainConfig,
    RewardConfig,
    SFTConfig,
    TrainConfig,
)
from chatforge.train.distributed import DistInfo
from chatforge.train.dpo import run_dpo
from chatforge.train.ppo import run_ppo
from chatforge.train.pretrain import LanguageModeling, run_pretrain
from chatforge.train.reward import run_reward, sample_answer_sets
from chatforge.train.sft import run_sft

SAMPLE_PROMPTS = ("The capital of", "Seven plus five is", "Once upon a time,")


@dataclass(frozen=True)
class Budget:
    corpus_mb: float
    corpus_mix: CorpusMix  # the corpus's share of each document kind
    vocab_size: int
    model: ModelSize
    seq_len: int  # pretraining windows: shorter than the context, since a tiny model learns far faster on them
    steps: int
    batch_size: int
    lr: float
    eval_every: int
    probe_facts: int  # facts asked in the fact-completion probe
    sft_steps: int
    sft_batch_size: int
    sft_lr: float
    sft_replay: float  # weight of replayed pretraining text in SFT's loss (SFTConfig.replay_coef; 0: none)
    task_scale: float  # share of the default task-data sizes
    rm_samples: int  # SFT samples per preference prompt that the labeler ranks with the rule-made answers
    rm_steps: int
    ppo_steps: int
    ppo_rollout: int  # answers per PPO iteration
    dpo_steps: int
    dpo_beta: float  # DPOConfig.beta
    dpo_rpo_alpha: float  # DPOConfig.rpo_alpha: the chosen answer's NLL beside the DPO loss (0: plain DPO)


# Facts dominate the corpus: the demo's model must memorize the world's 432 facts before SFT can make them
# answerable, and a fact's exposures, not the text's variety, decide that (docs/demo-recipe.md).
FACTS_FIRST = CorpusMix(facts=0.70, stories=0.10, dialogues=0.05, arithmetic=0.10, word_games=0.05)
FULL = Budget(corpus_mb=2.0, corpus_mix=FACTS_FIRST, vocab_size=2048,
              model=ModelSize(n_layer=4, n_head=4, n_embd=192, context_length=512), seq_len=128,
              steps=500, batch_size=32, lr=3e-3, eval_every=50, probe_facts=432,
              sft_steps=300, sft_batch_size=4, sft_lr=1e-3, sft_replay=1.0, task_scale=1.0,
              rm_samples=2, rm_steps=150, ppo_steps=40, ppo_rollout=32, dpo_steps=100, dpo_beta=0.5,
              dpo_rpo_alpha=1.0)
FAST = Budget(corpus_mb=0.3, corpus_mix=FACTS_FIRST, vocab_size=512,
              model=ModelSize(n_layer=2, n_head=2, n_embd=64, context_length=256), seq_len=128,
              steps=60, batch_size=16, lr=3e-3, eval_every=30, probe_facts=60,
              sft_steps=80, sft_batch_size=8, sft_lr=3e-3, sft_replay=1.0, task_scale=0.1,
              rm_samples=2, rm_steps=10, ppo_steps=2, ppo_rollout=8, dpo_steps=10, dpo_beta=0.5,
              dpo_rpo_alpha=1.0)
# About an hour on 2 cores: the same recipe with a model of 2.6x the compute per token and 4x the
# pretraining steps, to show how far it goes with more compute (docs/demo-recipe.md has its table).
LARGE = replace(FULL, corpus_mb=4.0, model=ModelSize(n_layer=6, n_head=4, n_embd=256, context_length=512),
                steps=2000, lr=2e-3, eval_every=100, sft_steps=900, ppo_steps=60)
PRESETS = {"fast": FAST, "full": FULL, "large": LARGE}


def stage(name: str, timings: dict[str, float]) -> Callable:
    """Run a stage function, print its banner and wall time, and record the time."""

    def run(fn: Callable, *args, **kwargs):
        click.secho(f"\n== {name}", bold=True)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - t0
        click.echo(f"   {name}: {timings[name]:.1f}s")
        return out

    return run


def make_corpus(run_dir: Path, budget: Budget) -> Path:
    path = run_dir / "corpus" / "corpus.jsonl"
    if path.exists():
        click.echo(f"   reusing {path}")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    World.build(seed=0).save(run_dir / "corpus" / "world.json")
    write_corpus(path, num_bytes=int(budget.corpus_mb * 1e6), world_seed=0, seed=0, mix=budget.corpus_mix)
    click.echo(f"   built-in world corpus: {path.stat().st_size / 1e6:.2f} MB -> {path}")
    return path


def make_tokenizer(run_dir: Path, corpus: Path, budget: Budget) -> Tokenizer:
    path = run_dir / "tokenizer" / "tokenizer.json"
    if path.exists():
        click.echo(f"   reusing {path}")
        return Tokenizer.from_file(path)
    tok = Tokenizer.train(iter_documents([corpus]), vocab_size=budget.vocab_size, show_progress=True)
    tok.save(path)
    click.echo(f"   byte-level BPE, {tok.vocab_size} tokens -> {path}")
    return tok


def make_shards(run_dir: Path, corpus: Path, tok: Tokenizer) -> Path:
    out = run_dir / "data"
    meta_file = out / "meta.json"
    if meta_file.exists() and read_meta(out).get("tokenizer_hash") == tok.hash:
        click.echo(f"   reusing {out}")
        return out
    meta = prepare_shards([corpus], tok, out, val_fraction=0.05, show_progress=True)
    tok.save(out / "tokenizer.json")
    s = meta["splits"]
    click.echo(f"   {s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens ({meta['dtype']})")
    return out


def prepare_builtin_data(run_dir: Path, budget: Budget | None = None) -> Path:
    """Corpus, tokenizer and shards of the built-in world under run_dir (reused when present)."""
    budget = budget or FULL
    corpus = make_corpus(run_dir, budget)
    return make_shards(run_dir, corpus, make_tokenizer(run_dir, corpus, budget))


def made_before(out: Path, inputs: list[Path]) -> bool:
    """Whether a training stage's saved weights are older than a file it is trained from: a rerun
    then trains it again from the start (a reward model made before its rankings were)."""
    weights = out / "checkpoint" / "model.safetensors"
    return weights.exists() and any(p.exists() and p.stat().st_mtime > weights.stat().st_mtime for p in inputs)


def finished(out: Path, steps: int) -> bool:
    done = out / "checkpoint" / TRAINER_FILE
    if done.exists() and read_json(done, "trainer state").get("step") == steps:
        click.echo(f"   reusing {out} (finished)")
        return True
    return False


def pretrain(run_dir: Path, data: Path, budget: Budget) -> Path:
    out = run_dir / "pretrain"
    cfg = PretrainConfig(
        data=str(data), out=str(out), model=budget.model, seq_len=budget.seq_len,
        train=TrainConfig(max_steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr,
                          warmup_steps=max(1, budget.steps // 20), eval_every=budget.eval_every,
                          eval_batches=10, save_every=budget.eval_every * 2, log_every=10),
    )
    if not finished(out, budget.steps):
        run_pretrain(cfg, DistInfo(), resume=True)
    return out


def initial_val_loss(run_dir: Path, budget: Budget) -> float:
    """Validation loss of the untrained model, with the same batches as the final one."""
    from chatforge.data.shards import TokenDataset

    ckpt = load_checkpoint(run_dir / "pretrain")
    torch.manual_seed(0)
    fresh = GPT(ckpt.model.config).eval()
    val = TokenDataset(run_dir / "data", "val")
    objective = LanguageModeling(val, val, budget.batch_size, budget.seq_len, 0)
    with torch.no_grad():
        return objective.evaluate(fresh, 10)["val/loss"]


@torch.no_grad()
def fact_completion_accuracy(model: GPT, tok: Tokenizer, world: World, limit: int) -> tuple[float, int]:
    """Share of facts whose value greedy decoding would produce after a cloze prefix.

    "The capital of Veloria is" must be followed by the tokens of " Kesh": scored in one batched
    teacher-forced pass, where greedy decoding is right iff every value token is the argmax
    given the tokens before it.
    """
    rows = []
    for fact in world.facts[:limit]:
        prefix = cloze_prefix(fact.attribute, fact.subject)
        if prefix is not None:
            rows.append((tok.encode(prefix), tok.encode(" " + fact.value)))
    if not rows:
        return 0.0, 0
    width = max(len(p) + len(v) for p, v in rows)
    ids = torch.full((len(rows), width), tok.eot_id, dtype=torch.long)
    for i, (p, v) in enumerate(rows):
        ids[i, : len(p) + len(v)] = torch.tensor(p + v)
    predicted = model(ids).argmax(-1)  # right padding cannot affect earlier positions (causal)
    correct = sum(
        bool((predicted[i, len(p) - 1 : len(p) + len(v) - 1] == torch.tensor(v)).all()) for i, (p, v) in enumerate(rows)
    )
    return correct / len(rows), len(rows)


def report(run_dir: Path, budget: Budget, timings: dict[str, float]) -> dict:
    ckpt = load_checkpoint(run_dir / "pretrain")
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    world = World.load(run_dir / "corpus" / "world.json")
    before = initial_val_loss(run_dir, budget)
    records = [r for r in map(_json, (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines())
               if "val/loss" in r]
    click.echo("   validation loss by step: " + ", ".join(
        [f"0: {before:.3f}"] + [f"{r['step']}: {r['val/loss']:.3f}" for r in records]))
    accuracy, asked = fact_completion_accuracy(model, tok, world, budget.probe_facts)
    torch.manual_seed(0)
    fresh_accuracy, _ = fact_completion_accuracy(GPT(model.config).eval(), tok, world, budget.probe_facts)
    click.echo(f"   fact completion (greedy, {asked} facts): trained {accuracy:.1%}, untrained {fresh_accuracy:.1%}")
    params = SamplingParams(max_tokens=24, temperature=0.8, top_k=40, seed=0)
    completions = Engine(model, tok).generate([tok.encode(p) for p in SAMPLE_PROMPTS], params)
    for prompt, completion in zip(SAMPLE_PROMPTS, completions):
        click.echo(f"   > {prompt}{completion.outputs[0].text}")
    return {"val_loss_before": before, "val_loss_after": records[-1]["val/loss"] if records else None,
            "fact_accuracy": accuracy, "fact_accuracy_untrained": fresh_accuracy, "timings": timings}


def make_tasks(run_dir: Path, budget: Budget, step_by_step: bool = True) -> Path:
    out = run_dir / "tasks"
    if (out / "tasks.json").exists():
        click.echo(f"   reusing {out}")
        return out
    world = World.load(run_dir / "corpus" / "world.json")
    config = TaskConfig(step_by_step=step_by_step).scaled(budget.task_scale)
    paths = write_tasks(out, world, seed=0, config=config)
    counts = {name: len(path.read_text().splitlines()) for name, path in paths.items() if path.suffix == ".jsonl"}
    click.echo("   " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    return out


def sft_config(run_dir: Path, tasks: Path, budget: Budget) -> SFTConfig:
    """The demo's SFT settings (benchmarks/lora_sft.py runs them with LoRA too)."""
    return SFTConfig(
        data=[str(tasks / "sft_train.jsonl")], val=[str(tasks / "sft_val.jsonl")], init_from=str(run_dir / "pretrain"),
        out=str(run_dir / "sft"), replay_data=str(run_dir / "data") if budget.sft_replay else "",
        replay_coef=budget.sft_replay,
        train=TrainConfig(max_steps=budget.sft_steps, batch_size=budget.sft_batch_size, lr=budget.sft_lr,
                          warmup_steps=max(1, budget.sft_steps // 15), weight_decay=0.0,
                          eval_every=max(10, budget.sft_steps // 3), eval_batches=10,
                          save_every=budget.sft_steps, log_every=10),
    )


def sft(run_dir: Path, tasks: Path, budget: Budget) -> Path:
    out = run_dir / "sft"
    cfg = sft_config(run_dir, tasks, budget)
    if not finished(out, budget.sft_steps):
        run_sft(cfg, DistInfo(), resume=True)
    return out


def short_run(steps: int, batch_size: int, lr: float, warmup: int = 0) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup, weight_decay=0.0,
                       eval_every=max(1, steps // 3), eval_batches=10, save_every=steps, log_every=1)


PREFERENCE_SPLITS = ("prefs_train", "prefs_val")


def label_sft_samples(run_dir: Path, tasks: Path, budget: Budget) -> Path:
    """InstructGPT's comparison data: the labeler ranks the SFT model's own answers to each preference
    prompt (sampled at PPO's rollout temperature) together with the prompt's rule-made answers.

    A reward model trained on rule-made answers alone never sees what the policy writes, and PPO
    finds what it over-values there: on the demo run it ordered 71% of pairs of SFT samples (of
    different checked score) as the scorer does, 78% with these rankings (benchmarks/rm_best_of_n.py).
    """
    out = run_dir / "rm_data"
    inputs = [resolve_checkpoint_dir(run_dir / "sft") / "model.safetensors"]
    inputs += [tasks / f"{split}.jsonl" for split in PREFERENCE_SPLITS]
    paths = {split: out / f"{split}.jsonl" for split in PREFERENCE_SPLITS}
    newest_input = max(p.stat().st_mtime for p in inputs)
    if all(p.exists() and p.stat().st_mtime >= newest_input for p in paths.values()):
        click.echo(f"   reusing {out}")
        return out
    labeler = Labeler(Scorer(World.load(run_dir / "corpus" / "world.json")), near_misses_first=True,
                      over_refusals_last=True)
    policy = load_checkpoint(run_dir / "sft")
    for n, (split, path) in enumerate(paths.items()):
        records = [_json(line) for line in (tasks / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        prompts = [[Message(m["role"], m["content"]) for m in r["prompt"]] for r in records]
        samples = sample_answer_sets(policy, prompts, budget.rm_samples, PPOSettings.temperature,
                                     seed=1_000_000 * n, max_tokens=PPOSettings.max_new_tokens)
        ranked = [{**r, "responses": labeler.rank(p, r["responses"] + s)} for r, p, s in zip(records, prompts, samples)]
        atomic_write(path, lambda f, ranked=ranked: f.writelines(strict_json(r, ensure_ascii=False) + "\n"
                                                                 for r in ranked))
        click.echo(f"   {split}: {len(ranked)} prompts, {budget.rm_samples} SFT samples each ranked with "
                   f"the rule-made answers -> {path}")
    return out


def reward_model(run_dir: Path, rm_data: Path, budget: Budget) -> Path:
    out = run_dir / "rm"
    data = [rm_data / f"{split}.jsonl" for split in PREFERENCE_SPLITS]
    again = made_before(out, data)
    if again:
        click.echo(f"   {rm_data} is newer than the reward model: training it again")
    if again or not finished(out, budget.rm_steps):
        cfg = RewardConfig(data=[str(data[0])], val=[str(data[1])], init_from=str(run_dir / "sft"), out=str(out),
                           train=short_run(budget.rm_steps, 16, 1e-4, warmup=max(1, budget.rm_steps // 15)))
        run_reward(cfg, DistInfo(), resume=not again, overwrite=again)
    return out


def ppo(run_dir: Path, tasks: Path, budget: Budget) -> Path:
    out = run_dir / "ppo"
    again = made_before(out, [run_dir / "rm" / "checkpoint" / "model.safetensors"])
    if again:
        click.echo("   the reward model is newer than the PPO policy: training it again")
    if again or not finished(out, budget.ppo_steps):
        cfg = PPOConfig(prompts=[str(tasks / "rl_train.jsonl")], val=[str(tasks / "rl_val.jsonl")],
                        policy=str(run_dir / "sft"), reward_model=str(run_dir / "rm"), out=str(out),
                        ppo=PPOSettings(rollout_batch=budget.ppo_rollout, minibatch=min(8, budget.ppo_rollout)),
                        train=replace(short_run(budget.ppo_steps, 1, 3e-5), min_lr_ratio=1.0, eval_every=10))
        run_ppo(cfg, DistInfo(), resume=not again, overwrite=again)
    return out


def dpo(run_dir: Path, tasks: Path, budget: Budget) -> Path:
    out = run_dir / "dpo"
    if not finished(out, budget.dpo_steps):
        cfg = DPOConfig(data=[str(tasks / "prefs_train.jsonl")], val=[str(tasks / "prefs_val.jsonl")],
                        init_from=str(run_dir / "sft"), out=str(out), beta=budget.dpo_beta,
                        rpo_alpha=budget.dpo_rpo_alpha,
                        train=short_run(budget.dpo_steps, 16, 5e-5, warmup=max(1, budget.dpo_steps // 15)))
        run_dpo(cfg, DistInfo(), resume=True)
    return out


def evaluation(run_dir: Path, tasks: Path, stages: list[str]) -> dict[str, EvalResult]:
    """Every stage's model on the held-out prompts, judged by the scorer; a table and eval.json."""
    world = World.load(run_dir / "corpus" / "world.json")
    cfg = EvalConfig(prompts=[str(tasks / "eval.jsonl")], conversations=[str(tasks / "sft_val.jsonl")],
                     fact_knowledge=True)
    names = {"pretrain": "base", "sft": "sft"}
    saved = _saved_evals(run_dir, {s: names.get(s, s) for s in stages})
    results = {}
    for s in stages:
        name = names.get(s, s)
        if name in saved:
            click.echo(f"   reusing the evaluation of {run_dir / s} (eval.json is newer than its weights)")
            results[name] = saved[name]
        else:
            results[name] = evaluate(cfg, load_checkpoint(run_dir / s), world, progress=f"eval {name}")
    click.echo(format_table(results))
    write_json(run_dir / "eval.json", {name: r.to_dict() for name, r in results.items()})
    for fam, samples in results["sft"].samples.items():
        if samples:
            click.echo(f"   [{fam}] {samples[0]['prompt']!r} -> {samples[0]['answer']!r}")
    return results


ABLATION_DIR = "no-steps"  # RUN/no-steps: the step-by-step ablation's run (see step_ablation)
SHARED_STAGES = ("corpus", "tokenizer", "data", "pretrain")


def detection(run_dir: Path, budget: Budget) -> dict:
    """The watermark and the zero-shot detectors on the PPO model's answers (chatforge/detect/measure.py),
    written to detection.json for the report."""
    from chatforge.detect.measure import measure_detection

    out = run_dir / "detection.json"
    made = (run_dir / "ppo" / "checkpoint" / "model.safetensors").stat().st_mtime
    if out.exists() and out.stat().st_mtime > made:
        click.echo(f"   reusing {out}")
        return json.loads(out.read_text())
    figures = measure_detection(load_checkpoint(run_dir / "ppo"), load_checkpoint(run_dir / "pretrain"),
                                World.load(run_dir / "corpus" / "world.json"),
                                tasks=TaskConfig().scaled(budget.task_scale))
    atomic_write_text(out, strict_json(figures, indent=2, default=float))
    mark = figures["watermark"]
    click.echo(f"   checked score plain {figures['checked_score']['plain']:.3f}, watermarked "
               f"{figures['checked_score']['watermarked']:.3f}; documents of {mark['settings']['group']} answers "
               f"found watermarked: {mark['watermarked']['documents']['detected']:.0%} (plain "
               f"{mark['plain']['documents']['detected']:.0%}, human {mark['human']['documents']['detected']:.0%})")
    return figures


def int8(run_dir: Path, tasks: Path, results: dict[str, EvalResult]) -> dict:
    """The final model in weight-only int8 (`chatforge quantize`, `evaluate.measure_int8`): RUN/ppo-int8,
    and its weights, checked score and held-out loss beside the fp32 model's, in int8.json for the report."""
    out = run_dir / "int8.json"
    made = (run_dir / "ppo" / "checkpoint" / "model.safetensors").stat().st_mtime
    if out.exists() and out.stat().st_mtime > made:
        click.echo(f"   reusing {out}")
        return json.loads(out.read_text())
    cfg = EvalConfig(prompts=[str(tasks / "eval.jsonl")], conversations=[str(tasks / "sft_val.jsonl")])
    figures = measure_int8(run_dir / "ppo", run_dir / "ppo-int8", cfg,
                           World.load(run_dir / "corpus" / "world.json"), fp32=results.get("ppo"))
    atomic_write_text(out, strict_json(figures, indent=2))
    fp32, q8 = figures["fp32"], figures["int8"]
    click.echo(f"   weights {fp32['weights_bytes'] / 1e6:.2f} MB -> {q8['weights_bytes'] / 1e6:.2f} MB; checked score "
               f"{fp32['score']:.3f} -> {q8['score']:.3f}; held-out loss {fp32['val_loss']:.3f} -> {q8['val_loss']:.3f}"
               f" ({run_dir / 'ppo-int8'})")
    return figures


def step_ablation(run_dir: Path, budget: Budget) -> dict[str, EvalResult]:
    """The chain-of-thought ablation: the pipeline after pretraining once more, on demonstrations and
    rankings that answer the same prompts directly (TaskConfig.step_by_step=False), in RUN/no-steps.

    It shares the run's corpus, tokenizer and pretrained model (links), so the two runs differ only in the
    task data; its eval.json is judged on the same held-out prompts and the report puts them side by side.
    """
    sub = run_dir / ABLATION_DIR
    sub.mkdir(exist_ok=True)
    for name in SHARED_STAGES:
        link = sub / name
        if not link.exists():
            link.symlink_to(Path("..") / name, target_is_directory=True)
    timings: dict[str, float] = {}
    tasks = stage("ablation: tasks", timings)(make_tasks, sub, budget, step_by_step=False)
    stage("ablation: sft", timings)(sft, sub, tasks, budget)
    rm_data = stage("ablation: rm_data", timings)(label_sft_samples, sub, tasks, budget)
    stage("ablation: rm", timings)(reward_model, sub, rm_data, budget)
    stage("ablation: ppo", timings)(ppo, sub, tasks, budget)
    stage("ablation: dpo", timings)(dpo, sub, tasks, budget)
    results = stage("ablation: eval", timings)(evaluation, sub, tasks, ["sft", "ppo", "dpo"])
    save_timings(sub, timings)
    return results


def _saved_evals(run_dir: Path, names: dict[str, str]) -> dict[str, EvalResult]:
    """The results in eval.json of the stages whose weights are older than the file (a rerun skips them)."""
    path = run_dir / "eval.json"
    if not path.exists():
        return {}
    saved, made = read_json(path, "demo evaluation"), path.stat().st_mtime
    out = {}
    for stage, name in names.items():
        weights = resolve_checkpoint_dir(run_dir / stage) / "model.safetensors"
        if name in saved and weights.exists() and weights.stat().st_mtime < made:
            out[name] = EvalResult.from_dict(saved[name])
    return out


def _json(line: str) -> dict:
    return json.loads(line)


def claim_run_dir(run_dir: Path, preset: str) -> None:
    """Record the run dir's preset; refuse another one, whose stages would resume the wrong models."""
    marker = run_dir / "preset.txt"
    if marker.exists() and marker.read_text().strip() != preset:
        raise ConfigError(f"demo: {run_dir} holds a --preset {marker.read_text().strip()} run, not {preset}: "
                          "pass another --out, or --overwrite to start it over")
    if not marker.exists() and (run_dir / "pretrain").exists() and preset != "full":
        raise ConfigError(f"demo: {run_dir} holds a run made before presets (a full one), not {preset}: "
                          "pass another --out, or --overwrite to start it over")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        atomic_write_text(marker, preset + "\n")


def run_demo(run_dir: Path, preset: str = "full", overwrite: bool = False, seeds: list[int] | None = None,
             ablation: bool = False) -> dict:
    """Every stage of the pipeline at one of PRESETS' budgets, reusing the stages a run dir has finished."""
    import shutil

    if preset not in PRESETS:
        raise ConfigError(f"demo: preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    budget = PRESETS[preset]
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    claim_run_dir(run_dir, preset)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = stage("corpus", timings)(make_corpus, run_dir, budget)
    tok = stage("tokenizer", timings)(make_tokenizer, run_dir, corpus, budget)
    data = stage("data", timings)(make_shards, run_dir, corpus, tok)
    stage("pretrain", timings)(pretrain, run_dir, data, budget)
    summary = stage("probe", timings)(report, run_dir, budget, timings)
    tasks = stage("tasks", timings)(make_tasks, run_dir, budget)
    stage("sft", timings)(sft, run_dir, tasks, budget)
    rm_data = stage("rm_data", timings)(label_sft_samples, run_dir, tasks, budget)
    stage("rm", timings)(reward_model, run_dir, rm_data, budget)
    stage("ppo", timings)(ppo, run_dir, tasks, budget)
    stage("dpo", timings)(dpo, run_dir, tasks, budget)
    results = stage("eval", timings)(evaluation, run_dir, tasks, ["pretrain", "sft", "ppo", "dpo"])
    stage("detect", timings)(detection, run_dir, budget)
    stage("int8", timings)(int8, run_dir, tasks, results)
    if seeds:
        summary["seeds"] = stage("seeds", timings)(seed_comparison, run_dir, budget, seeds)
    if ablation:
        stage("ablation", timings)(step_ablation, run_dir, budget)
    save_timings(run_dir, timings)
    stage("report", timings)(write_run_report, run_dir)
    total = time.perf_counter() - t0
    click.secho(f"\ndemo finished in {total:.0f}s: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()),
                bold=True)
    click.echo(f"sample from the base model: chatforge sample --checkpoint {run_dir / 'pretrain'} "
               f"--prompt 'The capital of'")
    click.echo(f"chat with the SFT model:   chatforge chat --checkpoint {run_dir / 'sft'}")
    summary["eval"] = {name: {"families": r.families, "overall": r.overall} for name, r in results.items()}
    summary["total_s"] = total
    summary["preset"] = preset
    return summary


def seed_comparison(run_dir: Path, budget: Budget, seeds: list[int]) -> dict:
    """The RLHF proof: PPO once per seed and PPO with beta = 0 at the first, judged against SFT on the
    held-out prompts (chatforge.train.seeds; the table goes to seeds/results.json and the report)."""
    from chatforge.train.seeds import SeedSettings, Verdict, format_table, ppo_against_sft

    # beta = 0 for twice as long: it games the reward model, but not always within PPO's own budget
    settings = SeedSettings(ppo_steps=budget.ppo_steps, beta0_steps=2 * budget.ppo_steps,
                            rollout_batch=budget.ppo_rollout,
                            dpo_beta=budget.dpo_beta, rpo_alpha=budget.dpo_rpo_alpha)

    def log(line: str) -> None:
        click.echo(f"   {line}")

    figures = ppo_against_sft(run_dir, seeds, settings=settings, log=log)
    click.echo("\n".join("   " + line for line in format_table(figures).splitlines()))
    verdict = Verdict.of(figures)
    click.echo(f"   PPO vs SFT: {verdict.gain:+.3f} (worst seed {verdict.worst_gain:+.3f}), spread across seeds "
               f"{verdict.spread:.3f} -> {'beyond' if verdict.beyond_noise else 'within'} seed noise")
    return {"figures": figures, "beyond_noise": verdict.beyond_noise}


def save_timings(run_dir: Path, timings: dict[str, float]) -> None:
    """Each stage's wall time in RUN/timings.json, for the report. A reused stage takes about no time,
    so the longer of this run's and an earlier run's figure is the one that did the work."""
    path = run_dir / "timings.json"
    earlier = _json(path.read_text()) if path.exists() else {}
    write_json(path, {name: max(t, float(earlier.get(name, 0.0))) for name, t in timings.items()})


def write_run_report(run_dir: Path) -> None:
    from chatforge.report import write_report

    md, page, _ = write_report(run_dir)
    click.echo(f"   {md}\n   {page} (self-contained, plots embedded)")


def serve_demo(run_dir: Path, stage: str, host: str, port: int) -> None:
    """Serve one trained chat model with the web page, its feedback stored in RUN/chatforge.db (blocks)."""
    from chatforge.serve.app import ServeConfig
    from chatforge.serve.server import default_db_url, serve_checkpoint

    db_url = default_db_url(run_dir / stage)  # RUN/chatforge.db: what a plain `chatforge serve` of the stage uses
    click.secho(f"\nserving the {stage} model: open http://{host}:{port}/ to chat (API: http://{host}:{port}/v1); "
                "Ctrl-C stops", bold=True)
    click.echo(f"export the page's comparisons for the next reward model: "
               f"chatforge feedback export --db {db_url} --out prefs.jsonl")
    serve_checkpoint(ServeConfig(checkpoint=str(run_dir / stage), host=host, port=port, model_name=stage,
                                 db_url=db_url, log_level="warning"))
