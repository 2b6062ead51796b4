"""Pruning (chatforge/prune.py): Wanda's scores and masks by hand, exact sparsity per row and per group of
N:M, SparseGPT's update against the masks alone, the blocks pruned in order, the command and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from chatforge.checkpoint import load_checkpoint, save_checkpoint
from chatforge.cli import main
from chatforge.model import GPT, GPTConfig
from chatforge.prune import (
    InputStats,
    PruneConfig,
    Sparsity,
    parse_sparsity,
    prune_linear,
    prune_model,
    pruned_linears,
    sparsegpt_prune,
)

HALF, TWO_FOUR = Sparsity(0.5), Sparsity(0.5, 2, 4)


def run_cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def tiny_gpt(vocab_size: int, n_embd: int = 16) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, context_length=32, n_layer=2, n_head=2, n_embd=n_embd)).eval()


def test_wanda_scores_and_mask_match_a_hand_computation():
    linear = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -0.5, 3.0, 0.25], [4.0, 0.5, -1.5, 3.0]]))
    # input features' norms over the three tokens: 1, 5, 1, 2
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0], [0.0, 4.0, 1.0, 0.0]])
    stats = InputStats(4, hessian=False, device=torch.device("cpu"))
    stats.add(x[:2])
    stats.add(x[2:])  # statistics add up over batches
    assert torch.equal(stats.sq_norms, torch.tensor([1.0, 25.0, 1.0, 4.0]))
    # scores |W|·||X_j||: row 0 -> 1, 2.5, 3, 0.5 (drop columns 3, 0); row 1 -> 4, 2.5, 1.5, 6 (drop 2, 1)
    with torch.no_grad():
        prune_linear(linear, "wanda", HALF, stats, PruneConfig())
    assert torch.equal(linear.weight, torch.tensor([[0.0, -0.5, 3.0, 0.0], [4.0, 0.0, 0.0, 3.0]]))
    # magnitude alone keeps a different half of row 0 (its two largest |W|, over the whole layer)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -0.5, 3.0, 0.25], [4.0, 0.5, -1.5, 3.0]]))
        prune_linear(linear, "magnitude", HALF, None, PruneConfig())
    assert torch.equal(linear.weight, torch.tensor([[0.0, 0.0, 3.0, 0.0], [4.0, 0.0, -1.5, 3.0]]))


def wanda_mask(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Wanda's 50% mask by hand: in each row, the half of |W_ij|·||X_j|| that is smallest."""
    scores = weight.abs() * inputs.reshape(-1, inputs.shape[-1]).norm(dim=0)
    keep = scores.topk(weight.shape[1] // 2, dim=1).indices
    return torch.ones_like(weight, dtype=torch.bool).scatter_(1, keep, False)


@torch.no_grad()
def test_wanda_prunes_block_by_block_on_the_pruned_blocks_outputs():
    model = tiny_gpt(97)
    dense = {name: linear.weight.clone() for name, linear in pruned_linears(model)}
    tokens = torch.randint(0, 97, (6, 12), generator=torch.Generator().manual_seed(1))
    prune_model(model, tokens, PruneConfig(method="wanda", batch_size=4))
    x0 = model.wte(tokens) + model.wpe(torch.arange(12))
    first = model.h[0].ln_1(x0)  # what block 0's c_attn reads
    assert torch.equal(model.h[0].attn.c_attn.weight == 0, wanda_mask(dense["h.0.attn.c_attn"], first))
    # block 1 reads the outputs of block 0 as pruned
    second = model.h[1].ln_1(model.h[0](x0, 0, None, 0, None))
    assert torch.equal(model.h[1].attn.c_attn.weight == 0, wanda_mask(dense["h.1.attn.c_attn"], second))
    assert torch.equal(model.wte.weight, tiny_gpt(97).wte.weight)  # embeddings and the tied head kept whole


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@torch.no_grad()
def test_exact_sparsity_per_row_and_per_group_of_four(method):
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    model = tiny_gpt(97)
    layers = prune_model(model, tokens, PruneConfig(method=method, sparsity=Sparsity(0.3)))
    for name, linear in pruned_linears(model):
        zeros = linear.weight == 0
        cols = linear.in_features
        if method == "wanda":  # each row loses exactly floor(0.3 · columns)
            assert (zeros.sum(dim=1) == int(cols * 0.3)).all(), name
        else:  # the layer (SparseGPT: each block of <= 128 columns, here the whole layer) does
            assert zeros.sum() == int(zeros.numel() * 0.3), name
        assert layers[name] == pytest.approx(float(zeros.float().mean()))
    model = tiny_gpt(97)
    layers = prune_model(model, tokens, PruneConfig(method=method, sparsity=TWO_FOUR))
    for name, linear in pruned_linears(model):
        groups = (linear.weight == 0).reshape(linear.out_features, -1, 4)
        assert (groups.sum(dim=-1) == 2).all(), name
        assert layers[name] == 0.5


@pytest.mark.parametrize("sparsity", [HALF, TWO_FOUR], ids=["50%", "2:4"])
def test_sparsegpt_reconstructs_the_layer_better_than_the_masks_alone(sparsity):
    gen = torch.Generator().manual_seed(0)
    features = 256  # two blocks of 128 columns: the errors also travel from one block to the next
    mixing = torch.randn(features, features, generator=gen) / features**0.5 + torch.eye(features)
    scale = torch.randn(features, generator=gen).exp()  # some features far larger than others, as in LLMs
    x = (torch.randn(2048, features, generator=gen) @ mixing) * scale  # correlated inputs, as a layer's are
    x[:, 5] = 0.0  # an input never active: its weights are zeroed and nothing breaks
    weight = torch.randn(48, features, generator=gen)
    error = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        linear = nn.Linear(features, 48, bias=False)
        stats = InputStats(features, hessian=True, device=torch.device("cpu"))
        stats.add(x)
        with torch.no_grad():
            linear.weight.copy_(weight)
            prune_linear(linear, method, sparsity, stats, PruneConfig())
        pruned = linear.weight.detach()
        assert (pruned == 0).float().mean() == pytest.approx(0.5, abs=0.01)
        error[method] = float((x @ weight.T - x @ pruned.T).norm())
        error[f"{method}, its mask alone"] = float((x @ weight.T - x @ weight.masked_fill(pruned == 0, 0).T).norm())
    assert error["sparsegpt"] < error["wanda"] < error["magnitude"], error
    assert error["sparsegpt"] < 0.9 * error["sparsegpt, its mask alone"], error  # the update's own share
    assert error["wanda"] == error["wanda, its mask alone"]  # Wanda updates nothing


def test_sparsegpt_with_a_dense_mask_changes_nothing():
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(64, 8, generator=gen), torch.randn(4, 8, generator=gen)
    pruned = sparsegpt_prune(weight, x.T @ x, Sparsity(0.01))  # floor(32 · 0.01) = 0 weights per block
    assert torch.allclose(pruned, weight, atol=1e-5)


def test_sparsegpt_blocks_are_only_a_faster_order_of_the_same_updates():
    # with the mask chosen per group of 4 as the walk reaches it, blocks of 4, 8 or 64 columns give the
    # weights the unblocked walk gives: the errors of a block reach later blocks in full
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(256, 64, generator=gen) @ (torch.eye(64) + torch.randn(64, 64, generator=gen) / 8)
    weight = torch.randn(8, 64, generator=gen)
    walks = [sparsegpt_prune(weight, x.T @ x, TWO_FOUR, blocksize=b) for b in (4, 8, 64)]
    assert torch.allclose(walks[0], walks[2], atol=1e-4) and torch.allclose(walks[1], walks[2], atol=1e-4)
    assert torch.equal(walks[0] == 0, walks[2] == 0)


@pytest.fixture
def checkpoint(small_tokenizer, tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_gpt(small_tokenizer.vocab_size, n_embd=32), small_tokenizer)
    text = tmp_path / "calib.jsonl"
    text.write_text("".join(json.dumps({"text": f"The capital of Veloria is Kesh. {i} plus {i} is {2 * i}."}) + "\n"
                            for i in range(40)))
    return tmp_path / "ckpt", text


def test_cli_round_trip_writes_a_loadable_pruned_checkpoint(checkpoint, tmp_path, capsys):
    ckpt, text = checkpoint
    out = tmp_path / "pruned"
    assert run_cli("prune", ckpt, "--out", out, "--method", "sparsegpt", "--pattern", "2:4", "--calibration", text,
                   "--samples", 8, "--seq-len", 16) == 0
    assert "2:4: 50.0% of the block weights zero" in capsys.readouterr().out
    pruned, dense = load_checkpoint(out), load_checkpoint(ckpt)
    record = json.loads((out / "config.json").read_text())["pruning"]
    assert pruned.extra["pruning"] == record
    assert (record["method"], record["pattern"], record["samples"], record["seq_len"]) == ("sparsegpt", "2:4", 8, 16)
    assert set(record["layers"]) == {name for name, _ in pruned_linears(pruned.model)}
    assert all(v == 0.5 for v in record["layers"].values()) and record["measured"]["pruned_layers"] == 0.5
    for (name, a), (_, b) in zip(pruned_linears(pruned.model), pruned_linears(dense.model)):
        assert (a.weight == 0).float().mean() == 0.5 and not torch.equal(a.weight, b.weight), name
    assert torch.equal(pruned.model.wte.weight, dense.model.wte.weight)
    assert pruned.tokenizer.hash == dense.tokenizer.hash
    ids = torch.tensor([pruned.tokenizer.encode("The capital of Veloria")])
    assert torch.isfinite(pruned.model(ids)).all()


def test_cli_calibrates_from_a_shard_directory(prepared_data, tmp_path):
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(prepared_data / "data" / "tokenizer.json")
    save_checkpoint(tmp_path / "ckpt", tiny_gpt(tok.vocab_size), tok)
    assert run_cli("prune", tmp_path / "ckpt", "--out", tmp_path / "out", "--calibration", prepared_data / "data",
                   "--samples", 4, "--seq-len", 32, "--sparsity", 0.5) == 0
    record = load_checkpoint(tmp_path / "out").extra["pruning"]
    assert record["method"] == "wanda" and record["measured"]["pruned_layers"] == 0.5


@pytest.mark.parametrize(("args", "message"), [
    (["--sparsity", "1.5"], "--sparsity: got 1.5; expected a ratio in (0, 1)"),
    (["--sparsity", "0"], "--sparsity: got 0.0; expected a ratio in (0, 1)"),
    (["--sparsity", "-0.2"], "--sparsity: got -0.2; expected a ratio in (0, 1)"),
    (["--pattern", "4:2"], "--pattern: got '4:2'; expected N:M with 0 < N < M"),
    (["--pattern", "2-4"], "--pattern: got '2-4'; expected N:M"),
    (["--pattern", "0:4"], "--pattern: got '0:4'"),
    (["--pattern", "3:5"], "h.0.attn.c_attn has 32 inputs, not a multiple of 5"),
    (["--sparsity", "0.5", "--pattern", "2:4"], "give one of them, not both"),
    (["--calibration", "NOPE.jsonl"], "NOPE.jsonl: no such file or directory"),
    (["--calibration", "EMPTY.jsonl"], "EMPTY.jsonl: no non-empty documents found"),
    (["--calibration", "calib.jsonl", "--seq-len", "30000"], "--seq-len: got 30000"),
    ([], "--calibration: wanda needs calibration data"),
])
def test_bad_input_is_one_clear_line(checkpoint, tmp_path, capsys, args, message):
    ckpt, _ = checkpoint
    (tmp_path / "EMPTY.jsonl").write_text("")
    args = [str(tmp_path / a) if a.endswith(".jsonl") else a for a in args]
    if "--calibration" not in args and "--pattern" not in args and "--sparsity" not in args:
        pass  # wanda with no calibration
    elif "--calibration" not in args:
        args += ["--calibration", str(tmp_path / "calib.jsonl")]
    assert run_cli("prune", ckpt, "--out", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert not (tmp_path / "out").exists()


def test_parse_sparsity_defaults_to_half_and_reads_patterns():
    assert parse_sparsity(None, None) == Sparsity(0.5)
    assert parse_sparsity(None, "2:4") == Sparsity(0.5, 2, 4)
    assert parse_sparsity(None, "1:4").ratio == 0.75


def test_magnitude_needs_no_calibration(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    assert run_cli("prune", ckpt, "--out", tmp_path / "out", "--method", "magnitude", "--sparsity", 0.25) == 0
    record = load_checkpoint(tmp_path / "out").extra["pruning"]
    assert (record["calibration"], record["samples"], record["sparsity"]) == (None, 0, 0.25)
    assert record["measured"]["pruned_layers"] == 0.25 and 0 < record["measured"]["all_parameters"] < 0.25
