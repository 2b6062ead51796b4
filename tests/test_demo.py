"""`chatforge demo --fast`: the whole pipeline built so far (pretraining, SFT, RM, PPO, DPO, evaluation)."""

import json

import pytest

import chatforge.demo
import chatforge.serve.server
from chatforge.checkpoint import load_checkpoint
from chatforge.cli import main
from chatforge.demo import run_demo
from chatforge.errors import ConfigError
from chatforge.report import PNG_SIGNATURE, STAGES
from chatforge.train.seeds import Verdict


@pytest.mark.slow
def test_fast_demo_trains_a_model_whose_validation_loss_falls_and_rerun_skips_finished_stages(tmp_path, capsys,
                                                                                              monkeypatch):
    summary = run_demo(tmp_path / "demo", preset="fast")
    stages = ("corpus", "tokenizer", "data", "pretrain", "probe", "tasks", "sft", "rm_data", "rm", "ppo", "dpo",
              "eval", "detect", "int8", "report")
    assert list(summary["timings"]) == list(stages)  # every stage ran, in order, each timed
    assert summary["val_loss_after"] < summary["val_loss_before"] - 1.0
    # the figures the summary gives are the run's own: the pretraining metrics' last validation loss
    metrics = [json.loads(line) for line in (tmp_path / "demo" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert summary["val_loss_after"] == [r for r in metrics if "val/loss" in r][-1]["val/loss"]
    state = json.loads((tmp_path / "demo" / "pretrain" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == chatforge.demo.FAST.steps
    # SFT learned the chat format: its held-out conversation loss is far below the base model's
    base, sft = summary["eval"]["base"]["overall"], summary["eval"]["sft"]["overall"]
    assert sft["val_loss"] < base["val_loss"] - 1.0
    assert set(summary["eval"]["sft"]["families"]) == {"facts", "followup", "arithmetic", "words", "harmful",
                                                       "harmless", "jailbreak", "twohop"}
    assert json.loads((tmp_path / "demo" / "eval.json").read_text()).keys() == {"base", "sft", "ppo", "dpo"}
    # the detect stage: the PPO model's answers, plain and watermarked, against the world's reference answers
    detection = json.loads((tmp_path / "demo" / "detection.json").read_text())
    marked = detection["watermark"]
    assert marked["watermarked"]["documents"]["mean_z"] > marked["plain"]["documents"]["mean_z"]
    assert marked["human"]["documents"]["detected"] == 0.0 and marked["plain"]["documents"]["detected"] == 0.0
    assert set(detection["zero_shot"]) == {"perplexity_burstiness", "fast_detectgpt", "binoculars"}
    assert "| watermarked |" in (tmp_path / "demo" / "report.md").read_text()
    # the int8 stage: the PPO model in int8, judged on the very prompts eval.json judged it on in fp32
    q8 = json.loads((tmp_path / "demo" / "int8.json").read_text())
    assert q8["fp32"]["score"] == summary["eval"]["ppo"]["overall"]["score"]
    assert q8["int8"]["weights_bytes"] < 0.4 * q8["fp32"]["weights_bytes"]
    assert abs(q8["change"]["val_loss"]) < 0.05 and abs(q8["change"]["score"]) < 0.05
    assert json.loads((tmp_path / "demo" / "ppo-int8" / "config.json").read_text())["quantization"]["bits"] == 8
    assert "## The final model in int8" in (tmp_path / "demo" / "report.md").read_text()
    assert_every_json_file_is_strict_json(tmp_path / "demo")
    for stage in ("rm", "ppo", "dpo"):
        assert (tmp_path / "demo" / stage / "checkpoint" / "model.safetensors").exists()
    # the reward model's rankings: each preference prompt's rule-made answers plus the SFT model's samples
    def records(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    rule_made, labeled = (records(tmp_path / "demo" / d / "prefs_train.jsonl") for d in ("tasks", "rm_data"))
    assert [r["prompt"] for r in labeled] == [r["prompt"] for r in rule_made]
    assert all(set(a["responses"]) <= set(b["responses"]) for a, b in zip(rule_made, labeled))
    assert sum(len(b["responses"]) - len(a["responses"]) for a, b in zip(rule_made, labeled)) > len(labeled)
    # each stage's wall time, as the run recorded it (the report is timed after timings.json is written)
    timings = json.loads((tmp_path / "demo" / "timings.json").read_text())
    assert set(timings) == set(stages) - {"report"} and timings["pretrain"] > 0
    assert timings == pytest.approx({k: v for k, v in summary["timings"].items() if k != "report"})
    assert summary["total_s"] >= sum(summary["timings"].values())
    report_md = (tmp_path / "demo" / "report.md").read_text()
    assert "| facts |" in report_md
    # every plot the report writes: one per training stage (all ran) and the evaluation's, each a valid PNG
    plots = [f"{stage}.png" for stage, _ in STAGES] + ["eval.png"]
    assert sorted(p.name for p in (tmp_path / "demo" / "report").glob("*.png")) == sorted(plots)
    for name in plots:
        png = (tmp_path / "demo" / "report" / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and png[12:16] == b"IHDR", name
        assert png.endswith(b"IEND\xaeB`\x82"), name  # the closing chunk: the file is complete
        assert f"(report/{name})" in report_md, name  # linked from report.md
    ckpt = load_checkpoint(tmp_path / "demo" / "pretrain")
    assert ckpt.tokenizer.hash == json.loads((tmp_path / "demo" / "data" / "meta.json").read_text())["tokenizer_hash"]

    # the rerun is `chatforge demo --fast --no-serve`: it reuses every stage, finishes, and serves nothing
    written = {p: p.stat().st_mtime_ns for p in (tmp_path / "demo").rglob("*") if p.is_file()}
    evaluation = json.loads((tmp_path / "demo" / "eval.json").read_text())
    results, served, evaluated = [], [], []

    def recording_run_demo(*args, **kwargs):
        results.append(run_demo(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(chatforge.demo, "run_demo", recording_run_demo)
    monkeypatch.setattr(chatforge.demo, "serve_demo", lambda *args, **kwargs: served.append(args))
    monkeypatch.setattr(chatforge.serve.server, "serve_checkpoint", lambda *args, **kwargs: served.append(args))
    real_evaluate = chatforge.demo.evaluate
    monkeypatch.setattr(chatforge.demo, "evaluate", lambda *args, **kwargs: evaluated.append(args))
    main(["demo", "--fast", "--no-serve", "--out", str(tmp_path / "demo")])  # returns: it does not block serving
    assert served == []
    (again,) = results
    assert list(again["timings"]) == list(stages)
    # nothing was made again: every file of every stage is the one the first run wrote, and no model answered
    # the held-out prompts again (base, sft, ppo, dpo: eval.json's figures are the saved ones)
    rewritten = {p.relative_to(tmp_path / "demo").as_posix() for p, t in written.items() if p.stat().st_mtime_ns != t}
    assert rewritten <= {"eval.json", "timings.json", "report.md", "report.html"} | {
        f"report/{stage}.png" for stage, _ in STAGES} | {"report/eval.png"}, rewritten
    assert evaluated == [] and json.loads((tmp_path / "demo" / "eval.json").read_text()) == evaluation
    assert again["val_loss_after"] == summary["val_loss_after"]
    assert {name: r["overall"]["score"] for name, r in again["eval"].items()} == {
        name: r["overall"]["score"] for name, r in summary["eval"].items()}

    # --seeds adds the RLHF proof: PPO per seed and PPO with beta = 0, judged against SFT, in the report
    results.clear()
    main(["demo", "--fast", "--no-serve", "--out", str(tmp_path / "demo"), "--seeds", "0", "--seeds", "1"])
    (with_seeds,) = results
    assert list(with_seeds["timings"]) == [*stages[:-1], "seeds", "report"]
    assert "seeds" in json.loads((tmp_path / "demo" / "timings.json").read_text())
    assert set(with_seeds["seeds"]["figures"]) == {"sft", "ppo", "ppo-beta0"}
    assert len(with_seeds["seeds"]["figures"]["ppo"]) == 2 and len(with_seeds["seeds"]["figures"]["ppo-beta0"]) == 1
    saved = json.loads((tmp_path / "demo" / "seeds" / "results.json").read_text())
    assert {method: saved[method]["seeds"] for method in saved} == {"sft": [], "ppo": [0, 1], "ppo-beta0": [0]}
    assert {method: saved[method]["figures"] for method in saved} == with_seeds["seeds"]["figures"]
    assert with_seeds["seeds"]["beyond_noise"] == Verdict.of(saved_figures(saved)).beyond_noise
    report_md = (tmp_path / "demo" / "report.md").read_text()
    assert "## RLHF across seeds" in report_md and "| ppo | 0 1 |" in report_md and "| ppo-beta0 | 0 |" in report_md

    # --ablation adds the chain-of-thought ablation: the stages after pretraining on direct answers, in no-steps/
    results.clear()
    monkeypatch.setattr(chatforge.demo, "evaluate", real_evaluate)  # the ablation's models are new: evaluated
    main(["demo", "--fast", "--no-serve", "--out", str(tmp_path / "demo"), "--ablation"])
    assert list(results[0]["timings"])[-2:] == ["ablation", "report"]
    ablation = tmp_path / "demo" / "no-steps"
    for shared in ("corpus", "tokenizer", "data", "pretrain"):  # the same pretrained model, not a copy
        assert (ablation / shared).resolve() == (tmp_path / "demo" / shared).resolve()
    assert (ablation / "tasks" / "eval.jsonl").read_bytes() == (tmp_path / "demo" / "tasks" / "eval.jsonl").read_bytes()
    def word_answers(tasks):
        rows = map(json.loads, (tasks / "sft_train.jsonl").read_text().splitlines())
        return [r["messages"][-1]["content"] for r in rows if r["family"] == "words"]

    assert any("Spelled:" in a or "Counting" in a for a in word_answers(tmp_path / "demo" / "tasks"))
    direct_answers = word_answers(ablation / "tasks")
    assert direct_answers and not any("Spelled:" in a or "Counting" in a for a in direct_answers)
    direct = json.loads((ablation / "eval.json").read_text())
    assert set(direct) == {"sft", "ppo", "dpo"}
    report_md = (tmp_path / "demo" / "report.md").read_text()
    assert "## Chain-of-thought ablation" in report_md and "| family | sft steps | sft direct |" in report_md
    # every model's fact knowledge (every fact as multiple choice) and the phrasing split are in the report
    assert all(0 <= r["overall"]["facts_known"] <= 1 for r in evaluation.values())
    assert "| facts known (multiple choice) |" in report_md and "| score, held-out phrasings |" in report_md

    # the command then serves the PPO model: the official client chats with it, and SIGTERM stops it
    serve_the_finished_demo(tmp_path / "demo")


def saved_figures(results):
    return {method: entry["figures"] for method, entry in results.items()}


def assert_every_json_file_is_strict_json(run_dir):
    """No NaN or Infinity (Python's json writes them; strict readers refuse them): a figure over no prompts is null."""
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    files = [p for p in run_dir.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file()]
    assert len(files) > 20
    for path in files:
        text = path.read_text()
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        for line in filter(str.strip, lines):
            json.loads(line, parse_constant=refuse)
    harmful = json.loads((run_dir / "eval.json").read_text())["sft"]["families"]["harmful"]
    assert harmful["accuracy"] is None  # harmful prompts have no right answer, only a right refusal


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
        # a first message as the page sends it with its defaults (Max tokens: min(256, half the context))
        context = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"][0]["context_length"]
        example = httpx.get(f"http://127.0.0.1:{port}/api/examples", timeout=5).json()
        assert example["source"] == "training" and example["examples"]
        ask = [{"role": "user", "content": example["examples"][0]}]
        first = client.chat.completions.create(model="ppo", messages=ask, max_tokens=min(256, context // 2),
                                               temperature=0.7, extra_body={"truncation": "auto"})
        assert first.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert f"http://127.0.0.1:{port}/" in out
    assert (run_dir / "chatforge.db").exists() and f"stored in sqlite:///{(run_dir / 'chatforge.db').resolve()}" in out


def test_a_rerun_reuses_an_evaluation_only_while_it_is_newer_than_the_stages_weights(tmp_path):
    import os

    from chatforge.demo import _saved_evals
    from chatforge.evaluate import EvalResult

    for stage in ("sft", "ppo"):
        ckpt = tmp_path / stage / "checkpoint"
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text("{}")
        (ckpt / "model.safetensors").write_bytes(b"")
        os.utime(ckpt / "model.safetensors", (1000, 1000))
    saved = {name: EvalResult(f"/runs/{name}", {"facts": {"score": 0.5}}, {"score": 0.5}).to_dict()
             for name in ("sft", "ppo")}
    (tmp_path / "eval.json").write_text(json.dumps(saved))
    os.utime(tmp_path / "eval.json", (2000, 2000))
    assert set(_saved_evals(tmp_path, {"sft": "sft", "ppo": "ppo"})) == {"sft", "ppo"}
    assert _saved_evals(tmp_path, {"sft": "sft"})["sft"].overall == {"score": 0.5}
    os.utime(tmp_path / "ppo" / "checkpoint" / "model.safetensors", (3000, 3000))  # ppo retrained since
    assert set(_saved_evals(tmp_path, {"sft": "sft", "ppo": "ppo"})) == {"sft"}
    (tmp_path / "eval.json").unlink()
    assert _saved_evals(tmp_path, {"sft": "sft"}) == {}


def test_a_training_stage_made_before_the_file_it_trains_from_is_trained_again(tmp_path):
    import os

    from chatforge.demo import made_before

    weights = tmp_path / "rm" / "checkpoint" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    rankings = tmp_path / "rm_data" / "prefs_train.jsonl"
    rankings.parent.mkdir()
    rankings.write_text("{}\n")
    os.utime(rankings, (1000, 1000))
    os.utime(weights, (2000, 2000))
    assert not made_before(tmp_path / "rm", [rankings, tmp_path / "rm_data" / "missing.jsonl"])
    os.utime(rankings, (3000, 3000))  # the rankings were made again (a retrained SFT model sampled them)
    assert made_before(tmp_path / "rm", [rankings])
    assert not made_before(tmp_path / "never-trained", [rankings])


def test_a_run_dir_keeps_its_preset_and_refuses_another(tmp_path):
    run_dir = tmp_path / "demo"
    chatforge.demo.claim_run_dir(run_dir, "large")
    assert (run_dir / "preset.txt").read_text() == "large\n"
    chatforge.demo.claim_run_dir(run_dir, "large")  # the same preset resumes
    with pytest.raises(ConfigError, match="holds a --preset large run, not full.*--overwrite"):
        chatforge.demo.claim_run_dir(run_dir, "full")


def test_a_run_made_before_presets_counts_as_full(tmp_path):
    run_dir = tmp_path / "demo"
    (run_dir / "pretrain").mkdir(parents=True)
    chatforge.demo.claim_run_dir(run_dir, "full")
    (run_dir / "preset.txt").unlink()
    with pytest.raises(ConfigError, match="made before presets"):
        chatforge.demo.claim_run_dir(run_dir, "fast")


def test_an_unknown_preset_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="preset must be one of fast, full, large, got 'huge'"):
        run_demo(tmp_path / "demo", preset="huge")
    assert not (tmp_path / "demo").exists()


def test_the_large_preset_spends_more_on_every_stage_that_learns():
    full, large = chatforge.demo.FULL, chatforge.demo.LARGE
    assert large.model.n_layer * large.model.n_embd ** 2 > 2 * full.model.n_layer * full.model.n_embd ** 2
    assert large.steps >= 4 * full.steps and large.sft_steps > full.sft_steps and large.ppo_steps >= full.ppo_steps
    assert large.model.context_length == full.model.context_length  # the same conversations fit
