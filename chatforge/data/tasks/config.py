"""What the task world builds: ``FamilyMix`` (each family's share of the SFT, preference and RL
files) and ``TaskConfig`` (counts, split shares, the labelers' noise, candidates per ranking).

The tool families (``calc``, ``dates``, ``functions``) have share 0 by default, so the default files
do not depend on them: the tool settings (``TOOL_FIELDS``) and the tool families' mix weights are
left out of ``tasks.json`` while no tool family is on (``meta_config``). ``TaskConfig.with_tools()``
turns them on with ``TOOL_MIX``."""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field, fields, replace

from chatforge.data.tasks.vocabulary import SPLITS, TODAY, TOOL_FAMILIES
from chatforge.errors import ConfigError


@dataclass(frozen=True)
class FamilyMix:
    """Share of each family in the SFT, preference and RL files (normalised; eval is balanced instead)."""

    facts: float = 0.25
    followup: float = 0.15
    arithmetic: float = 0.20
    words: float = 0.15
    # As many requests to answer as to refuse: with fewer harmless ones (0.125 against 0.225) the reward
    # model preferred a refusal to the right answer on 47% of held-out harmless requests, and PPO learned
    # to refuse them (docs/demo-recipe.md).
    harmful: float = 0.10
    harmless: float = 0.175
    jailbreak: float = 0.075
    twohop: float = 0.10  # questions that need two facts (twohop.py)
    calc: float = 0.0  # tool families: off unless given a weight (see TOOL_MIX)
    dates: float = 0.0
    functions: float = 0.0

    def shares(self) -> dict[str, float]:
        weights = {f.name: float(getattr(self, f.name)) for f in fields(self)}
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ConfigError(f"task family mix weights must be >= 0 and not all zero, got {weights}")
        total = sum(weights.values())
        return {k: w / total for k, w in weights.items()}


TOOL_MIX = {"calc": 0.15, "dates": 0.10, "functions": 0.15}  # weights `TaskConfig.with_tools` gives them
COUNT_FIELDS = ("sft_train", "sft_val", "prefs_train", "prefs_val", "rl_train", "rl_val", "eval_per_family")


@dataclass(frozen=True)
class TaskConfig:
    """What ``build_tasks``/``write_tasks`` make; the defaults suit a CPU demo."""

    sft_train: int = 3000  # conversations
    sft_val: int = 300
    prefs_train: int = 2000  # prompts, each with K ranked responses
    prefs_val: int = 100
    rl_train: int = 400  # prompts
    rl_val: int = 100
    eval_per_family: int = 60
    mix: FamilyMix = field(default_factory=FamilyMix)
    # Shares of underlying items per split (normalised).
    split_sft: float = 0.45
    split_rm: float = 0.20
    split_rl: float = 0.15
    split_heldout: float = 0.20
    # Labeler noise in SFT training demonstrations (validation demonstrations are clean).
    padded_share: float = 0.25  # filler openers/closers
    verbose_share: float = 0.10  # restate the question, then answer
    wrong_share: float = 0.08  # a plausible wrong answer (not harmful requests)
    harmful_comply_share: float = 0.15  # harmful requests (and jailbreaks) complied with instead of refused
    wrapped_harmless_share: float = 0.3  # harmless requests in a jailbreak's wrapper (items; must be < 1)
    long_followup_share: float = 0.4  # follow-up prompts with two earlier user turns or more
    system_prompt_share: float = 0.2  # conversations that start with a system prompt
    arithmetic_words_share: float = 0.3  # arithmetic asked in number words rather than digits
    arithmetic_items_per_op: int = 500  # distinct (a, b) per operation in the item pool
    min_candidates: int = 4  # rule-made responses per preference prompt (before extra_candidates)
    max_candidates: int = 6
    # Word tasks (reverse, count), arithmetic and two-hop questions answered step by step (steps.py,
    # twohop.py); False: the direct answers, the same prompts (the chain-of-thought ablation).
    step_by_step: bool = True
    # Tool families (used only when one has a weight in `mix`).
    declare_builtin_tools: bool = True  # calc/dates records declare the calculator and calendar in the system
    # turn; False: no declaration (the model learns their API from demonstrations, as Toolformer did; both
    # specs cost ~600 tokens, too many for a 128-token context)
    today: str = TODAY  # the calendar's fixed clock in data and evaluation (YYYY-MM-DD)
    unaided_share: float = 0.15  # calc/dates demonstrations answered right without the tool (in the head)
    functions_fit_share: float = 0.7  # functions prompts where a declared function answers the request
    max_functions: int = 4  # functions declared per functions prompt: 1 to this many

    def __post_init__(self) -> None:
        for name in COUNT_FIELDS:
            if getattr(self, name) < 0:
                raise ConfigError(f"task config: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("padded_share", "verbose_share", "wrong_share", "harmful_comply_share", "system_prompt_share",
                     "arithmetic_words_share", "unaided_share", "functions_fit_share", "long_followup_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"task config: {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.wrapped_harmless_share < 1.0:
            raise ConfigError(f"task config: wrapped_harmless_share must be in [0, 1), "
                              f"got {self.wrapped_harmless_share}")
        if self.padded_share + self.verbose_share > 1.0:
            raise ConfigError("task config: padded_share + verbose_share must be <= 1")
        if min(self.split_shares().values()) <= 0:
            raise ConfigError(f"task config: every split share must be > 0, got {self.split_shares()}")
        if not 2 <= self.min_candidates <= self.max_candidates <= 6:
            raise ConfigError(f"task config: need 2 <= min_candidates <= max_candidates <= 6, "
                              f"got {self.min_candidates}, {self.max_candidates}")
        if not 1 <= self.arithmetic_items_per_op <= 700:  # 2-digit x 1-digit has only 720 pairs
            raise ConfigError(f"task config: arithmetic_items_per_op must be in 1..700, "
                              f"got {self.arithmetic_items_per_op}")
        if not 1 <= self.max_functions <= 4:
            raise ConfigError(f"task config: max_functions must be in 1..4, got {self.max_functions}")
        try:
            datetime.date.fromisoformat(self.today)
        except (TypeError, ValueError):
            raise ConfigError(f"task config: today must be a date YYYY-MM-DD, got {self.today!r}") from None
        self.mix.shares()

    @property
    def tool_families(self) -> tuple[str, ...]:
        """The tool families with a weight in the mix: the ones written, and evaluated."""
        return tuple(f for f in TOOL_FAMILIES if getattr(self.mix, f) > 0)

    def with_tools(self, **weights: float) -> TaskConfig:
        """The same recipe with the tool families on (``TOOL_MIX``'s weights, or the ones given)."""
        return replace(self, mix=replace(self.mix, **(TOOL_MIX | weights)))

    def scaled(self, factor: float) -> TaskConfig:
        """The same recipe with every count multiplied by factor (at least 1 each): a smaller or larger set."""
        return replace(self, **{n: max(1, round(getattr(self, n) * factor)) for n in COUNT_FIELDS})

    def split_shares(self) -> dict[str, float]:
        return {s: float(getattr(self, f"split_{s}")) for s in SPLITS}


TOOL_FIELDS = ("declare_builtin_tools", "today", "unaided_share", "functions_fit_share", "max_functions")


def meta_config(config: TaskConfig) -> dict:
    """The config as ``tasks.json`` records it; without tool families, nothing of theirs."""
    out = asdict(config)
    if not config.tool_families:
        for name in TOOL_FIELDS:
            del out[name]
        for name in TOOL_FAMILIES:
            del out["mix"][name]
    return out
