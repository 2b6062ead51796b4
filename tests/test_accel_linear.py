"""chatforge.accel's products and the engine's view of a model: the same numbers as the model's own
layers, faster on this CPU, and never in the model itself; a CPU without chatforge's kernels (ARM, an
x86 without AVX2) gets the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import chatforge.accel.linear as accel_linear
from chatforge.accel.linear import FastLinear, fast_kernel, fast_linear, fast_view, sync_mode
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.model import GPT, GPTConfig

ROW_COUNTS = [1, 2, 3, 4, 7, 16, 17, 64, 65]


class Letters:
    """All the engine needs of a tokenizer: a token's bytes."""

    special_ids: dict[str, int] = {}

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([97 + token_id % 26])


@pytest.mark.parametrize("rows", ROW_COUNTS)
def test_fast_linear_computes_the_layers_product_at_every_row_count(rows):
    torch.manual_seed(0)
    layer = nn.Linear(96, 300)
    x = torch.randn(rows, 96)
    with torch.no_grad():
        expected, got = layer(x), fast_linear(layer, x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), fast_kernel(rows)


def test_fast_linear_takes_batched_three_dimensional_input_and_a_layer_without_bias():
    torch.manual_seed(0)
    layer = nn.Linear(64, 50, bias=False)
    x = torch.randn(4, 3, 64)
    with torch.no_grad():
        assert torch.allclose(fast_linear(layer, x), layer(x), rtol=1e-5, atol=1e-5)


def test_fast_linear_follows_a_weight_changed_in_place_after_it_was_used():
    """A packed copy of the weight (MKL's layout) must be rebuilt when training changes the weight."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 40)
    x = torch.randn(8, 32)
    with torch.no_grad():
        fast_linear(layer, x)  # packs (where packing is the fast kernel)
    for optimizer in (torch.optim.SGD(layer.parameters(), lr=1.0),
                      torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)):  # fused: no version bump
        layer(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            assert torch.allclose(fast_linear(layer, x), layer(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.load_state_dict({"weight": torch.randn(40, 32), "bias": torch.zeros(40)})
        assert torch.allclose(fast_linear(layer, x), layer(x), rtol=1e-5, atol=1e-5)


def test_with_gradients_fast_linear_is_the_layers_own_product_bit_for_bit(monkeypatch):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80)
    x = torch.randn(16, 48)

    def no_fast_kernel(rows):
        raise AssertionError("a fast kernel was chosen")

    monkeypatch.setattr(accel_linear, "fast_kernel", no_fast_kernel)
    with torch.no_grad(), pytest.raises(AssertionError, match="fast kernel"):  # no_grad does choose one
        fast_linear(layer, x)
    y = fast_linear(layer, x)
    assert y.requires_grad and torch.equal(y, layer(x))


class SubclassedWeight(torch.Tensor):
    """A weight of another tensor type, as torchao's quantized layouts are: its products are its own."""


def test_a_weight_that_is_a_tensor_subclass_keeps_its_own_product(monkeypatch):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80)
    layer.weight = nn.Parameter(torch.Tensor._make_subclass(SubclassedWeight, layer.weight.detach()), False)
    assert type(layer.weight) is SubclassedWeight

    def no_fast_kernel(rows):
        raise AssertionError("a fast kernel was chosen")

    monkeypatch.setattr(accel_linear, "fast_kernel", no_fast_kernel)
    x = torch.randn(1, 48)
    with torch.no_grad():
        assert torch.equal(fast_linear(layer, x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=96, context_length=32, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        m.wte.weight.mul_(30)  # logits far apart: greedy tokens do not hang on the last bit of a product
    return m


def test_the_view_shares_every_weight_and_leaves_the_model_as_it_was(model):
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    view = fast_view(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert all(type(m) is FastLinear for m in view.modules() if isinstance(m, nn.Linear))
    assert {k: v.data_ptr() for k, v in view.state_dict().items()} == before
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert view.h[0].ln_1 is model.h[0].ln_1 and view.wte is model.wte  # nothing to speed up: shared
    x = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        assert torch.allclose(view(x), model(x), rtol=1e-4, atol=1e-4)
        model.h[1].mlp.c_fc.weight.mul_(-1)  # training changes weights in place: the view sees it
        assert torch.allclose(view(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_hooked_layer_runs_itself_in_the_view_and_the_view_follows_train_and_eval(model):
    calls = []
    model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    view = fast_view(model)
    with torch.no_grad():
        view(torch.randint(0, 96, (1, 3)))
    assert calls == [1]
    model.train()
    sync_mode(view, model)
    assert all(m.training for m in view.modules())


def test_an_engine_runs_its_forwards_through_the_view_and_the_model_stays_plain(model):
    engine = Engine(model, Letters(), max_batch_size=2, stop_token_ids=[])
    assert engine._view is not model and type(engine._view.lm_head) is FastLinear
    assert type(model.lm_head) is nn.Linear and not engine.fused and engine.fused_reason == "not asked for"


_DECODE = """
import json, sys, torch
from chatforge.accel import kernels
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.model import GPT, GPTConfig
class Letters:
    special_ids = {}
    def token_bytes(self, token_id):
        return bytes([97 + token_id % 26])
model = GPT(GPTConfig(vocab_size=96, context_length=32, n_layer=2, n_head=2, n_embd=32)).eval()
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
engine = Engine(model, Letters(), max_batch_size=4, stop_token_ids=[], fused=True)
params = SamplingParams(max_tokens=12, temperature=0)
tokens = [c.outputs[0].token_ids for c in engine.generate([[1, 2, 3], [7], [5, 5, 9, 30], [60, 2]], params)]
print(json.dumps({"tokens": tokens, "fused": engine.fused, "reason": engine.fused_reason,
                  "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def decode_in_a_process(tmp_path, model, **env) -> dict:
    weights = tmp_path / "model.pt"
    torch.save(model.state_dict(), weights)
    out = subprocess.run([sys.executable, "-c", _DECODE, str(weights)], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_cpu_without_the_kernels_says_why_and_decodes_the_same_tokens(tmp_path, model):
    """ATEN_CPU_CAPABILITY=default makes torch report (and use) no vector extension, as on an x86 without
    AVX2; ARM (NEON, SVE) is the same case: chatforge's kernels are x86 only."""
    without = decode_in_a_process(tmp_path, model, ATEN_CPU_CAPABILITY="default")
    assert without["capability"] == "DEFAULT" and not without["fused"]
    assert "AVX2 or AVX-512" in without["reason"] and "DEFAULT" in without["reason"]
    plain = Engine(model, Letters(), max_batch_size=4, stop_token_ids=[])
    prompts = [[1, 2, 3], [7], [5, 5, 9, 30], [60, 2]]
    want = [c.outputs[0].token_ids for c in plain.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]
    assert without["tokens"] == want
    here = decode_in_a_process(tmp_path, model)
    assert here["tokens"] == want  # with the fused step where the kernels build here
    assert here["fused"] == (here["reason"] is None)
