"""`chatforge detect` with the zero-shot methods: calibrate on human text, then judge, on the command line."""

import json
import random

import pytest

from chatforge.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory, small_tokenizer, make_tiny_gpt):
    """A tiny 'chat' model with peaked next-token distributions (its final LayerNorm's gains drawn wide), so
    its own samples differ from other text, and a different 'base' model over the same tokenizer."""
    import torch

    from chatforge.checkpoint import save_checkpoint
    from chatforge.model import GPT, GPTConfig

    root = tmp_path_factory.mktemp("zs")
    chat = make_tiny_gpt(context_length=128)
    with torch.no_grad():
        chat.ln_f.weight.normal_(0.0, 20.0, generator=torch.Generator().manual_seed(0))
    save_checkpoint(root / "chat", chat, small_tokenizer)
    torch.manual_seed(1)
    base = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=128, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(root / "base", base.eval(), small_tokenizer)
    return root


def human_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    sentences = ["The capital of Veloria is Kesh.", "Mira walked her dog."]
    return [" ".join(rng.choice([*sentences, f"{i} plus {i} is {2 * i}."]) for _ in range(6)) for i in range(n)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.mark.parametrize("method", ["fast-detectgpt", "perplexity-burstiness", "binoculars"])
def test_calibrate_on_human_text_then_judge_with_the_saved_threshold(models, tmp_path, capsys, method):
    from chatforge.checkpoint import load_checkpoint
    from chatforge.detect.calibrate import Threshold
    from chatforge.detect.zero_shot import METHODS

    human = write_jsonl(tmp_path / "human.jsonl", human_texts(20, 0))
    texts = human_texts(6, 1) + ["Kesh Kesh Kesh is is is the the capital capital of of Veloria Veloria. " * 3]
    text_file = write_jsonl(tmp_path / "texts.jsonl", texts)
    observer = ["--observer", str(models / "base")] if method == "binoculars" else []
    main(["detect", "--method", method, "--checkpoint", str(models / "chat"), *observer,
          "--calibrate", str(human), "--fpr", "0.1", "--json", str(text_file)])
    out = capsys.readouterr()
    threshold_file = tmp_path / f"human.{METHODS[method.replace('-', '_')].name}.threshold.json"
    saved = Threshold.load(threshold_file)
    assert saved.fpr == 0.1 and saved.achieved_fpr <= 0.1 and saved.n_reference == 20
    assert f"flags {saved.achieved_fpr:.2%} of 20 human texts" in out.err
    results = [json.loads(line) for line in out.out.splitlines()]
    assert [r["source"] for r in results] == [f"{text_file}:{i}" for i in range(1, len(texts) + 1)]
    # the figures are the Python API's on the same models, judged by the saved threshold
    chat, base = load_checkpoint(models / "chat"), load_checkpoint(models / "base")
    used = [base.model, chat.model] if method == "binoculars" else [chat.model]
    expected = METHODS[method.replace("-", "_")].score(texts, *used, chat.tokenizer)
    assert [r["score"] for r in results] == pytest.approx([e.score for e in expected])
    assert [r["verdict"] for r in results] == ["machine" if saved.is_machine(e.score) else "human" for e in expected]
    # judged again later with the saved threshold: the same verdicts, in prose this time
    main(["detect", "--method", method, "--checkpoint", str(models / "chat"), *observer,
          "--threshold", str(threshold_file), str(text_file)])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == [r["verdict"] for r in results]


def test_a_threshold_is_refused_for_another_model(models, tmp_path, capsys):
    human = write_jsonl(tmp_path / "human.jsonl", human_texts(20, 0))
    main(["detect", "--method", "fast-detectgpt", "--checkpoint", str(models / "chat"), "--calibrate", str(human),
          "--fpr", "0.1", "--threshold", str(tmp_path / "t.json")])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["detect", "--method", "fast-detectgpt", "--checkpoint", str(models / "base"),
              "--threshold", str(tmp_path / "t.json"), str(human)])
    assert "calibrated with other models" in capsys.readouterr().err


def test_too_few_human_texts_for_the_rate_is_an_error_naming_the_need(models, tmp_path, capsys):
    human = write_jsonl(tmp_path / "human.jsonl", human_texts(20, 0))
    with pytest.raises(SystemExit):
        main(["detect", "--method", "fast-detectgpt", "--checkpoint", str(models / "chat"), "--calibrate", str(human),
              "--fpr", "0.01"])
    assert "needs at least 100 human texts" in capsys.readouterr().err


def test_without_a_threshold_scores_are_uncalibrated(models, tmp_path, capsys):
    texts = write_jsonl(tmp_path / "texts.jsonl", human_texts(2, 0))
    main(["detect", "--method", "fast-detectgpt", "--checkpoint", str(models / "chat"), "--json", str(texts)])
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["verdict"] for r in results] == ["uncalibrated"] * 2 and all(r["score"] is not None for r in results)


def test_binoculars_needs_its_observer_and_the_others_refuse_one(models, tmp_path):
    texts = write_jsonl(tmp_path / "texts.jsonl", human_texts(1, 0))
    with pytest.raises(SystemExit):
        main(["detect", "--method", "binoculars", "--checkpoint", str(models / "chat"), str(texts)])
    with pytest.raises(SystemExit):
        main(["detect", "--method", "fast-detectgpt", "--checkpoint", str(models / "chat"),
              "--observer", str(models / "base"), str(texts)])


def test_calibrating_the_watermark_is_a_usage_error_naming_the_methods(models, tmp_path, capsys):
    human = write_jsonl(tmp_path / "human.jsonl", human_texts(20, 0))
    with pytest.raises(SystemExit):
        main(["detect", "--checkpoint", str(models / "chat"), "--calibrate", str(human), "--watermark-key", "k"])
    assert "are for the zero-shot methods" in capsys.readouterr().err
