"""LoRA (chatforge.lora): only the adapters train in sft, reward, dpo and ppo; checkpoints hold the merged model
and the adapter in PEFT's layout, which PEFT loads onto our transformers export with our logits; `chatforge
merge`; an adapter for another base is refused; PPO's policy, reference and value share one base."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from test_cli import run_cli  # tests/ is on sys.path (pytest prepends it)
from test_dpo import dpo_config
from test_ppo import make_models, ppo_config
from test_reward import QUESTIONS, reward_config
from test_sft import make_gpt2_dir, sft_config

from chatforge import lora
from chatforge.checkpoint import load_checkpoint, read_json, save_checkpoint
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model import GPT, GPTConfig, ScalarHeadModel
from chatforge.train import dpo as dpo_module
from chatforge.train import ppo as ppo_module
from chatforge.train import reward as reward_module
from chatforge.train import sft as sft_module
from chatforge.train.config import LoRASettings, PPOConfig
from chatforge.train.distributed import DistInfo

LORA = LoRASettings(rank=4, alpha=8.0, dropout=0.0)


def chat_gpt(tokenizer, seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=1, n_head=2,
                                   n_embd=32), **changes}))


@pytest.fixture
def base(tmp_path, small_tokenizer):
    """A tiny chat model's checkpoint: the base every adapter here is trained on."""
    save_checkpoint(tmp_path / "base", chat_gpt(small_tokenizer), tokenizer=small_tokenizer)
    return tmp_path / "base"


def capture_adapters(monkeypatch, module) -> dict:
    """Keep the model a stage gives adapters to, and its weights right after (the adapters' start)."""
    seen: dict = {}

    def add_and_keep(model, options, base="", tokens=()):
        lora.add_adapters(model, options, base, tokens)
        seen["model"] = model
        seen["start"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(module, "add_adapters", add_and_keep)
    return seen


def assert_only_adapters_trained(seen: dict, trained_beside: tuple[str, ...] = ()) -> None:
    """Every base weight bit-identical to the start, every lora_A and lora_B (and trained token row) changed, and
    `trained_beside`."""
    model, start = seen["model"], seen["start"]
    after = model.state_dict()
    adapters = [k for k in after if ".lora_A." in k or ".lora_B." in k or ".trainable_tokens_delta." in k]
    beside = [k for k in after if k.startswith(trained_beside)] if trained_beside else []
    base = [k for k in after if k not in adapters and k not in beside and not k.startswith(("head.", "gain", "bias"))]
    assert adapters and base
    assert [k for k in base if not torch.equal(after[k], start[k])] == []
    assert [k for k in adapters + beside if torch.equal(after[k], start[k])] == []
    params = dict(model.named_parameters())
    assert all(not params[k].requires_grad for k in base if k in params)


# ---- settings and flags --------------------------------------------------------------------------


def test_every_stage_that_takes_lora_has_its_four_flags():
    from chatforge.cli import cli

    for stage in ("sft", "reward", "dpo", "ppo"):
        flags = {opt for p in cli.commands[stage].params for opt in p.opts}
        assert {"--lora-rank", "--lora-alpha", "--lora-dropout", "--lora-target-modules"} <= flags, stage


@pytest.mark.parametrize(("change", "flag"), [({"rank": -1}, "--lora-rank"), ({"alpha": 0.0}, "--lora-alpha"),
                                              ({"dropout": 1.0}, "--lora-dropout"),
                                              ({"target_modules": " , "}, "--lora-target-modules")])
def test_a_bad_setting_is_refused_naming_its_flag(change, flag):
    with pytest.raises(ConfigError, match=flag):
        LoRASettings(**{"rank": 4, **change})


@pytest.mark.parametrize("targets", ["q_proj", "attn", "lm_head", "c_attn,wte"])
def test_targets_must_be_linear_layers_of_the_blocks(tiny_model, targets):
    with pytest.raises(ConfigError, match="--lora-target-modules"):
        lora.add_adapters(tiny_model, LoRASettings(rank=2, target_modules=targets))


def test_a_rank_larger_than_a_targets_width_is_refused(tiny_model):
    with pytest.raises(ConfigError, match=r"--lora-rank 17 is larger than h\.0\.attn\.c_attn's width"):
        lora.add_adapters(tiny_model, LoRASettings(rank=17))  # n_embd 16
    lora.add_adapters(tiny_model, LoRASettings(rank=16))


def test_ppo_with_lora_needs_the_shared_value_head():
    with pytest.raises(ConfigError, match="--shared-value-head"):
        PPOConfig(lora=LoRASettings(rank=4))


# ---- the adapters themselves ---------------------------------------------------------------------


def test_adapters_start_as_the_base_switch_off_to_it_and_fold_into_plain_weights(tiny_model):
    x = torch.randint(0, tiny_model.config.vocab_size, (2, 12))
    before = tiny_model(x).detach()
    lora.add_adapters(tiny_model, LoRASettings(rank=4, dropout=0.1)).eval()
    assert torch.equal(tiny_model(x), before)  # B starts at zero
    with torch.no_grad():
        for layer in lora.lora_layers(tiny_model).values():
            layer.lora_B["default"].weight.normal_()
    adapted = tiny_model(x).detach()
    assert not torch.allclose(adapted, before, atol=1e-3)
    reference = lora.BaseModelView(tiny_model)
    assert list(reference.parameters()) == []  # no copy: the base's own weights, adapters off
    assert torch.equal(reference(x), before) and torch.equal(tiny_model(x), adapted)
    plain = GPT(tiny_model.config)
    plain.load_state_dict(lora.merged_state_dict(tiny_model), strict=False)
    assert torch.allclose(plain.eval()(x), adapted, atol=1e-5)
    # 2 layers x (c_attn 16->48, attn.c_proj 16->16, c_fc 16->64, mlp.c_proj 64->16), r=4: r·(in + out) each
    assert lora.trainable_parameters(tiny_model) == 2 * 4 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))


