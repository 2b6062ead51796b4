"""The labeler: ranks K candidate responses per preference prompt by the scorer's rules (right over
wrong, the right refusal behaviour, concise over padded). It stands in for human labelers'
judgement when rankings are made; it never judges held-out answers -- only the scorer does.

Responses may be transcripts (calls, results, the answer). Among responses the scorer values alike,
a tool family's are ordered by how they used the tool: a right call with a right answer, then a
right answer without a call, then the rest. So the labeler prefers a correct call over a correct
answer computed in the head, and both over a wrong answer; a call with wrong arguments (or a needless
call, or a result the answer contradicts) scores 0, so it never comes before an honest right answer.
For functions prompts where a declared function fits, a right answer from memory scores 0 (the
request asked for the function) but still comes before the wrong ones among the zeros."""

from __future__ import annotations

from collections.abc import Sequence

from chatforge.chat import Message
from chatforge.data.tasks.calls import Response, as_response, final_text, response_key
from chatforge.data.tasks.scorer import Prompt, Score, Scorer
from chatforge.data.tasks.steps import after_steps
from chatforge.data.tasks.text import _norm


class Labeler:
    """Ranks candidate responses the way the labelers' instructions say: a right answer (or the right
    refusal behaviour) first, then concise over padded, then a right answer that shows its steps (column
    by column, letter by letter) over one that does not, then shorter, then alphabetical (so ties break
    the same way every time). Exact duplicates and empty responses are dropped.

    With ``near_misses_first``, among wrong answers the more of the right answer's words one has, the
    earlier it comes ("12 plus 30 is 41." before nonsense, or before refusing a harmless request).
    That is for rankings of a policy's own samples, most of them wrong in some way: without it the
    shortest wrong answer, often a refusal, comes first, and PPO against a reward model trained on
    such rankings refused harmless requests (checked score 0.269 against 0.320 with it, three
    seeds). It is off for the rule-made rankings DPO trains on: there it ranks every refusal of an
    answerable prompt last, and DPO learns "refusing is bad" as a rule of its own (harmful requests
    refused 0% instead of 63%; checked score 0.131 against 0.237).

    With ``over_refusals_last``, a refusal of a harmless request comes after every other answer: it
    is the wrong refusal behaviour, not a wrong attempt. Also for the policy's own samples: there the
    reward model otherwise scored refusing a harmless look-alike ("How do I lock a door?") about like
    a wrong attempt, and PPO refused 78% of harmless requests on the demo run (checked score 0.320 ±
    0.034 over three seeds against 0.349 ± 0.011 with it).
    """

    def __init__(self, scorer: Scorer, near_misses_first: bool = False, over_refusals_last: bool = False) -> None:
        self.scorer = scorer
        self.near_misses_first = near_misses_first
        self.over_refusals_last = over_refusals_last

    def rank(self, prompt: Prompt, responses: Sequence[str | Sequence[Message]],
             family: str | None = None) -> list[Response]:
        """The responses best first (strings stay strings; transcripts come back as tuples); `family` is
        the prompt's label, for the scorer."""
        unique = list(dict.fromkeys(r for r in map(as_response, responses) if r and _says_something(r)))
        scores = self.scorer.score_all(prompt, unique, family)
        reference = set(_norm(self.scorer.reference(prompt, family) or "").split())

        def nearness(i: int) -> float:  # share of the right answer's words, for wrong answers only
            if not self.near_misses_first or scores[i].value > 0 or not reference:
                return 0.0
            return round(len(reference & set(_norm(final_text(unique[i])).split())) / len(reference), 2)

        over_refusal = self.over_refusals_last and self.scorer.family(prompt, family) == "harmless"
        order = sorted(range(len(unique)),
                       key=lambda i: (-scores[i].value, -_tool_use(scores[i]), over_refusal and scores[i].refused,
                                      -nearness(i), scores[i].padded, -_right_with_steps(unique[i], scores[i]),
                                      scores[i].length, response_key(unique[i])))
        return [unique[i] for i in order]


def _right_with_steps(response: Response, score: Score) -> bool:
    """A right answer that shows its steps (steps.py): it comes before a right answer without them, whatever
    their lengths. The demonstrations reason in steps because the steps make the answer right; a reward
    model that preferred the shorter direct answer would teach PPO to drop them."""
    text = final_text(response)
    return score.value > 0 and after_steps(text) != text


def _says_something(response: Response) -> bool:
    """Whether a response says anything: text that is not blank, or a transcript."""
    return bool(response.strip()) if isinstance(response, str) else True


def _tool_use(score: Score) -> int:
    """2: a right call and a right answer; 1: a right answer without a call; 0: anything else (and
    every response of a family without tools, so their order is as it always was)."""
    if score.called is None or not score.correct:
        return 0
    return 2 if score.call_correct else 1 if not score.called else 0
