"""Thresholds for the zero-shot detectors, calibrated on human text at a chosen false-positive rate.

A zero-shot score means nothing until it is compared with scores of human text scored the same way:
the published thresholds (Binoculars' 0.9015, Fast-DetectGPT's) were chosen for other models and other
data and do not transfer. `calibrate` takes the scores of human reference texts and picks the
threshold as an empirical quantile, conservatively: at most floor(fpr * n) of the n scorable human
texts are flagged (ties only flag fewer), and it refuses when n < 1 / fpr, where no threshold could
show that rate. The achieved rate on the reference is recorded with it.

A Threshold remembers the method, the scoring parameters (context length, window stride, the
burstiness definition) and the fingerprint of the tokenizer and models; `apply_threshold` refuses
scores made another way, so a threshold is never used with other models or parameters than it was
made with. It notes, in the message, a text whose length lies outside the reference texts' lengths.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from chatforge.data.readers import iter_jsonl
from chatforge.detect.zero_shot import METHODS, ZeroShotScore
from chatforge.errors import ConfigError, DataError
from chatforge.files import atomic_write_text, strict_json

THRESHOLD_FORMAT = "chatforge-zero-shot-threshold-v1"


@dataclass
class Threshold:
    """A calibrated decision rule: machine when the score is above (direction "higher") or below
    ("lower") `threshold`."""

    method: str
    direction: str
    threshold: float
    fpr: float  # the rate asked for
    achieved_fpr: float  # the share of the scorable human reference texts the rule flags
    n_reference: int  # scorable human texts
    n_too_short: int  # human texts left out as too short
    tokens_scored: dict[str, float]  # min, median and max over the scorable reference texts
    params: dict[str, Any]
    fingerprint: dict[str, Any]

    def is_machine(self, score: float) -> bool:
        return score > self.threshold if self.direction == "higher" else score < self.threshold

    def to_json(self) -> str:
        return strict_json({"format": THRESHOLD_FORMAT, **asdict(self)}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "threshold") -> Threshold:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: not valid JSON ({e.msg} at line {e.lineno}); expected a threshold") from None
        if not isinstance(obj, dict) or obj.get("format") != THRESHOLD_FORMAT:
            raise DataError(f"{source}: expected a JSON object with \"format\": \"{THRESHOLD_FORMAT}\"")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(obj))
        if missing:
            raise DataError(f"{source}: missing field(s) {missing}")
        if obj["method"] not in METHODS:
            raise DataError(f"{source}: unknown method {obj['method']!r}; expected one of {sorted(METHODS)}")
        return cls(**{k: obj[k] for k in names})

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Threshold:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{path}: missing; expected a threshold (chatforge detect --calibrate)") from None
        return cls.from_json(text, str(path))


def _scores_params(method: str, scores: list[ZeroShotScore], params: dict[str, Any] | None) -> dict[str, Any]:
    """The scores' common parameters (checked against `params` when given)."""
    for s in scores:
        if s.method != method:
            raise ConfigError(f"calibrating {method}: got a {s.method} score; score the human texts with {method}")
    seen = {json.dumps(s.details["params"], sort_keys=True) for s in scores if "params" in s.details}
    if len(seen) > 1:
        raise ConfigError(f"calibrating {method}: the human texts were scored with different parameters: {seen}")
    found = json.loads(seen.pop()) if seen else None
    if params is not None and found is not None and found != params:
        raise ConfigError(f"calibrating {method}: params {params} differ from the scores' {found}")
    return dict(params if params is not None else found or {})


