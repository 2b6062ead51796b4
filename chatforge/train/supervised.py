"""The supervised step that pretraining, SFT, the reward model and DPO share, on the training harness.

A stage supplies an `Objective`: the global batch of a step, the summed loss of a slice of it, and
an evaluation. `SupervisedStep` turns it into one optimizer iteration: learning rate from the
schedule, gradient accumulation over micro-batches, the loss scaled by the batch's weight,
clipping, optional bf16 autocast, token counting. `supervised_trainer` puts it on the harness
(`chatforge.train.loop.Trainer`), which adds resume, checkpoints, metrics and evaluation cadence.

Why the batch is global: every rank builds the same global batch for a step (from a generator
seeded by (seed, step)) and takes its own rows. So the batch at step s does not depend on how
many processes run or where a run was resumed, and the loss normalizer (e.g. the number of
target tokens in the whole global batch) is known on every rank without communication. Hence
2 processes with batch B reproduce 1 process with batch 2B, and a resumed run reproduces an
uninterrupted one.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from chatforge.checkpoint import WEIGHTS_FILE, load_state_into
from chatforge.errors import ConfigError
from chatforge.train.config import TrainConfig
from chatforge.train.distributed import DistInfo, all_reduce_sum
from chatforge.train.loop import Trainer, build_optimizer, wrap_model

Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    """What a supervised stage plugs into `SupervisedStep`."""

    def batch(self, step: int) -> Batch:
        """The global batch of `step` (tensors with the batch on dim 0); identical on every rank."""

    def weight(self, batch: Batch) -> float:
        """The normalizer of the step's loss, e.g. the number of target tokens in the global batch."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed loss over a slice of the batch, and summed extra metrics (divided by weight later)."""

    def tokens(self, batch: Batch) -> int:
        """Tokens processed in the global batch (for throughput)."""

    def evaluate(self, model: nn.Module, max_batches: int) -> dict[str, float]:
        """Held-out metrics, e.g. {"val/loss": ...}; run on the main process."""


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of every tensor of the batch."""
    return {k: v[start:stop] for k, v in batch.items()}


class SupervisedStep:
    """One optimizer step on an Objective's global batch: the `Step` of every gradient-descent stage but PPO."""

    bar_keys = ("train/loss", "val/loss", "lr", "tokens_per_s")

    def __init__(self, model: nn.Module, objective: Objective, cfg: TrainConfig, dist: DistInfo) -> None:
        self.model, self.objective, self.cfg, self.dist = model, objective, cfg, dist
        self.optimizer = build_optimizer(model, cfg)
        self.forward_model = wrap_model(model, cfg, dist)
        self.world = dist.world_size
        self.micro = cfg.micro_batch_size or cfg.batch_size // self.world
        if cfg.batch_size % (self.world * self.micro):
            raise ConfigError(
                f"train config: batch_size ({cfg.batch_size}) must be a multiple of processes ({self.world}) "
                f"x micro_batch_size ({self.micro})"
            )
        self.accum = cfg.batch_size // (self.world * self.micro)
        self.autocast = (
            torch.autocast(dist.device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
        )

    def run(self, step: int) -> dict[str, float]:
        """Accumulate this rank's rows of the global batch in micro-batches, then clip and step once."""
        cfg, model = self.cfg, self.forward_model
        lr = cfg.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.objective.batch(step)
        weight = float(self.objective.weight(batch))
        rows = self.micro * self.accum
        mine = slice_batch(batch, self.dist.rank * rows, (self.dist.rank + 1) * rows)
        total = torch.zeros(1, dtype=torch.float64)
        sums: dict[str, torch.Tensor] = {}
        model.train()
        for m in range(self.accum):
            rows_m = slice_batch(mine, m * self.micro, (m + 1) * self.micro)
            micro = {k: v.to(self.dist.device) for k, v in rows_m.items()}
            sync = m == self.accum - 1 or not isinstance(model, DistributedDataParallel)
            with (nullcontext() if sync else model.no_sync()), self.autocast:
                loss_sum, extra = self.objective.loss(model, micro)
            # DDP averages gradients over processes, so scale by world size to get sum / weight.
            (loss_sum * (self.world / weight)).backward()
            total += loss_sum.detach().double().cpu()
            for k, v in extra.items():
                sums[k] = sums.get(k, 0) + v.detach().double().cpu()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduced = all_reduce_sum(torch.cat([total] + [sums[k].reshape(1) for k in sorted(sums)]))
        out = {"train/loss": reduced[0].item() / weight, "lr": lr, "grad_norm": float(grad_norm),
               "tokens": self.objective.tokens(batch)}
        out.update({f"train/{k}": reduced[i + 1].item() / weight for i, k in enumerate(sorted(sums))})
        return out

    def evaluate(self) -> dict[str, float]:
        """The Objective's held-out metrics, in eval mode (no dropout), without gradients."""
        self.model.eval()
        with torch.no_grad(), self.autocast:
            metrics = self.objective.evaluate(self.model, self.cfg.eval_batches)
        self.model.train()
        return metrics

    def saved_models(self) -> tuple[nn.Module, dict[str, nn.Module]]:
        return self.model, {}

    def checkpoint_config(self) -> dict:
        return {}

    def restore(self, path: Path) -> None:
        load_state_into(self.model, path / WEIGHTS_FILE)


def supervised_trainer(model: nn.Module, objective: Objective, cfg: TrainConfig, out_dir: str | Path,
                       dist: DistInfo, **harness: Any) -> Trainer:
    """The harness driving a SupervisedStep; `harness` takes Trainer's keywords (tokenizer, run_config, ...)."""
    return Trainer(SupervisedStep(model, objective, cfg, dist), cfg, out_dir, dist, **harness)
