"""Structured output: decode under a JSON grammar so the output always parses (and validates).

A `GrammarSpec` is the frozen, hashable description a request carries in `SamplingParams.grammar`:
any JSON object (`response_format` `{"type": "json_object"}`), a JSON Schema (`{"type":
"json_schema", "json_schema": {...}}` or a raw schema) or a tool call (`{"name": <one of the tools>,
"arguments": <its parameters>}`, for `tool_choice` "required" or a named function). Building one
checks the schema with llguidance and raises `GrammarError` (a `ValueError` and a `RequestError`,
so the server answers 400 naming the field) for anything it cannot enforce.

`GrammarMask` is the logits processor (see processors.py for its place in the order). Each row with a
grammar owns an llguidance `LLMatcher`; every step it catches up on the row's new tokens (from
`TokenHistory.generated`, so a rebuilt pipeline just replays them), asks the matcher for the bitmask
of allowed tokens, and sets every other logit to -inf. The row's stop tokens are allowed exactly when
the grammar is complete (and are then the only choice once nothing can follow), so a finished JSON
ends the turn and an unfinished one cannot. Near max_tokens a row lands: a greedy byte-by-byte search
finds a shortest way to finish the document (close strings, arrays and objects, fill required fields
with minimal values), and once max_tokens leaves at most CLOSE_WINDOW tokens beyond it the row may only
take tokens after which that completion still fits, so even an untrained model's output parses.

The library compiles a tokenizer once (~0.25 s at 50k tokens): it is cached per tokenizer object, and
each spec's initial matcher per tokenizer; rows get deep copies (microseconds).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch
from torch import Tensor

from chatforge.errors import RequestError

# compact JSON with json.dumps' separators (what chat.py writes into tool-call turns): no free
# whitespace, which an untrained model could emit forever
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# near max_tokens: once it leaves at most CLOSE_WINDOW tokens beyond the shortest completion, a row may
# only take tokens after which that completion still fits (the best LANDING_KEEP of LANDING_TRIES tried)
CLOSE_WINDOW = 24
CLOSE_GROWTH = 8  # tokens one token is assumed to add to the shortest completion, at most (paces the search)
CLOSE_LIMIT = 1024  # bytes: a longer shortest completion is not searched for (the row decodes freely)
CLOSE_TRIES = 4096  # single-byte tries per search, at most (a few microseconds each)
LANDING_TRIES, LANDING_KEEP = 16, 8
LOOKAHEAD = 8  # in a string that cannot end yet, allowed bytes tried for one after which it can
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for json_schema and function names
NEG_INF = float("-inf")


class GrammarError(RequestError, ValueError):
    """A response_format / tools / tool_choice the grammar cannot be built from; `param` names the field."""


def _fail(param: str, message: str) -> GrammarError:
    return GrammarError(f"{param}: {message}", param=param)


def _canonical(schema: Any) -> str:
    """One JSON string per schema; key order is kept (it is the order properties are generated in)."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class GrammarSpec:
    """What a row's output must be. `kind`: "json_object", "json_schema" or "tool_call"; `schema`: the
    JSON Schema enforced, as canonical JSON; `name`: the json_schema's name; `tool_names`: the tools a
    tool-call grammar allows, in order."""

    kind: str
    schema: str
    name: str | None = None
    tool_names: tuple[str, ...] = ()

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def json_object(cls) -> GrammarSpec:
        """Any JSON object (response_format {"type": "json_object"})."""
        return cls("json_object", _canonical({"type": "object"}))

    @classmethod
    def json_schema(cls, schema: Any, name: str | None = None, param: str = "response_format") -> GrammarSpec:
        """A raw JSON Schema (a dict); raises GrammarError naming `param` if it cannot be enforced."""
        if not isinstance(schema, dict):
            raise _fail(param, f"a JSON Schema must be an object, got {type(schema).__name__}")
        spec = cls("json_schema", _canonical(schema), name)
        spec.check(param)
        return spec

    @classmethod
    def from_response_format(cls, response_format: Any) -> GrammarSpec | None:
        """OpenAI's response_format: None for {"type": "text"} (or no type), else the grammar."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise _fail("response_format", f"expected an object, got {type(response_format).__name__}")
        kind = response_format.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object()
        if kind != "json_schema":
            raise _fail("response_format.type", f"expected 'text', 'json_object' or 'json_schema', got {kind!r}")
        body = response_format.get("json_schema")
        if not isinstance(body, dict):
            raise _fail("response_format.json_schema", "expected an object with 'name' and 'schema'")
        name = body.get("name")
        if not (isinstance(name, str) and _NAME.match(name)):
            raise _fail("response_format.json_schema.name",
                        f"expected 1-64 letters, digits, '_' or '-', got {name!r}")
        if not isinstance(body.get("strict", False), (bool, type(None))):
            raise _fail("response_format.json_schema.strict", f"expected a boolean, got {body['strict']!r}")
        return cls.json_schema(body.get("schema", {}), name, param="response_format.json_schema.schema")

    @classmethod
    def tool_call(cls, tools: Any, name: str | None = None) -> GrammarSpec:
        """`{"name": <tool name>, "arguments": <that tool's parameters>}` over `tools` (OpenAI's
        `{"type": "function", "function": {...}}` or bare `{"name", "description", "parameters"}`
        entries); with `name`, that tool only."""
        functions = _functions(tools)
        if name is not None:
            if name not in functions:
                raise _fail("tool_choice", f"no tool named {name!r}; the tools are {list(functions)}")
            functions = {name: functions[name]}
        branches, defs = [], {}
        for i, (fname, parameters) in enumerate(functions.items()):
            key = f"tool_{i}"
            defs[key] = _rebase_refs(parameters, f"#/$defs/{key}")
            branches.append({"type": "object",
                             "properties": {"name": {"const": fname}, "arguments": {"$ref": f"#/$defs/{key}"}},
                             "required": ["name", "arguments"], "additionalProperties": False})
        schema = {**(branches[0] if len(branches) == 1 else {"anyOf": branches}), "$defs": defs}
        spec = cls("tool_call", _canonical(schema), tool_names=tuple(functions))
        spec.check("tools")
        return spec

    @classmethod
    def from_tool_choice(cls, tools: Any, tool_choice: Any) -> GrammarSpec | None:
        """The grammar OpenAI's tool_choice asks for: "required" (any of the tools) or
        {"type": "function", "function": {"name": ...}} (that one); None for "auto", "none" or absent."""
        if tool_choice is None or tool_choice in ("auto", "none"):
            return None
        if tool_choice == "required":
            return cls.tool_call(tools)
        function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise _fail("tool_choice", "expected 'auto', 'none', 'required' or "
                                       "{'type': 'function', 'function': {'name': ...}}")
        return cls.tool_call(tools, function["name"])

    # ---- the library's grammar ---------------------------------------------------------------

    @property
    def grammar(self) -> str:
        """llguidance's grammar for this spec."""
        return llguidance.LLMatcher.grammar_from_json_schema(self.schema, overrides=JSON_OPTIONS)

    def check(self, param: str) -> None:
        """Raise GrammarError naming `param` when llguidance cannot enforce the schema."""
        try:
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(self.grammar)
        except ValueError as e:
            is_error, messages = True, [str(e)]
        if is_error:
            detail = " ".join(" ".join(messages).split())
            raise _fail(param, f"the schema cannot be enforced: {detail}")


