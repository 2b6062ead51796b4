"""`chatforge demo --fast`: the whole pipeline built so far (pretraining, SFT, RM, PPO, DPO, evaluation)."""

import json

import pytest

from chatforge.checkpoint import load_checkpoint
from chatforge.demo import run_demo


@pytest.mark.slow
def test_fast_demo_trains_a_model_whose_validation_loss_falls_and_rerun_skips_finished_stages(tmp_path, capsys):
    summary = run_demo(tmp_path / "demo", fast=True)
    out = capsys.readouterr().out
    stages = ("corpus", "tokenizer", "data", "pretrain", "probe", "tasks", "sft", "rm", "ppo", "dpo", "eval",
              "report")
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
    timings = json.loads((tmp_path / "demo" / "timings.json").read_text())
    assert set(timings) == set(stages) - {"report"} and timings["pretrain"] > 0
    assert "| facts |" in (tmp_path / "demo" / "report.md").read_text()
    assert (tmp_path / "demo" / "report" / "ppo.png").read_bytes().startswith(b"\x89PNG")
    ckpt = load_checkpoint(tmp_path / "demo" / "pretrain")
    assert ckpt.tokenizer.hash == json.loads((tmp_path / "demo" / "data" / "meta.json").read_text())["tokenizer_hash"]

    again = run_demo(tmp_path / "demo", fast=True)
    out = capsys.readouterr().out
    assert out.count("reusing") == 9  # corpus, tokenizer, data, pretrain, tasks, sft, rm, ppo, dpo
    assert again["val_loss_after"] == summary["val_loss_after"]

    # the command then serves the PPO model: the official client chats with it, and SIGTERM stops it
    serve_the_finished_demo(tmp_path / "demo")


def serve_the_finished_demo(run_dir):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "chatforge", "demo", "--fast", "--out", str(run_dir), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the demo's server did not start"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
        assert [m.id for m in client.models.list()] == ["ppo"]
        reply = client.chat.completions.create(model="ppo", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=5)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert "<html" in httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text.lower()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert f"http://127.0.0.1:{port}/" in out
    assert (run_dir / "chatforge.db").exists()
