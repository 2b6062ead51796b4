"""Shared fixtures: tiny models and a tiny tokenizer, built on the fly (no downloads)."""

from __future__ import annotations

import pytest
import torch

from chatforge.model import GPT, GPTConfig

TINY = dict(vocab_size=97, context_length=32, n_layer=2, n_head=2, n_embd=16)


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
