"""Every training stage's settings: the dataclasses the command line's flags are generated from and
checkpoints record, importable without torch or the trainers (`chatforge --help` loads none of them).

Each stage module imports its config from here; a field's comment or `help` is what its flag shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from chatforge.config import setting
from chatforge.errors import ConfigError

FROZEN_DTYPE_NAMES = ("float32", "bfloat16")  # PPO's frozen models: chatforge.train.ppo maps them to dtypes


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step, summed over processes and accumulation
    micro_batch_size: int = 0  # sequences per forward pass and process; 0: batch_size / processes
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    dtype: str = "float32"  # or "bfloat16": autocast for matmuls, weights and optimizer stay fp32
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    compile: bool = False  # torch.compile the model (faster steps after a warm-up compile)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train config: dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        for name in ("max_steps", "batch_size", "eval_every", "save_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train config: {name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train config: lr must be positive, got {self.lr}")

    def lr_at(self, step: int) -> float:
        """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * progress))


LORA_TARGETS_DEFAULT = "c_attn,c_proj,c_fc"


@dataclass
class LoRASettings:
    """Low-rank adapters (Hu et al., 2021; chatforge.lora, through PEFT): with rank > 0 every weight of the
    model is frozen and only a pair of small matrices B·A beside each target layer trains (and a reward or
    value model's new head). The flags are --lora-rank, --lora-alpha, --lora-dropout, --lora-target-modules."""

    rank: int = setting(0, "LoRA rank r of each adapter; 0: no adapters, every weight trains (full fine-tuning)",
                        flag="lora-rank")
    alpha: float = setting(16.0, "LoRA alpha: the adapters' product B·A is scaled by alpha / rank",
                           flag="lora-alpha")
    dropout: float = setting(0.05, "dropout on the adapters' input while training", flag="lora-dropout")
    target_modules: str = setting(LORA_TARGETS_DEFAULT, "comma-separated layers that get adapters: c_attn, c_proj "
                                  "(both attn.c_proj and mlp.c_proj), c_fc, attn.c_proj, mlp.c_proj",
                                  flag="lora-target-modules")

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"lora config: rank (--lora-rank) must be >= 0 (0: full fine-tuning), got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"lora config: alpha (--lora-alpha) must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora config: dropout (--lora-dropout) must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise ConfigError("lora config: target_modules (--lora-target-modules) names no layer; expected e.g. "
                              f"{LORA_TARGETS_DEFAULT!r}")

    @property
    def targets(self) -> list[str]:
        """The target layer names, in the order given."""
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]


@dataclass
class ModelSize:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    context_length: int = 256
    dropout: float = 0.0


@dataclass
class PretrainConfig:
    data: str = ""  # a directory made by `chatforge data prepare`
    out: str = "runs/default/pretrain"
    tokenizer: str = ""  # tokenizer.json or its directory; default: the one saved in `data`
    init_from: str = ""  # continue from a checkpoint (ours or a Hugging Face GPT-2 directory)
    seq_len: int = field(default=0, metadata={
        "help": "train on windows of this many tokens, shorter than the context if you like: a small model "
                "learns far faster from short windows, and a chat model's later positions are trained by SFT "
                "on long conversations; 0: the context length"})
    model: ModelSize = field(default_factory=ModelSize)
    train: TrainConfig = field(default_factory=TrainConfig)


def _sft_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=300, batch_size=16, lr=3e-4, warmup_steps=20, weight_decay=0.0,
                       eval_every=50, eval_batches=10, save_every=200)


