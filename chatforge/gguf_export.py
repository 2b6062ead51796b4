"""GGUF export: the GPT and its tokenizer as one file that llama.cpp (and the tools built on it) runs.

The layout is the one llama.cpp's `convert_hf_to_gguf.py` writes for a transformers GPT-2
(architecture "gpt2"): HF's Conv1D weights are transposed there to (out, in), which is already how
our nn.Linear stores them, so every tensor is written as it is in memory. The tied LM head is
written as its own `output` tensor (a copy of `token_embd`), as that converter does.

The tokenizer is written as a "gpt2" BPE vocabulary: tokens in id order (byte-level strings, as in
vocab.json), their merges, and token types (chat special tokens are CONTROL, so llama.cpp never
produces them from plain text). Ids the tokenizer does not use (a model vocabulary padded past the
tokenizer's) become `[PAD{id}]` tokens of type UNUSED. A tokenizer with the chat special tokens also
writes `tokenizer.chat_template` (chatforge.chat.CHAT_TEMPLATE, the Jinja twin of our template).

`dtype="q8_0"` writes llama.cpp's 8-bit blocks (`gguf.quants.quantize`: 32 values of a row share one f16
scale) for the tensors llama.cpp's `convert_hf_to_gguf.py` quantizes: every 2-D weight but the position
embedding (the token embedding and the output head included); norms, biases and positions stay f32, as
there. A row whose length is not a multiple of 32 cannot be cut into blocks: the converter falls back to
f16 for it, this export names the tensor and stops.

The `gguf` package is imported only when exporting (`pip install chatforge[gguf]`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge.chat import CHAT_TEMPLATE, has_chat_tokens
from chatforge.checkpoint import load_checkpoint
from chatforge.errors import CheckpointError, ConfigError
from chatforge.files import temp_file_beside
from chatforge.model import GPT, ScalarHeadModel
from chatforge.tokenizer import SPECIAL_TOKENS

DTYPES = ("f32", "f16", "q8_0")
Q8_0_KEEPS_F32 = ("position_embd.weight",)  # 2-D, yet f32 in llama.cpp's q8_0 files
GGUF_PRE_TOKENIZER = "gpt-2"  # our ByteLevel pre-tokenizer splits with GPT-2's regex


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            "GGUF export needs the `gguf` package; install it with `pip install 'chatforge[gguf]'` "
            "(or `pip install gguf`)"
        ) from None
    return gguf


def tensor_names(n_layer: int) -> dict[str, str]:
    """Our state-dict name -> GGUF tensor name (from gguf's GPT-2 table, not hand-typed)."""
    gguf = _gguf()
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    arch_tensors = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GPT2])
    plain = {"wte": T.TOKEN_EMBD, "wpe": T.POS_EMBD, "ln_f": T.OUTPUT_NORM}
    per_block = {
        "ln_1": T.ATTN_NORM, "attn.c_attn": T.ATTN_QKV, "attn.c_proj": T.ATTN_OUT,
        "ln_2": T.FFN_NORM, "mlp.c_fc": T.FFN_UP, "mlp.c_proj": T.FFN_DOWN,
    }
    assert set(plain.values()) | set(per_block.values()) | {T.OUTPUT} <= arch_tensors
    out = {}
    for ours, kind in plain.items():
        for suffix in ("weight", "bias"):
            out[f"{ours}.{suffix}"] = f"{names[kind]}.{suffix}"
    for i in range(n_layer):
        for ours, kind in per_block.items():
            for suffix in ("weight", "bias"):
                out[f"h.{i}.{ours}.{suffix}"] = f"{names[kind].format(bid=i)}.{suffix}"
    out["lm_head.weight"] = f"{names[T.OUTPUT]}.weight"
    return out


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> tensor (float32, CPU), in our own (out, in) layout; `output` is the tied head."""
    names = tensor_names(model.config.n_layer)
    state = model.state_dict()  # keeps lm_head.weight, the tied copy of wte.weight
    return {names[k]: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items() if k in names}


def tokenizer_vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, GGUF token types, merges "a b") for a model of `vocab_size` ids."""
    gguf = _gguf()
    TT = gguf.TokenType
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model only {vocab_size}; expected a model "
            "vocabulary at least as large as the tokenizer's"
        )
    backend = tokenizer.backend
    added = backend.get_added_tokens_decoder()  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        token = backend.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(TT.CONTROL if added[i].special or token in SPECIAL_TOKENS.values() else TT.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TT.NORMAL)
    merges = json.loads(backend.to_str())["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # newer tokenizers: [a, b] pairs
    return tokens, [int(t) for t in types], merges


def _check_out_path(out: Path) -> None:
    if out.suffix.lower() != ".gguf":
        raise ConfigError(f"{out}: expected an output file name ending in .gguf")
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; expected a .gguf file path")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out}: cannot create the directory {parent} ({e.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{out}: the directory {parent} is not writable")