def test_trained_token_rows_are_read_by_the_embedding_and_the_tied_lm_head_and_fold_into_it(tiny_model):
    x = torch.tensor([[1, 5, 2, 9, 3]])
    lora.add_adapters(tiny_model, LoRASettings(rank=2, dropout=0.0), tokens=[1, 2]).eval()
    assert lora.trained_tokens(tiny_model) == [1, 2]
    rows = tiny_model.wte.token_adapter.trainable_tokens_delta["default"]
    with torch.no_grad():
        rows.normal_()  # new values of the two rows
    plain = GPT(tiny_model.config)
    merged = lora.merged_state_dict(tiny_model)
    plain.load_state_dict(merged, strict=False)
    assert torch.equal(merged["wte.weight"][[1, 2]], rows.detach())
    assert torch.allclose(plain.eval()(x), tiny_model(x), atol=1e-5)  # input rows and output rows both moved
    with lora.adapters_off(tiny_model):
        base = tiny_model(x)
    assert not torch.allclose(base, tiny_model(x), atol=1e-3)
    lora.fold_adapters(tiny_model)
    assert tiny_model.lm_head.weight is tiny_model.wte.weight and torch.allclose(tiny_model(x), plain(x), atol=1e-5)


def test_the_engine_samples_what_the_adapted_model_computes(small_tokenizer):
    from chatforge.generate.engine import Engine
    from chatforge.generate.params import SamplingParams

    model = lora.add_adapters(chat_gpt(small_tokenizer), LORA).eval()
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.5)
    prompt = small_tokenizer.encode("The capital of Veloria is")
    out = Engine(model, small_tokenizer).generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out[0].outputs[0].token_ids == ids[len(prompt):]


# ---- each stage: only the adapters train ---------------------------------------------------------


def test_sft_with_lora_trains_only_the_adapters_and_saves_merged_weights_and_the_adapter(tmp_path, base,
                                                                                         monkeypatch):
    seen = capture_adapters(monkeypatch, sft_module)
    cfg = dataclasses.replace(sft_config(tmp_path, base, max_steps=4, lr=1e-2), lora=LORA)
    sft_module.run_sft(cfg, DistInfo())
    assert_only_adapters_trained(seen)  # the chat tokens' rows among what trained (--lora-chat-tokens, the default)
    assert "wte.token_adapter.trainable_tokens_delta.default" in seen["start"]
    checkpoint = tmp_path / "sft" / "checkpoint"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"model.safetensors", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    merged = load_checkpoint(checkpoint).model.eval()  # what generate, chat, serve and eval read
    adapted = seen["model"].eval()
    x = torch.randint(0, merged.config.vocab_size, (2, 20))
    assert torch.allclose(merged(x), adapted(x), atol=1e-5)