def calibrate(method: str, human_scores: list[ZeroShotScore], fpr: float, fingerprint: dict[str, Any],
              params: dict[str, Any] | None = None) -> Threshold:
    """The threshold flagging at most `fpr` of the scorable human texts (too-short ones are left out).

    ConfigError for an unknown method, fpr outside (0, 1), scores of another method or parameters, or
    fewer than 1 / fpr scorable texts. params default to those recorded in the scores."""
    if method not in METHODS:
        raise ConfigError(f"unknown zero-shot method {method!r}; expected one of {sorted(METHODS)}")
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"fpr: got {fpr}; expected a rate between 0 and 1, e.g. 0.01")
    params = _scores_params(method, human_scores, params)
    scored = [s for s in human_scores if s.score is not None]
    n = len(scored)
    allowed = math.floor(n * fpr + 1e-9)  # human texts the rule may flag
    if allowed < 1:
        raise ConfigError(f"calibrating {method} at fpr {fpr} needs at least {math.ceil(1 / fpr - 1e-9)} human texts "
                          f"long enough to score; got {n} ({len(human_scores) - n} too short)")
    values = sorted(float(s.score) for s in scored)
    direction = METHODS[method].direction
    threshold = values[n - allowed - 1] if direction == "higher" else values[allowed]
    flagged = sum(v > threshold if direction == "higher" else v < threshold for v in values)
    lengths = [s.tokens_scored for s in scored]
    return Threshold(method, direction, threshold, fpr, flagged / n, n, len(human_scores) - n,
                     {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
                     params, fingerprint)


def _fingerprint_difference(made: dict[str, Any], given: dict[str, Any]) -> str:
    if made.get("tokenizer") != given.get("tokenizer"):
        return "the tokenizer differs"
    a, b = made.get("models", []), given.get("models", [])
    if len(a) != len(b):
        return f"it was made with {len(a)} model(s), not {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            part = "config" if x.get("config") != y.get("config") else "weights"
            return f"model {i + 1}'s {part} differ"
    return "the fingerprints differ"


def apply_threshold(scores: list[ZeroShotScore], threshold: Threshold,
                    fingerprint: dict[str, Any]) -> list[ZeroShotScore]:
    """Copies of `scores` with the verdict ("machine" or "human"; "too short" stays) and the threshold.

    ConfigError when the models' fingerprint, a score's method or its parameters are not the
    threshold's: a threshold only means its false-positive rate for what it was calibrated on."""
    if fingerprint != threshold.fingerprint:
        raise ConfigError(f"this {threshold.method} threshold was calibrated with other models: "
                          f"{_fingerprint_difference(threshold.fingerprint, fingerprint)}; calibrate again")
    out = []
    for s in scores:
        if s.method != threshold.method:
            raise ConfigError(f"a {threshold.method} threshold cannot judge a {s.method} score")
        if "params" in s.details and s.details["params"] != threshold.params:
            raise ConfigError(f"the {s.method} score was made with parameters {s.details['params']}, the threshold "
                              f"with {threshold.params}; score with the threshold's parameters or calibrate again")
        if s.score is None:
            out.append(replace(s, threshold=threshold.threshold))
            continue
        verdict = "machine" if threshold.is_machine(s.score) else "human"
        out.append(replace(s, verdict=verdict, threshold=threshold.threshold, message=_length_note(s, threshold)))
    return out


def _length_note(score: ZeroShotScore, threshold: Threshold) -> str:
    low, high = threshold.tokens_scored["min"], threshold.tokens_scored["max"]
    if low <= score.tokens_scored <= high:
        return score.message
    note = (f"{score.tokens_scored} tokens scored; the threshold was calibrated on texts of {low} to {high} "
            "tokens, so its false-positive rate may not hold here")
    return f"{score.message}; {note}" if score.message else note


def read_reference(path: str | Path, text_field: str = "text",
                   context_field: str = "context") -> tuple[list[str], list[str | None]]:
    """Human reference texts from a JSON Lines file: one object per line with `text_field` (a string)
    and optionally `context_field` (the prompt it answered); DataError naming the line otherwise."""
    texts: list[str] = []
    contexts: list[str | None] = []
    expected = f'an object with "{text_field}" (a string) and optionally "{context_field}"'
    try:
        for number, obj in iter_jsonl(path, expected):
            text, context = obj.get(text_field), obj.get(context_field)
            if not isinstance(text, str) or not (context is None or isinstance(context, str)):
                raise DataError(f"{path}:{number}: expected {expected}")
            texts.append(text)
            contexts.append(context)
    except FileNotFoundError:
        raise DataError(f"{path}: missing; expected human reference texts, {expected}, one per line") from None
    if not texts:
        raise DataError(f"{path}: no texts; expected one JSON object per line, {expected}")
    return texts, contexts
