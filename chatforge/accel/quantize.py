"""Weight-only int8 for inference: every weight matrix of the GPT in 8 bits, one fp32 scale per output channel.

Decode reads every weight once a token, so its speed is the weight stream's: int8 weights are a quarter
of fp32's bytes. Each matrix W (out, in) is stored as q = round(W / s) in int8 with s = absmax(row) / 127
per output row (symmetric, no zero point: LLM.int8's and torchao's `Int8WeightOnlyConfig`'s scheme), so
|W - q·s| <= s/2 in every entry. Quantized: the four linear layers of every block (c_attn, c_proj, c_fc,
c_proj) and the tied token embedding / LM head, stored once: the head's product runs on it (`Int8Linear`)
and the embedding lookup dequantizes the rows it reads (`Int8Embedding`, one row a token: nothing
measurable next to a decode step), so the model holds no fp32 copy of its largest matrix. Position
embeddings, LayerNorms and biases stay fp32 (a few hundred KB; llama.cpp's q8_0 keeps them so too).

Every int8 product goes through `chatforge.accel.int8.int8_linear`, so faster int8 kernels there make
these layers faster with no change here. A quantized model is for inference only: the engine runs it
(where the CPU kernels build, the fused decode step runs it on their int8 products), training refuses it
(`checkpoint.check_not_quantized`).

A quantized checkpoint is an ordinary checkpoint directory whose config.json carries
`"quantization": {"method": "int8_weight_only", "group": "per_channel", ...}` and whose model.safetensors
holds `<layer>.qweight` (int8), `<layer>.scale` (fp32) and the fp32 rest; `quantize_checkpoint` writes
one, `load_for_inference` reads one (or quantizes an fp32 checkpoint on load).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from chatforge.accel import kernels
from chatforge.accel.int8 import int8_linear
from chatforge.checkpoint import (
    CONFIG_FILE,
    GENERATION_FILE,
    QUANTIZATION_KEY,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    atomic_directory,
    default_generation_config,
    is_hf_gpt2_dir,
    load_checkpoint,
    load_model_config,
    load_tokenizer,
    quantization_of,
    read_json,
    resolve_checkpoint_dir,
    write_json,
)
from chatforge.errors import CheckpointError, ConfigError
from chatforge.model import GPT, GPTConfig, ScalarHeadModel

METHOD = "int8_weight_only"
DTYPES = ("int8",)  # what `quantize_model` makes; "none" on the command line leaves the weights as they are
QMAX = 127  # symmetric: -127..127 (never -128, so q and -q both exist)


def int8_marker() -> dict:
    """The `quantization` entry of a quantized checkpoint's config.json."""
    return {"method": METHOD, "bits": 8, "group": "per_channel", "symmetric": True}


@torch.no_grad()
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of an (out, in) matrix: scale = absmax(row) / 127 per output row, q = round(W / scale)
    in int8. A row of zeros gets scale 1 (its q are 0), so nothing divides by zero."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 matrix an int8 one stands for: q * scale per row."""
    return qweight.float() * scale.float()[:, None]


