"""Checkpoint directories: what they hold, how they load, and how they fail."""

import json

import pytest
import torch

from chatforge.checkpoint import load_checkpoint, load_training_state, save_checkpoint
from chatforge.errors import CheckpointError


def test_save_and_load_round_trips_weights_tokenizer_and_config(tmp_path, tiny_model, small_tokenizer):
    save_checkpoint(tmp_path / "ck", tiny_model, small_tokenizer, training_state={"step": 3})
    files = {p.name for p in (tmp_path / "ck").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "training_state.pt"} <= files
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.model.config == tiny_model.config
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    assert loaded.model.lm_head.weight.data_ptr() == loaded.model.wte.weight.data_ptr()  # still tied
    assert loaded.tokenizer.hash == small_tokenizer.hash
    assert loaded.generation_config["eos_token_id"] == small_tokenizer.eot_id
    assert load_training_state(tmp_path / "ck")["step"] == 3


def test_a_stage_directory_resolves_to_its_checkpoint(tmp_path, tiny_model):
    save_checkpoint(tmp_path / "pretrain" / "checkpoint", tiny_model)
    assert load_checkpoint(tmp_path / "pretrain", tokenizer=False).path == tmp_path / "pretrain" / "checkpoint"


def test_no_temporary_directory_is_left_behind(tmp_path, tiny_model):
    save_checkpoint(tmp_path / "ck", tiny_model)
    save_checkpoint(tmp_path / "ck", tiny_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_crash_between_the_two_renames_still_finds_the_old_copy(tmp_path, tiny_model):
    save_checkpoint(tmp_path / "ck", tiny_model)
    (tmp_path / "ck").rename(tmp_path / ".ck.old")  # the state right after the first rename
    assert load_checkpoint(tmp_path / "ck", tokenizer=False).model.config == tiny_model.config


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON"),
        (lambda d: None, None),  # saved without training state: not resumable
    ],
)
def test_a_damaged_checkpoint_names_the_missing_or_broken_file(tmp_path, tiny_model, small_tokenizer, damage,
                                                                message):
    save_checkpoint(tmp_path / "ck", tiny_model, small_tokenizer)
    damage(tmp_path / "ck")
    if message is None:
        with pytest.raises(CheckpointError, match="training_state.pt: missing"):
            load_training_state(tmp_path / "ck")
    else:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / "ck")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path, tiny_model):
    save_checkpoint(tmp_path / "ck", tiny_model)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["model"]["n_embd"] = 32
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(tmp_path / "ck", tokenizer=False)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_training_state_loads_without_unpickling_objects(tmp_path, tiny_model):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    save_checkpoint(tmp_path / "ck", tiny_model, training_state={"obj": Evil()})
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_training_state(tmp_path / "ck")
