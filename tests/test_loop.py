"""The training harness and the supervised step: optimizer, schedule, accumulation, checkpoints and exact resume."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from chatforge import checkpoint as ckpt_mod
from chatforge.checkpoint import load_checkpoint
from chatforge.errors import CheckpointError, ConfigError
from chatforge.model import GPT, GPTConfig, lm_loss
from chatforge.train.config import TrainConfig
from chatforge.train.distributed import DistInfo
from chatforge.train.loop import build_optimizer
from chatforge.train.supervised import supervised_trainer

CFG = GPTConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)


class RandomTokens:
    """A minimal Objective: windows of a fixed token stream, chosen by (seed, step).

    The stream repeats a random 10-token phrase with 30% of positions replaced by noise, so a
    model can learn it, but not perfectly.
    """

    def __init__(self, batch_size=8, seq_len=16, seed=0):
        rng = np.random.default_rng(123)
        stream = np.tile(rng.integers(0, 50, 10), 500)
        noise = rng.random(len(stream)) < 0.3
        stream[noise] = rng.integers(0, 50, noise.sum())
        self.stream = torch.from_numpy(stream)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

    def batch(self, step):
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.stream) - self.seq_len - 1, self.batch_size)
        rows = torch.stack([self.stream[s : s + self.seq_len + 1] for s in starts])
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    def weight(self, batch):
        return batch["labels"].numel()

    def tokens(self, batch):
        return batch["input_ids"].numel()

    def loss(self, model, batch):
        return lm_loss(model(batch["input_ids"]), batch["labels"], reduction="sum"), {}

    def evaluate(self, model, max_batches):
        b = self.batch(10_000)
        return {"val/loss": lm_loss(model(b["input_ids"]), b["labels"]).item()}


def make_trainer(out, callbacks=None, dropout=0.1, **overrides):
    torch.manual_seed(0)
    model = GPT(replace(CFG, dropout=dropout))
    settings = dict(max_steps=8, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=4, save_every=100,
                    log_every=1, progress=False)
    settings.update(overrides)
    cfg = TrainConfig(**settings)
    return supervised_trainer(model, RandomTokens(batch_size=cfg.batch_size), cfg, out, DistInfo(),
                              run_config={"data": "random"}, callbacks=callbacks)


def losses(result):
    return [m["train/loss"] for m in result.metrics]


class StopAt:
    def __init__(self, step):
        self.step = step

    def __call__(self, step, record):
        if step == self.step:
            raise KeyboardInterrupt


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    full = make_trainer(tmp_path / "full").fit()
    first = make_trainer(tmp_path / "split", callbacks=[StopAt(4)]).fit()
    assert first.interrupted and first.step == 4
    second = make_trainer(tmp_path / "split").fit(resume=True)
    assert second.step == 8
    np.testing.assert_allclose(losses(first) + losses(second), losses(full), rtol=0, atol=1e-6)
    a = load_checkpoint(tmp_path / "full", tokenizer=False).model.state_dict()
    b = load_checkpoint(tmp_path / "split", tokenizer=False).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl holds each step once, even though the run was split
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # dropout off: its masks depend on how the batch is split
    one = make_trainer(tmp_path / "a", dropout=0.0, micro_batch_size=8).fit()
    four = make_trainer(tmp_path / "b", dropout=0.0, micro_batch_size=2).fit()
    np.testing.assert_allclose(losses(one), losses(four), atol=1e-5)


def test_one_step_changes_every_trainable_weight(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    model = trainer.stepper.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit()
    after = model.state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []


def test_loss_falls_on_learnable_data(tmp_path):
    result = make_trainer(tmp_path, max_steps=30, lr=1e-2).fit()
    assert np.mean(losses(result)[-5:]) < np.mean(losses(result)[:5]) - 0.2


def test_learning_rate_warms_up_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1)
    assert cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(55) == pytest.approx(0.55)  # halfway through the cosine: the midpoint of 1.0 and 0.1
    assert cfg.lr_at(100) == pytest.approx(0.1)


def test_matrices_decay_and_biases_and_norms_do_not(tiny_model):
    opt = build_optimizer(tiny_model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(tiny_model.parameters()))


def test_metrics_are_json_lines_with_loss_throughput_and_validation(tmp_path):
    make_trainer(tmp_path).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "train/loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert [r["step"] for r in records if "val/loss" in r] == [4, 8]


def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit()
    before = load_checkpoint(tmp_path, tokenizer=False).model.state_dict()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", crash)
    trainer.step = 5
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    after = load_checkpoint(tmp_path, tokenizer=False).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 2


def test_a_finished_run_is_not_overwritten_without_asking(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    with pytest.raises(ConfigError, match="--resume"):
        make_trainer(tmp_path, max_steps=2).fit()
    make_trainer(tmp_path, max_steps=2).fit(overwrite=True)


def test_resume_with_a_different_config_names_the_field(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    with pytest.raises(CheckpointError, match="'lr' was 0.003 and is now 0.01"):
        make_trainer(tmp_path, max_steps=4, lr=1e-2).fit(resume=True)


def test_batch_must_split_evenly_into_micro_batches(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        make_trainer(tmp_path, batch_size=8, micro_batch_size=3)


def test_bfloat16_autocast_trains(tmp_path):
    result = make_trainer(tmp_path, max_steps=3, dtype="bfloat16").fit()
    assert all(np.isfinite(losses(result)))


def test_processes_that_would_resume_from_different_steps_are_refused(tmp_path):
    from chatforge.errors import ConfigError
    from chatforge.train.loop import check_same_start

    check_same_start([40, 40, 40], tmp_path)  # agreement: nothing to say
    check_same_start([0], tmp_path)
    with pytest.raises(ConfigError, match=r"rank 0: step 40, rank 1: step 0.*shares"):
        check_same_start([40, 0], tmp_path)  # a second machine that cannot see the first one's checkpoint
