"""`chatforge detect` and the watermark flags that `generate`, `chat` and `detect` share.

One set of flags (`--watermark-key`, `--watermark-gamma`, ...) with one set of defaults serves the
generator and the detector, so a text is tested with the settings it was written with unless the
user says otherwise (the reference implementations' users met detectors run with other settings).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from chatforge.detect.score import DEFAULT_Z_THRESHOLD, MIN_TOKENS
from chatforge.errors import ConfigError
from chatforge.generate.watermark import SCHEMES, WatermarkConfig, key_from_text


def watermark_options(fn: Callable) -> Callable:
    """The watermark's flags; the command gets `watermark` (a WatermarkConfig, or None without a key)."""
    options = [
        click.option("--watermark-key", envvar="CHATFORGE_WATERMARK_KEY", default=None, show_envvar=True,
                     help="Watermark with this secret key (any text, or an integer as transformers' hashing_key)."),
        click.option("--watermark-gamma", default=0.25, show_default=True, help="The green list's share of tokens."),
        click.option("--watermark-delta", default=2.0, show_default=True, help="The bias on green tokens' logits."),
        click.option("--watermark-seeding-scheme", type=click.Choice(SCHEMES), default="lefthash", show_default=True,
                     help="lefthash: seeded by the previous tokens; selfhash: by them and the token itself."),
        click.option("--watermark-context-width", default=1, show_default=True,
                     help="Tokens in the seeding window (selfhash counts the token itself; the paper uses 4)."),
    ]
    for option in reversed(options):
        fn = option(fn)

    def wrapped(*args: Any, watermark_key: str | None, watermark_gamma: float, watermark_delta: float,
                watermark_seeding_scheme: str, watermark_context_width: int, **kwargs: Any) -> Any:
        watermark = None
        if watermark_key is not None:
            watermark = WatermarkConfig(key=key_from_text(watermark_key), gamma=watermark_gamma,
                                        delta=watermark_delta, seeding_scheme=watermark_seeding_scheme,
                                        context_width=watermark_context_width)
        return fn(*args, watermark=watermark, **kwargs)

    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    wrapped.__click_params__ = fn.__click_params__  # type: ignore[attr-defined]
    return wrapped


@dataclass
class Text:
    """One text to test and where it came from (file and line, or stdin)."""

    source: str
    text: str
    context: str = ""


def read_texts(paths: tuple[str, ...], field: str, context_field: str) -> Iterator[Text]:
    """Texts from files (a .jsonl file gives one text per line, from `field`; any other file is one
    text) or, without paths or with '-', from stdin."""
    for path in paths or ("-",):
        if path == "-":
            yield Text("stdin", sys.stdin.read())
        elif path.endswith(".jsonl"):
            yield from _jsonl_texts(Path(path), field, context_field)
        else:
            yield Text(path, _read(Path(path)))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"detect: {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"detect: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_texts(path: Path, field: str, context_field: str) -> Iterator[Text]:
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"detect: {where}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ConfigError(f"detect: {where}: expected an object with a string field {field!r}")
        context = record.get(context_field, "") if context_field else ""
        yield Text(where, record[field], context if isinstance(context, str) else "")


def summary_line(source: str, result: dict) -> str:
    if result["verdict"] == "too short":
        return f"{source}: too short ({result['message']})"
    line = (f"{source}: {result['verdict']} (z = {result['z']:.2f}, p = {result['p_value']:.3g}, "
            f"{result['green_tokens']} of {result['tokens_scored']} tokens green)")
    window = result.get("window")
    if window:
        line += (f"; best passage: characters {window['start_char']}-{window['end_char']}, z = {window['z']:.2f}, "
                 f"p = {window['corrected_p_value']:.3g} after {window['windows_tried']} windows: {window['verdict']}")
    return line


ZERO_SHOT = {"perplexity-burstiness": "perplexity_burstiness", "fast-detectgpt": "fast_detectgpt",
             "binoculars": "binoculars"}


@click.command()
@click.argument("paths", nargs=-1)
@click.option("--checkpoint", required=True,
              help="The generating model: its tokenizer and vocabulary for the watermark, the scoring model for "
                   "the zero-shot methods (Binoculars' performer: the chat model).")
@click.option("--method", type=click.Choice(["watermark", *ZERO_SHOT]), default="watermark", show_default=True,
              help="watermark (needs the key) or a zero-shot detector (needs no key; calibrate it first).")
@click.option("--observer", default=None, help="Binoculars' observer: the base model the chat model was tuned from.")
@click.option("--calibrate", "calibrate_file", default=None,
              help="Zero-shot: human reference texts (JSONL, 'text' and optional 'context') to set the threshold on.")
@click.option("--fpr", default=0.01, show_default=True, help="With --calibrate: the false-positive rate on human text.")
@click.option("--threshold", "threshold_file", default=None,
              help="Zero-shot: the calibrated threshold file to judge with, or to write with --calibrate "
                   "(default there: REFERENCE.METHOD.threshold.json).")
@click.option("--field", default="text", show_default=True, help="The JSONL field holding the text.")
@click.option("--context-field", default="", help="A JSONL field holding the prompt: it seeds, it is not scored.")
@click.option("--z-threshold", default=DEFAULT_Z_THRESHOLD, show_default=True, help="z above this: watermarked.")
@click.option("--min-tokens", default=MIN_TOKENS, show_default=True, help="Fewer scored tokens: too short.")
@click.option("--count-repeated-ngrams", is_flag=True,
              help="Score every repeat of an n-gram (default: each once, as the reference advises).")
