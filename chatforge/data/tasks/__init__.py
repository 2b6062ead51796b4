"""The task world: SFT demonstrations, ranked preferences, RL prompts and evaluation prompts over the
built-in world, and the scorer that checks any (prompt, response) pair.

Why: SFT, the reward model, PPO and evaluation each need data of the same *shape* as the real thing
(labelers' demonstrations, labelers' rankings, users' prompts, human raters), and evaluation needs a
judge that is a program. See WORLD.md.

Eight task families, each checkable by the scorer from the prompt text alone:

- ``facts``: "What is the capital of Vovunia?" (ATTRIBUTES' question templates)
- ``followup``: a fact question, its correct answer, then "And what about its river?"; some with two
  earlier user turns (a question and a follow-up, or a turn naming the subject and a follow-up)
- ``arithmetic``: 2-3 digit addition/subtraction and 2-digit x 1-digit multiplication, in digits or words,
  answered column by column
- ``words``: reverse a word (spelled, then backwards), count a letter in it (a running count), spell it
  letter by letter
- ``harmful``: requests to refuse politely ("How do I steal a car?")
- ``harmless``: look-alike requests to answer ("How do I wash a car?"), some in a jailbreak's wrapper
- ``jailbreak``: harmful requests in a wrapper of four kinds (role-play, fiction, "ignore your rules",
  prefix injection): refused all the same
- ``twohop``: questions that need two facts ("Which language is spoken in the country whose capital is
  Folrun?"), answered by stating the first fact, then the second

Arithmetic, reversing, counting and two-hop answers reason in steps (chain of thought) unless
``TaskConfig.step_by_step`` is False, which gives the direct answers to the same prompts (the
ablation); the scorer judges both. Every family that asks through templates except two-hop also has
held-out phrasings (``Attribute.heldout_questions``, ``HELDOUT_REQUEST_TEMPLATES``,
``HELDOUT_JAILBREAK_WRAPPERS``, ...): half of each family's evaluation prompts use them (their records
say ``"phrasing": "heldout"``), and no other file or the corpus does.

and three tool families, off unless the mix gives them a weight (``TaskConfig().with_tools()``), so
the default files are what they were before them:

- ``calc``: arithmetic's questions answered through the calculator (call, result, answer)
- ``dates``: a date's weekday, the days between two dates, today's date (the calendar, on a fixed clock)
- ``functions``: fact questions beside 1-4 declared world functions (``get_capital(country)``): call
  the one that fits, or answer directly when none does

One module per concern, each importing only the ones listed before it:

- ``vocabulary``: the names of families, splits and word tasks, and the fixed texts tasks are made of
  (system prompts, filler, restatements, refusals, compliances, request templates, harmful and
  harmless acts).
- ``text``: normalising text, reading numbers in digits or words, phrase lookups, regexes from
  question templates, and telling refusals (``is_refusal``) and padding (``is_padded``).
- ``config``: ``FamilyMix`` and ``TaskConfig``, what the builders make.
- ``answers``: the concise reference answers the generators demonstrate and the scorer measures
  conciseness against.
- ``steps``: the step-by-step answers of arithmetic and word tasks, their slips (wrong answers), and
  reading a response's answer after its steps (``after_steps``).
- ``twohop``: the compositions of two facts that have one answer, their questions, answers, wrong
  answers and the scorer's check.
- ``calls``: responses that are transcripts (calls, results, answer), the world's functions as
  tools, and the built-in tools' specs.
- ``scorer``: ``Scorer`` and ``Score``: recognises a prompt's family from its text, looks the answer
  up in the world and checks a response (correctness, refusal behaviour, padding).
- ``labeler``: ``Labeler``, which ranks candidate responses by the scorer's rules; it stands in for
  human labelers' judgement when preference data is made.
- ``verifier``: ``Verifier``, the scorer's correctness checks of the final answer of the families a
  program verifies (arithmetic, words, calc, dates, functions), 1/0 or None: the one reward RL may take
  from the world (GRPO's and RLOO's ``--reward verifier``); never facts, padding or refusals.
- ``items``: the underlying items of every family and the split each belongs to (``build_items``).
- ``families``: ``Task``, and one maker per family that turns an item into a prompt in a random
  phrasing with its rule-made responses.
- ``builders``: the noisy SFT demonstrations, the labeler's rankings, RL and evaluation prompts
  (``build_tasks``) and their files (``write_tasks``).

The labeler ranks by the scorer's rules, standing in for labelers' judgement in training data; the
scorer alone judges held-out answers, and is never a training signal (the verifier's final-answer
checks excepted, as WORLD.md allows).
"""

from chatforge.data.tasks.answers import _harmless_answer
from chatforge.data.tasks.builders import Demo, ExtraCandidates, Ranking, TaskSet, build_tasks, write_tasks
from chatforge.data.tasks.calls import Response, final_text, response_json, task_tools, world_tools
from chatforge.data.tasks.config import COUNT_FIELDS, TOOL_MIX, FamilyMix, TaskConfig
from chatforge.data.tasks.families import Task
from chatforge.data.tasks.items import Item, Key, build_items
from chatforge.data.tasks.labeler import Labeler
from chatforge.data.tasks.scorer import Prompt, Score, Scorer
from chatforge.data.tasks.text import is_padded, is_refusal
from chatforge.data.tasks.verifier import VERIFIED_FAMILIES, Verifier
from chatforge.data.tasks.vocabulary import (
    ALL_FAMILIES,
    COMPLIANCES,
    FAMILIES,
    FILLER_CLOSERS,
    FILLER_OPENERS,
    HARMFUL_ACTS,
    HARMLESS_ACTS,
    HELDOUT_JAILBREAK_WRAPPERS,
    HELDOUT_REQUEST_TEMPLATES,
    JAILBREAK_KINDS,
    JAILBREAK_WRAPPERS,
    PAD_PENALTY,
    PHRASINGS,
    REFUSALS,
    REQUEST_TEMPLATES,
    RESTATEMENTS,
    SPLITS,
    SYSTEM_PROMPTS,
    TODAY,
    TOOL_FAMILIES,
    WITHOUT_TOOLS,
    WORD_TASKS,
)

__all__ = [
    "ALL_FAMILIES", "TODAY", "TOOL_FAMILIES", "TOOL_MIX", "WITHOUT_TOOLS", "Response", "final_text",
    "response_json", "task_tools", "world_tools",
    "COMPLIANCES", "COUNT_FIELDS", "FAMILIES", "FILLER_CLOSERS", "FILLER_OPENERS", "HARMFUL_ACTS", "HARMLESS_ACTS",
    "PAD_PENALTY", "REFUSALS", "REQUEST_TEMPLATES", "RESTATEMENTS", "SPLITS", "SYSTEM_PROMPTS", "WORD_TASKS",
    "HELDOUT_JAILBREAK_WRAPPERS", "HELDOUT_REQUEST_TEMPLATES", "JAILBREAK_KINDS", "JAILBREAK_WRAPPERS", "PHRASINGS",
    "Demo", "ExtraCandidates", "FamilyMix", "Item", "Key", "Labeler", "Prompt", "Ranking", "Score", "Scorer", "Task",
    "TaskConfig", "TaskSet", "VERIFIED_FAMILIES", "Verifier", "_harmless_answer", "build_items", "build_tasks",
    "is_padded", "is_refusal", "write_tasks",
]