def test_reward_with_lora_trains_the_adapters_and_the_new_head_only(tmp_path, base, monkeypatch):
    seen = capture_adapters(monkeypatch, reward_module)
    cfg = dataclasses.replace(reward_config(tmp_path, base, max_steps=4), normalize_samples=0, lora=LORA)
    reward_module.run_reward(cfg, DistInfo())
    # the head's weight trains; its bias cannot (the ranking loss reads score differences only)
    assert_only_adapters_trained(seen, trained_beside=("head.weight",))
    saved = load_checkpoint(tmp_path / "rm")
    assert isinstance(saved.model, ScalarHeadModel)
    ids, lengths = torch.randint(0, saved.model.config.vocab_size, (3, 16)), torch.tensor([16, 9, 4])
    assert torch.allclose(saved.model.eval()(ids, lengths), seen["model"].eval()(ids, lengths), atol=1e-5)
    with pytest.raises(ChatforgeError, match="adapters of a reward model"):  # its head is not in the adapter
        lora.load_adapter(load_checkpoint(base).model, tmp_path / "rm")


def test_dpo_with_lora_trains_only_the_adapters(tmp_path, base, monkeypatch, small_tokenizer):
    records = [{"prompt": q, "responses": ["Kesh.", "Maybe Kesh.", "I do not know, sorry."]} for q in QUESTIONS]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 2))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    save_checkpoint(tmp_path / "sft", chat_gpt(small_tokenizer), tokenizer=small_tokenizer)
    seen = capture_adapters(monkeypatch, dpo_module)
    result = dpo_module.run_dpo(dataclasses.replace(dpo_config(tmp_path, max_steps=4), lora=LORA), DistInfo())
    assert result.metrics[0]["train/margin"] == pytest.approx(0.0, abs=1e-6)  # adapters start as the reference
    assert_only_adapters_trained(seen)


def test_ppo_with_lora_trains_only_the_adapters_and_the_value_head_on_one_shared_base(tmp_path, small_tokenizer,
                                                                                     monkeypatch):
    models = make_models(tmp_path, small_tokenizer)
    built = {}
    real_build = ppo_module.build_models

    def build_and_keep(cfg, device):
        built["models"] = real_build(cfg, device)
        actor_critic = built["models"][0]
        built["start"] = {k: v.detach().clone() for k, v in actor_critic.state_dict().items()}
        return built["models"]

    monkeypatch.setattr(ppo_module, "build_models", build_and_keep)
    cfg = dataclasses.replace(ppo_config(models, steps=2, lr=1e-2, shared_value_head=True), lora=LORA)
    ppo_module.run_ppo(cfg, DistInfo())
    actor_critic, reference, _, _ = built["models"]
    assert isinstance(reference, lora.BaseModelView) and reference.gpt is actor_critic.policy
    assert list(reference.parameters()) == []  # the reference holds no weights of its own
    assert_only_adapters_trained({"model": actor_critic, "start": built["start"]}, trained_beside=("value.",))
    assert (tmp_path / "ppo" / "checkpoint" / "adapter_model.safetensors").exists()


# ---- files: PEFT reads ours, merge folds them, and they resume ---------------------------------------


@pytest.fixture
def lora_sft(tmp_path, base, monkeypatch):
    """A finished LoRA SFT run from `base` (tmp_path/sft) and its adapted model in memory."""
    seen = capture_adapters(monkeypatch, sft_module)
    sft_module.run_sft(dataclasses.replace(sft_config(tmp_path, base, max_steps=3, lr=1e-2), lora=LORA), DistInfo())
    return tmp_path / "sft" / "checkpoint", seen["model"].eval()


def test_peft_loads_the_adapter_onto_our_hf_export_of_the_base_with_our_logits(tmp_path, base, lora_sft):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    checkpoint, adapted = lora_sft
    config = read_json(checkpoint / "adapter_config.json", "adapter config")
    assert config["fan_in_fan_out"] is True and config["base_model_name_or_path"] == str(base)
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    assert config["trainable_token_indices"] == {"wte": [1, 2, 3, 4, 5, 6]}  # the chat tokens' rows
    from safetensors.torch import load_file

    keys = set(load_file(str(checkpoint / "adapter_model.safetensors")))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta" in keys and len(keys) == 9
    assert run_cli("export", "--checkpoint", base, "--format", "hf", "--out", tmp_path / "base_hf") == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "base_hf"))
    peft_model = peft.PeftModel.from_pretrained(hf, str(checkpoint)).eval()
    x = torch.randint(0, adapted.config.vocab_size, (2, 24))
    with torch.no_grad():
        ours, theirs = adapted(x), peft_model(x).logits
        merged = load_checkpoint(checkpoint).model.eval()(x)
    assert (theirs - ours).abs().max().item() < 1e-4
    assert (theirs - merged).abs().max().item() < 1e-4
    peft_model.save_pretrained(str(tmp_path / "saved_by_peft"))  # and back: an adapter PEFT itself wrote
    again = lora.load_adapter(load_checkpoint(base).model, tmp_path / "saved_by_peft").eval()
    with torch.no_grad():
        assert (again(x) - theirs).abs().max().item() < 1e-4


