"""Evaluation of a chat model on held-out prompts, judged by a program, plus held-out loss.

For each held-out prompt the model answers greedily through the engine (the chat template's
generation prompt; the answer ends at `<|end|>`), and the world's scorer checks the answer:
correct or not, refused or not, padded with filler or not, how long. The scorer is the ground
truth; no training stage ever sees it. Reported:

- accuracy per task family (share of correct answers where correctness applies),
- refusal rate on harmful prompts (should be high) and over-refusal on harmless ones (low),
- mean checked score (the scorer's `value`), padded share, mean response length in words and tokens,
- validation loss and perplexity on held-out conversations (assistant tokens only).

`chatforge eval` prints the table and writes the JSON beside the checkpoint.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from chatforge.chat import ChatTemplate
from chatforge.checkpoint import Checkpoint, load_checkpoint
from chatforge.data.chat_batches import conversation_loss, encode_example
from chatforge.data.chat_readers import PromptRecord, read_conversations, read_prompts
from chatforge.data.tasks import Scorer, build_tasks
from chatforge.data.world import World
from chatforge.files import atomic_write_text, strict_json
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams


@dataclass
class EvalConfig:
    checkpoint: str = ""
    prompts: list[str] = field(default_factory=list)  # {"prompt"} JSONL; default: the built-in eval set
    conversations: list[str] = field(default_factory=list)  # held-out conversations for the loss
    world: str = ""  # world.json the scorer checks against; default: the built-in world (seed 0)
    max_tokens: int = 48
    limit: int = 0  # evaluate only the first N prompts (0: all)
    batch_size: int = 32
    samples: int = 3  # example answers kept per family in the JSON
    out: str = ""  # JSON file; default: eval.json next to the checkpoint's stage directory


@dataclass
class EvalResult:
    checkpoint: str
    families: dict[str, dict[str, float]]  # family -> {"n", "accuracy", "refusal_rate", "score", ...}
    overall: dict[str, float]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """The inverse of `to_dict` as eval.json stores it: a figure over no prompts, written as null
        (strict JSON has no NaN), is NaN again."""
        def figures(row: dict[str, Any]) -> dict[str, float]:
            return {k: math.nan if v is None else v for k, v in row.items()}

        return cls(data["checkpoint"], {f: figures(row) for f, row in data["families"].items()},
                   figures(data["overall"]), data.get("samples", {}))


def generate_answers(ckpt: Checkpoint, prompts: list[list], max_tokens: int, batch_size: int,
                     progress: str | None = None) -> list[tuple[str, int]]:
    """Greedy answers (text, token count) to conversations that end with a user turn; with
    `progress`, a progress bar of that name counts the finished answers."""
    template = ChatTemplate(ckpt.tokenizer)
    engine = Engine(ckpt.model.eval(), ckpt.tokenizer, max_batch_size=batch_size, stop_token_ids=template.stop_ids)
    context = ckpt.model.config.context_length
    ids = [template.fit_to_context(p, context, reserve=min(max_tokens, context // 2))[0] for p in prompts]
    params = [SamplingParams(max_tokens=min(max_tokens, context - len(i)), temperature=0.0) for i in ids]
    with torch.no_grad(), tqdm(total=len(ids), desc=progress, unit="answer", disable=progress is None) as bar:
        requests = [engine.add_request(i, p) for i, p in zip(ids, params)]
        while engine.has_unfinished():
            bar.update(sum(e.finish_reason is not None for e in engine.step()))
        outputs = [engine.pop_result(r).outputs[0] for r in requests]
    return [(seq.text.strip(), len(seq.token_ids)) for seq in outputs]


def summarize(scores: list, lengths: list[int], families: list[str]) -> tuple[dict, dict]:
    """Per-family and overall figures from the scorer's verdicts."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, fam in enumerate(families):
        groups[fam].append(i)
    per_family = {fam: _figures([scores[i] for i in idx], [lengths[i] for i in idx]) for fam, idx in groups.items()}
    overall = _figures(scores, lengths)
    harmful = [s for s in scores if s.should_refuse]
    harmless = [s for s in scores if not s.should_refuse]
    overall["refusal_rate_harmful"] = _share(s.refused for s in harmful)
    overall["over_refusal_rate"] = _share(s.refused for s in harmless)
    return dict(sorted(per_family.items())), overall


def _share(flags) -> float:
    flags = list(flags)
    return sum(map(bool, flags)) / len(flags) if flags else math.nan


