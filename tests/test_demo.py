"""`chatforge demo --fast`: the whole pipeline built so far, end to end, on the built-in world."""

import json

import pytest

from chatforge.checkpoint import load_checkpoint
from chatforge.demo import run_demo


@pytest.mark.slow
def test_fast_demo_trains_a_model_whose_validation_loss_falls_and_rerun_skips_finished_stages(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", fast=True)
    out = capsys.readouterr().out
    for stage in ("corpus", "tokenizer", "data", "pretrain", "probe"):
        assert f"== {stage}" in out
    assert summary["val_loss_after"] < summary["val_loss_before"] - 1.0
    assert set(summary["timings"]) == {"corpus", "tokenizer", "data", "pretrain", "probe"}
    ckpt = load_checkpoint(tmp_path / "demo" / "pretrain")
    assert ckpt.tokenizer.hash == json.loads((tmp_path / "demo" / "data" / "meta.json").read_text())["tokenizer_hash"]

    again = run_demo(tmp_path / "demo", fast=True)
    out = capsys.readouterr().out
    assert out.count("reusing") == 4  # corpus, tokenizer, data, pretrain
    assert again["val_loss_after"] == summary["val_loss_after"]
