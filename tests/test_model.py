"""The GPT: GPT-2's architecture, its initialization, and the KV-cache forward the engine needs."""

import copy as copy_module
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from chatforge.errors import ConfigError
from chatforge.model import GPT, IGNORE_INDEX, GPTConfig, lm_loss, single_query_attention


def test_logits_have_one_row_per_position_and_token(tiny_model, tiny_config):
    x = torch.randint(0, tiny_config.vocab_size, (3, 10))
    assert tiny_model(x).shape == (3, 10, tiny_config.vocab_size)


def test_lm_head_is_tied_to_the_token_embedding(tiny_model):
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.wte.weight.data_ptr()


def test_parameter_count_matches_gpt2_formula(tiny_model, tiny_config):
    c = tiny_config
    per_block = 12 * c.n_embd**2 + 13 * c.n_embd  # attn 4C^2+4C, mlp 8C^2+5C, two LayerNorms 4C
    expected = c.vocab_size * c.n_embd + c.context_length * c.n_embd + c.n_layer * per_block + 2 * c.n_embd
    assert tiny_model.num_params() == expected
    assert tiny_model.num_params(non_embedding=True) == expected - (c.vocab_size + c.context_length) * c.n_embd


def test_residual_projections_use_gpt2_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context_length=16, n_layer=8, n_head=4, n_embd=256))
    proj = model.h[0].mlp.c_proj.weight.std().item()
    fc = model.h[0].mlp.c_fc.weight.std().item()
    assert fc == pytest.approx(0.02, rel=0.05)
    assert proj == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)


def test_future_tokens_cannot_change_past_logits(tiny_model):
    x = torch.randint(0, 97, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 97
    tiny_model.eval()
    assert torch.allclose(tiny_model(x)[:, :8], tiny_model(y)[:, :8], atol=1e-6)


def test_prefill_then_decode_with_kv_cache_equals_full_forward(tiny_model):
    tiny_model.eval()
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = tiny_model(x)
        cache = tiny_model.make_kv_cache(batch_size=2)
        parts = [tiny_model(x[:, :12], kv_cache=cache)]
        parts += [tiny_model(x[:, i : i + 1], kv_cache=cache, pos_offset=i) for i in range(12, 16)]
        parts.append(tiny_model(x[:, 16:], kv_cache=cache, pos_offset=16))  # a chunk after a cached prefix
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_sequence_longer_than_context_is_refused(tiny_model):
    with pytest.raises(ValueError, match="context_length"):
        tiny_model(torch.zeros(1, 33, dtype=torch.long))


def test_bad_sizes_are_config_errors_naming_the_field():
    with pytest.raises(ConfigError, match="n_head"):
        GPTConfig(n_embd=130, n_head=4)
    with pytest.raises(ConfigError, match="n_layer"):
        GPTConfig(n_layer=0)


def test_lm_loss_ignores_masked_targets_and_matches_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    targets = torch.tensor([[0, IGNORE_INDEX]])
    expected = -torch.log_softmax(logits[0, 0], -1)[0]
    assert lm_loss(logits, targets).item() == pytest.approx(expected.item())
    assert lm_loss(logits, targets, reduction="sum").item() == pytest.approx(expected.item())


def test_growing_the_vocabulary_keeps_old_rows_ties_the_head_and_starts_new_rows_at_the_mean(tiny_model):
    old = tiny_model.wte.weight.detach().clone()
    tiny_model.resize_token_embeddings(old.shape[0] + 3)
    new = tiny_model.wte.weight
    assert tiny_model.config.vocab_size == old.shape[0] + 3
    assert torch.equal(new[: old.shape[0]], old)
    assert torch.allclose(new[old.shape[0] :], old.mean(0).expand(3, -1))
    assert tiny_model.lm_head.weight is new
    assert tiny_model(torch.tensor([[1, 2, old.shape[0] + 2]])).shape[-1] == old.shape[0] + 3


def test_single_query_attention_equals_sdpa_with_and_without_a_mask():
    """The attention of the compiled decode steps: one query per row over its cached keys."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 4, 9, 16), torch.randn(3, 4, 9, 16)
    got = single_query_attention(q, k, v)
    assert got.shape == (3, 4, 1, 16)
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v), atol=1e-6)
    # rows at different lengths: an additive mask hides each row's unused slots, as the engine builds it
    lengths = torch.tensor([9, 4, 1])
    mask = torch.zeros(3, 9).masked_fill_(torch.arange(9)[None] >= lengths[:, None], -math.inf)[:, None, None]
    got = single_query_attention(q, k, v, mask)
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6)
    assert torch.allclose(got[2], v[2, :, :1], atol=1e-6)  # a row that sees one slot gets its value


# ---- plain: no kernel choices -------------------------------------------------------------------


def test_without_gradients_the_model_computes_what_a_training_step_computes_bit_for_bit(tiny_model):
    """PPO's and DPO's no-grad log-probs must be those of the training forward: the model has no
    faster path of its own (the engine's lives in chatforge.accel)."""
    x = torch.randint(0, tiny_model.config.vocab_size, (2, 5))  # 10 rows: where a fast kernel would differ
    with torch.no_grad():
        quiet = tiny_model(x)
    assert torch.equal(quiet, tiny_model(x).detach())


def test_the_model_imports_no_acceleration():
    code = "import sys, chatforge.model; print(sorted(m for m in sys.modules if m.startswith('chatforge')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "accel" not in out and "cpu_kernels" not in out, out


def test_a_model_used_for_decoding_still_saves_and_copies_only_its_parameters(tiny_model):
    before = set(tiny_model.state_dict())
    x = torch.randint(0, tiny_model.config.vocab_size, (8, 1))
    with torch.no_grad():
        tiny_model(x)
    assert set(tiny_model.state_dict()) == before
    copy = copy_module.deepcopy(tiny_model)
    with torch.no_grad():
        assert torch.allclose(copy(x), tiny_model(x), rtol=1e-5, atol=1e-5)