@click.option("--windowed", is_flag=True, help="Also find the most watermarked passage (text pasted into text).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per text instead of a line of prose.")
@watermark_options
def detect(paths: tuple[str, ...], checkpoint: str, method: str, observer: str | None, calibrate_file: str | None,
           fpr: float, threshold_file: str | None, field: str, context_field: str, z_threshold: float,
           min_tokens: int, count_repeated_ngrams: bool, windowed: bool, as_json: bool,
           watermark: WatermarkConfig | None) -> None:
    """Tell machine text from human text: chatforge's watermark, or a zero-shot detector calibrated on human
    text (`--calibrate human.jsonl --fpr 0.01`). Texts come from files, a JSONL file's field, or stdin."""
    from chatforge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    if method != "watermark":
        zero_shot(ckpt, ZERO_SHOT[method], paths, observer, calibrate_file, fpr, threshold_file, field, context_field,
                  min_tokens, as_json)
        return
    if calibrate_file or threshold_file or observer:
        raise click.UsageError("--calibrate, --threshold and --observer are for the zero-shot methods (--method "
                               "fast-detectgpt, perplexity-burstiness or binoculars); the watermark's test is "
                               "--z-threshold")
    if watermark is None:
        raise click.UsageError("detect needs the watermark's key: --watermark-key or CHATFORGE_WATERMARK_KEY")
    watermark_texts(ckpt, watermark, read_texts(paths, field, context_field), z_threshold, min_tokens,
                    not count_repeated_ngrams, windowed, as_json)


def watermark_texts(ckpt: Any, watermark: WatermarkConfig, texts: Iterator[Text], z_threshold: float,
                    min_tokens: int, ignore_repeated_ngrams: bool, windowed: bool, as_json: bool) -> None:
    from chatforge.detect.score import detect_watermark

    vocab_size = ckpt.model.config.vocab_size
    for item in texts:
        result = detect_watermark(item.text, ckpt.tokenizer, watermark, vocab_size=vocab_size, context=item.context,
                                  ignore_repeated_ngrams=ignore_repeated_ngrams, z_threshold=z_threshold,
                                  min_tokens=min_tokens, windowed=windowed).to_dict()
        if as_json:
            click.echo(json.dumps({"source": item.source, **result, "watermark": watermark.public()}))
        else:
            click.echo(summary_line(item.source, result))


def zero_shot(ckpt: Any, method: str, paths: tuple[str, ...], observer: str | None, calibrate_file: str | None,
              fpr: float, threshold_file: str | None, field: str, context_field: str, min_tokens: int,
              as_json: bool) -> None:
    """Score with a zero-shot method; calibrate a threshold first (--calibrate) or judge with a saved one."""
    from chatforge.detect.calibrate import Threshold, apply_threshold, calibrate, read_reference
    from chatforge.detect.zero_shot import METHODS, fingerprint

    models = scoring_models(ckpt, method, observer)
    prints = fingerprint(ckpt.tokenizer, *models)

    def score(texts: list[str], contexts: list) -> list:
        return METHODS[method].score(texts, *models, ckpt.tokenizer, contexts, min_tokens=min_tokens)

    threshold = None
    if calibrate_file:
        texts, contexts = read_reference(calibrate_file, field, context_field or "context")
        threshold = calibrate(method, score(texts, contexts), fpr, prints)
        path = Path(threshold_file or f"{Path(calibrate_file).with_suffix('')}.{method}.threshold.json")
        threshold.save(path)
        click.echo(f"{method}: threshold {threshold.threshold:.4g} ({threshold.direction} is machine) flags "
                   f"{threshold.achieved_fpr:.2%} of {threshold.n_reference} human texts -> {path}", err=True)
        if not paths:
            return
    elif threshold_file:
        threshold = Threshold.load(threshold_file)
    items = list(read_texts(paths, field, context_field))
    results = score([i.text for i in items], [i.context or None for i in items])
    if threshold is not None:
        results = apply_threshold(results, threshold, prints)
    for item, result in zip(items, results):
        if as_json:
            click.echo(json.dumps({"source": item.source, **result.to_dict()}))
        else:
            click.echo(zero_shot_line(item.source, result))


def scoring_models(ckpt: Any, method: str, observer: str | None) -> list:
    """The models a method scores with: Binoculars' observer (the base model) and performer (the chat
    model), or the one checkpoint."""
    from chatforge.checkpoint import load_checkpoint

    if method != "binoculars":
        if observer:
            raise click.UsageError(f"--observer is Binoculars' base model; {method} scores with --checkpoint only")
        return [ckpt.model]
    if not observer:
        raise click.UsageError("binoculars needs --observer: the base model the --checkpoint chat model was tuned from")
    base = load_checkpoint(observer)
    if base.tokenizer.hash != ckpt.tokenizer.hash:
        raise ConfigError(f"binoculars: {observer} and the checkpoint have different tokenizers; the observer must be "
                          "the base model the chat model was tuned from")
    return [base.model, ckpt.model]


def zero_shot_line(source: str, result: Any) -> str:
    if result.score is None:
        return f"{source}: {result.verdict} ({result.message})"
    judged = f"{result.verdict}" if result.threshold is None else f"{result.verdict} (threshold {result.threshold:.4g})"
    line = f"{source}: {judged}, {result.method} score {result.score:.4g} over {result.tokens_scored} tokens"
    return line + (f"; {result.message}" if result.message else "")
