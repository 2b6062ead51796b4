"""What the engine hands back: per-token logprobs, each finished sequence, a request's completion, and
the stream events of one step. Plain data, so the server, the trainers and the tests read results
without the scheduler."""

from __future__ import annotations

from dataclasses import dataclass, field

from chatforge.generate.tool_loop import CallDelta, ToolTurn


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the k most likely, best first


@dataclass
class SequenceOutput:
    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop", "length", "cancelled", "tool_calls"
    logprobs: list[TokenLogprob] | None = None  # sampled tokens' entries, then the end token's when one stopped it
    cumulative_logprob: float = 0.0
    # with tool use (tool_loop.py): the calls left to the caller (finish_reason "tool_calls"), the calls
    # the engine ran with their results, and the [start, end) spans of token_ids it fed in (not sampled)
    tool_calls: list[str] = field(default_factory=list)
    tool_turns: list[ToolTurn] = field(default_factory=list)
    fed_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def mean_logprob(self) -> float:
        return self.cumulative_logprob / max(len(self.token_ids), 1)


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    outputs: list[SequenceOutput]
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with echo: None for the first token
    completion_tokens: int = 0  # every sampled token, stop tokens included
    fed_tokens: int = 0  # tool results the engine fed in (input to the model, never sampled)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclass
class StreamEvent:
    """What one step produced for one sequence of a request."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]  # new tokens of the text (an end token that stopped it is not text)
    logprobs: list[TokenLogprob]  # with logprobs: one per sampled token, the end token included
    finish_reason: str | None = None
    call: CallDelta | None = None  # with tool use: what this step added to a call being written
    tool_turns: list[ToolTurn] = field(default_factory=list)  # calls the engine ran this step, with results