def _functions(tools: Any) -> dict[str, dict]:
    """name -> parameters schema of each tool, in order."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise _fail("tools", "a tool call needs a non-empty list of tools")
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _fail(where, f"expected an object, got {type(tool).__name__}")
        fn = tool.get("function") if tool.get("type") == "function" or "function" in tool else tool
        if not isinstance(fn, dict):
            raise _fail(f"{where}.function", "expected an object with 'name' and 'parameters'")
        name = fn.get("name")
        if not (isinstance(name, str) and _NAME.match(name)):
            raise _fail(f"{where}.function.name", f"expected 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in out:
            raise _fail(f"{where}.function.name", f"duplicate tool name {name!r}")
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise _fail(f"{where}.function.parameters",
                        f"a JSON Schema must be an object, got {type(parameters).__name__}")
        GrammarSpec("json_schema", _canonical(parameters)).check(f"{where}.function.parameters")
        out[name] = parameters
    return out


def _rebase_refs(schema: Any, base: str) -> Any:
    """`schema` moved under `base`: its local references ("#", "#/$defs/x") now point there."""
    if isinstance(schema, list):
        return [_rebase_refs(s, base) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = base + value[1:]
        elif key in ("$schema", "$id"):
            continue  # meaningful at a document's root only
        else:
            out[key] = _rebase_refs(value, base)
    return out


# ---- one compiled tokenizer per tokenizer object -------------------------------------------------


class CompiledTokenizer:
    """llguidance's view of one of our tokenizers, and the initial matcher of each spec seen with it."""

    MAX_SPECS = 64

    def __init__(self, tokenizer: Any) -> None:
        if not hasattr(tokenizer, "to_json_str"):
            raise TypeError(f"a grammar needs chatforge's Tokenizer (with to_json_str), got {type(tokenizer).__name__}")
        specials = getattr(tokenizer, "special_ids", {})
        eos = specials.get("eot", specials.get("end_turn"))
        self.ll = llguidance.LLTokenizer(tokenizer.to_json_str(), n_vocab=tokenizer.vocab_size, eos_token=eos)
        self.vocab_size = self.ll.vocab_size
        self.eos_ids = list(self.ll.eos_tokens)  # set when accepting: replaced by each row's own stop tokens
        # one token per byte (byte-level BPE has them all); 0xFF, llguidance's marker byte, never occurs in JSON
        self.byte_token = {b: self.ll.tokenize_bytes(bytes([b]))[0] for b in range(0xFF)}
        self._initial: OrderedDict[GrammarSpec, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher for `spec` (a deep copy of the cached initial one)."""
        with self._lock:
            initial = self._initial.get(spec)
            if initial is None:
                initial = llguidance.LLMatcher(self.ll, spec.grammar, log_level=0)
                if initial.is_error():
                    raise _fail("response_format" if spec.kind != "tool_call" else "tools",
                                f"the schema cannot be enforced: {' '.join(initial.get_error().split())}")
                self._initial[spec] = initial
                if len(self._initial) > self.MAX_SPECS:
                    self._initial.popitem(last=False)
            self._initial.move_to_end(spec)
            return initial.deep_copy()


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILED_LOCK = threading.Lock()


def compiled_tokenizer(tokenizer: Any) -> CompiledTokenizer:
    """The CompiledTokenizer of `tokenizer`, built once per tokenizer object."""
    with _COMPILED_LOCK:
        try:
            compiled = _COMPILED.get(tokenizer)
        except TypeError:  # not weakly referenceable: no cache
            return CompiledTokenizer(tokenizer)
        if compiled is None:
            compiled = _COMPILED[tokenizer] = CompiledTokenizer(tokenizer)
        return compiled


def shortest_output(spec: GrammarSpec, tokenizer: Any) -> list[int] | None:
    """The tokens of the shortest document the closing search finds for `spec` (what a row's output
    becomes when max_tokens leaves no room for more), or None when it finds none. A max_tokens below
    its length cannot end in a complete document: a caller may refuse it up front."""
    compiled = compiled_tokenizer(tokenizer)
    return shortest_completion(compiled.matcher(spec), _Lexer(), compiled)


# ---- the processor -------------------------------------------------------------------------------

def _then_ascii(first: bytes) -> bytes:
    return first + bytes(b for b in range(0x20, 0x7F) if b not in first)


# bytes to try, best first, when closing: end what is open, then the shortest values
_ORDER = {
    # separators early: a format or pattern (an email, a URI, a date) needs them between its letters
    "string": _then_ascii(b'":@/.-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ'),
    "escape": _then_ascii(b'n"\\/bfrtu'),
    "utf8": bytes(range(0x80, 0xC0)),  # the rest of a character a token left unfinished
    # a comma before any digit: after "12" a 0 would make the number longer forever
    "outside": _then_ascii(b'}],0"{[ntf-123456789:.eE+'),
}


@dataclass
class _Lexer:
    """Where a JSON text stands byte-wise: in a string, after a backslash, inside a UTF-8 character."""

    in_string: bool = False
    escaped: bool = False
    pending: int = 0  # continuation bytes still due

    def scan(self, data: bytes) -> _Lexer:
        in_string, escaped, pending = self.in_string, self.escaped, self.pending
        for b in data:
            if pending:
                pending -= 1
            elif b >= 0xC0:
                pending = 1 if b < 0xE0 else 2 if b < 0xF0 else 3
            elif escaped:
                escaped = False
            elif in_string:
                if b == 0x5C:
                    escaped = True
                elif b == 0x22:
                    in_string = False
            elif b == 0x22:
                in_string = True
        return _Lexer(in_string, escaped, pending)

    @property
    def order(self) -> bytes:
        if self.pending:
            return _ORDER["utf8"]
        return _ORDER["escape" if self.escaped else "string" if self.in_string else "outside"]


def _next_byte(m: llguidance.LLMatcher, lexer: _Lexer, compiled: CompiledTokenizer, tries: int) -> tuple[bytes, int]:
    """Consume the byte the closing search takes next; (it, tries so far). In a string that cannot end
    yet, the first of the first LOOKAHEAD allowed bytes after which it can (a pattern's last letter),
    else the first allowed one."""
    quote = compiled.byte_token[0x22]
    wants_end = lexer.in_string and not lexer.escaped and not lexer.pending and m.validate_tokens([quote]) == 0
    first = None
    seen = 0
    for b in lexer.order:
        tries += 1
        if m.try_consume_tokens([compiled.byte_token[b]]) != 1:
            continue
        if not wants_end:
            return bytes([b]), tries
        ends = m.validate_tokens([quote]) == 1
        if ends:
            return bytes([b]), tries
        m.rollback(1)
        first = b if first is None else first
        seen += 1
        if seen >= LOOKAHEAD:
            break
    if first is None:
        return b"", tries
    m.try_consume_tokens([compiled.byte_token[first]])
    return bytes([first]), tries


def shortest_completion(matcher: llguidance.LLMatcher, lexer: _Lexer, compiled: CompiledTokenizer) -> list[int] | None:
    """The tokens of the shortest completion a byte-by-byte greedy search finds from `matcher`'s state
    ([] when complete): forced bytes as they come, else the first byte of `lexer.order` the grammar
    takes. None when it finds none within CLOSE_LIMIT bytes and CLOSE_TRIES tries. `matcher` is kept."""
    m = matcher.deep_copy()
    out, tries = bytearray(), 0
    while not m.is_accepting():
        if len(out) >= CLOSE_LIMIT or m.is_stopped():
            return None
        step = m.compute_ff_bytes()
        if step:
            tokens = compiled.ll.tokenize_bytes(step)
            if m.try_consume_tokens(tokens) != len(tokens):
                return None
        else:
            step, tries = _next_byte(m, lexer, compiled, tries)
            if not step or tries > CLOSE_TRIES:
                return None
        out += step
        lexer = lexer.scan(step)
    tokens = compiled.ll.tokenize_bytes(bytes(out)) if out else []
    if tokens and matcher.validate_tokens(tokens[:1]) != 1:  # a BPE merge across what the grammar splits
        tokens = [compiled.byte_token[b] for b in out]
    return tokens


class _Row:
    """One row's matcher and what it has consumed."""

    def __init__(self, matcher: llguidance.LLMatcher, max_tokens: int, stops: list[int]) -> None:
        self.matcher, self.max_tokens, self.stops = matcher, max_tokens, stops
        self.consumed = 0  # generated tokens fed to the matcher
        self.free = False  # the grammar no longer applies (complete with no stop token to end on, or broken)
        self.lexer = _Lexer()
        self.check_at = 0  # when to search for the shortest completion again (a count of consumed tokens)
        self.misses = 0  # searches in a row that found none

    @property
    def remaining(self) -> int:
        """Tokens the row may still sample, this step's included."""
        return self.max_tokens - self.consumed

    def catch_up(self, generated: list[int], compiled: CompiledTokenizer) -> None:
        for token in generated[self.consumed:]:
            if not self.free:
                if self.matcher.consume_token(token):
                    self.lexer = self.lexer.scan(compiled.ll.decode_bytes([token]))
                else:  # a token the mask forbade: ignore_eos past the end, or every allowed token was banned
                    self.free = True
        self.consumed = len(generated)

    def closing_due(self, compiled: CompiledTokenizer) -> list[int] | None:
        """The shortest completion when max_tokens leaves at most CLOSE_WINDOW tokens beyond it, else None.
        The search runs again only when that could have happened: after (slack - CLOSE_WINDOW) /
        (1 + CLOSE_GROWTH) tokens, as if each token added CLOSE_GROWTH tokens to the completion."""
        if self.consumed < self.check_at:
            return None
        close = shortest_completion(self.matcher, self.lexer, compiled)
        if close is None:  # search again next step, then less and less often
            self.misses += 1
            self.check_at = self.consumed + min(2 ** (self.misses - 1), CLOSE_WINDOW)
            return None
        self.misses = 0
        slack = self.remaining - len(close)
        self.check_at = self.consumed + max(1, (slack - CLOSE_WINDOW) // (1 + CLOSE_GROWTH))
        return close if slack <= CLOSE_WINDOW else None

    def landing(self, candidates: list[int], close: list[int], compiled: CompiledTokenizer) -> list[int]:
        """Of `candidates` (allowed, best first), those after which the shortest completion still fits
        in max_tokens (at most LANDING_KEEP of them), and the completion's next token."""
        keep = []
        for token in candidates:
            if token in self.stops:
                keep.append(token)
                continue
            m = self.matcher.deep_copy()
            if not m.consume_token(token):
                continue
            after = shortest_completion(m, self.lexer.scan(compiled.ll.decode_bytes([token])), compiled)
            if after is not None and len(after) <= self.remaining - 1:
                keep.append(token)
                if len(keep) >= LANDING_KEEP:
                    break
        return keep + close[:1]


class GrammarMask:
    """-inf on every token a row's grammar forbids next; rows without a grammar are left alone.

    `rows[i]` is the batch row of grammar row i. The matchers live here; a rebuilt processor (the
    engine builds a new pipeline whenever rows join or leave) replays each row's generated tokens.
    """

    _executor: llguidance.LLExecutor | None = None

    def __init__(self, compiled: CompiledTokenizer, rows: list[int], states: list[_Row]) -> None:
        self.compiled, self.rows, self.states = compiled, rows, states

    @classmethod
    def build(cls, specs: Sequence[GrammarSpec | None], max_tokens: Sequence[int], stop_ids: Sequence[list[int]],
              tokenizer: Any) -> GrammarMask | None:
        rows = [r for r, s in enumerate(specs) if s is not None]
        if not rows:
            return None
        if tokenizer is None:
            raise ValueError("a grammar needs the tokenizer: build the pipeline with tokenizer=")
        compiled = compiled_tokenizer(tokenizer)
        states = [_Row(compiled.matcher(specs[r]), max_tokens[r], sorted(set(stop_ids[r]))) for r in rows]
        return cls(compiled, rows, states)

    @classmethod
    def executor(cls) -> llguidance.LLExecutor:
        if cls._executor is None:
            cls._executor = llguidance.LLExecutor()
        return cls._executor

    def allowed(self, history: Any, vocab_size: int, logits: Tensor | None = None) -> np.ndarray:
        """(G, vocab_size) bool: what each grammar row may sample next. `logits` (B, V) rank the
        candidates of a row near its max_tokens (the first allowed ids without them)."""
        compiled = self.compiled
        width = (compiled.vocab_size + 31) // 32
        bitmask = np.full((len(self.rows), width), -1, dtype=np.int32)  # all allowed: free rows
        fill, closing = [], {}
        for i, (row, state) in enumerate(zip(self.rows, self.states)):
            state.catch_up(history.generated(row), compiled)
            if state.free:
                continue
            if state.matcher.is_stopped() and not state.stops:
                state.free = True  # complete, and nothing ends the row (ignore_eos): the rest is not JSON
                continue
            close = state.closing_due(compiled)
            if close is not None:
                closing[i] = close
            if close is None or len(close) < state.remaining:
                fill.append((state.matcher, i))
        if len(fill) == 1:
            fill[0][0].unsafe_compute_mask_ptr(bitmask[fill[0][1]].ctypes.data, width * 4)
        elif fill:
            self.executor().unsafe_compute_mask_ptr(fill, bitmask.ctypes.data, width * 4, len(self.rows))
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").view(bool)
        allowed = np.zeros((len(self.rows), vocab_size), dtype=bool)
        n = min(vocab_size, bits.shape[1], compiled.vocab_size)
        allowed[:, :n] = bits[:, :n]  # a model with more rows than the tokenizer: the extra ids stay banned
        for i, state in enumerate(self.states):
            if state.free:
                allowed[i] = True
                continue
            allowed[i, [t for t in compiled.eos_ids if t < vocab_size]] = False
            # stop tokens exactly when the grammar is complete
            allowed[i, [t for t in state.stops if t < vocab_size]] = state.matcher.is_accepting()
            close = closing.get(i)
            if close is None:
                continue
            if len(close) >= state.remaining:  # only the completion fits (or not even it): take it
                keep = close[:1] or state.stops
            else:
                keep = state.landing(self._ranked(allowed[i], logits, self.rows[i]), close, compiled)
            keep = [t for t in keep if t < vocab_size]
            if keep:
                allowed[i] = False
                allowed[i, keep] = True
        allowed[~allowed.any(1)] = True  # nothing left to take (a complete grammar with no stop token): no mask
        return allowed

    @staticmethod
    def _ranked(allowed: np.ndarray, logits: Tensor | None, row: int) -> list[int]:
        """The allowed ids, best first by `logits[row]` (lowest ids first without), LANDING_TRIES of them."""
        ids = allowed.nonzero()[0]
        if logits is not None and len(ids) > 1:
            scores = logits[row].detach().float().cpu().numpy()[ids]
            if len(ids) > LANDING_TRIES:
                top = np.argpartition(-scores, LANDING_TRIES - 1)[:LANDING_TRIES]
                ids, scores = ids[top], scores[top]
            ids = ids[np.argsort(-scores, kind="stable")]
        return ids[:LANDING_TRIES].tolist()

    def __call__(self, logits: Tensor, history: Any) -> Tensor:
        allowed = self.allowed(history, logits.size(-1), logits)
        if logits.device.type == "cpu":  # numpy: no (B, V) pass through torch's thread pool, 5-10x cheaper
            return torch.from_numpy(self._apply(logits.detach().numpy(), allowed, np))
        return self._apply(logits, torch.from_numpy(allowed).to(logits.device), torch)

    def _apply(self, logits: Any, allowed: Any, xp: Any) -> Any:
        """`logits` with -inf where not `allowed` on the grammar rows (a copy), in numpy or torch (`xp`)."""
        every_row = len(self.rows) == logits.shape[0]
        sub = logits if every_row else logits[self.rows]
        masked = xp.where(allowed, sub, NEG_INF)
        # a row whose allowed tokens were all banned before (a -inf ban; a -100 bias is finite): the grammar
        # wins, uniformly over what it allows
        dead = (masked == NEG_INF).all(1)
        if bool(dead.any()):
            masked[dead] = xp.where(allowed[dead], 0.0, NEG_INF)
        if every_row:
            return masked
        out = logits.copy() if xp is np else logits.clone()
        out[self.rows] = masked
        return out
