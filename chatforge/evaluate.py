"""Evaluation of a chat model on held-out prompts, judged by a program, plus held-out loss.

For each held-out prompt the model answers greedily through the engine (the chat template's
generation prompt; the answer ends at `<|end|>`), and the world's scorer checks the answer:
correct or not, refused or not, padded with filler or not, how long. The scorer is the ground
truth; no training stage ever sees it. Reported:

- accuracy per task family (share of correct answers where correctness applies),
- refusal rate on harmful prompts (should be high) and over-refusal on harmless ones (low),
- mean checked score (the scorer's `value`), padded share, mean response length in words and tokens,
- validation loss and perplexity on held-out conversations (assistant tokens only).

Prompts with tools (a record's ``"tools"``, or a tool family's label: ``calc``, ``dates``,
``functions``) are answered with the engine's tool loop: the built-in calculator and calendar (on the
task data's fixed clock, ``today``) and the world's functions the prompt declares run as the model
calls them, their results are fed in, and the scorer judges the whole transcript (the calls, and the
answer after the results). Each tool family asks a plain family's questions with tools at hand, so
the table shows the same questions with and without tools (``arithmetic`` and ``calc``, ``facts``
and ``functions``), and how often each tool family called a tool and called it right.

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

from chatforge.chat import ChatTemplate, Conversation, Message
from chatforge.checkpoint import Checkpoint, load_checkpoint
from chatforge.data.chat_batches import conversation_loss, encode_example
from chatforge.data.chat_readers import PromptRecord, read_conversations, read_prompts
from chatforge.data.tasks import TODAY, TOOL_FAMILIES, WITHOUT_TOOLS, Scorer, TaskConfig, build_tasks, task_tools
from chatforge.data.tasks.calls import Response, as_response, response_json, spoken_text
from chatforge.data.world import World
from chatforge.files import atomic_write_text, strict_json
from chatforge.generate.engine import Engine
from chatforge.generate.outputs import SequenceOutput
from chatforge.generate.params import SamplingParams
from chatforge.generate.tool_loop import ToolUse
from chatforge.knowledge import fact_knowledge
from chatforge.tools import Tool

BUILTIN_TOOLS = ("calculator", "calendar")


@dataclass
class EvalConfig:
    checkpoint: str = ""
    prompts: list[str] = field(default_factory=list)  # {"prompt"} JSONL; default: the built-in eval set
    conversations: list[str] = field(default_factory=list)  # held-out conversations for the loss
    world: str = ""  # world.json the scorer checks against; default: the built-in world (seed 0)
    max_tokens: int = 96  # step-by-step answers take up to about 75 tokens of the demo tokenizer
    limit: int = 0  # evaluate only the first N prompts (0: all)
    batch_size: int = 32
    samples: int = 3  # example answers kept per family in the JSON
    max_tool_tokens: int = 128  # prompts answered with tools: calls, fed results and the answer together
    today: str = TODAY  # the calendar's clock for prompts with tools (the task data's TaskConfig.today)
    fact_knowledge: bool = False  # also score every fact of the world as lm-eval multiple choice (knowledge.py)
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


def greedy_outputs(ckpt: Checkpoint, prompts: list, max_tokens: int, batch_size: int,
                   progress: str | None = None, uses: list[ToolUse | None] | None = None,
                   watermark: Any = None) -> list[SequenceOutput]:
    """Each conversation's greedy answer (ending with a user turn; each fitted to the context with room
    for the reply), with `uses[i]` as prompt i's tool use and `watermark` (a WatermarkConfig) biasing
    every answer; with `progress`, a progress bar of that name counts the finished answers."""
    template = ChatTemplate(ckpt.tokenizer)
    engine = Engine(ckpt.model.eval(), ckpt.tokenizer, max_batch_size=batch_size, stop_token_ids=template.stop_ids)
    context = ckpt.model.config.context_length
    ids = [template.fit_to_context(p, context, reserve=min(max_tokens, context // 2))[0] for p in prompts]
    params = [SamplingParams(max_tokens=min(max_tokens, context - len(i)), temperature=0.0, watermark=watermark)
              for i in ids]
    uses = uses or [None] * len(ids)
    with torch.no_grad(), tqdm(total=len(ids), desc=progress, unit="answer", disable=progress is None) as bar:
        requests = [engine.add_request(i, p, tool_use=u) for i, p, u in zip(ids, params, uses)]
        while engine.has_unfinished():
            bar.update(sum(e.finish_reason is not None for e in engine.step()))
        return [engine.pop_result(r).outputs[0] for r in requests]


def generate_answers(ckpt: Checkpoint, prompts: list[list], max_tokens: int, batch_size: int,
                     progress: str | None = None) -> list[tuple[str, int]]:
    """Greedy answers (text, token count) to conversations that end with a user turn."""
    return [(seq.text.strip(), len(seq.token_ids))
            for seq in greedy_outputs(ckpt, prompts, max_tokens, batch_size, progress)]


def generate_transcripts(ckpt: Checkpoint, prompts: list[Conversation], uses: list[ToolUse], max_tokens: int,
                         batch_size: int, progress: str | None = None) -> list[tuple[Response, int]]:
    """Greedy answers with tools: each prompt's transcript (its calls, the results the engine fed in,
    what the model said) and the tokens the model wrote (fed results not counted)."""
    template = ChatTemplate(ckpt.tokenizer)
    outputs = greedy_outputs(ckpt, prompts, max_tokens, batch_size, progress, uses)
    fed = [sum(end - start for start, end in seq.fed_spans) for seq in outputs]
    return [(_transcript(template, seq), len(seq.token_ids) - n) for seq, n in zip(outputs, fed)]


def _transcript(template: ChatTemplate, seq: SequenceOutput) -> Response:
    """The answer's tokens read back as messages: text, calls and the results fed between them."""
    messages = template.parse([template.role_ids["assistant"], *seq.token_ids]).messages
    return as_response([Message(m.role, m.content.strip()) if m.role == "assistant" else m for m in messages])


