"""The fused decode step (chatforge_cpu::DecodeStep): GPT's forward for one new token a row, in one call.

Everything here skips, with the reason, where chatforge's CPU kernels cannot be built (see
test_kernels.py).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from chatforge.accel import kernels
from chatforge.accel.fused_step import FusedDecodeStep, _int8_scales, _products, _weights, unsupported_reason
from chatforge.accel.quantize import Int8Linear, quantize_model
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.model import GPT, GPTConfig

# odd sizes: a head width of 7 and a width of 42 (the masked tails of every vector loop, the MLP's 168 too), a
# vocabulary of 300 (the LM head's last panel padded), three blocks
CONFIG = GPTConfig(vocab_size=300, context_length=48, n_layer=3, n_head=6, n_embd=42)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(CONFIG).eval()
    with torch.no_grad():  # LayerNorm gains and biases away from 1 and 0, so a dropped one shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def decode_step(model: GPT, packed: bool):
    packs = [torch.ops.chatforge_cpu.pack(w.detach()) for w in _products(model)] if packed else []
    return torch.classes.chatforge_cpu.DecodeStep(_weights(model), packs, CONFIG.n_head, CONFIG.layer_norm_eps, [])


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 17])  # one row (the gemv); several (the packed product), past a 16-row tile
def test_token_by_token_it_gives_the_models_logits_and_fills_the_cache_as_the_model_does(ops, model, rows):
    torch.manual_seed(rows)
    ids = torch.randint(0, CONFIG.vocab_size, (rows, 20))
    step, cache = decode_step(model, packed=rows > 1), model.make_kv_cache(rows + 1)
    with torch.no_grad():
        want = model(ids)
        got = torch.stack([step.forward(ids[:, t].tolist(), [t] * rows, cache.k, cache.v) for t in range(20)], 1)
        reference = model.make_kv_cache(rows)
        model(ids, kv_cache=reference)
    assert close(got, want)
    assert close(cache.k[:, :rows, :, :20], reference.k[:, :, :, :20])
    assert close(cache.v[:, :rows, :, :20], reference.v[:, :, :, :20])
    assert not cache.k[:, rows:].any() and not cache.k[:, :, :, 20:].any()  # nothing written elsewhere


def test_rows_at_different_positions_each_attend_over_their_own_slots_only(ops, model):
    torch.manual_seed(1)
    ids = torch.randint(0, CONFIG.vocab_size, (5, 30))
    positions = [11, 29, 3, 20, 0]
    with torch.no_grad():
        want = model(ids)
        cache = model.make_kv_cache(5)
        model(ids, kv_cache=cache)  # every row's slots filled to 30: later slots must stay unseen
        got = decode_step(model, packed=True).forward([int(ids[r, p]) for r, p in enumerate(positions)], positions,
                                                      cache.k, cache.v)
    assert close(got, torch.stack([want[r, p] for r, p in enumerate(positions)]))


def test_a_wrong_call_is_a_clear_error_not_a_crash(ops, model):
    step, cache = decode_step(model, packed=False), model.make_kv_cache(2)
    weights, new_step = _weights(model), torch.classes.chatforge_cpu.DecodeStep
    calls = {
        "outside the vocabulary": lambda: step.forward([300], [0], cache.k, cache.v),
        "outside the context": lambda: step.forward([1], [48], cache.k, cache.v),
        "need the packed weights": lambda: step.forward([1, 2], [0, 0], cache.k, cache.v),
        "2 tokens and 1 positions": lambda: step.forward([1, 2], [0], cache.k, cache.v),
        "the caches must be": lambda: step.forward([1], [0], cache.k[:2], cache.v[:2]),
        "rows >= 3": lambda: decode_step(model, packed=True).forward([1, 2, 3], [0] * 3, cache.k, cache.v),
        "expected 5 + 12 weights a block": lambda: new_step(weights[:-1], [], 4, 1e-5, []),
        "contiguous fp32": lambda: torch.classes.chatforge_cpu.DecodeStep([weights[0].double()] + weights[1:], [], 6,
                                                                          1e-5, []),
        "not divisible by 4 heads": lambda: torch.classes.chatforge_cpu.DecodeStep(weights, [], 4, 1e-5, []),
        "pack 0 is not": lambda: torch.classes.chatforge_cpu.DecodeStep(
            weights, [torch.ops.chatforge_cpu.pack(w.detach().T.contiguous()) for w in _products(model)], 6, 1e-5, []),
    }
    for message, call in calls.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()


def test_it_follows_the_weights_through_an_optimizer_step_and_a_replaced_embedding(active, model):
    fused, ids = FusedDecodeStep(model), torch.tensor([[7, 8, 9]])

    def agree() -> bool:
        cache = model.make_kv_cache(2)
        got = [fused([t, t], [i, i], cache)[0] for i, t in enumerate(ids[0].tolist())]
        one = model.make_kv_cache(1)
        got_one = [fused([t], [i], one)[0] for i, t in enumerate(ids[0].tolist())]
        with torch.no_grad():
            want = model(ids)[0]
        return close(torch.stack(got), want) and close(torch.stack(got_one), want)

    assert agree()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # fused AdamW bumps no version
    model(ids).sum().backward()
    optimizer.step()
    assert agree()
    with torch.no_grad():
        model.h[2].mlp.c_fc.weight.data = torch.randn(168, 42)  # a new tensor behind the same parameter
    assert agree()
    model.resize_token_embeddings(310)  # new parameters in new modules: wte and the LM head
    assert agree() and fused([1], [0], model.make_kv_cache(1)).shape == (1, 310)


def test_a_layer_replaced_after_it_was_built_takes_the_model_out_of_its_hands(active, model):
    fused = FusedDecodeStep(model)
    assert fused.covers(1) and fused.covers(32) and not fused.covers(33)
    model.h[0].attn.c_proj = Lora(42, 42)
    assert not fused.covers(1)
    with pytest.raises(ValueError, match="h.0.attn.c_proj is a Lora"):
        fused([1], [0], model.make_kv_cache(1))


class Subclassed(GPT):
    pass


class Lora(nn.Linear):
    pass


class SubclassedWeight(torch.Tensor):
    """A weight of another tensor type, as torchao's quantized layouts are."""


