"""Supervised fine-tuning: assistant-only loss, exact packing, deterministic batches, the stage end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

from chatforge.chat import ChatTemplate, Conversation, Message
from chatforge.checkpoint import load_checkpoint, read_json, save_checkpoint
from chatforge.data.chat_batches import collate, conversation_loss, encode_example, forward_logits, labels_from, pack
from chatforge.errors import ConfigError
from chatforge.model import GPT, IGNORE_INDEX, GPTConfig, lm_loss
from chatforge.train.config import SFTConfig, TrainConfig
from chatforge.train.distributed import DistInfo
from chatforge.train.sft import SupervisedChat, run_sft


def conv(*turns):
    return Conversation([Message(r, c) for r, c in turns])


CONVERSATIONS = [
    conv(("system", "Be brief."), ("user", "What is the capital of Veloria?"), ("assistant", "Kesh.")),
    conv(("user", "What is 3 plus 4?"), ("assistant", "Seven."), ("user", "And 5 plus 5?"), ("assistant", "Ten.")),
    conv(("user", "Reverse the word dog."), ("assistant", "god")),
    conv(("user", "How do I pick a lock?"), ("assistant", "Sorry, I can't help with that.")),
]


@pytest.fixture(scope="module")
def template(small_tokenizer):
    return ChatTemplate(small_tokenizer)


@pytest.fixture
def chat_model(small_tokenizer):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=128, n_layer=2, n_head=2, n_embd=32))


def test_labels_are_the_next_token_only_where_the_assistant_speaks(template, small_tokenizer):
    r = template.render(CONVERSATIONS[0])
    e = encode_example(template, CONVERSATIONS[0], seq_len=64)
    assert e.input_ids == r.ids[:-1]
    trained = [label for label in e.labels if label != IGNORE_INDEX]
    assert trained == small_tokenizer.encode("Kesh.") + [small_tokenizer.special_ids["end_turn"]]


def test_changing_a_user_or_system_token_label_cannot_change_the_loss(template, chat_model):
    r = template.render(CONVERSATIONS[1])
    x = torch.tensor([r.ids[:-1]])
    logits = chat_model(x)
    loss = lm_loss(logits, torch.tensor([labels_from(r.ids, r.mask)]), reduction="sum")
    for j in range(1, len(r.ids)):
        changed = list(r.ids)
        changed[j] = (changed[j] + 1) % chat_model.config.vocab_size
        other = lm_loss(logits, torch.tensor([labels_from(changed, r.mask)]), reduction="sum")
        if r.mask[j]:
            assert other != loss, f"assistant token {j} must count"
        else:
            assert other == loss, f"token {j} is not the assistant's and must not count"


def test_no_gradient_reaches_positions_that_predict_user_or_system_tokens(template, chat_model):
    e = encode_example(template, CONVERSATIONS[1], seq_len=64)
    logits = chat_model(torch.tensor([e.input_ids])).detach().requires_grad_()
    lm_loss(logits, torch.tensor([e.labels]), reduction="sum").backward()
    per_position = logits.grad[0].abs().sum(-1)
    untrained = torch.tensor(e.labels) == IGNORE_INDEX
    assert (per_position[untrained] == 0).all() and (per_position[~untrained] > 0).all()


def test_the_loss_is_the_mean_cross_entropy_of_assistant_tokens_by_hand(template, chat_model):
    e = encode_example(template, CONVERSATIONS[0], seq_len=64)
    logits = chat_model(torch.tensor([e.input_ids]))[0]
    picked = [(i, t) for i, t in enumerate(e.labels) if t != IGNORE_INDEX]
    by_hand = -sum(F.log_softmax(logits[i], -1)[t] for i, t in picked) / len(picked)
    assert torch.allclose(lm_loss(logits[None], torch.tensor([e.labels])), by_hand, atol=1e-6)


def test_a_packed_row_computes_exactly_what_each_example_computes_alone(template, chat_model):
    examples = [encode_example(template, c, seq_len=64) for c in CONVERSATIONS[:3]]
    packed = collate([examples], pad_id=0, width=128, packed=True)
    logits = forward_logits(chat_model, packed)[0]
    at = 0
    for e in examples:
        alone = chat_model(torch.tensor([e.input_ids]))[0]
        n = len(e.input_ids)
        torch.testing.assert_close(logits[at : at + n], alone, atol=1e-5, rtol=1e-5)
        at += n


def test_no_token_attends_across_examples_in_a_packed_row(template, chat_model):
    a, b = (encode_example(template, c, seq_len=64) for c in CONVERSATIONS[:2])
    a2 = type(a)([(t + 1) % 50 + 7 for t in a.input_ids], a.labels)  # other tokens, same length
    first = forward_logits(chat_model, collate([[a, b]], 0, width=128))[0, len(a.input_ids) :]
    second = forward_logits(chat_model, collate([[a2, b]], 0, width=128))[0, len(a.input_ids) :]
    torch.testing.assert_close(first, second)


def test_packed_and_padded_batches_give_the_same_loss(template, chat_model):
    examples = [encode_example(template, c, seq_len=64) for c in CONVERSATIONS]
    padded = collate([[e] for e in examples], 0, packed=False)
    packed = collate([examples[:2], examples[2:]], 0, width=128, packed=True)
    loss_padded = lm_loss(forward_logits(chat_model, padded), padded["labels"], reduction="sum")
    loss_packed = lm_loss(forward_logits(chat_model, packed), packed["labels"], reduction="sum")
    torch.testing.assert_close(loss_padded, loss_packed, atol=1e-4, rtol=1e-5)


def test_packing_fills_rows_in_order_without_splitting_an_example():
    rows = pack([3, 0, 1, 2], lengths=[10, 20, 30, 25], seq_len=50)
    assert rows == [[3, 0], [1, 2]]  # 25 + 10, then 20 + 30 fills the second row exactly
    assert pack([2, 1, 0], lengths=[10, 45, 30], seq_len=50) == [[2], [1], [0]]
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3]


@pytest.mark.parametrize("packing", [True, False])
def test_batches_are_a_function_of_the_step_and_every_epoch_covers_every_example(template, packing):
    examples = [encode_example(template, c, seq_len=64) for c in CONVERSATIONS * 5]
    a = SupervisedChat(examples, examples[:2], batch_size=3, seq_len=64, pad_id=0, seed=1, packing=packing)
    b = SupervisedChat(examples, examples[:2], batch_size=3, seq_len=64, pad_id=0, seed=1, packing=packing)
    for step in (5, 0, 3):  # any order: no hidden iterator state
        assert all(torch.equal(a.batch(step)[k], b.batch(step)[k]) for k in a.batch(step))
    epoch = [i for row in a._epoch_rows(0) for i in row]
    assert sorted(epoch) == list(range(len(examples)))


def test_a_conversation_longer_than_the_context_is_cut_and_one_with_no_assistant_token_left_is_dropped(template):
    long = conv(("user", "word " * 100), ("assistant", "Yes."))
    assert encode_example(template, long, seq_len=16) is None
    r = template.render(CONVERSATIONS[1])
    cut = r.turn_starts[1] + 2  # into the first answer
    kept = encode_example(template, CONVERSATIONS[1], seq_len=cut)
    assert kept.input_ids == r.ids[:cut] and len(kept.labels) == cut


# ---- the stage end to end -----------------------------------------------------------------------


def write_jsonl(path, convs):
    path.write_text("".join(json.dumps({"messages": c.to_openai()}) + "\n" for c in convs))
    return str(path)


def sft_config(tmp_path, init_from, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", CONVERSATIONS * 4)
    val = write_jsonl(tmp_path / "val.jsonl", CONVERSATIONS[:2])
    settings = dict(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=12, save_every=12,
                    log_every=1, progress=False)
    settings.update(train)
    return SFTConfig(data=[data], val=[val], init_from=str(init_from), out=str(tmp_path / "sft"),
                     train=TrainConfig(**settings))


@pytest.fixture
def pretrained(tmp_path, chat_model, small_tokenizer):
    save_checkpoint(tmp_path / "base", chat_model, tokenizer=small_tokenizer)
    return tmp_path / "base"


def test_sft_lowers_the_held_out_loss_and_changes_every_weight(tmp_path, pretrained):
    before = load_checkpoint(pretrained).model.state_dict()
    result = run_sft(sft_config(tmp_path, pretrained), DistInfo())
    val = [m["val/loss"] for m in result.metrics if "val/loss" in m]
    first_eval = [m for m in result.metrics if "val/loss" in m][0]
    assert val[-1] == first_eval["val/loss"]  # one eval at the end
    ckpt = load_checkpoint(tmp_path / "sft")
    after = ckpt.model.state_dict()
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    assert read_json(ckpt.path / "config.json", "config")["stage"] == "sft"

    t = ChatTemplate(ckpt.tokenizer)
    held_out = [encode_example(t, c, 64) for c in CONVERSATIONS[:2]]
    base_loss = conversation_loss(load_checkpoint(pretrained).model, held_out, 0)["loss"]
    assert val[-1] < base_loss - 0.5


def test_an_interrupted_sft_run_resumes_exactly(tmp_path, pretrained):
    def stop_at_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    straight = run_sft(sft_config(tmp_path / "a", pretrained, max_steps=6), DistInfo())
    first = run_sft(sft_config(tmp_path / "b", pretrained, max_steps=6), DistInfo(), callbacks=[stop_at_3])
    assert first.interrupted and first.step == 3
    resumed = run_sft(sft_config(tmp_path / "b", pretrained, max_steps=6), DistInfo(), resume=True)
    loss = [m["train/loss"] for m in straight.metrics if "train/loss" in m]
    tail = [m["train/loss"] for m in resumed.metrics if "train/loss" in m]
    assert tail == pytest.approx(loss[3:], abs=1e-6)


def test_sft_needs_a_starting_checkpoint_and_data(tmp_path):
    with pytest.raises(ConfigError, match="--init-from"):
        run_sft(SFTConfig(data=["x.jsonl"]), DistInfo())
    with pytest.raises(ConfigError, match="--data"):
        run_sft(SFTConfig(init_from="somewhere"), DistInfo())


def make_gpt2_dir(hf_dir) -> int:
    """A tiny transformers GPT-2 directory as GPT-2 ships (vocab.json + merges.txt, no chat tokens); its vocab size."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [" ".join(m.content for m in c.messages) for c in CONVERSATIONS] * 10
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_dir.mkdir()
    bpe.model.save(str(hf_dir))  # vocab.json + merges.txt, as GPT-2 ships them
    vocab = bpe.get_vocab_size()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir)
    return vocab