@dataclass
class SFTConfig:
    data: list[str] = field(default_factory=list)  # conversation files (messages / Alpaca / ShareGPT)
    val: list[str] = field(default_factory=list)  # held-out conversations; default: val_fraction of data
    init_from: str = ""  # the pretrained checkpoint (ours or a Hugging Face GPT-2 directory)
    out: str = "runs/default/sft"
    format: str = "auto"  # "auto", "messages", "alpaca" or "sharegpt"
    skip_invalid: bool = False  # skip (and count) bad records instead of stopping at the first
    val_fraction: float = 0.05
    packing: bool = True
    seq_len: int = 0  # tokens per row; 0: the model's context length
    replay_data: str = field(default="", metadata={
        "help": "token shards of pretraining text (chatforge data prepare) replayed beside the conversations: "
                "one window of --replay-len tokens per row, its LM loss weighted by --replay-coef; keeps what "
                "pretraining stored (the demo's facts) from being overwritten"})
    replay_coef: float = 0.0  # weight of a replayed token's loss relative to an assistant token's (0: no replay)
    replay_len: int = 128  # tokens per replayed window
    lora: LoRASettings = field(default_factory=LoRASettings)
    lora_chat_tokens: bool = field(default=True, metadata={
        "help": "with --lora-rank, the chat tokens' embedding rows (<|user|>, <|assistant|>, <|end|>, ...) train "
                "beside the adapters (PEFT's trainable tokens): a pretrained model never saw them, and frozen at "
                "their starting values they cost LoRA most of what SFT teaches"})
    train: TrainConfig = field(default_factory=_sft_train_defaults)

    def __post_init__(self) -> None:
        if self.replay_coef < 0:
            raise ConfigError(f"sft config: replay_coef (--replay-coef) must be >= 0, got {self.replay_coef}")
        if self.replay_coef and not self.replay_data:
            raise ConfigError("sft config: --replay-coef needs --replay-data "
                              "(token shards from chatforge data prepare)")
        if self.replay_len < 1:
            raise ConfigError(f"sft config: replay_len (--replay-len) must be >= 1, got {self.replay_len}")


def _reward_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=200, batch_size=16, lr=1e-4, warmup_steps=10, weight_decay=0.0,
                       eval_every=50, eval_batches=10, save_every=200)


@dataclass
class RewardConfig:
    data: list[str] = field(default_factory=list)  # {"prompt","chosen","rejected"} or {"prompt","responses"} JSONL
    val: list[str] = field(default_factory=list)  # held-out preferences; default: val_fraction of data
    init_from: str = ""  # the SFT checkpoint (backbone); the head starts fresh
    out: str = "runs/default/rm"
    skip_invalid: bool = False
    val_fraction: float = 0.05
    seq_len: int = 0  # 0: the model's context length
    normalize_samples: int = 256  # SFT answers sampled to set gain and bias (0: no normalization)
    normalize_temperature: float = 1.0
    lora: LoRASettings = field(default_factory=LoRASettings)
    train: TrainConfig = field(default_factory=_reward_train_defaults)


def _ppo_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=40, batch_size=32, lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                       eval_every=10, eval_batches=2, save_every=20, log_every=1, grad_clip=1.0)


@dataclass
class PPOSettings:
    rollout_batch: int = 32  # prompts answered per PPO iteration (global)
    minibatch: int = 8  # answers per optimizer step and process
    ppo_epochs: int = 2  # passes over each rollout; docs/demo-recipe.md compares 1 and 2 on the demo
    max_new_tokens: int = 96  # room for step-by-step answers (up to about 75 tokens in the demo)
    temperature: float = 1.0
    init_kl_coef: float = 0.1  # beta
    adaptive_kl: bool = True
    kl_target: float = 6.0  # nats per answer
    kl_horizon: int = 10000  # answers
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    missing_eos_penalty: float = 1.0  # subtracted from the score of an answer cut off before <|end|>
    ptx_coef: float = 0.0  # weight of the pretraining loss (needs ptx_data)
    ptx_data: str = ""  # token shards (chatforge data prepare) for the ptx loss
    val_prompts: int = 64  # held-out prompts answered at each evaluation
    frozen_dtype: str = field(default="float32", metadata={
        "help": "dtype of the frozen reference and reward model: float32, or bfloat16 for half their memory "
                "(slower on a CPU without bf16 instructions)"})
    shared_value_head: bool = field(default=False, metadata={
        "help": "value head on the policy's trunk (one forward for logits and values; no value backbone)"})
    tools: bool = field(default=False, metadata={
        "help": "rollouts run the built-in calculator and calendar when the policy calls them; their results "
                "are fed in, never trained on (no loss, KL, entropy or value target)"})

    def __post_init__(self) -> None:
        if self.frozen_dtype not in FROZEN_DTYPE_NAMES:
            raise ConfigError(f"ppo config: frozen_dtype (--frozen-dtype) must be one of {list(FROZEN_DTYPE_NAMES)}, "
                              f"got {self.frozen_dtype!r}")