class ByteTokenizer:
    special_ids: dict[str, int] = {}

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([97 + token_id % 26])


@pytest.mark.parametrize("change, reason", [
    (lambda m: Subclassed(CONFIG), "a Subclassed, not chatforge's GPT"),
    (lambda m: m.h[1].mlp.c_fc.register_forward_hook(lambda *a: None) and m, "h.1.mlp.c_fc has a forward hook"),
    (lambda m: setattr(m.h[0].attn, "c_proj", Lora(42, 42)) or m, "h.0.attn.c_proj is a Lora"),
    (lambda m: m.to(torch.bfloat16), "wte.weight is not a contiguous fp32 CPU tensor"),
    (lambda m: GPT(GPTConfig(**{**CONFIG.to_dict(), "dropout": 0.1})).train(), "training mode with dropout"),
    (lambda m: setattr(m.h[1].mlp.c_fc, "weight", nn.Parameter(torch.Tensor._make_subclass(
        SubclassedWeight, m.h[1].mlp.c_fc.weight.detach()), False)) or m, "h.1.mlp.c_fc.weight is a SubclassedWeight"),
])
def test_it_declines_what_it_would_not_compute_as_the_model_does(active, model, change, reason):
    assert unsupported_reason(model) is None
    assert reason in unsupported_reason(change(model))
    with pytest.raises(ValueError, match="cannot run this model"):
        FusedDecodeStep(change(model))


def test_it_needs_the_kernels_loaded(ops, model):
    kernels.set_active(False)
    assert unsupported_reason(model) == "chatforge's CPU kernels are not loaded"


class Spy:
    """The engine's decode forward past the fused step, replaced by the model itself, counting the rows
    of each call."""

    def __init__(self, model: GPT) -> None:
        self.model, self.rows = model, []

    def __call__(self, tokens, **kwargs):
        self.rows.append(tokens.shape[0])
        return self.model(tokens, **kwargs)


