"""What a caller asks of the engine: OpenAI's sampling parameters plus the usual extras.

Names follow the OpenAI API (max_tokens, temperature, top_p, n, best_of, stop, logprobs, echo,
presence_penalty, frequency_penalty, logit_bias, seed) so the server can pass requests through;
the extras (top_k, min_p, repetition_penalty, min_tokens, beam search) follow transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chatforge.errors import RequestError

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 20  # chat allows 20 alternatives; completions 5 (the caller passes its own limit)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0  # stop tokens and stop strings are suppressed until this many tokens exist
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # CTRL: divide positive logits (multiply negative) of seen tokens
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0), over generated tokens
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency * count, over generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100]
    stop: list[str] = field(default_factory=list)  # up to 4 strings, never part of the output
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's own end tokens
    ignore_eos: bool = False  # keep going past the model's end tokens (benchmarks)
    n: int = 1
    best_of: int | None = None  # sample best_of, return the n with the highest mean logprob
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k
    echo: bool = False  # include the prompt (and its logprobs) in the output
    seed: int | None = None
    num_beams: int = 1  # > 1: beam search (deterministic; sampling parameters do not apply)
    length_penalty: float = 1.0  # beam score = sum logprob / length ** length_penalty
    early_stopping: bool = False  # beam search stops when num_beams hypotheses are finished
    no_repeat_ngram_size: int = 0  # ban any n-gram that already occurs in the sequence
    # chat replies: the template renders a turn's content from its first character, so a first token that
    # carries a space (" Kesh") decodes to the text without it (the tokens and logprobs keep it)
    strip_leading_whitespace: bool = False
    # special tokens (a role marker a model wanders into) add no text, as vLLM's skip_special_tokens; off by
    # default so completions and scoring keep every character; the chat endpoint and `chatforge chat` turn it on
    skip_special_tokens: bool = False
    # structured output: the output must match this grammar, a GrammarSpec (a JSON object, a JSON Schema, a
    # tool call; see chatforge/generate/grammar.py), its stop tokens allowed once the JSON is complete. Set by
    # the server and the API, not a command-line flag (config False); typed Any so this module imports no
    # grammar library
    grammar: Any = field(default=None, metadata={"config": False})
    # a WatermarkConfig (chatforge/generate/watermark.py): green tokens get its bias, last of the processors; set
    # from --watermark-key or the server's setting, never echoed (it holds the secret key)
    watermark: Any = field(default=None, metadata={"config": False}, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.num_beams == 1

    def validate(self, vocab_size: int, context_length: int, prompt_len: int,
                 logprobs_limit: int = MAX_LOGPROBS) -> None:
        """Raise RequestError naming the parameter for anything the engine cannot honour."""
        checks = [
            (prompt_len >= 1, "prompt", "prompt is empty; expected at least one token"),
            (prompt_len <= context_length, "prompt",
             f"prompt has {prompt_len} tokens; the model's context is {context_length}"),
            (self.max_tokens >= 0, "max_tokens", f"max_tokens must be >= 0, got {self.max_tokens}"),
            (prompt_len + self.max_tokens <= context_length, "max_tokens",
             f"prompt ({prompt_len} tokens) + max_tokens ({self.max_tokens}) exceeds the context of "
             f"{context_length} tokens"),
            (0 <= self.min_tokens <= max(self.max_tokens, 0), "min_tokens",
             f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}"),
            (self.temperature >= 0, "temperature", f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, "top_k", f"top_k must be >= 0, got {self.top_k}"),
            (0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, "repetition_penalty",
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty",
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty",
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (len(self.stop) <= MAX_STOP_STRINGS, "stop",
             f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings"),
            (self.n >= 1, "n", f"n must be >= 1, got {self.n}"),
            (self.best_of is None or self.best_of >= self.n, "best_of",
             f"best_of ({self.best_of}) must be >= n ({self.n})"),
            (self.logprobs is None or 0 <= self.logprobs <= logprobs_limit, "logprobs",
             f"logprobs must be between 0 and {logprobs_limit}, got {self.logprobs}"),
            (self.num_beams >= 1, "num_beams", f"num_beams must be >= 1, got {self.num_beams}"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size",
             f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}"),
            (self.grammar is None or self.num_beams == 1, "num_beams",
             "beam search cannot follow a grammar (response_format json / a required tool call); use num_beams=1"),
            (self.watermark is None or self.num_beams == 1, "num_beams",
             "beam search cannot watermark its output; use num_beams=1"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise RequestError(message, param=param)
        for token, bias in self.logit_bias.items():
            if not (isinstance(token, int) and 0 <= token < vocab_size):
                raise RequestError(f"logit_bias: unknown token id {token!r}; expected 0..{vocab_size - 1}",
                                   param="logit_bias")
            if not -100 <= bias <= 100:
                raise RequestError(f"logit_bias for token {token}: {bias} is outside [-100, 100]",
                                   param="logit_bias")
        for token in self.stop_token_ids:
            if not (isinstance(token, int) and 0 <= token < vocab_size):
                raise RequestError(f"stop_token_ids: unknown token id {token!r}", param="stop_token_ids")
