"""Shared fixtures: tiny models and a tiny tokenizer, built on the fly (no downloads); and the RLHF
proof's training, started with the session so that it runs beside every other test."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from chatforge.model import GPT, GPTConfig

TINY = dict(vocab_size=97, context_length=32, n_layer=2, n_head=2, n_embd=16)
RLHF_PROOF = "test_ppo_beats_sft_beyond_seed_noise_and_without_the_kl_penalty_games_the_reward_model"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The RLHF proof's test runs last: its training starts with the session (`rlhf_proof_training`),
    so every other test runs while it trains, and the suite takes about as long as the proof alone."""
    items.sort(key=lambda item: item.name == RLHF_PROOF)  # stable: the rest keep their order


@dataclass
class BackgroundTraining:
    process: subprocess.Popen
    run: Path  # the run directory it trains
    log: Path  # its stdout and stderr

    def wait(self) -> int:
        return self.process.wait()


@pytest.fixture(scope="session", autouse=True)
def rlhf_proof_training(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """When the RLHF proof is selected, its training (`test_rlhf_proof.train_and_compare`) starts at the
    first test, in a fresh interpreter (as `chatforge demo` runs) at the lowest CPU priority, so the other
    tests run at their usual speed and it trains in the time they leave. Otherwise None."""
    if not any(item.name == RLHF_PROOF for item in request.session.items):
        yield None
        return
    run = tmp_path_factory.mktemp("rlhf_proof") / "demo"
    log = run.parent / "training.log"
    code = f"import test_rlhf_proof as t; t.train_and_compare({str(run)!r})"
    lowest_priority = (lambda: os.nice(19)) if hasattr(os, "nice") else None
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent, stdout=out,
                                   stderr=subprocess.STDOUT, preexec_fn=lowest_priority)
    yield BackgroundTraining(process, run, log)
    if process.poll() is None:  # the session ended early (a failure with -x, an interrupt)
        process.kill()
        process.wait()


@pytest.fixture(autouse=True)
def _restore_cpu_kernels():
    """A test that builds chatforge's CPU kernels (a fused engine does) uses them only itself:
    every other test keeps torch's products, whatever order the tests run in."""
    from chatforge.accel import kernels

    before = dict(kernels._STATE)
    yield
    kernels._STATE.update(before)


@pytest.fixture(scope="session")
def ops():
    """chatforge's CPU kernels (torch.ops.chatforge_cpu), built here once (about 40 s); a test that
    needs them skips, with the reason, where the CPU has no AVX-512 or the build fails."""
    from chatforge.accel import kernels

    reason = kernels.unsupported_reason()
    if reason is not None:
        pytest.skip(f"chatforge's CPU kernels cannot be built here: {reason}")
    if not kernels._build():
        pytest.skip("chatforge's CPU kernels did not build here (see the warning)")
    return torch.ops.chatforge_cpu


@pytest.fixture
def active(ops):
    """The kernels in use by chatforge.accel.linear for this test."""
    from chatforge.accel import kernels

    kernels.set_active(True)
    return ops


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(**TINY)


@pytest.fixture
def tiny_model(tiny_config) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config)


@pytest.fixture(scope="session")
def small_tokenizer():
    from chatforge.tokenizer import Tokenizer

    texts = [f"The capital of Veloria is Kesh. {i} plus {i} is {2 * i}. Mira walked her dog." for i in range(200)]
    return Tokenizer.train(texts, vocab_size=300)


@pytest.fixture(scope="session")
def make_tiny_gpt(small_tokenizer):
    """`make_tiny_gpt(context_length)`: the servers' tests' model, a seeded 1-layer GPT over `small_tokenizer`
    (the same weights for the same context length, whichever test makes it)."""
    def make(context_length: int = 64) -> GPT:
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=context_length, n_layer=1,
                             n_head=2, n_embd=16)).eval()

    return make


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """A small built-in-world corpus, its tokenizer and its token shards, made once per session."""
    from chatforge.data.readers import iter_documents
    from chatforge.data.shards import prepare_shards
    from chatforge.data.world import write_corpus
    from chatforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("prepared")
    corpus = write_corpus(root / "corpus" / "corpus.jsonl", num_bytes=150_000)
    tok = Tokenizer.train(iter_documents([corpus]), vocab_size=400)
    tok.save(root / "tokenizer")
    prepare_shards([corpus], tok, root / "data", val_fraction=0.05, num_workers=1, show_progress=False)
    tok.save(root / "data" / "tokenizer.json")
    return root


@pytest.fixture
def lm_eval_offline(monkeypatch, tmp_path):
    """lm_eval, imported with every Hugging Face download switched off (skips without it)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    try:
        import lm_eval
        import lm_eval.evaluator
        import lm_eval.tasks
    except ImportError as e:
        pytest.skip(f"lm-evaluation-harness (pip package lm_eval, in the dev extra) is not importable: {e}")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    return lm_eval


# ---- a served tiny model: a module that asks for these defines `tiny` as (model, tokenizer) ------------


@pytest.fixture(scope="module")
def server(tiny):
    """The OpenAI-compatible server over the module's `tiny` model, in a background thread."""
    from chatforge.generate.engine import Engine
    from chatforge.serve.app import ServeConfig, create_app
    from chatforge.serve.server import ServerThread

    model, tok = tiny
    app = create_app(Engine(model, tok, max_batch_size=8), ServeConfig(model_name="tiny", web=False))
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    """The official `openai` client of `server`."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def local(tiny):
    """An engine of our own on the same weights: what the server must answer."""
    from chatforge.generate.engine import Engine

    model, tok = tiny
    return Engine(model, tok, max_batch_size=8)