def tensor_type(name: str, array: np.ndarray, dtype: str) -> Any:
    """The GGML type `name` is written in for `dtype`: 1-D tensors (norms, biases) always f32; f16 turns every
    2-D weight to f16; q8_0 every 2-D weight but the position embedding (llama.cpp's converter's rule)."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if array.ndim < 2 or dtype == "f32":
        return Q.F32
    if dtype == "f16":
        return Q.F16
    return Q.F32 if name in Q8_0_KEEPS_F32 else Q.Q8_0


def check_q8_0_rows(tensors: dict[str, torch.Tensor]) -> None:
    """Raise ConfigError naming the first tensor q8_0 cannot store: its rows must split into blocks of 32."""
    gguf = _gguf()
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    for name, tensor in tensors.items():
        width = tensor.shape[-1]
        if tensor_type(name, tensor.numpy(), "q8_0") == gguf.GGMLQuantizationType.Q8_0 and width % block:
            raise ConfigError(f"GGUF q8_0: {name} has rows of {width} values; q8_0 stores blocks of {block} along a "
                              f"row, so the width must be a multiple of {block} (export f16 or f32 instead)")


def export_gguf(
    model: GPT | ScalarHeadModel, tokenizer: Any, out: str | Path, *, dtype: str = "f32", name: str | None = None
) -> Path:
    """Write `model` and `tokenizer` to the GGUF file `out` (f32; f16 or q8_0 for 2-D weights); returns it.

    The file is written beside `out` and renamed into place, so a failure never leaves half a file.
    """
    out = Path(out)
    if isinstance(model, ScalarHeadModel) or not isinstance(model, GPT):
        raise CheckpointError(
            "GGUF export: this checkpoint is a reward/value model (a GPT with a scalar head); "
            "expected a language model (after `chatforge pretrain`, `sft`, `ppo` or `dpo`)"
        )
    if tokenizer is None:
        raise CheckpointError("GGUF export: the checkpoint has no tokenizer.json; expected one beside the weights")
    if dtype not in DTYPES:
        raise ConfigError(f"GGUF export: dtype {dtype!r} is not supported; expected one of {list(DTYPES)}")
    _check_out_path(out)
    tensors = gguf_tensors(model)
    if dtype == "q8_0":
        check_q8_0_rows(tensors)
    gguf = _gguf()
    fd, tmp = temp_file_beside(out)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        _add_metadata(writer, model, tokenizer, dtype, name or out.stem)
        for tname, tensor in tensors.items():
            array = tensor.numpy()
            kind = tensor_type(tname, array, dtype)
            if kind == gguf.GGMLQuantizationType.Q8_0:
                writer.add_tensor(tname, gguf.quants.quantize(array, kind), raw_dtype=kind)
            else:
                writer.add_tensor(tname, array.astype(np.float16) if kind == gguf.GGMLQuantizationType.F16 else array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _add_metadata(writer: Any, model: GPT, tokenizer: Any, dtype: str, name: str) -> None:
    """The GPT-2 hyperparameters, the file type and the tokenizer (vocabulary, merges, special ids, template)."""
    gguf = _gguf()
    c = model.config
    tokens, types, merges = tokenizer_vocab(tokenizer, c.vocab_size)
    writer.add_name(name)
    writer.add_block_count(c.n_layer)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.n_embd)
    writer.add_feed_forward_length(4 * c.n_embd)
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(c.layer_norm_eps)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[dtype])

    specials = tokenizer.special_ids
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(GGUF_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eot_id)  # GPT-2: <|endoftext|> is both
    writer.add_eos_token_id(tokenizer.eot_id)
    if "end_turn" in specials:
        writer.add_eot_token_id(specials["end_turn"])  # <|end|> closes a chat turn
    writer.add_add_bos_token(False)  # our prompts start with the first turn's token, not eot
    if has_chat_tokens(tokenizer):
        writer.add_chat_template(CHAT_TEMPLATE)


def export_checkpoint_gguf(checkpoint_dir: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    _check_out_path(Path(out))  # fail before loading a large checkpoint
    ckpt = load_checkpoint(checkpoint_dir)
    return export_gguf(ckpt.model, ckpt.tokenizer, out, dtype=dtype, name=Path(ckpt.path).name)
