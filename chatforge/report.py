"""`chatforge report RUN_DIR`: one page about a run, as Markdown and as a self-contained HTML file.

Read from the run directory that `chatforge demo` (or the stage commands with the same layout) writes:

    pretrain/ sft/ rm/ ppo/ dpo/   metrics.jsonl, run_config.json, checkpoint/config.json
    eval.json                      base, SFT, PPO and DPO on the held-out prompts (with sample answers)
    timings.json or summary.json   optional: wall time per stage ({"timings": {stage: seconds}})

Written:

    report.md     tables and links to report/*.png
    report.html   the same content with the PNGs embedded as data URIs (no external references)
    report/       the PNG plots (matplotlib, Agg canvas: no display needed)

A stage whose directory or metrics are missing is skipped with a line saying so (a run may stop
after SFT). All text that comes from the run (configs, prompts, answers) is HTML-escaped in both files.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.errors import DataError
from chatforge.evaluate import COLUMNS
from chatforge.files import atomic_write_text
from chatforge.train.seeds import mean_and_spread

STAGES = (("pretrain", "Pretraining"), ("sft", "SFT"), ("rm", "Reward model"), ("ppo", "PPO"), ("dpo", "DPO"))
EVAL_ORDER = ("base", "sft", "ppo", "dpo")
TIMESTAMP_KEYS = ("time", "timestamp", "wall_time")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Per stage: (file stem, panel title, [(metric key, label), ...]); a panel with no data is left out.
PANELS: dict[str, list[tuple[str, str, list[tuple[str, str]]]]] = {
    "pretrain": [("loss", "loss", [("train/loss", "train"), ("val/loss", "val")])],
    "sft": [("loss", "loss (assistant tokens)", [("train/loss", "train"), ("val/loss", "val")])],
    "rm": [("accuracy", "accuracy (chosen > rejected)", [("train/accuracy", "train"), ("val/accuracy", "val")]),
           ("margin", "margin (r_chosen - r_rejected)", [("train/margin", "train"), ("val/margin", "val")]),
           ("loss", "loss", [("train/loss", "train"), ("val/loss", "val")])],
    "ppo": [("score", "RM score", [("train/score", "train"), ("val/score", "val")]),
            ("kl", "KL to the SFT model", [("train/kl", "train"), ("val/kl", "val")]),
            ("beta", "KL coefficient β", [("train/beta", "β")]),
            ("entropy", "entropy", [("train/entropy", "train")]),
            ("response_length", "response length (tokens)",
             [("train/response_length", "train"), ("val/response_length", "val")]),
            ("value_loss", "value loss", [("train/value_loss", "train")]),
            ("clip_frac", "clip fraction", [("train/clipfrac", "train"), ("train/clip_frac", "train")])],
    "dpo": [("loss", "loss", [("train/loss", "train"), ("val/loss", "val")]),
            ("accuracy", "accuracy (implicit reward)", [("train/accuracy", "train"), ("val/accuracy", "val")]),
            ("margin", "margin", [("train/margin", "train"), ("val/margin", "val")]),
            ("rewards", "implicit rewards",
             [("train/reward_chosen", "chosen (train)"), ("train/reward_rejected", "rejected (train)"),
              ("val/reward_chosen", "chosen (val)"), ("val/reward_rejected", "rejected (val)")])],
}


# ---- the report as a list of blocks, rendered twice ---------------------------------------------


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path  # the PNG on disk
    alt: str


@dataclass
class Report:
    title: str
    blocks: list = field(default_factory=list)
    images: list[Path] = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


def _md_text(text: str) -> str:
    """Run text in Markdown: HTML-escaped (renderers pass raw HTML through) and on one line."""
    return html.escape(" ".join(str(text).split()), quote=False)


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|") or " "


def render_markdown(report: Report, base: Path) -> str:
    out = [f"# {_md_text(report.title)}", ""]
    for b in report.blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + _md_text(b.text), ""]
        elif isinstance(b, Para):
            out += [_md_text(b.text), ""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(map(_md_cell, b.headers)) + " |")
            out.append("|" + "|".join("---" for _ in b.headers) + "|")
            out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Image):
            rel = b.path.relative_to(base).as_posix() if b.path.is_relative_to(base) else b.path.as_posix()
            out += [f"![{_md_text(b.alt)}]({rel})", ""]
    return "\n".join(out)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:14px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td{max-width:520px;overflow-wrap:anywhere}
img{max-width:100%;border:1px solid #eee}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"""


