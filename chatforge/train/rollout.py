"""What the RL stages share (PPO, GRPO, RLOO): prompts fitted to the context, answers sampled through the
engine, log-probs of sampled tokens, the reward model's scores and the frozen models.

A stage never imports another stage, so these pieces live here rather than in `ppo.py`:

- loading: `load_policy`, `load_reward_model` (and `check_same_tokens`), `freeze`;
- prompts: `fit_prompt` / `fit_prompts` (old turns dropped so an answer fits), `step_prompts` (this
  process's share of a step's seeded prompt batch), `RLPrompt` (a prompt with what a verifier reads);
- rollouts: `Sampler` (pure sampling at a temperature through the engine, a seed per answer, tools
  optional), `Rollout` / `make_rollout` (right-padded rows and the mask of the policy's own tokens),
  `response_of` (an answer's tokens read back as text or a transcript);
- scoring: `response_logprobs`, `entropy_of`, `RewardFn` and `reward_model_scores`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chatforge.chat import ChatTemplate, Conversation, Message
from chatforge.checkpoint import TOKENIZER_FILE, Checkpoint, load_checkpoint, load_tokenizer
from chatforge.data.chat_readers import chat_paths, read_prompts
from chatforge.data.tasks.calls import Response, as_response
from chatforge.errors import ConfigError, DataError
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.generate.tool_loop import ToolUse
from chatforge.model import GPT, ScalarHeadModel
from chatforge.train.distributed import DistInfo

FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---- models --------------------------------------------------------------------------------------


def freeze(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A model that is never trained: eval mode, no gradients, weights in dtype (bf16 halves their memory)."""
    return model.requires_grad_(False).to(dtype).eval()


def load_policy(stage: str, path: str, device: torch.device) -> Checkpoint:
    """The SFT checkpoint the policy starts from; a reward model is refused by name."""
    sft = load_checkpoint(path, device=device)
    if isinstance(sft.model, ScalarHeadModel):
        raise ConfigError(f"{stage}: --policy {path} is a reward model; expected the SFT (chat) model")
    return sft


def load_reward_model(stage: str, path: str, sft: Checkpoint, policy_path: str, device: torch.device) -> Checkpoint:
    """`chatforge reward`'s model, refused when it is a language model or reads other token ids than the policy."""
    rm = load_checkpoint(path, device=device, tokenizer=False)
    if not isinstance(rm.model, ScalarHeadModel):
        raise ConfigError(f"{stage}: --reward-model {path} is a language model; expected `chatforge reward`'s")
    check_same_tokens(stage, sft, rm, policy_path, path)
    return rm


def check_same_tokens(stage: str, sft: Checkpoint, rm: Checkpoint, policy_path: str, rm_path: str) -> None:
    """The reward model must read the policy's token ids: the same tokenizer and vocabulary size."""
    if (rm.path / TOKENIZER_FILE).exists():  # `chatforge reward` saves it; a hand-made reward model may not
        theirs, ours = load_tokenizer(rm.path).hash, sft.tokenizer.hash
        if theirs != ours:
            raise ConfigError(f"{stage}: --reward-model {rm_path} was trained with another tokenizer than "
                              f"--policy {policy_path} (tokenizer.json hash {theirs[:12]} vs {ours[:12]}); expected a "
                              "reward model trained on the policy's tokenizer")
    theirs, ours = rm.model.config.vocab_size, sft.model.config.vocab_size
    if theirs != ours:
        raise ConfigError(f"{stage}: --reward-model {rm_path} has vocab_size {theirs} and --policy {policy_path} "
                          f"{ours}; expected the same vocabulary (a reward model trained from the policy's model)")


def response_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(ids[:, t+1] | ids[:, :t+1]) from the logits at t, divided by the sampling temperature."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def entropy_of(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---- prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLPrompt:
    """A prompt as the group stages keep it: the ids the policy continues, and what a verifier reads
    (the conversation with the tools it declares, the record's family label)."""

    ids: list[int]
    conversation: Conversation
    family: str | None = None


