"""The verifier: a reward RL may train on, for the families a program can verify, from the final answer only.

``Verifier(world).verify(prompt, response, family)`` is 1.0 when the response's final answer is right,
0.0 when it is wrong, and None when the prompt is not one it verifies. It uses the scorer's own
correctness checks (``Score.correct``, ``call_correct``, ``should_call``) and nothing else of its
judgement. The verified families:

- ``arithmetic``: the last number of the answer is the result;
- ``words``: the reversed word, the spelled letters, the last number is the letter count;
- ``calc``: the answer's last number is the result, and every calculator call (if any) is worth it;
- ``dates``: the right weekday / day count / date, and every calendar call (if any) has the right
  operation and dates;
- ``functions``, where a declared world function fits the question: the right function called with the
  question's subject, and the answer after its result names the value the function returned.

Why only these (WORLD.md, "Noise that makes RLHF worth doing"): RLHF exists to fix what SFT copied, and
the world's scorer — correctness, the right refusal behaviour, no filler — shows whether it did, on
held-out prompts, *without ever being a training signal*. The one exception, as in practice for math and
code, is a verifier that checks only the final answer of families a program can verify. So it stays
away from everything else the scorer judges:

- **facts** (and follow-ups, and ``functions`` prompts where no declared function fits, which are fact
  questions answered directly): a fact's truth is the world's, looked up by the scorer; rewarding it
  would hand RL the evaluation's answer key, where an RL stage should learn from the reward model's
  judgement (or from a tool's result, which the ``functions`` case checks);
- **padding**: conciseness is a matter of taste that the labelers' rankings, and so the reward model,
  teach; a verifier rewarding it would be the scorer itself as a training signal;
- **refusals** (``harmful``, ``harmless``): whether to refuse is a judgement, not a checkable answer;
  it is what the reward model learns from rankings, and what the held-out figures measure.

A refusal of an arithmetic question is simply wrong here (it names no result), not judged as a refusal;
a padded right answer is right. The module imports no torch: it reads text.
"""

from __future__ import annotations

from collections.abc import Sequence

from chatforge.chat import Message
from chatforge.data.tasks.scorer import Prompt, Score, Scorer
from chatforge.data.tasks.vocabulary import TODAY
from chatforge.data.world import World

VERIFIED_FAMILIES = ("arithmetic", "words", "calc", "dates", "functions")


class Verifier:
    """1.0 / 0.0 for a right / wrong final answer of a verifiable prompt, None for any other prompt."""

    def __init__(self, world: World, today: str = TODAY) -> None:
        self.scorer = Scorer(world, today)

    def verifiable(self, prompt: Prompt, family: str | None = None) -> bool:
        """Whether `verify` answers for this prompt (`family`: the record's label, as the scorer reads it)."""
        return self._verified(self.scorer.score(prompt, "", family))

    def verify(self, prompt: Prompt, response: str | Sequence[Message], family: str | None = None) -> float | None:
        """1.0 when the final answer (and every tool call) is right, 0.0 when not, None when unverifiable."""
        score = self.scorer.score(prompt, response, family)
        if not self._verified(score):
            return None
        right = bool(score.correct) and score.call_correct is not False and not (score.should_call and not score.called)
        return 1.0 if right else 0.0

    @staticmethod
    def _verified(score: Score) -> bool:
        """A verified family; for ``functions``, only where a declared function fits (else it is a fact question)."""
        return score.family in VERIFIED_FAMILIES and (score.family != "functions" or bool(score.should_call))
