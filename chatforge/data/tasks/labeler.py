"""The labeler: ranks K candidate responses per preference prompt by the scorer's rules (right over
wrong, the right refusal behaviour, concise over padded). It stands in for human labelers'
judgement when rankings are made; it never judges held-out answers -- only the scorer does."""

from __future__ import annotations

from collections.abc import Sequence

from chatforge.data.tasks.scorer import Prompt, Scorer
from chatforge.data.tasks.text import _norm


class Labeler:
    """Ranks candidate responses the way the labelers' instructions say: a right answer (or the right
    refusal behaviour) first, then concise over padded, then shorter, then alphabetical (so ties break
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

    def rank(self, prompt: Prompt, responses: Sequence[str]) -> list[str]:
        unique = list(dict.fromkeys(r for r in responses if r.strip()))
        scores = self.scorer.score_all(prompt, unique)
        reference = set(_norm(self.scorer.reference(prompt) or "").split())

        def nearness(i: int) -> float:  # share of the right answer's words, for wrong answers only
            if not self.near_misses_first or scores[i].value > 0 or not reference:
                return 0.0
            return round(len(reference & set(_norm(unique[i]).split())) / len(reference), 2)

        over_refusal = self.over_refusals_last and self.scorer.family(prompt) == "harmless"
        order = sorted(range(len(unique)),
                       key=lambda i: (-scores[i].value, over_refusal and scores[i].refused, -nearness(i),
                                      scores[i].padded, scores[i].length, unique[i]))
        return [unique[i] for i in order]