@dataclass
class PPOConfig:
    prompts: list[str] = field(default_factory=list)  # {"prompt"} JSONL (RL prompts)
    val: list[str] = field(default_factory=list)  # held-out prompts for evaluation
    policy: str = ""  # the SFT checkpoint: the policy starts here and the reference stays here
    reward_model: str = ""  # the reward model (chatforge reward); the value model starts from it
    out: str = "runs/default/ppo"
    ppo: PPOSettings = field(default_factory=PPOSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    train: TrainConfig = field(default_factory=_ppo_train_defaults)

    def __post_init__(self) -> None:
        if self.lora.rank and not self.ppo.shared_value_head:
            raise ConfigError("ppo config: --lora-rank needs --shared-value-head (the value head on the policy's "
                              "trunk, so that policy, reference and value share one frozen base model)")


REWARD_SOURCES = ("model", "verifier", "both")  # GRPO's and RLOO's --reward


@dataclass
class GroupRLSettings:
    """What GRPO and RLOO share: a group of answers per prompt, rewards, clipping, a KL penalty (each uses it
    its own way; see docs/rlhf.md). The defaults here are GRPO's; RLOOSettings changes a few."""

    reward: str = field(default="model", metadata={
        "choices": REWARD_SOURCES,
        "help": "model: the reward model's score; verifier: +1/-1 for a right/wrong final answer of the families a "
                "program verifies (arithmetic, word tasks, calc, dates, functions), other prompts dropped; both: "
                "the verifier's +1/-1 where it verifies, the reward model's score elsewhere"})
    prompts_per_step: int = 4  # prompts per iteration (global); each is answered num_generations times
    num_generations: int = 8  # G: answers per prompt, the group its advantages are measured in
    minibatch: int = field(default=0, metadata={
        "help": "answers per optimizer step and process; 0: all of the iteration's answers in one step"})
    ppo_epochs: int = field(default=1, metadata={
        "help": "passes over each iteration's answers (TRL's num_iterations); with 1 and --minibatch 0 the ratio "
                "to the rollout policy is 1 and the clipping never acts"})
    max_new_tokens: int = 96  # as PPO: room for step-by-step answers
    temperature: float = 1.0
    beta: float = field(default=0.04, metadata={
        "help": "weight of the k3 KL to the frozen SFT model in the loss; 0: no reference model at all"})
    cliprange: float = 0.2  # epsilon of the clipped ratio
    missing_eos_penalty: float = 1.0  # subtracted from the reward of an answer cut off before <|end|>
    val_prompts: int = 64  # held-out prompts answered greedily at each evaluation
    frozen_dtype: str = field(default="float32", metadata={
        "help": "dtype of the frozen reference and reward model: float32, or bfloat16 for half their memory"})
    tools: bool = field(default=False, metadata={
        "help": "rollouts run the built-in calculator and calendar (declared in every prompt; the calendar on the "
                "task data's clock) and the world functions a prompt declares; their results are fed in, never "
                "trained on"})
    world: str = field(default="", metadata={
        "help": "world.json the verifier checks against and the world functions read (--reward verifier|both, "
                "--tools); default: the built-in world (seed 0), the demo's"})

    def __post_init__(self) -> None:
        if self.reward not in REWARD_SOURCES:
            raise ConfigError(f"group RL config: reward (--reward) must be one of {list(REWARD_SOURCES)}, "
                              f"got {self.reward!r}")
        if self.frozen_dtype not in FROZEN_DTYPE_NAMES:
            raise ConfigError(f"group RL config: frozen_dtype (--frozen-dtype) must be one of "
                              f"{list(FROZEN_DTYPE_NAMES)}, got {self.frozen_dtype!r}")
        if self.num_generations < 2:
            raise ConfigError(f"group RL config: num_generations (--num-generations) must be at least 2 (the group "
                              f"is the baseline), got {self.num_generations}")
        for name in ("prompts_per_step", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"group RL config: {name} must be positive, got {getattr(self, name)}")
        if self.minibatch < 0 or self.beta < 0 or self.temperature <= 0:
            raise ConfigError("group RL config: minibatch and beta must be >= 0 and temperature > 0, got "
                              f"{self.minibatch}, {self.beta}, {self.temperature}")

    @property
    def answers_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations


@dataclass
class GRPOSettings(GroupRLSettings):
    scale_rewards: bool = field(default=True, metadata={
        "help": "divide each answer's reward minus its group's mean by the group's std (+1e-4); --no-scale-rewards "
                "keeps the centred reward, as Dr. GRPO recommends"})


@dataclass
class RLOOSettings(GroupRLSettings):
    prompts_per_step: int = 8
    num_generations: int = 4  # k of Ahmadian et al.: the leave-one-out baseline averages the other k - 1
    beta: float = field(default=0.05, metadata={
        "help": "KL to the frozen SFT model folded into the reward: r - beta * sum_t (log pi - log pi_ref); "
                "0: no reference model at all"})


@dataclass
class GroupRLConfig:
    prompts: list[str] = field(default_factory=list)  # {"prompt"} JSONL (RL prompts)
    val: list[str] = field(default_factory=list)  # held-out prompts for evaluation
    policy: str = ""  # the SFT checkpoint: the policy starts here and the reference stays here
    reward_model: str = ""  # the reward model (chatforge reward); not needed with --reward verifier
    out: str = ""
    train: TrainConfig = field(default_factory=_ppo_train_defaults)

    @property
    def settings(self) -> GroupRLSettings:
        raise NotImplementedError


@dataclass
class GRPOConfig(GroupRLConfig):
    out: str = "runs/default/grpo"
    grpo: GRPOSettings = field(default_factory=GRPOSettings)

    @property
    def settings(self) -> GRPOSettings:
        return self.grpo


@dataclass
class RLOOConfig(GroupRLConfig):
    out: str = "runs/default/rloo"
    rloo: RLOOSettings = field(default_factory=RLOOSettings)

    @property
    def settings(self) -> RLOOSettings:
        return self.rloo


def _dpo_train_defaults() -> TrainConfig:
    return TrainConfig(max_steps=200, batch_size=16, lr=5e-5, warmup_steps=10, weight_decay=0.0, eval_every=50,
                       eval_batches=10, save_every=200)


@dataclass
class DPOConfig:
    data: list[str] = field(default_factory=list)  # preference JSONL (chosen/rejected or ranked responses)
    val: list[str] = field(default_factory=list)
    init_from: str = ""  # the SFT checkpoint: the policy starts here and it is the reference
    out: str = "runs/default/dpo"
    beta: float = 0.1
    rpo_alpha: float = field(default=0.0, metadata={
        "help": "weight of the chosen answer's mean token NLL added to each pair's loss (RPO, Pang et al. 2024; "
                "TRL's rpo_alpha): keeps the chosen answers likely while DPO widens the margin"})
    skip_invalid: bool = False
    val_fraction: float = 0.05
    seq_len: int = 0  # 0: the model's context length
    lora: LoRASettings = field(default_factory=LoRASettings)
    train: TrainConfig = field(default_factory=_dpo_train_defaults)