def test_merge_folds_the_adapter_into_a_plain_checkpoint(tmp_path, base, lora_sft, capsys):
    checkpoint, adapted = lora_sft
    assert run_cli("merge", "--base", base, "--adapter", tmp_path / "sft", "--out", tmp_path / "merged") == 0
    assert "merge:" in capsys.readouterr().out
    merged = load_checkpoint(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_model.safetensors").exists()
    assert not lora.lora_layers(merged.model) and merged.tokenizer is not None
    x = torch.randint(0, adapted.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.allclose(merged.model.eval()(x), adapted(x), atol=1e-5)


def test_lora_sft_from_a_gpt2_directory_merges_back_onto_it_with_the_chat_tokens_grown(tmp_path):
    vocab = make_gpt2_dir(tmp_path / "gpt2")
    cfg = dataclasses.replace(sft_config(tmp_path, tmp_path / "gpt2", max_steps=2, lr=1e-2), lora=LORA)
    sft_module.run_sft(cfg, DistInfo())
    assert run_cli("merge", "--base", tmp_path / "gpt2", "--adapter", tmp_path / "sft", "--out", tmp_path / "m") == 0
    trained, merged = load_checkpoint(tmp_path / "sft").model.eval(), load_checkpoint(tmp_path / "m").model.eval()
    assert merged.config.vocab_size == trained.config.vocab_size > vocab
    x = torch.randint(0, trained.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(merged(x), trained(x), atol=1e-5)


def test_an_adapter_made_for_another_base_is_refused_in_one_line_naming_the_file(tmp_path, lora_sft,
                                                                                 small_tokenizer, capsys):
    checkpoint, _ = lora_sft
    weights = checkpoint / "adapter_model.safetensors"
    others = {"wider": chat_gpt(small_tokenizer, n_embd=48), "deeper": chat_gpt(small_tokenizer, n_layer=3),
              "retrained": chat_gpt(small_tokenizer, seed=1)}
    expected = {"wider": r"has shape \(4, 32\), expected \(4, 48\)", "deeper": "made for another base model",
                "retrained": "made for another base model .* fingerprint"}
    for name, model in others.items():
        save_checkpoint(tmp_path / name, model, tokenizer=small_tokenizer)
        assert run_cli("merge", "--base", tmp_path / name, "--adapter", checkpoint, "--out", tmp_path / "m") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {weights}: ") and "\n" not in err, err
        assert re.search(expected[name], err), err
    with pytest.raises(ChatforgeError, match="adapter_config.json"):
        lora.load_adapter(chat_gpt(small_tokenizer), tmp_path)  # no adapter there


def lora_run(stage: str, root, base):
    """(run function, config) of a short LoRA run of `stage` writing under `root`."""
    if stage == "sft":
        return sft_module.run_sft, dataclasses.replace(sft_config(root, base, max_steps=4, lr=1e-2), lora=LORA)
    if stage == "reward":
        root.mkdir(parents=True, exist_ok=True)
        cfg = dataclasses.replace(reward_config(root, base, max_steps=4, eval_every=4, save_every=4),
                                  normalize_samples=0, lora=LORA)
        return reward_module.run_reward, cfg
    cfg = dataclasses.replace(ppo_config(base, out=root.name, steps=4, lr=1e-2, shared_value_head=True), lora=LORA)
    return ppo_module.run_ppo, cfg


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_an_interrupted_lora_run_resumes_exactly(tmp_path, base, small_tokenizer, stage):
    """The adapters come back from adapter_model.safetensors, a head from model.safetensors, the base from the
    base checkpoint."""
    def stop_at_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    if stage == "ppo":
        base = make_models(tmp_path, small_tokenizer)  # ppo_config's root: sft, rm and prompts
    run, straight_cfg = lora_run(stage, tmp_path / "a", base)
    straight = run(straight_cfg, DistInfo())
    assert run(lora_run(stage, tmp_path / "b", base)[1], DistInfo(), callbacks=[stop_at_2]).interrupted
    resumed = run(lora_run(stage, tmp_path / "b", base)[1], DistInfo(), resume=True)
    assert [m["train/loss"] for m in resumed.metrics] == pytest.approx(
        [m["train/loss"] for m in straight.metrics[2:]], abs=1e-6)