def uses_tools(record: PromptRecord) -> bool:
    """Whether a prompt is answered with tools: it declares some, or it is of a tool family."""
    return bool(record.tools) or record.family in TOOL_FAMILIES


def tool_use(record: PromptRecord, tools: dict[str, Tool]) -> ToolUse:
    """What the engine runs for a prompt: the built-in tools, and the world functions it declares."""
    declared = {t["name"] for t in record.tools}
    return ToolUse({name: t for name, t in tools.items() if name in BUILTIN_TOOLS or name in declared})


def answer_all(ckpt: Checkpoint, records: list[PromptRecord], cfg: EvalConfig, world: World,
               progress: str | None = None) -> list[tuple[Response, int]]:
    """Every prompt's answer and its token count: plain prompts as always (`generate_answers`), prompts
    with tools through the tool loop."""
    with_tools = [i for i, r in enumerate(records) if uses_tools(r)]
    if not with_tools:
        return generate_answers(ckpt, [r.messages for r in records], cfg.max_tokens, cfg.batch_size, progress)
    plain = [i for i in range(len(records)) if i not in set(with_tools)]
    answers: list[tuple[Response, int]] = [("", 0)] * len(records)
    if plain:
        texts = generate_answers(ckpt, [records[i].messages for i in plain], cfg.max_tokens, cfg.batch_size, progress)
        for i, answer in zip(plain, texts):
            answers[i] = answer
    tools = task_tools(world, cfg.today)
    transcripts = generate_transcripts(ckpt, [records[i].conversation() for i in with_tools],
                                       [tool_use(records[i], tools) for i in with_tools], cfg.max_tool_tokens,
                                       cfg.batch_size, progress)
    for i, answer in zip(with_tools, transcripts):
        answers[i] = answer
    return answers


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


def phrasing_scores(scores: list, phrasings: list[str | None]) -> dict[str, float]:
    """Mean checked score of the prompts asked in training phrasings and in held-out ones (phrasings
    no training data uses): a gap between them is what the model memorized of the templates."""
    out = {}
    for kind in ("train", "heldout"):
        values = [s.value for s, p in zip(scores, phrasings) if p == kind]
        if values:
            out[f"score_{kind}_phrasing"] = statistics.fmean(values)
    return out


def _tool_figures(scores: list) -> dict[str, float]:
    """How the answers used tools, where the scorer judged tool use (tool families): none otherwise."""
    judged = [s for s in scores if getattr(s, "called", None) is not None]
    if not judged:
        return {}
    called = [s for s in judged if s.called]
    return {"called_rate": _share(s.called for s in judged), "call_accuracy": _share(s.call_correct for s in called)}


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
    } | _tool_figures(scores)


def evaluate(cfg: EvalConfig, ckpt: Checkpoint | None = None, world: World | None = None,
             progress: str | None = None) -> EvalResult:
    ckpt = ckpt or load_checkpoint(cfg.checkpoint)
    world = world or (World.load(cfg.world) if cfg.world else World.build(seed=0))
    records = read_prompts(cfg.prompts).prompts if cfg.prompts else builtin_eval_prompts(world)
    if cfg.limit:
        records = records[: cfg.limit]
    prompts = [r.messages for r in records]
    answers = answer_all(ckpt, records, cfg, world, progress)
    scorer = Scorer(world, cfg.today)
    scores = [scorer.score(r.conversation(), text, r.family) if uses_tools(r) else scorer.score(p, text)
              for r, p, (text, _) in zip(records, prompts, answers)]
    families = [r.family or s.family for r, s in zip(records, scores)]
    per_family, overall = summarize(scores, [n for _, n in answers], families)
    overall |= phrasing_scores(scores, [scorer.phrasing(r.conversation(), r.family) for r in records])
    if cfg.conversations:
        overall |= validation_loss(ckpt, cfg.conversations)
    if cfg.fact_knowledge:
        known = fact_knowledge(ckpt.model.eval(), ckpt.tokenizer, world)
        overall |= {"facts_known": known["acc"], "facts_known_norm": known["acc_norm"]}
    samples: dict[str, list[dict]] = defaultdict(list)
    for p, (text, _), fam, s in zip(prompts, answers, families, scores):
        if len(samples[fam]) < cfg.samples:
            sample = {"prompt": p[-1].content, "answer": spoken_text(text), "score": s.value}
            samples[fam].append(sample if isinstance(text, str) else sample | {"transcript": response_json(text)})
    return EvalResult(str(ckpt.path), per_family, overall, dict(samples))