def test_sft_starts_from_an_imported_gpt2_and_grows_its_vocabulary_for_the_chat_tokens(tmp_path):
    hf_dir = tmp_path / "gpt2"
    vocab = make_gpt2_dir(hf_dir)
    result = run_sft(sft_config(tmp_path, hf_dir, max_steps=2), DistInfo())
    assert result.step == 2
    ckpt = load_checkpoint(tmp_path / "sft")
    assert ckpt.model.config.vocab_size == ckpt.tokenizer.vocab_size > vocab
    assert ckpt.model.lm_head.weight is ckpt.model.wte.weight


# ---- replay: pretraining windows beside the conversations ------------------------------------------------


@pytest.fixture
def replayed(prepared_data, tmp_path):
    """A tiny model on the prepared corpus's tokenizer, saved, and that corpus's token shards."""
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(prepared_data / "data" / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=128, n_layer=2, n_head=2, n_embd=32))
    save_checkpoint(tmp_path / "base", model, tokenizer=tok)
    return model, tok, prepared_data / "data", tmp_path / "base"


def test_replay_adds_the_summed_lm_loss_of_pretraining_windows_weighted_by_its_coefficient(replayed):
    from chatforge.data.shards import TokenDataset
    from chatforge.train.sft import Replay

    model, tok, data, _ = replayed
    examples = [encode_example(ChatTemplate(tok), c, 64) for c in CONVERSATIONS]
    replay = Replay(TokenDataset(data, "train", expected_tokenizer_hash=tok.hash), coef=0.5, length=16)
    objective = SupervisedChat(examples, examples[:1], batch_size=2, seq_len=64, pad_id=tok.eot_id, seed=3,
                               replay=replay)
    batch = objective.batch(0)
    assert batch["replay_x"].shape == batch["replay_y"].shape == (2, 16)
    assert torch.equal(batch["replay_y"][:, :-1], batch["replay_x"][:, 1:])  # windows of the text, shifted by one
    assert torch.equal(objective.batch(0)["replay_x"], batch["replay_x"])  # a function of the step
    assert not torch.equal(objective.batch(1)["replay_x"], batch["replay_x"])
    loss, extra = objective.loss(model, batch)
    chat = F.cross_entropy(forward_logits(model, batch).flatten(0, 1), batch["labels"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    text = F.cross_entropy(model(batch["replay_x"]).flatten(0, 1), batch["replay_y"].flatten(), reduction="sum")
    assert torch.allclose(loss, chat + 0.5 * text, atol=1e-4)
    assert extra["replay_loss"] / objective.weight(batch) == pytest.approx(text.item() / 32, rel=1e-5)


def test_sft_with_replay_trains_every_weight_and_logs_the_replayed_text_loss(tmp_path, replayed):
    _, _, data, base = replayed
    plain = sft_config(tmp_path / "plain", base, max_steps=4)
    cfg = sft_config(tmp_path / "replay", base, max_steps=4)
    cfg.replay_data, cfg.replay_coef, cfg.replay_len = str(data), 1.0, 32
    before = load_checkpoint(base).model.state_dict()
    result = run_sft(cfg, DistInfo())
    after = load_checkpoint(tmp_path / "replay" / "sft").model.state_dict()
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    replay_losses = [m["train/replay_loss"] for m in result.metrics if "train/replay_loss" in m]
    assert len(replay_losses) == 4 and all(0 < x < 10 for x in replay_losses)
    # the same conversations in the same order: only the replayed text makes the runs differ
    without = run_sft(plain, DistInfo())
    assert "train/replay_loss" not in without.metrics[0]
    assert [m["train/loss"] for m in result.metrics if "train/loss" in m][0] > without.metrics[0]["train/loss"]


def test_replay_needs_its_shards_and_shards_of_the_models_own_tokenizer(tmp_path, pretrained, prepared_data):
    from chatforge.errors import DataError

    with pytest.raises(ConfigError, match="--replay-data"):
        SFTConfig(replay_coef=1.0)
    with pytest.raises(ConfigError, match="replay_coef"):
        SFTConfig(replay_data="data", replay_coef=-1.0)
    cfg = sft_config(tmp_path, pretrained)  # the small tokenizer's model, the prepared corpus's shards
    cfg.replay_data, cfg.replay_coef = str(prepared_data / "data"), 1.0
    with pytest.raises(DataError, match="different tokenizer"):
        run_sft(cfg, DistInfo())
