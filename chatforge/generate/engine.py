"""The inference engine: a KV cache of fixed slots and a step-level scheduler (continuous batching).

Each running sequence owns one row ("slot") of a preallocated KV cache. A `step()`:

1. admits waiting requests while slots are free: the prompt is prefilled once (batch 1) and its
   keys/values are copied into as many rows as the request needs (n, or best_of);
2. runs one decode forward for every older row at its own position (one batched forward, rows
   at different lengths: per-row position ids, per-row writes into the cache, a mask hiding
   each row's unused slots);
3. processes the logits row by row with each request's own parameters, samples, records
   logprobs, detects stop tokens and stop strings, and reports what is new;
4. frees the rows of finished or cancelled sequences, moving rows from the end into the holes
   so active rows stay contiguous (rows 0..n-1) and the forward never touches idle slots.

The engine knows nothing of HTTP: the server calls `add_request`, `step` and `cancel` from its
own loop; `generate` and `stream` are the blocking conveniences for everyone else.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import secrets
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx.experimental import _config as fx_config

from chatforge.accel import kernels
from chatforge.accel.fused_step import FusedDecodeStep, unsupported_reason
from chatforge.accel.linear import fast_view, sync_mode
from chatforge.errors import RequestError
from chatforge.generate.outputs import Completion, SequenceOutput, StreamEvent, TokenLogprob
from chatforge.generate.params import MAX_LOGPROBS, SamplingParams
from chatforge.generate.processors import LogitsPipeline, TokenHistory, sample_next, token_logprobs
from chatforge.generate.text import IncrementalText
from chatforge.generate.tool_loop import (
    CallReader,
    ToolTurn,
    ToolUse,
    TurnIds,
    result_tokens,
    run_calls,
    runs_all,
)
from chatforge.model import GPT, KVCache


class SlotCache(KVCache):
    """A KV cache whose rows sit at different positions during decode.

    Decode writes go through one indexed write into the whole cache tensor per layer: under
    torch.compile a write into a slice (a view) of the cache becomes a copy of the whole cache,
    while an indexed write stays in place.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.positions: torch.Tensor | None = None  # (rows,) write position of each row, decode only
        self.row_index: torch.Tensor | None = None  # (rows,) 0..rows-1
        self._layer_index = torch.arange(self.k.shape[0], device=self.k.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """In decode, `pos` is the last position any row writes: rows attend over slots [0, pos]."""
        if self.positions is None:
            return super().update(layer, k, v, pos)
        rows = k.shape[0]
        index = (self._layer_index[layer : layer + 1], self.row_index, slice(None), self.positions)
        self.k[index] = k[:, :, 0]
        self.v[index] = v[:, :, 0]
        return self.k[layer, :rows, :, : pos + 1], self.v[layer, :rows, :, : pos + 1]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


@dataclass
class _Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: list[int]
    num_rows: int
    logprobs_k: int | None
    outputs: dict[int, SequenceOutput] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    completion_tokens: int = 0
    fed_tokens: int = 0
    cancelled: bool = False
    tool_use: ToolUse | None = None

    @property
    def done(self) -> bool:
        return len(self.outputs) == self.num_rows


@dataclass
class _Row:
    request: _Request
    index: int
    generator: torch.Generator | None
    position: int  # where this row's next token goes in the cache
    text: IncrementalText
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    last_token: int = -1
    calls: CallReader | None = None  # with tool use: the calls of the answer so far
    rounds: int = 0  # tool rounds the engine ran for this row
    tool_turns: list[ToolTurn] = field(default_factory=list)
    fed_spans: list[tuple[int, int]] = field(default_factory=list)


def _row_seed(seed: int | None, index: int) -> int:
    if seed is None:
        return secrets.randbits(63)
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") >> 1


def prepared_engine(model: GPT, tokenizer: Any, say: Callable[[str], None], **kwargs: Any) -> Engine:
    """`Engine(model, tokenizer, **kwargs)` with its kernels built, graphs compiled and weights packed
    before the first request; `say` hears first what will take a while, then how the engine decodes
    (when the fused step or compile was asked for). What `generate`, `chat` and `serve` start with."""
    fused, compile = kwargs.get("fused", False), kwargs.get("compile", False)
    slow = ["chatforge's fused decode step (its kernels build once, about 40 s)"] if (
        fused and kernels.unsupported_reason() is None and not kernels.active()) else []
    slow += ["torch.compile's decode graphs (minutes)"] if compile else []
    if slow:
        say("preparing " + " and ".join(slow) + "...")
    engine = Engine(model, tokenizer, **kwargs)
    engine.warm_up()
    if fused or compile:
        say(f"decode: {engine.describe_decode()}")
    return engine


class Engine:
    """Batched generation over a GPT; requests come and go between decode steps."""

    def __init__(self, model: GPT, tokenizer: Any, max_batch_size: int = 16,
                 stop_token_ids: Sequence[int] | None = None, fused: bool = False, compile: bool = False) -> None:
        """`fused`: decode 1-32 rows in chatforge's fused CPU step where its kernels build here (about
        40 s once; `fused_reason` says why not elsewhere). `compile`: torch.compile the decode forward
        (what the fused step leaves, or all of it), compiled on first use or in `warm_up`."""
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = model.config
        self.max_batch_size = max_batch_size
        p = next(model.parameters())
        self.device = p.device
        self.cache = SlotCache(self.config, max_batch_size, device=p.device, dtype=p.dtype)
        self._row_index = torch.arange(max_batch_size, device=p.device)
        # every forward runs through the view: the model's weights, this CPU's fastest products
        self._view = fast_view(self.model)
        self._fused, self.fused_reason = self._fused_step(fused)
        # the decode forward; compiled, it runs as a few fused kernels without Python between the
        # matmuls (see `compile` in docs/architecture.md); prefill and beam search stay eager
        self.compiled = compile
        self._forward = torch.compile(self._view, dynamic=True) if compile else self._view
        if stop_token_ids is None:
            specials = getattr(tokenizer, "special_ids", {})
            stop_token_ids = [specials[k] for k in ("eot", "end_turn") if k in specials]
        # an id past the model's rows (a GPT-2 directory's tokenizer carries chat tokens the model
        # lacks) can never be sampled, so it can never stop anything
        self.eos_ids = [t for t in stop_token_ids if 0 <= t < self.config.vocab_size]
        self.special_ids = frozenset(getattr(tokenizer, "special_ids", {}).values())
        self.turn_ids = TurnIds.of(tokenizer)
        self.rows: list[_Row] = []
        self.waiting: deque[_Request] = deque()
        self.requests: dict[str, _Request] = {}
        self.history: TokenHistory | None = None
        self.pipeline: LogitsPipeline | None = None
        self._ids = itertools.count()

    def _fused_step(self, wanted: bool) -> tuple[FusedDecodeStep | None, str | None]:
        """The fused decode step where it is wanted and runs here, else None and why not."""
        if not wanted:
            return None, "not asked for"
        if self.device.type != "cpu":
            return None, f"the model is on {self.device.type}, not the CPU"
        reason = kernels.unsupported_reason()
        if reason is None and not kernels.load():
            reason = "chatforge's CPU kernels did not build (see the warning)"
        reason = reason or unsupported_reason(self.model)
        return (FusedDecodeStep(self.model), None) if reason is None else (None, reason)

    @property
    def fused(self) -> bool:
        """Whether decode steps of 1-32 rows run in chatforge's fused CPU step."""
        return self._fused is not None

    def describe_decode(self) -> str:
        """How this engine decodes, for a command's startup line."""
        if self.fused:
            rest = "torch.compile's graphs" if self.compiled else "torch's products"
            return f"chatforge's fused CPU step ({kernels.isa()}) for 1-{kernels.MAX_ROWS} rows, {rest} past that"
        how = "torch.compile's graphs" if self.compiled else "torch's products"
        return how + ("" if self.fused_reason == "not asked for" else f" (no fused step: {self.fused_reason})")

    # ---- the scheduler's public face ---------------------------------------------------------

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
                    logprobs_limit: int = MAX_LOGPROBS, tool_use: ToolUse | None = None) -> str:
        """Validate and queue a request; it starts at the next step with enough free slots. With
        `tool_use`, the answer's tool calls are read as calls and built-in tools run (tool_loop.py)."""
        prompt = [int(t) for t in prompt_ids]
        params.validate(self.config.vocab_size, self.config.context_length, len(prompt), logprobs_limit)
        self.check_prompt(prompt)
        if tool_use is not None:
            self._check_tool_use(params, tool_use)
        rows = max(params.best_of or params.n, params.n)
        if rows > self.max_batch_size and params.num_beams == 1:
            raise RequestError(f"n/best_of of {rows} exceeds the engine's {self.max_batch_size} slots",
                               param="best_of" if params.best_of else "n")
        rid = request_id or f"req-{next(self._ids)}"
        stop_ids = sorted(set(([] if params.ignore_eos else self.eos_ids) + list(params.stop_token_ids)))
        logprobs_k = params.logprobs if params.logprobs is not None else (0 if rows > params.n else None)
        request = _Request(rid, prompt, params, stop_ids, rows, logprobs_k, tool_use=tool_use)
        self.requests[rid] = request
        self.waiting.append(request)
        return rid

    def _check_tool_use(self, params: SamplingParams, use: ToolUse) -> None:
        if self.turn_ids is None:
            raise RequestError("tool calls need a tokenizer with the chat tokens (<|tool_call|>, <|tool_result|>)",
                               param="tools")
        if params.num_beams > 1:
            raise RequestError("beam search cannot run tools; use num_beams=1", param="num_beams")
        if use.run and params.grammar is not None:
            raise RequestError("built-in tools cannot run under a grammar (response_format or a required call)",
                               param="tools")

    def text_bytes(self, token: int, params: SamplingParams) -> bytes:
        """What `token` adds to the output text: its bytes, or nothing for a special token when the
        request skips them."""
        if params.skip_special_tokens and token in self.special_ids:
            return b""
        return self.tokenizer.token_bytes(token)

    def check_prompt(self, prompt: Sequence[int]) -> None:
        """Raise RequestError for a token id the model has no row for (a GPT-2 directory's tokenizer
        carries chat tokens the model lacks), before it reaches the embedding."""
        outside = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if outside:
            raise RequestError(
                f"token id {outside[0]} is outside the model's vocabulary (0..{self.config.vocab_size - 1}): "
                "the tokenizer has more tokens than the model has rows (a GPT-2 directory has no rows for the "
                "chat tokens: fine-tune it with `chatforge sft` first)", param="prompt")

    def cancel(self, request_id: str) -> bool:
        """Stop a request now (a client went away); its slots are free after the next step."""
        request = self.requests.get(request_id)
        if request is None or request.done:
            return False
        request.cancelled = True
        if request in self.waiting:
            self.waiting.remove(request)
            self.requests.pop(request_id, None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.rows or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def pop_result(self, request_id: str) -> Completion:
        """The finished request's completion (n outputs, best first when best_of > n)."""
        request = self.requests.pop(request_id)
        outputs = [request.outputs[i] for i in sorted(request.outputs)]
        if request.num_rows > request.params.n:
            outputs = sorted(outputs, key=lambda o: o.mean_logprob, reverse=True)[: request.params.n]
            if request.params.logprobs is None:
                for o in outputs:
                    o.logprobs = None
        for i, o in enumerate(outputs):
            o.index = i
        return Completion(request.id, request.prompt_ids, outputs, request.prompt_logprobs,
                          request.completion_tokens, request.fed_tokens)

    @torch.no_grad()
    def step(self) -> list[StreamEvent]:
        """Admit what fits, decode one token for every running row, and report what is new."""
        events: list[StreamEvent] = []
        self._drop_cancelled(events)
        sync_mode(self._view, self.model)  # PPO switches the policy between training and rollouts
        old = len(self.rows)
        new_logits = self._admit(events)
        if not self.rows:
            return events
        parts = [self._decode_old(old)] if old else []
        logits = torch.cat(parts + new_logits) if new_logits else parts[0]
        events += self._sample_and_advance(logits)
        return events

    def warm_up(self) -> None:
        """Compile every decode graph the engine will run now rather than in the first requests: one
        row, several rows in step, and rows at different positions, but only those the fused step
        leaves to the graphs (none when it runs and there are at most 32 slots); then pack the fused
        step's weights. A no-op when neither compiled nor fused. Leaves the engine idle."""
        if not (self.compiled or self.fused):
            return
        if self.has_unfinished():
            raise RuntimeError("warm_up needs an idle engine")
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        fused, self._fused = self._fused, None  # compile the graphs of the steps the fused one leaves to them
        try:
            if self.compiled and fused is None:
                self.generate([[0, 0]], params)
            if self.compiled and self.max_batch_size > (kernels.MAX_ROWS if fused else 1):
                self.generate([[0, 0], [0, 0]], params)
                self.generate([[0, 0], [0, 0, 0]], params)
        finally:
            self._fused = fused
        if fused is not None and self.max_batch_size > 1:
            self.generate([[0, 0], [0, 0]], params)  # the fused step's packed weights

    # ---- blocking conveniences ---------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 logprobs_limit: int = MAX_LOGPROBS, tool_use: ToolUse | None = None) -> list[Completion]:
        """Generate for a batch of prompts (each with its own params if a list is given)."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.add_request(p, sp, logprobs_limit=logprobs_limit, tool_use=tool_use)
               for p, sp in zip(prompts, plist)]
        while self.has_unfinished():
            self.step()
        return [self.pop_result(i) for i in ids]

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams,
               tool_use: ToolUse | None = None) -> Iterator[StreamEvent]:
        """Events of one request as they happen (other queued requests advance alongside)."""
        rid = self.add_request(prompt_ids, params, tool_use=tool_use)
        while rid in self.requests and not self.requests[rid].done:  # a cancelled request is dropped
            for event in self.step():
                if event.request_id == rid:
                    yield event

    # ---- admission and prefill ---------------------------------------------------------------

    def _admit(self, events: list[StreamEvent]) -> list[torch.Tensor]:
        new_logits = []
        while self.waiting and len(self.rows) + self._rows_needed(self.waiting[0]) <= self.max_batch_size:
            request = self.waiting.popleft()
            if request.params.num_beams > 1:
                self._run_beam_search(request, events)
                continue
            last = self._prefill(request)
            if request.params.max_tokens == 0:  # echo-only scoring: nothing to generate
                for i in range(request.num_rows):
                    request.outputs[i] = SequenceOutput(i, [], "", "length", [] if request.logprobs_k is not None
                                                        else None)
                    events.append(StreamEvent(request.id, i, "", [], [], "length"))
                continue
            new_logits.append(last.expand(request.num_rows, -1))
        return new_logits

    def _rows_needed(self, request: _Request) -> int:
        return 0 if request.params.num_beams > 1 or request.params.max_tokens == 0 else request.num_rows

    def _prefill(self, request: _Request) -> torch.Tensor:
        prompt = request.prompt_ids
        tmp = KVCache(self.config, 1, len(prompt), device=self.device, dtype=self.cache.k.dtype)
        hidden = self._view.hidden_states(torch.tensor([prompt], device=self.device), kv_cache=tmp)[0]
        if request.params.echo and request.logprobs_k is not None:
            logits = self.model.lm_head(hidden).float()
            request.prompt_logprobs = self._prompt_logprobs(logits, prompt, request.logprobs_k)
        else:  # only the last position's logits are needed: skip the LM head over the prompt
            logits = self._view.lm_head(hidden[-1:]).float()
        if request.params.max_tokens == 0:
            return logits[-1:]
        first = len(self.rows)
        for i in range(request.num_rows):
            row = first + i
            self.cache.k[:, row, :, : len(prompt)] = tmp.k[:, 0]
            self.cache.v[:, row, :, : len(prompt)] = tmp.v[:, 0]
            gen = None
            if request.params.temperature > 0:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(_row_seed(request.params.seed, i))
            text = IncrementalText(request.params.stop, request.params.strip_leading_whitespace)
            calls = CallReader() if request.tool_use is not None else None
            if calls is not None and prompt[-1] == self.turn_ids.call:  # the caller began the call (a forced one)
                calls.start_call()
            self.rows.append(_Row(request, i, gen, len(prompt), text, calls=calls))
        self._extend_state(request)
        return logits[-1:]

    def _prompt_logprobs(self, logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob | None]:
        chosen = torch.tensor(prompt[1:], device=logits.device)
        lp, top_ids, top_lp = token_logprobs(logits[:-1], chosen, k)
        out: list[TokenLogprob | None] = [None]
        for i in range(len(prompt) - 1):
            out.append(TokenLogprob(prompt[i + 1], float(lp[i]), list(zip(top_ids[i].tolist(), top_lp[i].tolist()))))
        return out

    def _extend_state(self, request: _Request) -> None:
        """Add the request's rows to the token history and rebuild the per-row parameters."""
        added = TokenHistory([request.prompt_ids] * request.num_rows, self.config.vocab_size, self.device)
        self.history = added if self.history is None else self.history.add_rows(added)
        self._rebuild_pipeline()

    def _rebuild_pipeline(self) -> None:
        self.pipeline = LogitsPipeline.from_params([r.request.params for r in self.rows],
                                                   [r.request.stop_ids for r in self.rows], self.device,
                                                   tokenizer=self.tokenizer)

    # ---- decode ------------------------------------------------------------------------------

    def _decode_old(self, count: int) -> torch.Tensor:
        """One decode forward for the first `count` rows, each at its own position."""
        rows = self.rows[:count]
        if self._fused is not None and self._fused.covers(count):
            logits = self._fused([r.last_token for r in rows], [r.position for r in rows], self.cache)
            for r in rows:
                r.position += 1
            return logits
        tokens = torch.tensor([[r.last_token] for r in rows], device=self.device)
        positions = torch.tensor([r.position for r in rows], device=self.device)
        last = max(r.position for r in rows)
        position_ids = mask = None
        if any(r.position != last for r in rows):  # rows at different lengths: hide each row's unused slots
            hidden = torch.arange(last + 1, device=self.device)[None, :] > positions[:, None]
            # additive (float) mask built once a step: sdpa would convert a boolean one in every layer
            mask = torch.zeros(hidden.shape, device=self.device, dtype=self.cache.k.dtype)
            mask = mask.masked_fill_(hidden, -math.inf)[:, None, None]
            position_ids = positions[:, None]
        self.cache.positions, self.cache.row_index = positions, self._row_index[:count]
        try:
            # no duck sizing when tracing: a mask as long as the model has heads would otherwise share the
            # head count's (static) size and compile a graph for that one length
            with fx_config.patch(use_duck_shape=not self.compiled):
                logits = self._forward(tokens, kv_cache=self.cache, pos_offset=last, position_ids=position_ids,
                                       attn_mask=mask)
        finally:
            self.cache.positions = None
        for r in rows:
            r.position += 1
        return logits[:, -1].float()

    def _sample_and_advance(self, raw: torch.Tensor) -> list[StreamEvent]:
        processed = self.pipeline(raw, self.history)
        greedy = torch.tensor([r.generator is None for r in self.rows], device=self.device)
        chosen = sample_next(processed, greedy, [r.generator for r in self.rows])
        want = [r.request.logprobs_k for r in self.rows if r.request.logprobs_k is not None]
        lp = top_ids = top_lp = None
        if want:
            lp, top_ids, top_lp = token_logprobs(raw, chosen, max(want))
        self.history.append(chosen)
        events, finished = [], []
        for i, (row, token) in enumerate(zip(self.rows, chosen.tolist())):
            event = self._advance_row(row, token, i, lp, top_ids, top_lp)
            events.append(event)
            if event.finish_reason is not None:
                finished.append(i)
        if finished:
            self._remove_rows(finished)
        return events

    def _advance_row(self, row: _Row, token: int, i: int, lp, top_ids, top_lp) -> StreamEvent:
        request, params = row.request, row.request.params
        request.completion_tokens += 1
        row.last_token = token
        entry = []
        if lp is not None and request.logprobs_k is not None:
            k = request.logprobs_k
            item = TokenLogprob(token, float(lp[i]), list(zip(top_ids[i, :k].tolist(), top_lp[i, :k].tolist())))
            row.cumulative_logprob += item.logprob
            # every sampled token has its entry, an end token too (usage counts it; lm-evaluation-harness
            # drops "the one generated entry" after an echoed prompt): logprobs may be one longer than tokens
            row.logprobs.append(item)
            entry = [item]
        if row.calls is not None and (token == self.turn_ids.call or row.calls.open or token in request.stop_ids):
            return self._tool_token(row, i, token, entry)
        if token in request.stop_ids:
            return self._finish(row, "stop", [], entry, row.text.finish())
        row.tokens.append(token)
        check = len(row.tokens) >= params.min_tokens
        delta = row.text.push(self.text_bytes(token, params), check_stops=check)
        if row.text.stopped:
            return self._finish(row, "stop", [token], entry, delta)
        if len(row.tokens) >= params.max_tokens or row.position + 1 > self.config.context_length:
            return self._finish(row, "length", [token], entry, delta + row.text.finish())
        return StreamEvent(request.id, row.index, delta, [token], entry)

    def _finish(self, row: _Row, reason: str, tokens: list[int], entry: list, delta: str,
                calls: list[str] | None = None) -> StreamEvent:
        request = row.request
        request.outputs[row.index] = SequenceOutput(
            row.index, row.tokens, row.text.text, reason,
            row.logprobs if request.logprobs_k is not None else None, row.cumulative_logprob,
            calls or [], row.tool_turns, row.fed_spans)
        return StreamEvent(request.id, row.index, delta, tokens, entry, reason)

    # ---- tool calls (tool_loop.py) -----------------------------------------------------------

    def _tool_token(self, row: _Row, i: int, token: int, entry: list) -> StreamEvent:
        """A token of a call (its marker, its JSON) or the end of a turn, for a request with tool use."""
        request, ids = row.request, self.turn_ids
        if token in request.stop_ids:
            calls = row.calls.end_turn()
            if not calls:
                return self._finish(row, "stop", [], entry, row.text.finish())
            if not (runs_all(request.tool_use, calls) and row.rounds < request.tool_use.max_rounds):
                return self._finish(row, "tool_calls", [], entry, row.text.finish(), calls)
            return self._run_tools(row, i, token, entry, calls)
        row.tokens.append(token)
        delta = row.calls.start_call() if token == ids.call else row.calls.push(self.tokenizer.token_bytes(token))
        if len(row.tokens) >= request.params.max_tokens or row.position + 1 > self.config.context_length:
            # out of tokens inside a call: the calls written so far go back, cut as they are (a grammar's
            # call is complete JSON by the last token), with finish_reason "length"
            return self._finish(row, "length", [token], entry, row.text.finish(), row.calls.end_turn())
        return StreamEvent(request.id, row.index, "", [token], entry, call=delta)

    def _run_tools(self, row: _Row, i: int, end: int, entry: list, calls: list[str]) -> StreamEvent:
        """Run the turn's calls and feed their results into the row; the row then samples again."""
        request = row.request
        turns = run_calls(request.tool_use, calls)
        fed = result_tokens(self.turn_ids, turns, self.tokenizer.encode)
        row.tokens.append(end)
        room = min(request.params.max_tokens - len(row.tokens), self.config.context_length - row.position - 1)
        if len(fed) > room:  # no room for the results and a word of answer: the budget is spent
            return self._finish(row, "length", [end], entry, row.text.finish(), [])
        row.rounds += 1
        row.tool_turns += turns
        row.fed_spans.append((len(row.tokens), len(row.tokens) + len(fed)))
        row.tokens += fed
        request.fed_tokens += len(fed)
        self.history.extend_row(i, [*fed])
        # the sampled <|end|> and every fed token but the last go into the cache now; the last one
        # (<|assistant|>) is the row's next decode input, as a sampled token would be
        self._feed_row(i, [end, *fed[:-1]])
        row.last_token = fed[-1]
        return StreamEvent(request.id, row.index, "", [end, *fed], entry, tool_turns=turns)

    def _feed_row(self, i: int, tokens: list[int]) -> None:
        """Run `tokens` through the model after row i's cached tokens, writing their keys and values."""
        row = self.rows[i]
        start, end = row.position, row.position + len(tokens)
        tmp = KVCache(self.config, 1, end, device=self.device, dtype=self.cache.k.dtype)
        tmp.k[:, 0, :, :start] = self.cache.k[:, i, :, :start]
        tmp.v[:, 0, :, :start] = self.cache.v[:, i, :, :start]
        self._view.hidden_states(torch.tensor([tokens], device=self.device), kv_cache=tmp, pos_offset=start)
        self.cache.k[:, i, :, :end] = tmp.k[:, 0]
        self.cache.v[:, i, :, :end] = tmp.v[:, 0]
        row.position = end

    # ---- freeing rows ------------------------------------------------------------------------

    def _drop_cancelled(self, events: list[StreamEvent]) -> None:
        gone = [i for i, r in enumerate(self.rows) if r.request.cancelled]
        for i in gone:
            row = self.rows[i]
            row.request.outputs[row.index] = SequenceOutput(row.index, row.tokens, row.text.text, "cancelled")
            events.append(StreamEvent(row.request.id, row.index, "", [], [], "cancelled"))
        if gone:
            for rid in {self.rows[i].request.id for i in gone}:
                self.requests.pop(rid, None)
            self._remove_rows(gone)

    def _remove_rows(self, removed: list[int]) -> None:
        """Free rows by moving rows from the end into the holes (only their used slots are copied)."""
        keep_n = len(self.rows) - len(removed)
        holes = [i for i in removed if i < keep_n]
        donors = [i for i in range(keep_n, len(self.rows)) if i not in set(removed)]
        order = list(range(len(self.rows)))
        for hole, donor in zip(holes, donors):
            self.cache.copy_row(donor, hole, self.rows[donor].position)
            order[hole] = donor
        order = order[:keep_n]
        self.rows = [self.rows[i] for i in order]
        self.history = self.history.select(order) if keep_n else None
        if keep_n:
            self._rebuild_pipeline()
        else:
            self.pipeline = None

    # ---- beam search -------------------------------------------------------------------------

    def _run_beam_search(self, request: _Request, events: list[StreamEvent]) -> None:
        from chatforge.generate.beam import beam_search

        hyps = beam_search(self._view, request.prompt_ids, request.params, request.stop_ids)
        request.num_rows = request.params.n
        for i, hyp in enumerate(hyps[: request.params.n]):
            text = IncrementalText(request.params.stop, request.params.strip_leading_whitespace)
            out = "".join(text.push(self.text_bytes(t, request.params)) for t in hyp.tokens) + text.finish()
            reason = "stop" if text.stopped else hyp.finish_reason
            request.outputs[i] = SequenceOutput(i, list(hyp.tokens), text.text, reason, None, hyp.sum_logprobs)
            request.completion_tokens += len(hyp.tokens)
            events.append(StreamEvent(request.id, i, out, list(hyp.tokens), [], reason))
