"""`chatforge chat`: a multi-turn chat in the terminal, streamed token by token.

The session keeps the whole history; when it no longer fits the context (with room for the
reply), the oldest turns after the system prompt are dropped whole and the user is told.
Lines starting with "/" are commands (see HELP). With the built-in tools (`chatforge chat --tools`),
the model sees the calculator and calendar in its system turn; a call it writes is shown as it is
written, chatforge runs it, and its result is shown before the model goes on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from chatforge.chat import ChatTemplate, Conversation, Message
from chatforge.checkpoint import Checkpoint
from chatforge.data.examples import example_prompts
from chatforge.errors import ChatforgeError, RequestError
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.generate.tool_loop import ToolUse
from chatforge.tools import Tool

HELP = """commands:
  /clear               forget the conversation (the system prompt stays)
  /system TEXT         set the system prompt (empty: none) and clear
  /temperature X       sampling temperature (0: greedy)
  /top_p X             nucleus sampling mass
  /max_tokens N        longest reply in tokens
  /settings            show the current settings
  /1 ... /N            send example prompt N (listed when the chat starts)
  /help                this list
  /quit                leave (Ctrl-D works too)"""

SETTINGS = {"temperature": float, "top_p": float, "max_tokens": int}


@dataclass
class ChatSession:
    ckpt: Checkpoint
    system: str = ""
    params: SamplingParams = field(default_factory=lambda: SamplingParams(max_tokens=128, temperature=0.7))
    history: list[Message] = field(default_factory=list)
    examples: list[str] | None = None  # offered at the start; default: from the checkpoint's training files
    engine: Engine | None = None  # default: the plain engine (the command line passes the fused one)
    tools: dict[str, Tool] = field(default_factory=dict)  # built-in tools the model may call (run here)

    def __post_init__(self) -> None:
        if self.examples is None:
            self.examples = example_prompts(self.ckpt.path)[0]
        self.template = ChatTemplate(self.ckpt.tokenizer)
        self.engine = self.engine or Engine(self.ckpt.model.eval(), self.ckpt.tokenizer, max_batch_size=1,
                                            stop_token_ids=self.template.stop_ids)

    def check(self, params: SamplingParams) -> None:
        """Raise RequestError naming the setting the engine cannot honour."""
        config = self.ckpt.model.config
        # a reply longer than the context is cut to what is left of it at each turn, not refused
        clamped = dataclasses.replace(params, max_tokens=min(params.max_tokens, config.context_length - 1))
        clamped.validate(config.vocab_size, config.context_length, prompt_len=1)

    def messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.history

    def command(self, line: str) -> tuple[str, bool]:
        """Run a "/" command: (what to print, whether to quit)."""
        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return "", True
        if name == "help":
            return HELP, False
        if name == "clear":
            self.history.clear()
            return "(conversation cleared)", False
        if name == "system":
            self.system = arg
            self.history.clear()
            return f"(system prompt {'set' if arg else 'removed'}; conversation cleared)", False
        if name == "settings":
            return ", ".join(f"{k} {getattr(self.params, k)}" for k in SETTINGS), False
        if name in SETTINGS:
            return self._set(name, arg), False
        return f"unknown command /{name}; /help lists them", False

    def _set(self, name: str, arg: str) -> str:
        try:
            value = SETTINGS[name](arg)
            params = dataclasses.replace(self.params, **{name: value})
            self.check(params)
        except ValueError:
            return f"/{name} needs a {SETTINGS[name].__name__}, got {arg!r}"
        except RequestError as e:
            return f"/{name}: {e}"
        self.params = params
        return f"({name} = {value})"

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's answer to `text`; notices about dropped turns come first, in brackets."""
        candidate = Conversation(self.messages() + [Message("user", text)],
                                 tools=[t.spec() for t in self.tools.values()])
        context = self.ckpt.model.config.context_length
        reserve = min(self.params.max_tokens, context // 2)
        ids, dropped = self.template.fit_to_context(candidate, context, reserve=reserve)
        if dropped:
            del self.history[:dropped]  # the turns fit_to_context left out: the oldest after the system prompt
            yield f"[the conversation no longer fits the {context}-token context: the oldest {dropped} turn(s) "
            yield "were dropped]\n"
        self.history.append(Message("user", text))
        params = dataclasses.replace(self.params, max_tokens=min(self.params.max_tokens, context - len(ids)),
                                     strip_leading_whitespace=True, skip_special_tokens=True)
        parts: list[str] = []
        echo = ToolEcho()
        use = ToolUse(self.tools) if self.tools else None
        for event in self.engine.stream(ids, params, tool_use=use):
            shown = echo.text(event)
            if event.tool_turns:  # the answer so far, its calls and their results join the history
                self._add_answer(parts)
                self.history += [Message("tool_call", t.call) for t in event.tool_turns]
                self.history += [Message("tool_result", t.result) for t in event.tool_turns]
                parts = []
            parts.append(event.text)
            yield shown
        self._add_answer(parts)

    def _add_answer(self, parts: list[str]) -> None:
        answer = "".join(parts).strip()
        if answer:
            self.history.append(Message("assistant", answer))


class ToolEcho:
    """What a stream event shows in a terminal: its text, a call as it is written (after "[call] ") and
    each result the engine fed in (after "[result] "), on lines of their own."""

    def __init__(self) -> None:
        self.calls = 0

    def text(self, event) -> str:
        out = ""
        if event.call is not None:
            if event.call.index >= self.calls:
                self.calls = event.call.index + 1
                out += "\n[call] "
            out += event.call.text
        for turn in event.tool_turns:
            out += f"\n[result] {turn.result}\n"
        return out + event.text


def run_chat(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> None:
    """The read-reply loop; `read` raises EOFError at end of input."""
    write(f"chatforge chat with {session.ckpt.path} — /help for commands\n")
    if session.examples:
        write("try one of these (type /1 to send the first):\n")
        write("".join(f"  /{i}  {text}\n" for i, text in enumerate(session.examples, start=1)))
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line[1:].isdigit() and line.startswith("/") and 1 <= int(line[1:]) <= len(session.examples or []):
            line = session.examples[int(line[1:]) - 1]
            write(f"you> {line}\n")
        if line.startswith("/"):
            out, quit_ = session.command(line)
            if out:
                write(out + "\n")
            if quit_:
                return
            continue
        write("assistant> ")
        try:
            for piece in session.reply(line):
                write(piece)
        except ChatforgeError as e:
            write(f"[{e}]")
        write("\n")
