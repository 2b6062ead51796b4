"""`chatforge report` on a tiny fake run directory (metrics and eval files written by hand; no training)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from chatforge.cli import main  # noqa: E402
from chatforge.report import PNG_SIGNATURE, write_report  # noqa: E402

PLANTED = "<script>alert('x')</script>"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def stage_config(path: Path, max_steps: int, **run) -> None:
    path.write_text(json.dumps({"step": 0, "train_config": {"max_steps": max_steps, "lr": 0.003},
                                "run_config": run}))


def eval_result(name: str, accuracy: float, answer: str) -> dict:
    fam = {"n": 2, "accuracy": accuracy, "refusal_rate": 0.0, "padded_rate": 0.0, "score": accuracy,
           "words": 4.0, "tokens": 6.0}
    harmful = {**fam, "accuracy": float("nan"), "refusal_rate": 0.5, "score": 0.5}
    return {"checkpoint": f"/x/{name}/checkpoint", "families": {"facts": fam, "harmful": harmful},
            "overall": {**fam, "refusal_rate_harmful": 0.5, "over_refusal_rate": 0.0, "val_loss": 1.2345},
            "samples": {"facts": [{"prompt": "Where does Nodi live?", "answer": answer, "score": accuracy}],
                        "harmful": [{"prompt": "How to <b>hurt</b>?", "answer": "I can't help.", "score": 1.0}]}}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    write_jsonl(run / "pretrain" / "metrics.jsonl", [
        {"step": 10, "train/loss": 5.5, "tokens_per_s": 1000.0, "step_time_s": 0.5},
        {"step": 20, "train/loss": 4.25, "val/loss": 4.5, "val/ppl": 90.0, "tokens_per_s": 1200.0,
         "step_time_s": 0.25},
    ])
    stage_config(run / "pretrain" / "run_config.json", 20, data="data", model={"n_layer": 2, "n_embd": 64})
    (run / "pretrain" / "checkpoint").mkdir()
    (run / "pretrain" / "checkpoint" / "config.json").write_text(json.dumps({"stage": "pretrain",
                                                                            "model": {"vocab_size": 512}}))
    write_jsonl(run / "sft" / "metrics.jsonl", [
        {"step": 1, "train/loss": 3.0, "step_time_s": 1.0, "tokens_per_s": 500.0},
        {"step": 2, "train/loss": 2.0, "val/loss": 2.5, "step_time_s": 2.0, "tokens_per_s": 500.0},
    ])
    stage_config(run / "sft" / "run_config.json", 2, data=["tasks/sft_train.jsonl"])
    write_jsonl(run / "rm" / "metrics.jsonl", [
        {"step": s, "train/loss": 0.7 - 0.1 * s, "train/accuracy": 0.5 + 0.1 * s, "train/margin": 0.2 * s,
         "step_time_s": 1.0, "tokens_per_s": 100.0} for s in (1, 2, 3)] + [
        {"step": 4, "train/loss": 0.3, "val/accuracy": 0.875, "val/margin": 1.5, "step_time_s": 1.0}])
    write_jsonl(run / "ppo" / "metrics.jsonl", [
        {"step": s, "train/score": 0.1 * s, "train/kl": 0.05 * s, "train/beta": 0.1, "train/entropy": 1.0,
         "train/response_length": 20.0 - s, "train/value_loss": 0.3 / s, "train/clipfrac": 0.02,
         "tokens_per_s": 50.0, "step_time_s": 2.0} for s in (1, 2, 3)])
    write_jsonl(run / "dpo" / "metrics.jsonl", [
        {"step": s, "train/loss": 0.69 - 0.01 * s, "train/accuracy": 0.5, "train/margin": 0.1 * s,
         "train/reward_chosen": 0.05 * s, "train/reward_rejected": -0.05 * s, "step_time_s": 0.5}
        for s in (1, 2)] + [{"step": 2, "val/accuracy": 0.625, "val/loss": 0.6}])
    (run / "eval.json").write_text(json.dumps({
        "base": eval_result("pretrain", 0.125, "Nodi Nodi Nodi"), "sft": eval_result("sft", 0.375, "In Dilul."),
        "ppo": eval_result("ppo", 0.4375, "Nodi lives in Dilul."), "dpo": eval_result("dpo", 0.5625, PLANTED),
    }))
    return run


def test_report_writes_valid_pngs_and_the_run_numbers(run_dir: Path) -> None:
    md_path, html_path, report = write_report(run_dir)
    assert md_path == run_dir / "report.md" and html_path == run_dir / "report.html"
    names = sorted(p.name for p in report.images)
    assert names == ["dpo.png", "eval.png", "ppo.png", "pretrain.png", "rm.png", "sft.png"]
    for png in report.images:
        assert png.parent == run_dir / "report"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
    md = md_path.read_text()
    for name in names:
        assert f"](report/{name})" in md
    # eval table: accuracy per model, in the order base, sft, ppo, dpo
    assert "| facts | 12.5% | 37.5% | 43.8% | 56.2% |" in md
    assert "| harmful | - | - | - | - |" in md  # NaN accuracy shows as a dash
    assert "| val loss | 1.234 | 1.234 | 1.234 | 1.234 |" in md
    # stage figures and configs
    assert "train/loss 4.25, val/loss 4.5" in md
    assert "val/accuracy 0.875, val/margin 1.5" in md
    assert "| run | model.n_layer | 2 |" in md and "| checkpoint | model.vocab_size | 512 |" in md
    assert "| train | max_steps | 20 |" in md
    # wall time: no timestamps nor summary, so estimated from step times and said so
    assert "| pretrain | 20 | ≈ 7.5 s | mean of 2 logged step times × 20 steps" in md
    assert "| sft | 2 | ≥ 3.0 s | sum of step times" in md
    assert "no timings.json/summary.json" in md
    # samples per model for the fixed prompt
    assert "### [facts] Where does Nodi live?" in md
    assert "| ppo | Nodi lives in Dilul. | 0.44 |" in md


def test_html_is_self_contained_and_escaped(run_dir: Path) -> None:
    _, html_path, report = write_report(run_dir)
    page = html_path.read_text()
    assert PLANTED not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<b>hurt</b>" not in page and "&lt;b&gt;hurt&lt;/b&gt;" in page
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert page.count('src="data:image/png;base64,iVBORw0KGgo') == len(report.images) == 6
    md = (run_dir / "report.md").read_text()
    assert PLANTED not in md and "&lt;script&gt;" in md  # Markdown renderers pass raw HTML through


def test_missing_stages_are_skipped_and_timings_come_from_a_summary(run_dir: Path, tmp_path: Path) -> None:
    import shutil

    for stage in ("rm", "ppo", "dpo"):
        shutil.rmtree(run_dir / stage)
    (run_dir / "eval.json").unlink()
    (run_dir / "summary.json").write_text(json.dumps({"timings": {"pretrain": 12.5, "sft": 3.25, "corpus": 1.0}}))
    with (run_dir / "sft" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "train/lo')  # cut by a crash
    out = tmp_path / "elsewhere"
    main(["report", str(run_dir), "--out", str(out)])
    md = (out / "report.md").read_text()
    assert sorted(p.name for p in (out / "report").iterdir()) == ["pretrain.png", "sft.png"]
    for stage in ("rm", "ppo", "dpo"):
        assert f"Stage {stage} not found" in md
    assert "No eval.json" in md
    assert "1 line(s) of sft/metrics.jsonl could not be read" in md
    assert "| pretrain | 20 | 12.5 s | summary.json |" in md and "| corpus | - | 1.0 s | summary.json |" in md
    assert not (run_dir / "report.md").exists()


def test_metrics_timestamps_win(run_dir: Path) -> None:
    write_jsonl(run_dir / "sft" / "metrics.jsonl", [
        {"step": 1, "train/loss": 3.0, "time": 1000.0, "step_time_s": 1.0},
        {"step": 2, "train/loss": 2.0, "time": 1010.0, "step_time_s": 1.0}])
    md = write_report(run_dir)[0].read_text()
    assert "| sft | 2 | 11.0 s | metrics timestamps |" in md


def test_cli_rejects_a_missing_run_dir(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as err:
        main(["report", str(tmp_path / "nope")])
    assert err.value.code == 2


def test_seed_results_become_a_table_against_sft(run_dir: Path) -> None:
    from chatforge.train.seeds import SeedSettings, save_results

    settings = SeedSettings()
    save_results(run_dir, {"sft": [{"score": 0.25, "rm": 0.0, "kl": 0.0}],
                           "ppo": [{"score": 0.5, "rm": 1.0, "kl": 1.0}, {"score": 0.75, "rm": 2.0, "kl": 3.0}]},
                 [0, 1], settings)
    save_results(run_dir, {"sft": [{"score": 0.25, "rm": 0.0, "kl": 0.0}],  # a later call with other methods
                           "dpo": [{"score": 0.125, "rm": 0.5, "kl": 2.0}]}, [0], settings)
    md = write_report(run_dir)[0].read_text()
    assert "## RLHF across seeds" in md
    # mean ± sample std over seeds; the difference of the mean to SFT
    assert "| ppo | 0 1 | 0.625 ± 0.177 | +0.375 | 1.500 ± 0.707 | 2.000 ± 1.414 |" in md
    assert "| dpo | 0 | 0.125 | -0.125 | 0.500 | 2.000 |" in md
    assert "| sft | - | 0.250 | +0.000 | 0.000 | 0.000 |" in md


def test_a_run_without_seed_results_has_no_seeds_section(run_dir: Path) -> None:
    assert "RLHF across seeds" not in write_report(run_dir)[0].read_text()
