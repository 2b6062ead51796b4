"""Shared fixtures: tiny models and a tiny tokenizer, built on the fly (no downloads)."""

from __future__ import annotations

import pytest
import torch

from chatforge.model import GPT, GPTConfig

TINY = dict(vocab_size=97, context_length=32, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(autouse=True)
def _restore_cpu_kernels():
    """A test that builds chatforge's CPU kernels (a fused engine does) uses them only itself:
    every other test keeps torch's products, whatever order the tests run in."""
    from chatforge.accel import kernels

    before = dict(kernels._STATE)
    yield
    kernels._STATE.update(before)


def built_kernels():
    """chatforge's CPU kernels (torch.ops.chatforge_cpu), built here once a process (about 40 s); the
    calling test skips, with the reason, where the CPU has neither AVX-512 nor AVX2 or the build fails."""
    from chatforge.accel import kernels

    reason = kernels.unsupported_reason()
    if reason is not None:
        pytest.skip(f"chatforge's CPU kernels cannot be built here: {reason}")
    if not kernels._build():
        pytest.skip("chatforge's CPU kernels did not build here (see the warning)")
    return torch.ops.chatforge_cpu


@pytest.fixture(scope="session")
def ops():
    """The kernels (`built_kernels`), for the tests that need them."""
    return built_kernels()


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
