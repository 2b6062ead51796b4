"""How well machine text is told from human text in the built-in world: the watermark and the zero-shot
detectors, measured on a chat model's answers to the held-out prompts.

The world's rule-made reference answers (`Task.answer`) stand for human text; the chat model's greedy
answers to the same prompts are the machine text, once plain and once watermarked. Answers are short
(a fact is a sentence), so besides single answers the figures are given for documents of `group`
answers to different prompts, as a student's homework would hold several. Each watermarked answer
is scored with its own prompt as context (seeding, not scored), and a document pools its answers'
green counts. Zero-shot detectors are calibrated on the first half of the human documents at the
chosen false-positive rate and tested on the second half and on the machine documents of the same
prompts, so no threshold is tested on the text it was set on.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from chatforge.chat import ChatTemplate
from chatforge.checkpoint import Checkpoint
from chatforge.data.tasks import Scorer, TaskConfig, build_tasks
from chatforge.data.world import World
from chatforge.detect.score import MIN_TOKENS, green_flags, p_value, verdict_of
from chatforge.errors import ConfigError
from chatforge.evaluate import greedy_outputs
from chatforge.generate.watermark import WatermarkConfig, green_lists, key_from_text


@dataclass
class DetectionSettings:
    key: str = "the demo's watermark key"  # a demo key: a real deployment keeps its key secret
    gamma: float = 0.25
    delta: float = 2.0
    z_threshold: float = 4.0
    group: int = 4  # answers per document
    fpr: float = 0.05  # the zero-shot detectors' false-positive rate on human text
    max_tokens: int = 96
    batch_size: int = 32
    families: tuple[str, ...] = ("facts", "followup", "twohop", "words", "arithmetic", "harmless")

    def watermark(self) -> WatermarkConfig:
        return WatermarkConfig(key=key_from_text(self.key), gamma=self.gamma, delta=self.delta)


def plain_tasks(world: World, families: tuple[str, ...], config: TaskConfig | None = None) -> list:
    """The held-out tasks of the chosen families (no tools: their answers are text)."""
    return [t for t in build_tasks(world, 0, config or TaskConfig()).eval if t.family in families]


def answer(ckpt: Checkpoint, tasks: list, settings: DetectionSettings, watermark: WatermarkConfig | None):
    outputs = greedy_outputs(ckpt, [list(t.prompt) for t in tasks], settings.max_tokens, settings.batch_size,
                             watermark=watermark)
    return [o.text.strip() for o in outputs], [list(o.token_ids) for o in outputs]


def prompt_ids(ckpt: Checkpoint, tasks: list, max_tokens: int) -> list[list[int]]:
    """Each task's generation prompt as `greedy_outputs` builds it: the context that seeds its answer."""
    template, context = ChatTemplate(ckpt.tokenizer), ckpt.model.config.context_length
    return [template.fit_to_context(list(t.prompt), context, reserve=min(max_tokens, context // 2))[0] for t in tasks]


def watermark_figures(ckpt: Checkpoint, tasks: list, marked_ids: list[list[int]], plain_ids: list[list[int]],
                      human_texts: list[str], settings: DetectionSettings,
                      config: WatermarkConfig | None = None) -> dict[str, Any]:
    """Detection of single answers and of documents of `group` answers: watermarked, plain, human
    (`config`: the watermark the answers were made with; default: the settings')."""
    config = config or settings.watermark()
    lists = green_lists(config, ckpt.model.config.vocab_size)
    prompts = prompt_ids(ckpt, tasks, settings.max_tokens)

    def flags(ids: list[list[int]]) -> list[list[bool]]:
        return [[f for f in green_flags(a, lists, context=p[-config.context_width:]) if f is not None]
                for a, p in zip(ids, prompts)]

    human = [[f for f in green_flags(ckpt.tokenizer.encode(t), lists) if f is not None] for t in human_texts]
    kinds = {"watermarked": flags(marked_ids), "plain": flags(plain_ids), "human": human}
    out = {"settings": config.public() | {"z_threshold": settings.z_threshold, "group": settings.group}}
    for kind, per_answer in kinds.items():
        documents = [sum(per_answer[i:i + settings.group], []) for i in range(0, len(per_answer), settings.group)]
        out[kind] = {"answers": _detection(per_answer, config.gamma, settings.z_threshold),
                     "documents": _detection(documents, config.gamma, settings.z_threshold)}
    return out


def _detection(flag_lists: list[list[bool]], gamma: float, z_threshold: float) -> dict[str, float]:
    """Share of texts long enough to score, share of those found watermarked, their mean z."""
    results = [verdict_of(sum(f), len(f), gamma, z_threshold, MIN_TOKENS) for f in flag_lists]
    scored = [r for r in results if r.z is not None]
    return {"n": len(results), "scorable": len(scored) / len(results) if results else 0.0,
            "detected": sum(r.verdict == "watermarked" for r in scored) / len(scored) if scored else float("nan"),
            "mean_z": statistics.fmean(r.z for r in scored) if scored else float("nan"),
            "mean_tokens": statistics.fmean(r.tokens_scored for r in results) if results else float("nan")}


def documents(texts: list[str], group: int) -> list[str]:
    return ["\n\n".join(texts[i:i + group]) for i in range(0, len(texts), group)]


def zero_shot_figures(chat: Checkpoint, base: Checkpoint, machine: list[str], human: list[str],
                      settings: DetectionSettings) -> dict[str, Any]:
    """Each zero-shot detector calibrated on the even human documents at `settings.fpr`, then the share
    flagged of the odd ones and of the machine documents of the same prompts as the odd ones (the tasks
    come family by family: halves cut in the middle would calibrate on some families and test on others,
    which measures how a threshold transfers between kinds of text instead)."""
    from chatforge.detect.calibrate import calibrate
    from chatforge.detect.zero_shot import METHODS, fingerprint

    human_docs, machine_docs = documents(human, settings.group), documents(machine, settings.group)
    reference, held_out, machine_test = human_docs[0::2], human_docs[1::2], machine_docs[1::2]
    models = {"model": chat.model, "observer": base.model, "performer": chat.model}
    out = {}
    for name, method in METHODS.items():
        used = [models[m] for m in method.models]
        scores = method.score(reference + held_out + machine_test, *used, chat.tokenizer)
        try:
            threshold = calibrate(name, scores[:len(reference)], settings.fpr, fingerprint(chat.tokenizer, *used))
        except ConfigError as e:  # too few human documents for this false-positive rate
            out[name] = {"threshold": None, "human_flagged": None, "machine_flagged": None, "note": str(e)}
            continue
        tested = scores[len(reference):]
        out[name] = {"threshold": threshold.threshold, "direction": method.direction,
                     "calibrated_on": len(reference), "tested_on": len(held_out),
                     "human_flagged": _flagged(tested[:len(held_out)], threshold),
                     "machine_flagged": _flagged(tested[len(held_out):], threshold)}
    return out


def _flagged(scores: list, threshold: Any) -> float | None:
    """The share of the scorable texts that the threshold calls machine-written."""
    valid = [s.score for s in scores if s.score is not None]
    return sum(map(threshold.is_machine, valid)) / len(valid) if valid else None


def checked_scores(world: World, tasks: list, texts: list[str]) -> float:
    scorer = Scorer(world)
    return statistics.fmean(scorer.score(list(t.prompt), text).value for t, text in zip(tasks, texts))


def measure_detection(chat: Checkpoint, base: Checkpoint | None, world: World,
                      settings: DetectionSettings | None = None, tasks: TaskConfig | None = None) -> dict[str, Any]:
    """Every figure of the module docstring, as one JSON-ready dict (`tasks`: the run's task settings, whose
    held-out prompts are answered)."""
    settings = settings or DetectionSettings()
    tasks = plain_tasks(world, settings.families, tasks)
    plain_texts, plain_ids = answer(chat, tasks, settings, None)
    marked_texts, marked_ids = answer(chat, tasks, settings, settings.watermark())
    human_texts = [t.answer if isinstance(t.answer, str) else "" for t in tasks]
    figures = {"prompts": len(tasks), "settings": asdict(settings) | {"key": "(hidden)"},
               "checked_score": {"plain": checked_scores(world, tasks, plain_texts),
                                 "watermarked": checked_scores(world, tasks, marked_texts)},
               "watermark": watermark_figures(chat, tasks, marked_ids, plain_ids, human_texts, settings)}
    figures["watermark"]["p_value_at_threshold"] = p_value(settings.z_threshold)
    if base is not None:
        figures["zero_shot"] = zero_shot_figures(chat, base, plain_texts, human_texts, settings)
    return figures