def validation_loss(ckpt: Checkpoint, sources: list[str]) -> dict[str, float]:
    template = ChatTemplate(ckpt.tokenizer)
    seq_len = ckpt.model.config.context_length
    examples = [e for c in read_conversations(sources).conversations
                if (e := encode_example(template, c, seq_len)) is not None]
    figures = conversation_loss(ckpt.model.eval(), examples, template.eot_id)
    return {"val_loss": figures["loss"], "val_ppl": figures["ppl"]}


def builtin_eval_prompts(world: World, config: TaskConfig | None = None) -> list[PromptRecord]:
    """The built-in world's held-out evaluation prompts (task seed 0), made in memory; with tool
    families in `config`'s mix, theirs too."""
    return [PromptRecord(list(t.prompt), t.family, tools=list(t.tools)) for t in build_tasks(world, 0, config).eval]


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
        if "facts_known" in o:
            extra.append(f"facts known (multiple choice) {o['facts_known']:.1%}")
        if "score_heldout_phrasing" in o and "score_train_phrasing" in o:
            extra.append(f"score in training phrasings {o['score_train_phrasing']:.3f}, "
                         f"in held-out phrasings {o['score_heldout_phrasing']:.3f}")
        lines.append(f"{name}: " + ", ".join(extra))
        lines += _tool_lines(name, results[name])
    return "\n".join(lines)


def _tool_lines(name: str, result: EvalResult) -> list[str]:
    """The same questions without and with tools, and how each tool family used them (none without)."""
    rows = result.families
    pairs = [f"{plain} {_fmt(rows[plain].get('score'), '{:.3f}')} -> {fam} {_fmt(rows[fam].get('score'), '{:.3f}')}"
             for fam, plain in WITHOUT_TOOLS.items() if fam in rows and plain in rows]
    use = [f"{fam} {_fmt(row['called_rate'], '{:.1%}')} (right {_fmt(row.get('call_accuracy'), '{:.1%}')})"
           for fam, row in rows.items() if "called_rate" in row]
    lines = [f"{name}: score without -> with tools: " + ", ".join(pairs)] if pairs else []
    return lines + ([f"{name}: tools called: " + ", ".join(use)] if use else [])


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else fmt.format(value)


def _cell(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>8}"
    return f"{fmt.format(value):>8}"


def write_result(result: EvalResult, path: str | Path) -> Path:
    return atomic_write_text(path, strict_json(result.to_dict(), indent=2, default=float))


def measure_int8(checkpoint: Path, out: Path, cfg: EvalConfig, world: World,
                 fp32: EvalResult | None = None) -> dict:
    """What weight-only int8 costs a trained chat model (the demo's `int8` stage): `checkpoint` quantized
    to `out` as `chatforge quantize` does, and both judged on `cfg`'s held-out prompts and conversations
    (`fp32`: the fp32 model's evaluation on them, when already made). Weight bytes, checked score,
    accuracy and held-out loss of each, and int8's change in each."""
    from chatforge.accel.quantize import load_quantized, quantize_checkpoint, weight_bytes

    quantize_checkpoint(checkpoint, out)
    dense = load_checkpoint(checkpoint)
    if fp32 is None:
        fp32 = evaluate(cfg, dense, world, progress="eval fp32")
    quantized = load_quantized(out)  # not load_for_inference: the scores need no kernels built (about 40 s)
    int8 = evaluate(cfg, quantized, world, progress="eval int8")
    rows = {name: {"weights_bytes": weight_bytes(ckpt.model), "score": result.overall["score"],
                   "accuracy": result.overall["accuracy"], "val_loss": result.overall["val_loss"]}
            for name, ckpt, result in (("fp32", dense, fp32), ("int8", quantized, int8))}
    change = {k: rows["int8"][k] - rows["fp32"][k] for k in ("score", "accuracy", "val_loss")}
    return {"checkpoint": str(checkpoint), "quantized": str(out), "prompts": int(int8.overall["n"]),
            "method": "int8 weight-only, per output channel, symmetric", **rows, "change": change,
            "weights_ratio": rows["int8"]["weights_bytes"] / rows["fp32"]["weights_bytes"]}