def test_a_fused_engine_decodes_up_to_32_rows_in_the_fused_step_and_more_in_the_forward(ops, model, monkeypatch):
    compiled = Engine(model, ByteTokenizer(), max_batch_size=4, stop_token_ids=[], fused=True)
    assert compiled.fused and compiled.fused_reason is None
    spy = compiled._forward = Spy(model)
    compiled.warm_up()  # every row count it can take is the fused step's: nothing else runs
    assert spy.rows == []
    prompts = [[5, 6, 7], [1], [9, 9, 9, 9, 9, 2], [3, 4]]
    params = [SamplingParams(max_tokens=m, temperature=0, logprobs=1) for m in (9, 4, 6, 8)]
    want = Engine(model, ByteTokenizer(), max_batch_size=4, stop_token_ids=[]).generate(prompts, params)
    assert [c.outputs[0].token_ids for c in compiled.generate(prompts, params)] == [
        c.outputs[0].token_ids for c in want]
    assert spy.rows == []
    monkeypatch.setattr(kernels, "MAX_ROWS", 2)
    got = compiled.generate(prompts, params)
    assert spy.rows and min(spy.rows) == 3  # more rows than the fused step takes: the forward; fewer: fused
    assert [c.outputs[0].token_ids for c in got] == [c.outputs[0].token_ids for c in want]
    lp = [t.logprob for c in got for t in c.outputs[0].logprobs]
    assert lp == pytest.approx([t.logprob for c in want for t in c.outputs[0].logprobs], abs=1e-4)


def test_an_engine_not_asked_for_it_never_uses_it(ops, model):
    engine = Engine(model, ByteTokenizer(), max_batch_size=2, compile=True)
    assert not engine.fused and engine.fused_reason == "not asked for"


# ---- a model in weight-only int8 -----------------------------------------------------------------------


@pytest.fixture
def int8_model(model) -> GPT:
    return quantize_model(model)


@pytest.mark.parametrize("rows", [1, 2, 5])  # the three tile shapes: 4 outputs x 1 row, 4 x 2, the many-row tile
def test_an_int8_model_runs_in_the_fused_step_with_the_quantized_models_own_logits(active, int8_model, rows):
    assert unsupported_reason(int8_model) is None
    torch.manual_seed(rows)
    ids = torch.randint(0, CONFIG.vocab_size, (rows, 20))
    fused, cache = FusedDecodeStep(int8_model), int8_model.make_kv_cache(rows)
    got = torch.stack([fused(ids[:, t].tolist(), [t] * rows, cache) for t in range(20)], 1)
    with torch.no_grad():
        want = int8_model(ids)  # Int8Embedding's dequantized rows, Int8Linear's products
        reference = int8_model.make_kv_cache(rows)
        int8_model(ids, kv_cache=reference)
    assert close(got, want)
    assert close(cache.k[:, :, :, :20], reference.k[:, :, :, :20])


def test_a_fused_engine_decodes_an_int8_model_to_the_same_tokens_as_its_eager_path(active, int8_model):
    prompts = [[5, 6, 7], [1], [9, 9, 9, 9, 9, 2]]
    params = [SamplingParams(max_tokens=m, temperature=0, logprobs=1) for m in (9, 4, 6)]
    fused = Engine(int8_model, ByteTokenizer(), max_batch_size=3, stop_token_ids=[], fused=True)
    assert fused.fused, fused.fused_reason
    eager = Engine(int8_model, ByteTokenizer(), max_batch_size=3, stop_token_ids=[])
    got, want = fused.generate(prompts, params), eager.generate(prompts, params)
    assert [c.outputs[0].token_ids for c in got] == [c.outputs[0].token_ids for c in want]
    lp = [t.logprob for c in got for t in c.outputs[0].logprobs]
    assert lp == pytest.approx([t.logprob for c in want for t in c.outputs[0].logprobs], abs=1e-4)


def test_a_model_with_some_products_int8_and_some_not_is_declined(active, model):
    model.h[1].mlp.c_fc = Int8Linear.from_linear(model.h[1].mlp.c_fc)
    assert unsupported_reason(model) == "some of its products are int8 and some are not"


def test_a_wrong_int8_step_is_a_clear_error(ops, int8_model):
    weights, scales, fp32 = _weights(int8_model), _int8_scales(int8_model), GPT(CONFIG)
    step = torch.classes.chatforge_cpu.DecodeStep
    calls = {
        "expected no int8 scales or 4 a block": lambda: step(weights, [], 6, 1e-5, scales[:-1]),
        "int8 weights take no packs": lambda: step(
            weights, [torch.ops.chatforge_cpu.pack(w.detach()) for w in _products(fp32)], 6, 1e-5, scales),
        "weight 0 must be a contiguous int8": lambda: step(_weights(fp32), [], 6, 1e-5, scales),
        "scale 1 must be 126": lambda: step(weights, [], 6, 1e-5, [scales[0], scales[1][:-1], *scales[2:]]),
    }
    for message, call in calls.items():
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()
