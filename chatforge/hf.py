"""Hugging Face GPT-2 interop: read a `GPT2LMHeadModel` directory, write one.

The architectures are the same; only names and one layout differ. transformers keeps GPT-2's
original `Conv1D` layers, whose weight is (in, out), the transpose of `nn.Linear`'s (out, in).
Only safetensors weights are read: a pickled `pytorch_model.bin` could run code when loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chatforge.checkpoint import (
    CONFIG_FILE,
    GENERATION_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    atomic_directory,
    load_checkpoint,
    model_state_dict,
    read_json,
    write_json,
)
from chatforge.errors import CheckpointError, ConfigError
from chatforge.model import GPT, GPTConfig

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_PREFIX = "transformer."
# transformers options that change the computation; we implement GPT-2's defaults only.
REQUIRED_HF_SETTINGS = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
}


def is_hf_gpt2_dir(path: Path) -> bool:
    try:
        return read_json(Path(path) / CONFIG_FILE, "model config").get("model_type") == "gpt2"
    except CheckpointError:
        return False


def config_from_hf(hf: dict, where: Path) -> GPTConfig:
    for key, allowed in REQUIRED_HF_SETTINGS.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"{where}: {key}={hf[key]!r} is not supported; expected one of {list(allowed)}")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise CheckpointError(f"{where}: n_inner={hf['n_inner']} is not supported; expected 4 * n_embd")
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        context_length=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        dropout=0.0,  # inference default; fine-tuning stages set their own
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def config_to_hf(config: GPTConfig, eot_id: int | None) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
    }


def state_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers of old transformers; the tied head
        name = key.removeprefix(HF_PREFIX)
        out[name] = tensor.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else tensor
    return out


def state_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        HF_PREFIX + k: (v.t().contiguous() if k.endswith(CONV1D_SUFFIXES) else v) for k, v in state.items()
    }


def load_hf_gpt2(path: str | Path, device: str | torch.device = "cpu", tokenizer: bool = True) -> Checkpoint:
    """Load a transformers GPT-2 directory (config.json + model.safetensors) as our GPT."""
    path = Path(path)
    config = config_from_hf(read_json(path / CONFIG_FILE, "GPT-2 config"), path / CONFIG_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        hint = " (pytorch_model.bin is not read because unpickling can run code; re-save with safetensors)"
        raise CheckpointError(f"{weights}: missing; expected GPT-2 weights in safetensors format" + (
            hint if (path / "pytorch_model.bin").exists() else ""))
    state = state_from_hf(load_file(str(weights)))
    model = GPT(config)
    expected = set(model_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: not GPT-2 weights (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.load_state_dict(state, strict=False)
    model.to(device)
    tok = None
    if tokenizer:
        from chatforge.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained_dir(path)
    gen = read_json(path / GENERATION_FILE, "generation config") if (path / GENERATION_FILE).exists() else {}
    return Checkpoint(path=path, model=model, tokenizer=tok, generation_config=gen, extra={"imported_from": "hf"})


def export_hf(model: GPT, tokenizer: Any | None, out_dir: str | Path) -> Path:
    """Write a directory that `transformers.GPT2LMHeadModel.from_pretrained` loads."""
    eot = tokenizer.eot_id if tokenizer is not None else None
    with atomic_directory(out_dir) as tmp:
        write_json(tmp / CONFIG_FILE, config_to_hf(model.config, eot))
        save_file(state_to_hf(model_state_dict(model)), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / GENERATION_FILE, {"bos_token_id": eot, "eos_token_id": eot})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
            write_json(tmp / "tokenizer_config.json", hf_tokenizer_config(tokenizer))
    return Path(out_dir)


def hf_tokenizer_config(tokenizer: Any) -> dict:
    eot = tokenizer.decode([tokenizer.eot_id])
    return {
        "tokenizer_class": "GPT2TokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "model_max_length": 1_000_000_000,
        "add_prefix_space": False,
    }


def export_checkpoint_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    from chatforge.model import ScalarHeadModel

    ckpt = load_checkpoint(checkpoint_dir)
    if isinstance(ckpt.model, ScalarHeadModel):  # GPT2LMHeadModel has no place for a scalar head
        raise ConfigError(f"export: {checkpoint_dir} is a reward model (a scalar head); expected a language model")
    return export_hf(ckpt.model, ckpt.tokenizer, out_dir)
