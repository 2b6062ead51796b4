"""What every generation route shares: the server's state (built once by create_app) and a checked prompt.

Kept apart from the routes (handlers.py), the job (jobs.py) and the response formats (formats.py) so
that each of those can use them without importing the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from chatforge.chat import ChatTemplate
from chatforge.data.examples import GENERIC_EXAMPLES
from chatforge.generate.engine import Engine
from chatforge.serve.metrics import Metrics
from chatforge.serve.runner import EngineRunner


@dataclass
class ServerState:
    """What the routes share; built once by create_app."""

    engine: Engine
    runner: EngineRunner
    tokenizer: Any
    template: ChatTemplate | None
    model_name: str
    metrics: Metrics
    moderator: Any = None  # chatforge.serve.moderation.Moderator (check(text) -> reason | None; REFUSAL)
    max_prompts: int = 64
    max_beams: int = 16
    created: int = field(default_factory=lambda: int(time.time()))
    examples: list[str] = field(default_factory=lambda: list(GENERIC_EXAMPLES))  # what the page offers to ask
    examples_source: str = "generic"  # "training": from the model's own training files
    builtin_tools: dict[str, Any] = field(default_factory=dict)  # name -> chatforge.tools.Tool, run by the engine
    # the server's WatermarkConfig (--watermark-key; None: none), on every answer; it holds the secret key
    watermark: Any = field(default=None, repr=False)
    # the --watermark-* settings (gamma, delta, seeding_scheme, context_width): the defaults of a request's
    # own watermark and of /v1/detect
    watermark_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        return self.engine.config.context_length

    @property
    def vocab_size(self) -> int:
        return self.engine.config.vocab_size

    @property
    def refusal(self) -> str:
        """What the moderator answers a flagged request with: it owns the text."""
        return str(self.moderator.REFUSAL)


@dataclass
class Prompt:
    """One prompt of a request: its token ids and its text (a chat prompt's text is "": it is never echoed)."""

    ids: list[int]
    text: str
