"""`chatforge demo --fast`: the whole pipeline built so far (pretraining, SFT, RM, PPO, DPO, evaluation)."""

import json

import pytest

from chatforge.checkpoint import load_checkpoint
from chatforge.demo import run_demo


@pytest.mark.slow
def test_fast_demo_trains_a_model_whose_validation_loss_falls_and_rerun_skips_finished_stages(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", fast=True)
    out = capsys.readouterr().out
    stages = ("corpus", "tokenizer", "data", "pretrain", "probe", "tasks", "sft", "rm", "ppo", "dpo", "eval")
    for stage in stages:
        assert f"== {stage}" in out
    assert summary["val_loss_after"] < summary["val_loss_before"] - 1.0
    assert set(summary["timings"]) == set(stages)
    # SFT learned the chat format: its held-out conversation loss is far below the base model's
    base, sft = summary["eval"]["base"]["overall"], summary["eval"]["sft"]["overall"]
    assert sft["val_loss"] < base["val_loss"] - 1.0
    assert set(summary["eval"]["sft"]["families"]) == {"facts", "followup", "arithmetic", "words", "harmful",
                                                       "harmless"}
    assert json.loads((tmp_path / "demo" / "eval.json").read_text()).keys() == {"base", "sft", "ppo", "dpo"}
    for stage in ("rm", "ppo", "dpo"):
        assert (tmp_path / "demo" / stage / "checkpoint" / "model.safetensors").exists()
    ckpt = load_checkpoint(tmp_path / "demo" / "pretrain")
    assert ckpt.tokenizer.hash == json.loads((tmp_path / "demo" / "data" / "meta.json").read_text())["tokenizer_hash"]

    again = run_demo(tmp_path / "demo", fast=True)
    out = capsys.readouterr().out
    assert out.count("reusing") == 9  # corpus, tokenizer, data, pretrain, tasks, sft, rm, ppo, dpo
    assert again["val_loss_after"] == summary["val_loss_after"]