class Int8Linear(nn.Module):
    """y = x @ (qweight * scale).T + bias, through `accel.int8.int8_linear`: an nn.Linear's product with its
    weight in int8 (`qweight`, (out, in)) and one fp32 scale per output channel (`scale`, (out,)). Buffers, not
    parameters: nothing here trains."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """`linear` quantized (its bias kept in fp32)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.qweight, layer.scale = quantize_weight(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach()
        return layer

    @classmethod
    def tied_to(cls, embedding: Int8Embedding) -> Int8Linear:
        """The LM head tied to a quantized token embedding: the very same int8 rows and scales, no bias."""
        layer = cls(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
        layer.qweight, layer.scale = embedding.qweight, embedding.scale
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int8Embedding(nn.Module):
    """An nn.Embedding whose rows are int8 with one fp32 scale per row (the tied LM head's output channels):
    a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(num_embeddings, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, device="meta")
        layer.qweight, layer.scale = quantize_weight(embedding.weight)
        return layer

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.qweight[idx].to(self.scale.dtype) * self.scale[idx].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def quantize_model(model: GPT, dtype: str = "int8") -> GPT:
    """`model` with its blocks' linear layers and its tied embedding / LM head in int8, changed in place and
    returned; for inference only (its remaining fp32 parameters stop requiring gradients). Layers other
    than a plain nn.Linear (an adapter's, say) are left as they are: merge adapters first."""
    if dtype not in DTYPES:
        raise ConfigError(f"quantize: dtype {dtype!r} is not supported; expected one of {list(DTYPES)}")
    if type(model) is not GPT:
        raise ConfigError(f"quantize: expected a language model (chatforge's GPT), got a {type(model).__name__} "
                          "(a reward model's scalar head is not quantized)")
    if model_quantization(model) is not None:
        return model
    for module in list(model.h.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear.from_linear(child))
    tied = model.lm_head.weight is model.wte.weight
    wte = Int8Embedding.from_embedding(model.wte)
    model.lm_head = Int8Linear.tied_to(wte) if tied else Int8Linear.from_linear(model.lm_head)
    model.wte = wte
    return model.requires_grad_(False)


def model_quantization(model: nn.Module) -> dict | None:
    """The quantization marker of a model with int8 layers, else None."""
    return int8_marker() if any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules()) else None


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the model holds (parameters and buffers; a tied matrix once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ---- quantized checkpoints ------------------------------------------------------------------------


def quantized_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """What a quantized checkpoint stores: every buffer and parameter, contiguous on the CPU, the LM head
    left out when it is the token embedding's rows (the loader ties it again)."""
    tied = getattr(model.lm_head, "qweight", None) is getattr(model.wte, "qweight", None)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
            if not (tied and k.startswith("lm_head."))}


def quantize_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "int8") -> Path:
    """Write `checkpoint` (fp32, ours or a GPT-2 directory) quantized to `out`, a checkpoint directory that
    `load_for_inference` reads: config.json with its `quantization` marker (and the source's path),
    model.safetensors with int8 weights and fp32 scales, the tokenizer and generation config beside them."""
    if dtype not in DTYPES:
        raise ConfigError(f"quantize: dtype {dtype!r} is not supported; expected one of {list(DTYPES)}")
    src = resolve_checkpoint_dir(checkpoint)
    marker = quantization_of(src)
    if marker is not None:
        raise ConfigError(f"quantize: {src} is already quantized ({marker.get('method')}); expected an fp32 checkpoint")
    check_out_dir(Path(out), [src, Path(checkpoint)])
    hf = is_hf_gpt2_dir(src)
    ckpt = load_checkpoint(src, tokenizer=hf)
    model = quantize_model(ckpt.model, dtype)
    extra = {k: v for k, v in ckpt.extra.items() if k != "imported_from"}
    with atomic_directory(out) as tmp:
        write_json(tmp / CONFIG_FILE, {"format": "chatforge", "architecture": "gpt2", "model": model.config.to_dict(),
                                       **extra, QUANTIZATION_KEY: int8_marker() | {"source": str(src)}})
        save_file(quantized_state_dict(model), str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt", "quantization": METHOD})
        if hf:  # a GPT-2 directory's tokenizer files are not ours: write ours
            if ckpt.tokenizer is not None:
                ckpt.tokenizer.save(tmp / TOKENIZER_FILE)
            write_json(tmp / GENERATION_FILE, default_generation_config(ckpt.tokenizer))
        for name in () if hf else (TOKENIZER_FILE, GENERATION_FILE):
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
    return Path(out)


def check_out_dir(out: Path, sources: list[Path]) -> None:
    """Refuse an output directory whose replacement would delete the source (it is the source or holds it)
    or a directory that is not a checkpoint (its files would be replaced whole)."""
    where = out.resolve()
    if any(s.resolve() == where or s.resolve().is_relative_to(where) for s in sources):
        raise ConfigError(f"quantize: --out {out} is or holds the checkpoint being quantized; expected a new directory")
    if where.exists() and (not where.is_dir() or (any(where.iterdir()) and not (where / CONFIG_FILE).exists())):
        raise ConfigError(f"quantize: --out {out} exists and is not a checkpoint; expected a new directory "
                          "(or a checkpoint to replace)")


def quantized_skeleton(config: GPTConfig, tied: bool = True) -> GPT:
    """A quantized GPT of `config` with no storage (meta tensors): what a quantized checkpoint loads into."""
    with torch.device("meta"):
        model = GPT(config)
        if not tied:
            model.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        return quantize_model(model)


def check_quantized_state(model: GPT, state: dict[str, torch.Tensor], weights_file: Path) -> None:
    """Raise CheckpointError naming the file unless `state` has exactly the skeleton's tensors, each of its
    shape and dtype."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights_file}: weights do not match config.json's quantized model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{weights_file}: {key} is {got.dtype} {tuple(got.shape)}; config.json implies "
                                  f"{want.dtype} {tuple(want.shape)}")


def load_quantized(path: str | Path, device: str | torch.device = "cpu", tokenizer: bool = True) -> Checkpoint:
    """A quantized checkpoint directory (`quantize_checkpoint`'s) as a Checkpoint holding the quantized GPT."""
    path = resolve_checkpoint_dir(path)
    config, extra = load_model_config(path)
    marker = extra.get(QUANTIZATION_KEY)
    if not isinstance(marker, dict) or marker.get("method") != METHOD:
        raise CheckpointError(f"{path / CONFIG_FILE}: quantization {marker!r} is not one chatforge reads; "
                              f"expected method {METHOD!r}")
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise CheckpointError(f"{weights}: missing; expected the quantized weights (safetensors)")
    state = load_file(str(weights))
    tied = "lm_head.qweight" not in state
    model = quantized_skeleton(config, tied)
    if tied and "wte.qweight" in state and "wte.scale" in state:
        state["lm_head.qweight"], state["lm_head.scale"] = state["wte.qweight"], state["wte.scale"]
    check_quantized_state(model, state, weights)
    model.load_state_dict(state, assign=True)  # the tied head gets the embedding's very tensors
    model.requires_grad_(False).to(device)
    tok = load_tokenizer(path) if tokenizer else None
    gen_file = path / GENERATION_FILE
    gen = read_json(gen_file, "generation config") if gen_file.exists() else default_generation_config(tok)
    return Checkpoint(path=path, model=model.eval(), tokenizer=tok, generation_config=gen, extra=extra)


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", quantize: str | None = None) -> Checkpoint:
    """A checkpoint as the inference commands (generate, chat, eval, serve) load it: a quantized one as
    stored; an fp32 one as it is, or quantized on load when `quantize` names a dtype ("none": as it is).
    A reward model is returned unquantized for the caller to refuse by name."""
    if quantize not in (None, "none", *DTYPES):
        raise ConfigError(f"--quantize: {quantize!r} is not supported; expected one of {['none', *DTYPES]}")
    if quantization_of(path) is not None:
        ckpt = load_quantized(path, device=device)
    else:
        ckpt = load_checkpoint(path, device=device)
        if quantize in DTYPES and not isinstance(ckpt.model, ScalarHeadModel):
            quantize_model(ckpt.model.eval(), quantize)
    if model_quantization(ckpt.model) is not None and torch.device(device).type == "cpu":
        use_int8_kernels()
    return ckpt


def use_int8_kernels() -> None:
    """Build (once a machine, about 40 s) and use chatforge's CPU kernels, whose int8 products make an
    int8 model fast on every path, fused step or not; where they cannot build (or CHATFORGE_CPU_KERNELS=0)
    the reference computes the same products by dequantizing."""
    if kernels.unsupported_reason() is None and not kernels.active():
        kernels.load()
