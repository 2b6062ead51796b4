"""Reading and writing checkpoints.

A checkpoint is a directory:

    config.json              {"format": "chatforge", "model": GPTConfig fields, ...}; "head": "scalar"
                             marks a reward/value model (a GPT backbone with a scalar head)
    model.safetensors        the weights (tied LM head stored once, as wte.weight)
    tokenizer.json           the tokenizer (when one is given)
    generation_config.json   default decoding settings and stop token ids
    training_state.pt        optimizer, step and RNG state (only while training; tensors and
                             plain containers, loaded with weights_only=True)
    trainer_state.json       the step and the configs that produced it, human-readable

It is written whole into a temporary sibling and swapped in by renames, so a crash while
saving leaves the previous checkpoint intact. A Hugging Face GPT-2 directory is accepted
wherever a checkpoint is read (see chatforge.hf).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chatforge.errors import CheckpointError
from chatforge.files import atomic_write_text, ordinary_permissions, strict_json
from chatforge.model import GPT, GPTConfig, ScalarHeadModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation_config.json"
STATE_FILE = "training_state.pt"
TRAINER_FILE = "trainer_state.json"
CHECKPOINT_SUBDIR = "checkpoint"  # a stage's output dir keeps its latest checkpoint here
TIED_KEYS = ("lm_head.weight",)  # same tensor as wte.weight; stored once


@dataclass
class Checkpoint:
    path: Path
    model: GPT | ScalarHeadModel
    tokenizer: Any | None  # chatforge.tokenizer.Tokenizer
    generation_config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # config.json entries other than the model's


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so readers never see half a file."""
    atomic_write_text(path, strict_json(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; expected the {what}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected the {what}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object holding the {what}")
    return obj


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` as a whole.

    The old directory is renamed aside before the new one takes its name and removed only
    after, so at every instant one complete copy exists (`resolve_checkpoint_dir` falls back
    to the aside copy if a crash hits between the two renames).
    """
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ordinary_permissions(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def model_state_dict(model: GPT | ScalarHeadModel) -> dict[str, torch.Tensor]:
    """Weights to store: contiguous CPU tensors, tied duplicates dropped (also under a backbone prefix)."""
    sd = model.state_dict()
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()
            if k.rpartition("backbone.")[2] not in TIED_KEYS}


def save_checkpoint(
    path: str | Path,
    model: GPT | ScalarHeadModel,
    tokenizer: Any | None = None,
    *,
    generation_config: dict | None = None,
    training_state: dict | None = None,
    trainer_state: dict | None = None,
    extra_config: dict | None = None,
    extra_weights: dict[str, torch.nn.Module] | None = None,
) -> Path:
    """Write a complete checkpoint directory atomically; returns its path.

    extra_weights: more models saved beside the main one, as NAME.safetensors (PPO's value model).
    """
    path = Path(path)
    with atomic_directory(path) as tmp:
        config = {"format": "chatforge", "architecture": "gpt2", "model": model.config.to_dict()}
        if isinstance(model, ScalarHeadModel):
            config["head"] = "scalar"
        config.update(extra_config or {})
        write_json(tmp / CONFIG_FILE, config)
        save_file(model_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for name, module in (extra_weights or {}).items():
            save_file(model_state_dict(module), str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
        write_json(tmp / GENERATION_FILE, generation_config or default_generation_config(tokenizer))
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
        if trainer_state is not None:
            write_json(tmp / TRAINER_FILE, trainer_state)
    return path


def default_generation_config(tokenizer: Any | None) -> dict:
    if tokenizer is None:
        return {}
    specials = tokenizer.special_ids
    stops = [specials[k] for k in ("eot", "end_turn") if k in specials]
    return {"eos_token_id": tokenizer.eot_id, "stop_token_ids": stops, "temperature": 1.0, "max_new_tokens": 128}


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory or a stage directory that holds one in `checkpoint/`."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINT_SUBDIR):
        if (candidate / CONFIG_FILE).exists():
            return candidate
        aside = candidate.with_name(f".{candidate.name}.old")  # crash between the two renames
        if not candidate.exists() and (aside / CONFIG_FILE).exists():
            return aside
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    raise CheckpointError(
        f"{path}: not a checkpoint; expected {CONFIG_FILE} and {WEIGHTS_FILE} "
        f"(a chatforge checkpoint or a Hugging Face GPT-2 directory)"
    )


def load_model_config(path: Path) -> tuple[GPTConfig, dict]:
    config = read_json(path / CONFIG_FILE, "model config")
    if config.get("format") != "chatforge" or "model" not in config:
        raise CheckpointError(f"{path / CONFIG_FILE}: expected a chatforge config with a 'model' entry")
    extra = {k: v for k, v in config.items() if k not in ("format", "architecture", "model")}
    return GPTConfig.from_dict(config["model"]), extra


def load_state_into(model: GPT | ScalarHeadModel, weights_file: Path) -> None:
    if not weights_file.exists():
        raise CheckpointError(f"{weights_file}: missing; expected the model weights (safetensors)")
    state = load_file(str(weights_file))
    expected = set(model_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_file}: weights do not match config.json (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for key, tensor in model.state_dict().items():
        if key in state and state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{weights_file}: {key} has shape {tuple(state[key].shape)}, config.json implies {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=False)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", tokenizer: bool = True) -> Checkpoint:
    """Load a chatforge checkpoint or a Hugging Face GPT-2 directory."""
    from chatforge import hf  # hf imports this module for writing

    path = resolve_checkpoint_dir(path)
    if hf.is_hf_gpt2_dir(path):
        return hf.load_hf_gpt2(path, device=device, tokenizer=tokenizer)
    config, extra = load_model_config(path)
    model = ScalarHeadModel(GPT(config)) if extra.get("head") == "scalar" else GPT(config)
    load_state_into(model, path / WEIGHTS_FILE)
    model.to(device)
    tok = load_tokenizer(path) if tokenizer else None
    gen_file = path / GENERATION_FILE
    gen = read_json(gen_file, "generation config") if gen_file.exists() else default_generation_config(tok)
    return Checkpoint(path=path, model=model, tokenizer=tok, generation_config=gen, extra=extra)


def load_tokenizer(path: str | Path) -> Any:
    from chatforge.tokenizer import Tokenizer

    file = Path(path) / TOKENIZER_FILE
    if not file.exists():
        raise CheckpointError(f"{file}: missing; expected the tokenizer saved with the checkpoint")
    return Tokenizer.from_file(file)


def load_training_state(path: str | Path) -> dict:
    """Optimizer, step and RNG state; loads tensors and containers only (no arbitrary unpickling)."""
    file = Path(path) / STATE_FILE
    if not file.exists():
        raise CheckpointError(f"{file}: missing; expected the training state of a resumable checkpoint")
    return torch.load(file, map_location="cpu", weights_only=True)