def fit_prompt(template: ChatTemplate, messages: list[Message], context: int, max_new_tokens: int,
               tools: list[dict] | None = None) -> list[int] | None:
    """The ids the policy continues: old turns dropped until `max_new_tokens` fit after the prompt (the
    `tools` declared in the system turn stay).

    When the system prompt and the latest turn alone leave less room than that, they are kept alone
    and the answer gets the room there is (a shorter answer beats no prompt); None when not even one
    answer token fits.
    """
    try:
        return template.fit_to_context(Conversation(messages, tools=tools or []), context, reserve=max_new_tokens)[0]
    except DataError:
        ids = template.generation_prompt(Conversation(latest_turns(messages), tools=tools or []))
        return ids if len(ids) < context else None


def latest_turns(messages: list[Message]) -> list[Message]:
    """The system prompt (if any) and the latest turn: what `fit_to_context` never drops."""
    return [m for m in messages[:1] if m.role == "system"] + messages[-1:]


def fit_prompts(prompts: list[list[Message]], sources: list[str], flag: str, template: ChatTemplate, context: int,
                max_new_tokens: int, tools: list[list[dict]] | None = None,
                positions: list[int] | None = None) -> list[list[int]]:
    """`fit_prompt` for every prompt up front (with `tools`, each prompt's declared functions), so one too
    long for the context stops the run before it starts. `positions`: each prompt's index among the records
    `read_prompts(sources)` returns, where `prompts` are some of them (the error names the file and place)."""
    out = []
    for index, messages in enumerate(prompts):
        declared = tools[index] if tools else None
        ids = fit_prompt(template, messages, context, max_new_tokens, declared)
        if ids is None:
            need = len(template.generation_prompt(Conversation(latest_turns(messages), tools=declared or [])))
            where = locate_prompt(sources, positions[index] if positions else index)
            raise DataError(f"{where} ({flag}): needs {need} tokens even with only its "
                            f"system prompt and latest turn, and the policy's context is {context}; expected at most "
                            f"{context - 1} so that at least one answer token fits (shorten or remove it)")
        out.append(ids)
    return out


def locate_prompt(sources: list[str], index: int) -> str:
    """'FILE: prompt N' (N-th record of that file) for the index-th prompt `read_prompts(sources)` returned."""
    for path in chat_paths(sources):
        try:
            count = len(read_prompts(path).prompts)
        except DataError:  # a file without prompts contributed none
            count = 0
        if index < count:
            return f"{path}: prompt {index + 1}"
        index -= count
    return f"prompt {index + 1}"


def step_prompts(n: int, batch: int, seed: int, step: int, dist: DistInfo) -> tuple[list[int], list[int]]:
    """This process's share of step's global batch of `batch` prompts drawn from `n`: their indices, and
    each one's global index in the run (what seeds its answers).

    The batch is the first `batch` of a permutation of max(n, batch) indices seeded by (seed, step),
    taken mod n, so a resumed run or another split over processes draws the same prompts."""
    order = np.random.default_rng([seed, step]).permutation(max(n, batch))[:batch] % n
    per_rank = batch // dist.world_size
    mine = range(dist.rank * per_rank, (dist.rank + 1) * per_rank)
    return [int(order[i]) for i in mine], [step * batch + i for i in mine]


# ---- rollouts ------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """A batch of answered prompts, right-padded; per-token tensors are aligned with ids[:, 1:]."""

    ids: torch.Tensor  # (B, T) prompt + response
    mask: torch.Tensor  # (B, T-1) 1 where the predicted token is one the policy sampled (not a fed tool result)
    lengths: torch.Tensor  # (B,) real tokens per row
    ended: torch.Tensor  # (B,) the answer closed with <|end|>
    responses: list[list[int]]
    prompts: list[Any] = field(default_factory=list)  # each row's RLPrompt, where the stage keeps them (GRPO, RLOO)