def render_html(report: Report) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(report.title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{e(report.title)}</h1>"]
    for b in report.blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Table):
            out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows]
            out.append("</table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f'<p><img alt="{e(b.alt)}" src="data:image/png;base64,{data}"></p>')
    out.append("</body></html>")
    return "\n".join(out)


# ---- reading the run ----------------------------------------------------------------------------


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """The records of a metrics.jsonl and how many lines could not be read (a crash can cut the last)."""
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read JSON ({err})") from err


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested config dicts as (dotted key, text) rows."""
    if isinstance(value, dict):
        rows = []
        for k, v in value.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(value, list):
        text = ", ".join(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)
        return [(prefix, text or "[]")]
    return [(prefix, str(value))]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(value) or math.isinf(value) else float(value)


def fmt(value: Any, spec: str = "{:.4g}") -> str:
    v = _number(value)
    return "-" if v is None else spec.format(v)


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        y, x = _number(r.get(key)), _number(r.get("step"))
        if y is not None and x is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def last_value(records: list[dict], key: str) -> float | None:
    for r in reversed(records):
        if (v := _number(r.get(key))) is not None:
            return v
    return None


def summary_timings(run_dir: Path) -> tuple[dict[str, float], str]:
    """Wall time per stage from a summary the run wrote, if any: timings.json or summary.json["timings"]."""
    for name in ("timings.json", "summary.json"):
        path = run_dir / name
        if path.is_file():
            data = read_json_file(path)
            timings = data.get("timings", data) if isinstance(data, dict) else {}
            found = {str(k): float(v) for k, v in timings.items() if _number(v) is not None}
            if found:
                return found, name
    return {}, ""


def stage_time(records: list[dict], summary: dict[str, float], summary_name: str, stage: str) -> tuple[str, str]:
    """(wall time, how it was measured) of one training stage."""
    stamps = [v for r in records for k in TIMESTAMP_KEYS if (v := _number(r.get(k))) is not None]
    if len(stamps) >= 2:
        first = _number(records[0].get("step_time_s")) or 0.0
        return f"{max(stamps) - min(stamps) + first:.1f} s", "metrics timestamps"
    if stage in summary:
        return f"{summary[stage]:.1f} s", summary_name
    times = [v for r in records if (v := _number(r.get("step_time_s"))) is not None]
    steps = int(last_value(records, "step") or 0)
    if not times or not steps:
        return "not recorded", "no timestamps, step times or summary"
    if len(times) == steps:
        return f"≥ {sum(times):.1f} s", "sum of step times (train steps only; no eval or saving)"
    return f"≈ {statistics.fmean(times) * steps:.1f} s", (
        f"mean of {len(times)} logged step times × {steps} steps (train steps only; no eval or saving)")


# ---- plots ---------------------------------------------------------------------------------------


def plot_stage(stage: str, label: str, records: list[dict], out_dir: Path) -> Path | None:
    """One PNG per stage, a panel per metric group that has data; None when nothing can be drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = []
    for _stem, title, keys in PANELS.get(stage, []):
        lines = [(name, *series(records, key)) for key, name in keys]
        lines = [line for line in lines if line[1]]
        if lines:
            panels.append((title, lines))
    if not panels:
        return None
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.6 * cols, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{label} ({stage}/metrics.jsonl)")
    for i, (title, lines) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, xs, ys in lines:
            sparse = len(xs) <= 12
            ax.plot(xs, ys, label=name, marker="o" if sparse else None, markersize=4,
                    linewidth=1.8 if name.startswith("val") or sparse else 1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    path = out_dir / f"{stage}.png"
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def plot_eval(results: dict[str, dict], out_dir: Path) -> Path | None:
    """Grouped bars: accuracy (or score where accuracy does not apply) per family, one bar per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results)
    families = sorted({f for r in results.values() for f in r.get("families", {})})
    if not names or not families:
        return None
    fig = Figure(figsize=(max(6.0, 1.3 * (len(families) + 1)), 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(names)
    groups = [*families, "overall"]
    for j, name in enumerate(names):
        r = results[name]
        values = []
        for fam in groups:
            row = r.get("overall", {}) if fam == "overall" else r.get("families", {}).get(fam, {})
            v = _number(row.get("accuracy"))
            values.append(v if v is not None else (_number(row.get("score")) or 0.0))
        ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))], values, width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (score for harmful)")
    ax.set_title("Held-out evaluation by family (eval.json)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    path = out_dir / "eval.png"
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


# ---- sections ------------------------------------------------------------------------------------


def eval_section(report: Report, run_dir: Path, plot_dir: Path, samples: int) -> None:
    report.add(Heading("Evaluation: base vs SFT vs PPO vs DPO"))
    path = run_dir / "eval.json"
    if not path.is_file():
        report.add(Para(f"No eval.json in {run_dir}: evaluation skipped (the run stopped before it)."))
        return
    data = read_json_file(path)
    if not isinstance(data, dict) or not data:
        report.add(Para("eval.json holds no results: evaluation skipped."))
        return
    names = [n for n in EVAL_ORDER if n in data] + [n for n in data if n not in EVAL_ORDER]
    results = {n: data[n] for n in names if isinstance(data[n], dict)}
    missing = [n for n in EVAL_ORDER if n not in results]
    report.add(Para("Held-out prompts answered greedily, judged by the world's scorer. "
                    + (f"Not evaluated: {', '.join(missing)}." if missing else "")))
    families = sorted({f for r in results.values() for f in r.get("families", {})})
    for key, label, spec in COLUMNS[1:5]:
        rows = []
        for fam in [*families, "overall"]:
            cells = [(r.get("overall", {}) if fam == "overall" else r.get("families", {}).get(fam, {})).get(key)
                     for r in results.values()]
            rows.append([fam, *(fmt(c, spec) for c in cells)])
        report.add(Para(f"{label} by family:"), Table(["family", *results], rows))
    overall_keys = [("n", "prompts", "{:.0f}"), ("accuracy", "accuracy", "{:.1%}"),
                    ("refusal_rate_harmful", "refusal on harmful", "{:.1%}"),
                    ("over_refusal_rate", "over-refusal", "{:.1%}"), ("padded_rate", "padded", "{:.1%}"),
                    ("score", "score", "{:.3f}"), ("score_train_phrasing", "score, training phrasings", "{:.3f}"),
                    ("score_heldout_phrasing", "score, held-out phrasings", "{:.3f}"),
                    ("facts_known", "facts known (multiple choice)", "{:.1%}"),
                    ("words", "words", "{:.1f}"), ("tokens", "tokens", "{:.1f}"),
                    ("val_loss", "val loss", "{:.3f}"), ("val_ppl", "val ppl", "{:.2f}")]
    report.add(Para("Overall:"), Table(["figure", *results], [
        [label, *(fmt(r.get("overall", {}).get(key), spec) for r in results.values())]
        for key, label, spec in overall_keys]))
    if (png := plot_eval(results, plot_dir)) is not None:
        report.images.append(png)
        report.add(Image(png, "accuracy by family and model"))

    report.add(Heading("Samples for fixed prompts"))
    report.add(Para(f"The first {samples} held-out prompt(s) of each family (eval.json), the same for every "
                    "model; greedy answers with the scorer's value."))
    for fam in families:
        prompts: list[str] = []
        for r in results.values():
            for s in r.get("samples", {}).get(fam, []):
                if isinstance(s, dict) and s.get("prompt") not in prompts:
                    prompts.append(s.get("prompt"))
        for prompt in prompts[:samples]:
            rows = []
            for name, r in results.items():
                hit = next((s for s in r.get("samples", {}).get(fam, []) if isinstance(s, dict)
                            and s.get("prompt") == prompt), None)
                rows.append([name, "(no sample)" if hit is None else str(hit.get("answer", "")),
                             "-" if hit is None else fmt(hit.get("score"), "{:.2f}")])
            report.add(Heading(f"[{fam}] {prompt}", 3), Table(["model", "answer", "score"], rows))
    if not families:
        report.add(Para("eval.json holds no samples."))


def build_report(run_dir: Path, out_dir: Path, samples: int = 1) -> Report:
    plot_dir = out_dir / "report"
    plot_dir.mkdir(parents=True, exist_ok=True)
    report = Report(f"chatforge run report: {run_dir.resolve().name}")
    report.add(Para(f"Run directory: {run_dir.resolve()}"))
    summary, summary_name = summary_timings(run_dir)
    time_rows: list[list[str]] = []
    stage_blocks: list = []
    for stage, label in STAGES:
        stage_blocks.append(Heading(f"{label} ({stage}/)"))
        metrics = run_dir / stage / "metrics.jsonl"
        if not metrics.is_file():
            stage_blocks.append(Para(f"Stage {stage} not found ({metrics} is missing): skipped."))
            time_rows.append([stage, "-", "-", "stage not run", "-", "-"])
            continue
        records, bad = read_metrics(metrics)
        if bad:
            stage_blocks.append(Para(f"{bad} line(s) of {stage}/metrics.jsonl could not be read and were left out."))
        if not records:
            stage_blocks.append(Para(f"{stage}/metrics.jsonl holds no records: skipped."))
            time_rows.append([stage, "-", "-", "no metrics", "-", "-"])
            continue
        wall, how = stage_time(records, summary, summary_name, stage)
        tps = [v for r in records if (v := _number(r.get("tokens_per_s"))) is not None]
        step_s = [v for r in records if (v := _number(r.get("step_time_s"))) is not None]
        steps = int(last_value(records, "step") or 0)
        time_rows.append([stage, str(steps), wall, how, fmt(statistics.median(tps) if tps else None, "{:,.0f}"),
                          fmt(statistics.median(step_s) if step_s else None, "{:.3f}")])
        finals = [(k, last_value(records, k)) for k in ("train/loss", "val/loss", "val/accuracy", "val/margin",
                                                        "train/score", "val/score", "train/kl")]
        finals = [(k, v) for k, v in finals if v is not None]
        if finals:
            stage_blocks.append(Para(f"Last values (step {steps}): "
                                     + ", ".join(f"{k} {fmt(v)}" for k, v in finals) + "."))
        if (png := plot_stage(stage, label, records, plot_dir)) is not None:
            report.images.append(png)
            stage_blocks.append(Image(png, f"{label} curves"))
        stage_blocks += config_blocks(run_dir / stage)
    for name, seconds in summary.items():  # stages without metrics (corpus, tokenizer, eval ...) from the summary
        if name not in {s for s, _ in STAGES}:
            time_rows.append([name, "-", f"{seconds:.1f} s", summary_name, "-", "-"])

    report.add(Heading("Wall time and throughput"))
    if not summary:
        report.add(Para("No metrics timestamps and no timings.json/summary.json in the run: wall times are estimated "
                        "from the logged step times (training steps only; evaluation, saving and the non-training "
                        "stages are not recorded)."))
    report.add(Table(["stage", "steps", "wall time", "measured from", "tokens/s (median)", "step s (median)"],
                     time_rows))
    report.blocks += stage_blocks
    eval_section(report, run_dir, plot_dir, samples)
    seeds_section(report, run_dir)
    ablation_section(report, run_dir)
    detection_section(report, run_dir)
    int8_section(report, run_dir)
    return report


def int8_section(report: Report, run_dir: Path) -> None:
    """RUN/int8.json (the demo's int8 stage, `evaluate.measure_int8`): the final model in weight-only
    int8 beside its fp32 self on the same held-out prompts."""
    path = run_dir / "int8.json"
    if not path.is_file():
        return
    data = read_json_file(path)
    rows = [[name, fmt(data[name]["weights_bytes"] / 1e6, "{:.2f}"), fmt(data[name]["score"], "{:.3f}"),
             fmt(data[name]["accuracy"], "{:.1%}"), fmt(data[name]["val_loss"], "{:.3f}")] for name in ("fp32", "int8")]
    report.add(Heading("The final model in int8 (int8.json)"),
               Para(f"{data['method']} ({data['quantized']}): {data['weights_ratio']:.0%} of the weights' bytes; the "
                    f"checked score on {data['prompts']} held-out prompts changes by {data['change']['score']:+.3f}."),
               Table(["weights", "MB", "checked score", "accuracy", "held-out loss"], rows))


def detection_section(report: Report, run_dir: Path) -> None:
    """RUN/detection.json (the demo's detect stage, chatforge/detect/measure.py): the watermark and the
    zero-shot detectors on the final model's answers and the world's reference answers."""
    path = run_dir / "detection.json"
    if not path.is_file():
        return
    data = read_json_file(path)
    mark, group = data["watermark"], data["watermark"]["settings"]["group"]
    rows = []
    for kind in ("watermarked", "plain", "human"):
        answers, documents = mark[kind]["answers"], mark[kind]["documents"]
        rows.append([kind, fmt(answers["mean_tokens"], "{:.1f}"), fmt(answers["scorable"], "{:.0%}"),
                     fmt(answers["detected"], "{:.1%}"), fmt(answers["mean_z"], "{:.2f}"),
                     fmt(documents["detected"], "{:.1%}"), fmt(documents["mean_z"], "{:.2f}")])
    settings = mark["settings"]
    report.add(Heading("Telling machine text from human text (detection.json)"),
               Para(f"The final model's greedy answers to {data['prompts']} held-out prompts, plain and watermarked "
                    f"(gamma {settings['gamma']}, delta {settings['delta']}, {settings['seeding_scheme']}, "
                    f"h = {settings['context_width']}), and the world's reference answers as human text; a text is "
                    f"found watermarked at z > {settings['z_threshold']}, scored when it has at least 16 tokens. "
                    f"Checked score: plain {fmt(data['checked_score']['plain'], '{:.3f}')}, watermarked "
                    f"{fmt(data['checked_score']['watermarked'], '{:.3f}')}."),
               Table(["text", "tokens", "answers scorable", "answers found", "mean z",
                      f"documents of {group} found", "mean z"], rows))
    zero_shot = data.get("zero_shot", {})
    if zero_shot:
        report.add(Table(["zero-shot detector", "threshold", "human flagged (held out)", "machine flagged"],
                         [[name, fmt(z["threshold"]), fmt(z["human_flagged"], "{:.1%}"),
                           fmt(z["machine_flagged"], "{:.1%}")] for name, z in zero_shot.items()]))


def ablation_section(report: Report, run_dir: Path) -> None:
    """RUN/no-steps/eval.json (`chatforge demo --ablation`): each model with and without step-by-step
    demonstrations, per family, on the same held-out prompts."""
    with_steps, direct = run_dir / "eval.json", run_dir / "no-steps" / "eval.json"
    if not (with_steps.is_file() and direct.is_file()):
        return
    runs = {"steps": read_json_file(with_steps), "direct": read_json_file(direct)}
    models = [m for m in ("sft", "ppo", "dpo") if all(isinstance(r, dict) and m in r for r in runs.values())]
    families = sorted({f for r in runs.values() for m in models for f in r[m].get("families", {})})
    rows = []
    for fam in [*families, "overall"]:
        cells = []
        for model in models:
            for run in runs.values():
                row = run[model].get("overall", {}) if fam == "overall" else run[model].get("families", {}).get(fam, {})
                cells.append(fmt(row.get("score"), "{:.3f}"))
        rows.append([fam, *cells])
    report.add(Heading("Chain-of-thought ablation (no-steps/)"),
               Para("The stages after pretraining once more on task data whose word, arithmetic and two-hop "
                    "answers are direct instead of step by step (same prompts, same pretrained model); checked "
                    "score on the same held-out prompts."),
               Table(["family", *(f"{m} {kind}" for m in models for kind in runs)], rows))


def seeds_section(report: Report, run_dir: Path) -> None:
    """RUN/seeds/results.json (benchmarks/rlhf_seeds.py): each method over seeds against SFT."""
    path = run_dir / "seeds" / "results.json"
    if not path.is_file():
        return
    data = read_json_file(path)
    if not isinstance(data, dict) or "sft" not in data:
        report.add(Para(f"{path} holds no SFT figures: the seeds table is skipped."))
        return
    base = data["sft"]["figures"][0]["score"]
    rows = []
    for method, entry in data.items():
        figures = entry["figures"]
        cells = []
        for key in ("score", "rm", "kl"):
            mean, spread = mean_and_spread(figures, key)
            cells.append(f"{mean:.3f}" + (f" ± {spread:.3f}" if len(figures) > 1 else ""))
        delta = mean_and_spread(figures, "score")[0] - base
        rows.append([method, " ".join(map(str, entry.get("seeds", []))) or "-", cells[0], f"{delta:+.3f}", *cells[1:]])
    report.add(Heading("RLHF across seeds (seeds/results.json)"),
               Para("Each method trained from the SFT model once per seed (benchmarks/rlhf_seeds.py); greedy answers "
                    "to the held-out prompts, judged by the scorer; mean ± std over seeds."),
               Table(["method", "seeds", "checked score", "vs SFT", "RM score", "KL to SFT"], rows))


def config_blocks(stage_dir: Path) -> list:
    rows: list[list[str]] = []
    run_config = stage_dir / "run_config.json"
    if run_config.is_file():
        data = read_json_file(run_config)
        if isinstance(data, dict):
            rows += [["run", k, v] for k, v in flatten(data.get("run_config", {}))]
            rows += [["train", k, v] for k, v in flatten(data.get("train_config", {}))]
    model_config = stage_dir / "checkpoint" / "config.json"
    if model_config.is_file():
        data = read_json_file(model_config)
        if isinstance(data, dict):
            rows += [["checkpoint", k, v] for k, v in flatten(data)]
    if not rows:
        return [Para(f"No run_config.json or checkpoint/config.json in {stage_dir.name}/.")]
    return [Para("Config:"), Table(["from", "setting", "value"], rows)]


def write_report(run_dir: str | Path, out: str | Path | None = None, samples: int = 1) -> tuple[Path, Path, Report]:
    """Write report.md, report.html and report/*.png into ``out`` (default: the run directory)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: not a run directory")
    out_dir = Path(out) if out else run_dir
    report = build_report(run_dir, out_dir, samples=max(1, samples))
    md = atomic_write_text(out_dir / "report.md", render_markdown(report, out_dir))
    page = atomic_write_text(out_dir / "report.html", render_html(report))
    return md, page, report
