"""Hugging Face GPT-2 interop, as pure conversion: configs, weight names and layouts, the tokenizer config
(with chatforge's chat template, so `apply_chat_template` and vLLM render what chatforge renders).

The architectures are the same; only names and one layout differ. transformers keeps GPT-2's
original `Conv1D` layers, whose weight is (in, out), the transpose of `nn.Linear`'s (out, in).
Reading and writing the directories is `chatforge.checkpoint`'s (`load_hf_gpt2`, `export_hf`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from chatforge.chat import CHAT_TEMPLATE, has_chat_tokens
from chatforge.errors import CheckpointError
from chatforge.model import GPTConfig

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_PREFIX = "transformer."
# transformers options that change the computation; we implement GPT-2's defaults only.
REQUIRED_HF_SETTINGS = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
}


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


def tokenizer_config(tokenizer: Any) -> dict:
    """tokenizer_config.json: GPT2TokenizerFast over our tokenizer.json, with <|endoftext|> as bos, eos and unk,
    and `chat_template` (chatforge.chat.CHAT_TEMPLATE) when the tokenizer has the chat special tokens."""
    eot = tokenizer.decode([tokenizer.eot_id])
    config = {
        "tokenizer_class": "GPT2TokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "model_max_length": 1_000_000_000,
        "add_prefix_space": False,
    }
    if has_chat_tokens(tokenizer):
        config["chat_template"] = CHAT_TEMPLATE
    return config