def make_rollout(prompts: list[list[int]], responses: list[list[int]], ended: list[bool], pad_id: int,
                 fed: list[list[tuple[int, int]]] | None = None) -> Rollout:
    """Right-padded prompt + response rows. `fed`: per row, the [start, end) spans of the response that the
    engine fed in (tool results): they are not the policy's actions, so their mask is 0."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width - 1))
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        mask[b, len(p) - 1 : len(p) + len(r) - 1] = 1.0  # positions whose next token is a response token
        for start, end in (fed[b] if fed else []):
            mask[b, len(p) - 1 + start : len(p) - 1 + end] = 0.0
    return Rollout(ids, mask, torch.tensor(lengths), torch.tensor(ended), responses)


class Sampler:
    """The policy's answers through the engine: pure sampling at a temperature (no top-k/top-p, so the
    sampled distribution is the one whose log-probs the losses use), or greedy; a seed per answer,
    `seed * 1_000_003 + k` for the answer's global index k, so a resume or another split over processes
    samples the same answers. Answers stop at `<|end|>` (appended to the response, `ended` True) or after
    min(max_new_tokens, context - prompt) tokens."""

    def __init__(self, policy: GPT, tokenizer, max_batch_size: int, max_new_tokens: int, seed: int) -> None:
        self.policy, self.max_new_tokens, self.seed = policy, max_new_tokens, seed
        self.template = ChatTemplate(tokenizer)
        self.engine = Engine(policy, tokenizer, max_batch_size=max_batch_size, stop_token_ids=[self.template.end_id])

    @torch.no_grad()
    def sample(self, ids: list[list[int]], seeds: list[int], temperature: float, greedy: bool = False,
               tool_use: ToolUse | Sequence[ToolUse | None] | None = None) -> Rollout:
        """Answers to `ids`, answer i seeded by `seeds[i]`; `tool_use`: one for every prompt, or one per prompt
        (the tools the engine runs when the policy calls them; their results are fed in, masked out)."""
        context = self.policy.config.context_length
        params = [SamplingParams(max_tokens=min(self.max_new_tokens, context - len(i)), seed=self.seed * 1_000_003 + k,
                                 temperature=0.0 if greedy else temperature) for i, k in zip(ids, seeds)]
        uses = list(tool_use) if isinstance(tool_use, Sequence) else [tool_use] * len(ids)
        self.policy.eval()
        requests = [self.engine.add_request(i, p, tool_use=u) for i, p, u in zip(ids, params, uses)]
        while self.engine.has_unfinished():
            self.engine.step()
        responses, ended, fed = [], [], []
        for request in requests:
            out = self.engine.pop_result(request).outputs[0]
            stopped = out.finish_reason == "stop"
            responses.append(list(out.token_ids) + ([self.template.end_id] if stopped else []))
            ended.append(stopped)
            fed.append(out.fed_spans)
        return make_rollout(ids, responses, ended, self.template.eot_id, fed)


def response_of(template: ChatTemplate, tokens: list[int]) -> Response:
    """An answer's tokens (its `<|end|>` included or not) read back as the scorer reads answers: the text of
    one assistant turn, or a transcript of calls, fed results and text; the decoded text when the tokens
    do not parse as turns."""
    try:
        messages = template.parse([template.role_ids["assistant"], *tokens]).messages
    except DataError:
        return template.tokenizer.decode([t for t in tokens if t != template.end_id]).strip()
    if not messages:
        return ""
    return as_response([Message(m.role, m.content.strip(), m.call_id) if m.role == "assistant" else m
                        for m in messages])


# ---- rewards -------------------------------------------------------------------------------------


RewardFn = Callable[[Rollout], torch.Tensor]


def reward_model_scores(reward_model: ScalarHeadModel) -> RewardFn:
    """Scores of the reward model read at each answer's last token (its <|end|> when it has one)."""

    @torch.no_grad()
    def score(rollout: Rollout) -> torch.Tensor:
        reward_model.eval()
        device = next(reward_model.parameters()).device
        return reward_model(rollout.ids.to(device), rollout.lengths.to(device)).float().cpu()  # bf16 -> fp32

    return score
