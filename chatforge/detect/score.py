"""Detecting the watermark: count the green tokens of a text and test them against chance.

Without a watermark each scored token is green with probability gamma, so for T tokens scored and G
green ones z = (G - gamma T) / sqrt(T gamma (1 - gamma)) is about standard normal; the one-sided
p-value is the normal survival function, 0.5 erfc(z / sqrt 2), computed exactly (no table, no
approximation). A text is "watermarked" when z exceeds the threshold (4 by default: p = 3.2e-5).

Repeated n-grams (the window that seeds a token, with the token) are scored once by default, as the
reference implementation advises: a phrase a human repeats would otherwise count its green tokens
again and again. The text is normalized before tokenization (NFC, zero-width characters removed, odd
spaces made plain), so pasting through an editor does not change the tokens. Only the text given is
scored; `context` (the prompt, when known) seeds the first tokens without being scored itself.

The windowed mode looks for a watermarked passage pasted inside human text: every window of 16, 32,
64, ... tokens is scored, the best z is reported with its character span, and its p-value is
multiplied by the number of windows tried (Bonferroni), so searching many windows does not make
human text look watermarked.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any

from chatforge.generate.watermark import GreenLists, WatermarkConfig, green_lists

MIN_TOKENS = 16  # below this many scored tokens a z-score says too little to give a verdict
DEFAULT_Z_THRESHOLD = 4.0
WINDOW_SIZES = (16, 32, 64, 128, 256, 512)

_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")


def normalize_text(text: str) -> str:
    """NFC, zero-width characters and soft hyphens removed, odd spaces (no-break, thin, ideographic...)
    made plain spaces: what an editor or a copy-paste changes without changing what one reads."""
    return _ODD_SPACES.sub(" ", _ZERO_WIDTH.sub("", unicodedata.normalize("NFC", text)))


def p_value(z: float) -> float:
    """One-sided p-value of a standard normal z: the survival function 0.5 erfc(z / sqrt 2)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def z_score(green: int, scored: int, gamma: float) -> float:
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1.0 - gamma))


@dataclass
class WatermarkScore:
    """One text's test. `verdict` is "watermarked", "not watermarked" or "too short" (then z, the
    fraction and the p-value are None: fewer than `min_tokens` tokens could be scored)."""

    tokens_scored: int
    green_tokens: int
    green_fraction: float | None
    z: float | None
    p_value: float | None
    verdict: str
    z_threshold: float
    message: str = ""
    window: dict[str, Any] | None = None  # windowed mode: the best passage found

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def green_flags(ids: list[int], lists: GreenLists, context: list[int] | tuple[int, ...] = (),
                ignore_repeated_ngrams: bool = True) -> list[bool | None]:
    """Per token of `ids`: True (green), False (red) or None (not scored: too little before it, or an
    n-gram already scored when repeats are ignored)."""
    tokens = list(context) + list(ids)
    h = lists.config.context_width
    seen: set[tuple[int, ...]] = set()
    flags: list[bool | None] = []
    for i in range(len(context), len(tokens)):
        window = lists.window_before(tokens[max(0, i - h):i], tokens[i])
        if window is None:
            flags.append(None)
            continue
        ngram = window if lists.config.selfhash else window + (tokens[i],)
        if ignore_repeated_ngrams and ngram in seen:
            flags.append(None)
            continue
        seen.add(ngram)
        flags.append(lists.is_green(window, tokens[i]))
    return flags


def verdict_of(green: int, scored: int, gamma: float, z_threshold: float, min_tokens: int) -> WatermarkScore:
    if scored < min_tokens:
        return WatermarkScore(scored, green, None, None, None, "too short", z_threshold,
                              f"{scored} tokens could be scored; a verdict needs at least {min_tokens}")
    z = z_score(green, scored, gamma)
    return WatermarkScore(scored, green, green / scored, z, p_value(z),
                          "watermarked" if z > z_threshold else "not watermarked", z_threshold)


def score_ids(ids: list[int], lists: GreenLists, context: list[int] | tuple[int, ...] = (),
              ignore_repeated_ngrams: bool = True, z_threshold: float = DEFAULT_Z_THRESHOLD,
              min_tokens: int = MIN_TOKENS) -> WatermarkScore:
    """The test over all of `ids`."""
    flags = [f for f in green_flags(ids, lists, context, ignore_repeated_ngrams) if f is not None]
    return verdict_of(sum(flags), len(flags), lists.config.gamma, z_threshold, min_tokens)


def best_window(flags: list[bool | None], gamma: float, sizes: tuple[int, ...] = WINDOW_SIZES,
                min_tokens: int = MIN_TOKENS) -> dict[str, Any] | None:
    """The window of tokens (over the scored ones) with the highest z, with its Bonferroni-corrected
    p-value; None when the text has fewer than `min_tokens` scored tokens."""
    scored = [i for i, f in enumerate(flags) if f is not None]
    prefix = [0]
    for i in scored:
        prefix.append(prefix[-1] + int(bool(flags[i])))
    n, tried, best = len(scored), 0, None
    for size in [s for s in sizes if min_tokens <= s <= n] or ([n] if n >= min_tokens else []):
        for start in range(n - size + 1):
            tried += 1
            z = z_score(prefix[start + size] - prefix[start], size, gamma)
            if best is None or z > best[0]:
                best = (z, start, size)
    if best is None:
        return None
    z, start, size = best
    return {"z": z, "p_value": p_value(z), "corrected_p_value": min(1.0, p_value(z) * tried), "windows_tried": tried,
            "tokens_scored": size, "green_tokens": prefix[start + size] - prefix[start],
            "first_token": scored[start], "last_token": scored[start + size - 1]}


def detect_watermark(text: str, tokenizer: Any, config: WatermarkConfig, vocab_size: int | None = None,
                     context: str = "", ignore_repeated_ngrams: bool = True,
                     z_threshold: float = DEFAULT_Z_THRESHOLD, min_tokens: int = MIN_TOKENS,
                     windowed: bool = False, lists: GreenLists | None = None) -> WatermarkScore:
    """Test one text for `config`'s watermark. `vocab_size`: the generating model's (default: the
    tokenizer's); `context`: the prompt the text answered, if known (seeds, not scored); `windowed`:
    also find the best passage (reported in `window`, with its character span in the normalized text)."""
    lists = lists or green_lists(config, vocab_size or tokenizer.vocab_size)
    text = normalize_text(text)
    ids = tokenizer.encode(text)
    context_ids = tokenizer.encode(normalize_text(context)) if context else []
    flags = green_flags(ids, lists, context_ids, ignore_repeated_ngrams)
    kept = [f for f in flags if f is not None]
    result = verdict_of(sum(kept), len(kept), config.gamma, z_threshold, min_tokens)
    if windowed and (window := best_window(flags, config.gamma, min_tokens=min_tokens)) is not None:
        window["start_char"] = len(tokenizer.decode(ids[: window["first_token"]]))
        window["end_char"] = len(tokenizer.decode(ids[: window["last_token"] + 1]))
        window["text"] = text[window["start_char"]: window["end_char"]]
        window["verdict"] = "watermarked" if window["corrected_p_value"] < p_value(z_threshold) else "not watermarked"
        result.window = window
    return result
