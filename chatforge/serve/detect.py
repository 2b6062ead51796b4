"""The watermark on the server: which answers carry one, and ``POST /v1/detect``, which tests texts for it.

Answers. With ``chatforge serve --watermark-key KEY`` every answer of /v1/completions and
/v1/chat/completions (streamed or not, every choice, the turns after built-in tool calls too: they
are the same engine request) is generated with `SamplingParams.watermark` set, by `answer_watermark`,
which `handlers.build_params` calls for both endpoints. Without a server key a request may bring its
own in the extra field ``watermark: {key, gamma?, delta?, seeding_scheme?, context_width?}``; on a
server with a key that field is a 400 naming ``watermark``: the operator decides, and a client can
neither switch the watermark off nor change it.

Detection. ``POST /v1/detect`` (schemas.DetectRequest) scores each text of ``input`` with
`chatforge.detect.score.detect_watermark` over the served model's vocabulary and answers
``{"object": "list", "method": "watermark", "data": [{"index": i, tokens_scored, green_tokens,
green_fraction, z, p_value, verdict, z_threshold, message, window}], "watermark": <the settings
used, never the key>}``. The key defaults to the server's (a 400 naming ``key`` when there is none),
the settings to the server's --watermark-* ones.

The key is a secret: it is never in a response (errors included: a bad key's message never repeats
it), a log line or /metrics; `WatermarkConfig.public()` is what may be shown.

``method`` names the detector. "watermark" is the only one yet; zero-shot detectors (no key: a model's
own statistics of the text) go into `DETECTORS` under their own name, with whatever body fields they
need added to DetectRequest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from chatforge.detect.score import detect_watermark
from chatforge.errors import ConfigError
from chatforge.generate.watermark import DEFAULT_KEY, GreenLists, WatermarkConfig, green_lists, key_from_text
from chatforge.serve.config import ServeConfig
from chatforge.serve.errors import APIError
from chatforge.serve.schemas import DetectRequest, WatermarkFields
from chatforge.serve.state import ServerState

SETTINGS = ("gamma", "delta", "seeding_scheme", "context_width")


# ---- keys and settings ------------------------------------------------------------------------------


def parse_key(value: str | int, param: str) -> int:
    """A key as the watermark takes it (text is hashed, a decimal integer taken as is); an error names
    `param` and never repeats the key."""
    if isinstance(value, int):
        if 0 < value < 2**63:
            return value
        raise APIError(400, f"{param}: a numeric key must be in [1, 2^63)", param=param)
    try:
        return key_from_text(value)
    except ConfigError as e:
        raise APIError(400, f"{param}: {str(e).removeprefix('watermark: ')}", param=param) from None


def watermark_config(key: int, settings: dict[str, Any], vocab_size: int) -> WatermarkConfig:
    """The watermark for `key` and `settings`, checked against the vocabulary (a gamma that leaves no
    green token fails here, not in the engine's thread); ConfigError names the setting."""
    config = WatermarkConfig(key=key, **settings)
    GreenLists(config, vocab_size)  # checks only: draws nothing
    return config


def _setting_name(e: ConfigError) -> str | None:
    """Which setting a WatermarkConfig error ("watermark: gamma must be ...") is about, if one of SETTINGS."""
    found = re.match(r"watermark: (\w+)", str(e))
    return found.group(1) if found and found.group(1) in SETTINGS else None


def _setting_error(e: ConfigError, prefix: str) -> APIError:
    """A WatermarkConfig error as a 400 naming the request's field (`prefix` + the setting)."""
    name, text = _setting_name(e), str(e).removeprefix("watermark: ")
    return APIError(400, f"{prefix}{text}" if name else text, param=f"{prefix}{name}" if name else None)


def _request_config(key: int, settings: dict[str, Any], vocab_size: int, prefix: str) -> WatermarkConfig:
    try:
        return watermark_config(key, settings, vocab_size)
    except ConfigError as e:
        raise _setting_error(e, prefix) from None


def server_watermark(config: ServeConfig, vocab_size: int) -> tuple[WatermarkConfig | None, dict[str, Any]]:
    """The server's watermark (None without --watermark-key) and its settings, which also fill what a
    request's own watermark or a detection leaves out. Bad flags are a ConfigError at startup."""
    settings = {"gamma": config.watermark_gamma, "delta": config.watermark_delta,
                "seeding_scheme": config.watermark_seeding_scheme, "context_width": config.watermark_context_width}
    try:
        watermark_config(DEFAULT_KEY, settings, vocab_size)
    except ConfigError as e:
        name, text = _setting_name(e), str(e).removeprefix("watermark: ")
        flag = f"--watermark-{name.replace('_', '-')}" if name else "watermark"
        raise ConfigError(f"{flag}: {text}") from None
    if config.watermark_key is None:
        return None, settings
    try:
        key = key_from_text(config.watermark_key)
    except ConfigError as e:  # its message never repeats the key
        raise ConfigError(f"--watermark-key: {str(e).removeprefix('watermark: ')}") from None
    return WatermarkConfig(key=key, **settings), settings


def _given(fields: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: value for name in names if (value := getattr(fields, name)) is not None}


def answer_watermark(state: ServerState, fields: WatermarkFields | None) -> WatermarkConfig | None:
    """The watermark of a request's answers: the server's whenever it has a key (a request's own
    `watermark` field is then refused), else the request's, else none."""
    if state.watermark is not None:
        if fields is not None:
            raise APIError(400, "watermark: this server watermarks every answer with its operator's key; a request "
                           "cannot set, change or switch off the watermark (leave the field out)", param="watermark")
        return state.watermark
    if fields is None:
        return None
    settings = {**state.watermark_settings, **_given(fields, SETTINGS)}
    return _request_config(parse_key(fields.key, "watermark.key"), settings, state.vocab_size, "watermark.")


# ---- /v1/detect -------------------------------------------------------------------------------------


def _texts(state: ServerState, value: str | list[str]) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise APIError(400, "input must be a string or a non-empty list of strings", param="input")
    if len(texts) > state.max_prompts:
        raise APIError(400, f"{len(texts)} texts in one request; this server takes at most {state.max_prompts}",
                       param="input")
    return texts


def detection_config(state: ServerState, body: DetectRequest) -> WatermarkConfig:
    """The watermark to test for: the body's key and settings where given, else the server's."""
    if body.key is not None:
        key = parse_key(body.key, "key")
    elif state.watermark is not None:
        key = state.watermark.key
    else:
        raise APIError(400, "key: this server has no watermark key (chatforge serve --watermark-key), so send the "
                       "key to check against in 'key'", param="key", code="no_watermark_key")
    settings = {**state.watermark_settings, **_given(body, ("gamma", "seeding_scheme", "context_width"))}
    return _request_config(key, settings, state.vocab_size, "")


def detect_watermarks(state: ServerState, body: DetectRequest, texts: list[str]) -> dict[str, Any]:
    """Method "watermark": the z-test of each text, with the green lists the engine caches for the same
    settings (GreenLists may be shared between threads)."""
    config = detection_config(state, body)
    lists = green_lists(config, state.vocab_size)
    data = []
    for i, text in enumerate(texts):
        score = detect_watermark(text, state.tokenizer, config, vocab_size=state.vocab_size, context=body.context or "",
                                 ignore_repeated_ngrams=body.ignore_repeated_ngrams, z_threshold=body.z_threshold,
                                 windowed=body.windowed, lists=lists)
        data.append({"index": i, **score.to_dict()})
    return {"object": "list", "method": "watermark", "data": data, "watermark": config.public()}


#: method name -> detector(state, body, texts) -> the response; zero-shot detectors are to come here
DETECTORS: dict[str, Callable[[ServerState, DetectRequest, list[str]], dict[str, Any]]] = {
    "watermark": detect_watermarks,
}


async def detect(state: ServerState, body: DetectRequest) -> dict[str, Any]:
    """``POST /v1/detect``: check the body, then score in a worker thread (long texts take a while)."""
    texts = _texts(state, body.input)
    detector = DETECTORS.get(body.method)
    if detector is None:
        raise APIError(400, f"method: unknown detection method {body.method!r}; this server offers "
                       f"{', '.join(DETECTORS)}", param="method")
    return await run_in_threadpool(detector, state, body, texts)