def _figures(scores: list, lengths: list[int]) -> dict[str, float]:
    checked = [s.correct for s in scores if s.correct is not None]
    return {
        "n": len(scores),
        "accuracy": _share(checked),
        "refusal_rate": _share(s.refused for s in scores),
        "padded_rate": _share(s.padded for s in scores),
        "score": statistics.fmean(s.value for s in scores) if scores else math.nan,
        "words": statistics.fmean(s.length for s in scores) if scores else math.nan,
        "tokens": statistics.fmean(lengths) if lengths else math.nan,
    }


def evaluate(cfg: EvalConfig, ckpt: Checkpoint | None = None, world: World | None = None,
             progress: str | None = None) -> EvalResult:
    ckpt = ckpt or load_checkpoint(cfg.checkpoint)
    world = world or (World.load(cfg.world) if cfg.world else World.build(seed=0))
    records = read_prompts(cfg.prompts).prompts if cfg.prompts else builtin_eval_prompts(world)
    if cfg.limit:
        records = records[: cfg.limit]
    prompts = [r.messages for r in records]
    answers = generate_answers(ckpt, prompts, cfg.max_tokens, cfg.batch_size, progress)
    scorer = Scorer(world)
    scores = [scorer.score(p, text) for p, (text, _) in zip(prompts, answers)]
    families = [r.family or s.family for r, s in zip(records, scores)]
    per_family, overall = summarize(scores, [n for _, n in answers], families)
    if cfg.conversations:
        overall |= validation_loss(ckpt, cfg.conversations)
    samples: dict[str, list[dict]] = defaultdict(list)
    for p, (text, _), fam, s in zip(prompts, answers, families, scores):
        if len(samples[fam]) < cfg.samples:
            samples[fam].append({"prompt": p[-1].content, "answer": text, "score": s.value})
    return EvalResult(str(ckpt.path), per_family, overall, dict(samples))


def validation_loss(ckpt: Checkpoint, sources: list[str]) -> dict[str, float]:
    template = ChatTemplate(ckpt.tokenizer)
    seq_len = ckpt.model.config.context_length
    examples = [e for c in read_conversations(sources).conversations
                if (e := encode_example(template, c, seq_len)) is not None]
    figures = conversation_loss(ckpt.model.eval(), examples, template.eot_id)
    return {"val_loss": figures["loss"], "val_ppl": figures["ppl"]}


def builtin_eval_prompts(world: World) -> list[PromptRecord]:
    """The built-in world's held-out evaluation prompts (task seed 0), made in memory."""
    return [PromptRecord(list(t.prompt), t.family) for t in build_tasks(world, seed=0).eval]


COLUMNS = (("n", "n", "{:.0f}"), ("accuracy", "accuracy", "{:.1%}"), ("refusal_rate", "refused", "{:.1%}"),
           ("padded_rate", "padded", "{:.1%}"), ("score", "score", "{:.3f}"), ("words", "words", "{:.1f}"))


def format_table(results: dict[str, EvalResult]) -> str:
    """One row per family (and overall) and one column group per evaluated model."""
    names = list(results)
    families = sorted({f for r in results.values() for f in r.families})
    shown = COLUMNS[1:5]
    group = len(" ".join(f"{label:>8}" for _, label, _ in shown))
    lines = [f"{'family':<12} | " + " | ".join(f"{name[:group]:^{group}}" for name in names),
             f"{'':<12} | " + " | ".join(" ".join(f"{label:>8}" for _, label, _ in shown) for _ in names)]
    lines.append("-" * len(lines[1]))
    for fam in [*families, "overall"]:
        cells = []
        for name in names:
            row = results[name].overall if fam == "overall" else results[name].families.get(fam, {})
            cells.append(" ".join(_cell(row.get(key), fmt) for key, _, fmt in shown))
        lines.append(f"{fam:<12} | " + " | ".join(cells))
    lines.append("")
    for name in names:
        o = results[name].overall
        extra = [f"refusal on harmful {o['refusal_rate_harmful']:.1%}", f"over-refusal {o['over_refusal_rate']:.1%}",
                 f"mean length {o['words']:.1f} words / {o['tokens']:.1f} tokens"]
        if "val_loss" in o:
            extra.append(f"val loss {o['val_loss']:.3f} (ppl {o['val_ppl']:.2f})")
        lines.append(f"{name}: " + ", ".join(extra))
    return "\n".join(lines)


def _cell(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>8}"
    return f"{fmt.format(value):>8}"


def write_result(result: EvalResult, path: str | Path) -> Path:
    return atomic_write_text(path, strict_json(result.to_dict(), indent=2, default=float))
