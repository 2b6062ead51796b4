"""Reading and writing checkpoints.

A checkpoint is a directory:

    config.json              {"format": "chatforge", "model": GPTConfig fields, ...}; "head": "scalar"
                             marks a reward/value model (a GPT backbone with a scalar head);
                             "quantization" marks inference-only weights (`chatforge quantize`,
                             loaded by chatforge.accel.quantize; `load_checkpoint` refuses them)
    model.safetensors        the weights (tied LM head stored once, as wte.weight)
    tokenizer.json           the tokenizer (when one is given)
    generation_config.json   default decoding settings and stop token ids
    training_state.pt        optimizer, step and RNG state (only while training; tensors and
                             plain containers, loaded with weights_only=True)
    trainer_state.json       the step and the configs that produced it, human-readable

It is written whole into a temporary sibling and swapped in by renames, so a crash while
saving leaves the previous checkpoint intact. A Hugging Face GPT-2 directory is accepted
wherever a checkpoint is read, and `export_hf` writes one (chatforge.hf converts the names and
layouts both ways).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chatforge import hf
from chatforge.errors import CheckpointError, ConfigError
from chatforge.files import atomic_directory, read_json, write_json
from chatforge.model import GPT, GPTConfig, ScalarHeadModel

__all__ = ["atomic_directory", "read_json", "write_json"]  # re-exported: many modules take them from here

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation_config.json"
STATE_FILE = "training_state.pt"
TRAINER_FILE = "trainer_state.json"
CHECKPOINT_SUBDIR = "checkpoint"  # a stage's output dir keeps its latest checkpoint here
TIED_KEYS = ("lm_head.weight",)  # same tensor as wte.weight; stored once
QUANTIZATION_KEY = "quantization"  # config.json entry of a quantized (inference-only) checkpoint


@dataclass
class Checkpoint:
    path: Path
    model: GPT | ScalarHeadModel
    tokenizer: Any | None  # chatforge.tokenizer.Tokenizer
    generation_config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # config.json entries other than the model's


def model_state_dict(model: GPT | ScalarHeadModel) -> dict[str, torch.Tensor]:
    """Weights to store: contiguous CPU tensors, tied duplicates dropped (also under a backbone prefix). A model
    carrying LoRA adapters gives its plain weights with the adapters folded in (`chatforge.lora`)."""
    sd = model.state_dict()
    if any(".base_layer." in k for k in sd):
        from chatforge.lora import merged_state_dict

        sd = merged_state_dict(model)
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
    A model carrying LoRA adapters is saved merged, with its adapters beside it in PEFT's layout
    (adapter_config.json, adapter_model.safetensors: `chatforge.lora`).
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
        if carries_adapters(model):
            from chatforge.lora import write_adapter

            write_adapter(model, tmp)
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


def check_state(model: GPT | ScalarHeadModel, state: dict[str, torch.Tensor], weights_file: Path,
                what: str = "weights do not match config.json") -> None:
    """Raise CheckpointError naming the file unless `state` has exactly the model's weights, each of its shape."""
    expected = set(model_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{weights_file}: {what} (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, tensor in model.state_dict().items():
        if key in state and state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{weights_file}: {key} has shape {tuple(state[key].shape)}, config.json implies {tuple(tensor.shape)}"
            )


def carries_adapters(model: torch.nn.Module) -> bool:
    """Whether PEFT's LoRA layers sit in `model` (chatforge.lora.add_adapters put them there)."""
    return any(hasattr(m, "lora_A") and hasattr(m, "base_layer") for m in model.modules())


def load_state_into(model: GPT | ScalarHeadModel, weights_file: Path) -> None:
    """The checkpoint's weights into `model`; a model carrying adapters resumes them from the adapter files
    beside `weights_file` (`chatforge.lora.load_trained_state`)."""
    if not weights_file.exists():
        raise CheckpointError(f"{weights_file}: missing; expected the model weights (safetensors)")
    if carries_adapters(model):
        from chatforge.lora import load_trained_state

        load_trained_state(model, weights_file)
        return
    state = load_file(str(weights_file))
    check_state(model, state, weights_file)
    model.load_state_dict(state, strict=False)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", tokenizer: bool = True) -> Checkpoint:
    """Load a chatforge checkpoint or a Hugging Face GPT-2 directory."""
    path = resolve_checkpoint_dir(path)
    if is_hf_gpt2_dir(path):
        return load_hf_gpt2(path, device=device, tokenizer=tokenizer)
    config, extra = load_model_config(path)
    check_not_quantized(path, extra)
    model = ScalarHeadModel(GPT(config)) if extra.get("head") == "scalar" else GPT(config)
    load_state_into(model, path / WEIGHTS_FILE)
    model.to(device)
    tok = load_tokenizer(path) if tokenizer else None
    gen_file = path / GENERATION_FILE
    gen = read_json(gen_file, "generation config") if gen_file.exists() else default_generation_config(tok)
    return Checkpoint(path=path, model=model, tokenizer=tok, generation_config=gen, extra=extra)


def quantization_of(path: str | Path) -> dict | None:
    """The `quantization` entry of a checkpoint's config.json (a quantized checkpoint), else None."""
    path = resolve_checkpoint_dir(path)
    if is_hf_gpt2_dir(path):
        return None
    config = read_json(path / CONFIG_FILE, "model config")
    marker = config.get(QUANTIZATION_KEY) if isinstance(config, dict) else None
    return marker if isinstance(marker, dict) else None


def check_not_quantized(path: Path, extra: dict) -> None:
    """Refuse a quantized checkpoint where fp32 weights are needed (training: int8 weights cannot take
    gradient steps; export). Read from config.json's marker, so core needs nothing of accel; the
    inference commands load quantized checkpoints through chatforge.accel.quantize instead."""
    marker = extra.get(QUANTIZATION_KEY)
    if marker is None:
        return
    method = marker.get("method", "?") if isinstance(marker, dict) else marker
    source = marker.get("source") if isinstance(marker, dict) else None
    raise CheckpointError(
        f"{path}: a quantized checkpoint ({method}): training needs fp32 weights; pass the fp32 checkpoint it "
        f"was quantized from{f' ({source})' if source else ''} (quantized checkpoints are for generate, chat, "
        "eval and serve)")


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


# ---- Hugging Face GPT-2 directories ----------------------------------------------------------------


def is_hf_gpt2_dir(path: Path) -> bool:
    try:
        return read_json(Path(path) / CONFIG_FILE, "model config").get("model_type") == "gpt2"
    except CheckpointError:
        return False


def load_hf_gpt2(path: str | Path, device: str | torch.device = "cpu", tokenizer: bool = True) -> Checkpoint:
    """Load a transformers GPT-2 directory (config.json + model.safetensors) as our GPT. Only safetensors
    weights are read: a pickled `pytorch_model.bin` could run code when loaded."""
    path = Path(path)
    config = hf.config_from_hf(read_json(path / CONFIG_FILE, "GPT-2 config"), path / CONFIG_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        hint = " (pytorch_model.bin is not read because unpickling can run code; re-save with safetensors)"
        raise CheckpointError(f"{weights}: missing; expected GPT-2 weights in safetensors format" + (
            hint if (path / "pytorch_model.bin").exists() else ""))
    state = hf.state_from_hf(load_file(str(weights)))
    model = GPT(config)
    check_state(model, state, weights, "not GPT-2 weights")
    model.load_state_dict(state, strict=False)
    model.to(device)
    tok = None
    if tokenizer:
        from chatforge.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained_dir(path)
    gen = read_json(path / GENERATION_FILE, "generation config") if (path / GENERATION_FILE).exists() else {}
    return Checkpoint(path=path, model=model, tokenizer=tok, generation_config=gen, extra={"imported_from": "hf"})


def export_hf(model: GPT, tokenizer: Any | None, out_dir: str | Path) -> Path:
    """Write a directory that `transformers.GPT2LMHeadModel.from_pretrained` loads; its tokenizer_config.json
    carries the chat template (`hf.tokenizer_config`), so `apply_chat_template` and vLLM render our ids."""
    eot = tokenizer.eot_id if tokenizer is not None else None
    with atomic_directory(out_dir) as tmp:
        write_json(tmp / CONFIG_FILE, hf.config_to_hf(model.config, eot))
        save_file(hf.state_to_hf(model_state_dict(model)), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / GENERATION_FILE, {"bos_token_id": eot, "eos_token_id": eot})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
            write_json(tmp / "tokenizer_config.json", hf.tokenizer_config(tokenizer))
    return Path(out_dir)


def export_checkpoint_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    ckpt = load_checkpoint(checkpoint_dir)
    if isinstance(ckpt.model, ScalarHeadModel):  # GPT2LMHeadModel has no place for a scalar head
        raise ConfigError(f"export: {checkpoint_dir} is a reward model (a scalar head); expected a language model")
    return export_hf(ckpt.model, ckpt.tokenizer, out_dir)
