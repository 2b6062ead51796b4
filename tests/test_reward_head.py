"""The scalar-head model (reward and value) and the ranking loss, checked by hand."""

import itertools
import math

import torch

from chatforge.model import GPT, ScalarHeadModel, ranking_loss


def test_a_4_way_ranking_loss_is_the_mean_of_its_6_pairwise_losses():
    r = torch.tensor([2.0, 0.5, 0.7, -1.0])  # best first
    pairs = list(itertools.combinations(range(4), 2))
    assert len(pairs) == 6
    by_hand = sum(-math.log(1 / (1 + math.exp(-(r[i] - r[j]).item()))) for i, j in pairs) / 6
    assert abs(ranking_loss(r, [4]).item() - by_hand) < 1e-6


def test_groups_of_different_sizes_each_count_once():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0, -2.0])
    assert torch.allclose(ranking_loss(torch.cat([a, b]), [2, 3]), ranking_loss(a, [2]) + ranking_loss(b, [3]))
    assert torch.allclose(ranking_loss(a, [2]), -torch.nn.functional.logsigmoid(torch.tensor(1.0)))


def test_the_score_is_read_at_each_rows_last_real_token_whatever_the_padding(tiny_model):
    model = ScalarHeadModel(tiny_model).eval()
    x = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    lengths = torch.tensor([3, 5])
    scores = model.score(x, lengths)
    alone = model.score(torch.tensor([[5, 6, 7]]), torch.tensor([3]))
    assert torch.allclose(scores[0], alone[0], atol=1e-6)
    assert torch.allclose(scores[1], model.values(x)[1, 4])


def test_gain_and_bias_rescale_the_score(tiny_model):
    model = ScalarHeadModel(tiny_model).eval()
    x, n = torch.tensor([[1, 2, 3]]), torch.tensor([3])
    raw = model.score(x, n)
    model.gain.fill_(2.0)
    model.bias.fill_(-1.0)
    assert torch.allclose(model.score(x, n), 2 * raw - 1)


def test_the_ranking_loss_trains_the_head_and_the_backbone(tiny_model):
    model = ScalarHeadModel(tiny_model)
    x = torch.randint(0, 97, (4, 6))
    loss = ranking_loss(model.score(x, torch.full((4,), 6)), [4])
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    # a pairwise loss sees only differences of scores, so a shift of all of them (the head's bias) gets no gradient
    assert grads.pop("head.bias").abs().max() < 1e-6
    frozen = [name for name, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert frozen == []
    assert model.backbone is tiny_model and isinstance(model.backbone, GPT)


def test_a_scalar_head_model_saves_and_loads_with_its_normalization(tiny_model, tmp_path, small_tokenizer):
    from chatforge.checkpoint import load_checkpoint, read_json, save_checkpoint

    model = ScalarHeadModel(tiny_model).eval()
    model.gain.fill_(0.5)
    model.bias.fill_(0.25)
    save_checkpoint(tmp_path / "rm", model, tokenizer=small_tokenizer)
    assert read_json(tmp_path / "rm" / "config.json", "config")["head"] == "scalar"
    loaded = load_checkpoint(tmp_path / "rm").model.eval()
    assert isinstance(loaded, ScalarHeadModel)
    x, n = torch.tensor([[1, 2, 3, 4]]), torch.tensor([4])
    assert torch.equal(loaded.score(x, n), model.score(x, n))
    assert loaded.backbone.lm_head.weight is loaded.backbone.wte.weight
    save_checkpoint(tmp_path / "lm", tiny_model)
    assert type(load_checkpoint(tmp_path / "lm", tokenizer=False).model) is GPT
