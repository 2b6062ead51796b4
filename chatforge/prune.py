"""Pruning: zero half of a trained GPT's weights with little loss, from a few hundred calibration sequences.

Three methods, each for the four linear layers of every block (``attn.c_attn``, ``attn.c_proj``,
``mlp.c_fc``, ``mlp.c_proj``); the token and position embeddings and the (tied) LM head are kept
whole, as in both papers:

- **magnitude** — the baseline: the smallest ``|W_ij|`` of each layer (the whole matrix is one
  comparison group, as in Wanda's reference), no calibration data.
- **wanda** (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs") — importance
  ``|W_ij| · ||X_j||₂``, the weight times the norm of its input feature over the calibration tokens,
  compared within each output row: every row loses the same share. No weight is updated.
- **sparsegpt** (Frantar & Alistarh 2023) — the mask and a compensating update of the weights left,
  row-wise Optimal Brain Surgeon over ``H = XᵀX`` (plus 1% of its mean diagonal as damping): the
  upper Cholesky factor ``U`` of ``H⁻¹`` is walked column by column in blocks of 128; in each block
  the mask takes the smallest ``w² / U_jj²`` (the adaptive mask: chosen with the weights already
  updated by the columns before), each pruned column's error ``(w - q) / U_jj`` is spread over the
  columns after it along ``U``'s row, and a block's errors reach the later blocks in one product.

Why the order: both methods with calibration run block by block, as their reference code does. The
calibration sequences go through the blocks already pruned, so block *b* is pruned for the inputs it
will really see; inside a block every layer's statistics come from one pass of the block before any
of its layers is pruned.

A sparsity is a ratio in (0, 1) (unstructured; SparseGPT compares within each block of 128 columns of
a layer) or an N:M pattern: of every M consecutive input weights of a row, N are kept (2:4 is what
sparse tensor cores run). The output is an ordinary fp32 checkpoint with zeros in place, loadable
everywhere; its config.json's ``"pruning"`` entry records the method, the asked sparsity, the
calibration and the sparsity measured in each layer. Zeros in dense storage make nothing faster:
`benchmarks/prune_quality.py` measures that, and torch's CSR product, instead of assuming it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from chatforge.checkpoint import load_checkpoint, resolve_checkpoint_dir, save_checkpoint
from chatforge.data.readers import iter_documents
from chatforge.data.shards import META_NAME, TokenDataset
from chatforge.errors import ConfigError, DataError
from chatforge.model import GPT, ScalarHeadModel

METHODS = ("wanda", "sparsegpt", "magnitude")
PRUNED_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # per block; names as in model.py
CALIBRATED = ("wanda", "sparsegpt")


# ---- what to prune -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sparsity:
    """The share of each comparison group zeroed (unstructured), or N kept of every M consecutive inputs."""

    ratio: float  # zeroed share; an N:M pattern zeroes 1 - N/M
    n: int = 0  # N:M pattern: weights kept per group (0: unstructured)
    m: int = 0  # N:M pattern: group size

    @property
    def structured(self) -> bool:
        return self.m > 0

    def describe(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.ratio:.0%} unstructured"


def parse_sparsity(sparsity: float | None, pattern: str | None) -> Sparsity:
    """`--sparsity` or `--pattern` as a Sparsity (0.5 unstructured when neither); a one-line ConfigError
    for a ratio outside (0, 1), a malformed pattern, or both given."""
    if sparsity is not None and pattern:
        raise ConfigError(f"--sparsity {sparsity} and --pattern {pattern}: give one of them, not both")
    if pattern:
        n, sep, m = pattern.partition(":")
        if not (sep and n.strip().isdigit() and m.strip().isdigit()) or not 0 < int(n) < int(m):
            raise ConfigError(f"--pattern: got {pattern!r}; expected N:M with 0 < N < M, N weights kept "
                              "of every M consecutive inputs (e.g. 2:4)")
        return Sparsity(1 - int(n) / int(m), int(n), int(m))
    ratio = 0.5 if sparsity is None else float(sparsity)
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"--sparsity: got {sparsity}; expected a ratio in (0, 1), the share of weights "
                          "zeroed (e.g. 0.5)")
    return Sparsity(ratio)


@dataclass
class PruneConfig:
    """How to prune: the method, the sparsity, the calibration's size and SparseGPT's settings."""

    method: str = "wanda"  # one of METHODS
    sparsity: Sparsity = field(default_factory=lambda: Sparsity(0.5))
    samples: int = 128  # calibration sequences (both papers use 128)
    seq_len: int = 0  # tokens per calibration sequence; 0: the model's context length
    seed: int = 0  # which calibration windows are drawn
    blocksize: int = 128  # SparseGPT: columns per block (the lazy batch update)
    damp: float = 0.01  # SparseGPT: dampening, a share of H's mean diagonal
    batch_size: int = 16  # calibration sequences per forward pass

    def check(self, model: GPT) -> None:
        """ConfigError for a method, size or pattern the model cannot take."""
        if self.method not in METHODS:
            raise ConfigError(f"--method: got {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.samples < 1 or self.batch_size < 1 or self.blocksize < 1:
            raise ConfigError("--samples, batch size and block size must be positive, got "
                              f"{self.samples}, {self.batch_size} and {self.blocksize}")
        if not 0 <= self.seq_len <= model.config.context_length:
            raise ConfigError(f"--seq-len: got {self.seq_len}; expected 1 to the model's context length "
                              f"{model.config.context_length} (0: the context length)")
        m = self.sparsity.m
        for name, linear in pruned_linears(model):
            if m and linear.in_features % m:
                raise ConfigError(f"--pattern {self.sparsity.describe()}: {name} has {linear.in_features} inputs, "
                                  f"not a multiple of {m}")


def pruned_linears(model: GPT) -> Iterator[tuple[str, nn.Linear]]:
    """(name, layer) of every linear layer pruning touches, block by block ("h.0.attn.c_attn", ...)."""
    for i, block in enumerate(model.h):
        for suffix in PRUNED_LAYERS:
            yield f"h.{i}.{suffix}", block.get_submodule(suffix)


# ---- masks and scores ----------------------------------------------------------------------------------


def smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` smallest entries along the last dimension (ties: the lower index)."""
    order = scores.argsort(dim=-1, stable=True)[..., :count]
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, order, True)


def prune_mask(scores: torch.Tensor, sparsity: Sparsity, per_row: bool = True) -> torch.Tensor:
    """True where a (rows, columns) layer's weight is zeroed: the least important M - N of every M
    consecutive columns of a row (N:M), else the `ratio` least important of each row (`per_row`) or of
    the whole matrix. Counts are floor(size · ratio), so every group loses exactly as many."""
    rows, cols = scores.shape
    if sparsity.structured:
        m = sparsity.m
        return smallest(scores.reshape(rows, cols // m, m), m - sparsity.n).reshape(rows, cols)
    if per_row:
        return smallest(scores, int(cols * sparsity.ratio))
    return smallest(scores.reshape(1, -1), int(scores.numel() * sparsity.ratio)).reshape(rows, cols)


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |W_ij| · ||X_j||₂: input_sq_norms[j] is the sum of squares of input feature j
    over every calibration token (a weight matters as much as the signal it multiplies)."""
    return weight.abs() * input_sq_norms.sqrt()[None, :]


class InputStats:
    """What one linear layer's calibration inputs tell the pruning: each input feature's sum of squares
    (Wanda) and, for SparseGPT, XᵀX over the tokens (the layer-wise Hessian, up to a factor)."""

    def __init__(self, features: int, hessian: bool, device: torch.device) -> None:
        self.sq_norms = torch.zeros(features, device=device)
        self.xtx = torch.zeros(features, features, device=device) if hessian else None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq_norms += (x * x).sum(dim=0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]


# ---- SparseGPT -----------------------------------------------------------------------------------------


def inverse_hessian_factor(xtx: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): the upper Cholesky factor of (H + λI)⁻¹, H = XᵀX, λ = damp · mean(diag H), and the
    inputs never active (diag 0; their weights are zeroed, they cannot matter). In float64: the
    factorization of a near-singular H is where float32 loses SparseGPT's accuracy."""
    h = xtx.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float(), dead


def sparsegpt_prune(weight: torch.Tensor, xtx: torch.Tensor, sparsity: Sparsity, blocksize: int = 128,
                    damp: float = 0.01) -> torch.Tensor:
    """The pruned weight (rows, columns): SparseGPT's mask and update for a layer whose inputs gave XᵀX.

    Column j's pruned weights q = 0 leave an error e = (w - q) / U_jj per row; the columns after j take
    -e · U[j, j:] (the OBS update for the Hessian of what is still free), within a block at once and
    to later blocks as one product of the block's errors. The mask of a block is chosen when the block
    is reached (weights already updated): the smallest w² / U_jj², of the whole block (unstructured)
    or of each row's group of M (N:M, chosen as column j reaches the group's first column)."""
    w = weight.detach().float().clone()
    u, dead = inverse_hessian_factor(xtx.to(w.device), damp)
    w[:, dead] = 0
    cols = w.shape[1]
    if sparsity.structured:
        blocksize = max(sparsity.m, blocksize // sparsity.m * sparsity.m)  # groups never straddle blocks
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        errors = _sparsegpt_block(w, u, start, end, sparsity)
        w[:, end:] -= errors @ u[start:end, end:]
    return w.to(weight.dtype)


def _sparsegpt_block(w: torch.Tensor, u: torch.Tensor, start: int, end: int, sparsity: Sparsity) -> torch.Tensor:
    """Prune columns start..end of `w` in place (mask and update within the block); returns their errors."""
    block, ub = w[:, start:end], u[start:end, start:end]
    diag = ub.diagonal()
    errors = torch.zeros_like(block)
    mask = None if sparsity.structured else prune_mask(block**2 / diag**2, sparsity, per_row=False)
    if mask is None:
        mask = torch.zeros_like(block, dtype=torch.bool)
    for j in range(end - start):
        if sparsity.structured and j % sparsity.m == 0:
            group = slice(j, j + sparsity.m)
            mask[:, group] = smallest(block[:, group] ** 2 / diag[group] ** 2, sparsity.m - sparsity.n)
        col = block[:, j]
        kept = col.masked_fill(mask[:, j], 0.0)
        err = (col - kept) / diag[j]
        block[:, j:] -= err[:, None] * ub[j, j:][None, :]
        block[:, j] = kept  # what the update leaves there up to rounding, with the zeros exact
        errors[:, j] = err
    return errors


# ---- the model, block by block ---------------------------------------------------------------------------


def prune_linear(linear: nn.Linear, method: str, sparsity: Sparsity, stats: InputStats | None,
                 cfg: PruneConfig) -> None:
    """Prune one layer in place by `method` (stats: its calibration inputs; None for magnitude)."""
    weight = linear.weight
    if method == "magnitude":
        weight[prune_mask(weight.abs(), sparsity, per_row=False)] = 0.0
    elif method == "wanda":
        weight[prune_mask(wanda_scores(weight, stats.sq_norms), sparsity)] = 0.0
    else:
        weight.copy_(sparsegpt_prune(weight, stats.xtx, sparsity, cfg.blocksize, cfg.damp))


def _run_block(model: GPT, index: int, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Block `index`'s outputs for inputs x (sequences, T, C), batch_size sequences at a time."""
    block = model.h[index]
    return torch.cat([block(x[i:i + batch_size], index, None, 0, None) for i in range(0, len(x), batch_size)])


def _block_stats(model: GPT, index: int, x: torch.Tensor, cfg: PruneConfig) -> dict[str, InputStats]:
    """Each pruned layer's input statistics from one pass of block `index` (unpruned) over x."""
    block = model.h[index]
    stats, hooks = {}, []
    for suffix in PRUNED_LAYERS:
        linear = block.get_submodule(suffix)
        stats[suffix] = InputStats(linear.in_features, cfg.method == "sparsegpt", x.device)
        hooks.append(linear.register_forward_pre_hook(lambda _m, args, s=stats[suffix]: s.add(args[0])))
    try:
        for i in range(0, len(x), cfg.batch_size):
            block(x[i:i + cfg.batch_size], index, None, 0, None)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


@torch.no_grad()
def prune_model(model: GPT, calibration: torch.Tensor | None, cfg: PruneConfig,
                progress: bool = False) -> dict[str, float]:
    """Prune `model` in place by `cfg` (calibration: (sequences, T) token ids, unused by magnitude);
    returns the share of zeros measured in each pruned layer. Blocks go in order, each pruned for the
    inputs the blocks pruned before it give (see the module's docstring)."""
    cfg.check(model)
    model.eval()
    if cfg.method == "magnitude":
        for _, linear in pruned_linears(model):
            prune_linear(linear, cfg.method, cfg.sparsity, None, cfg)
        return measured_sparsity(model)
    if calibration is None:
        raise ConfigError(f"--calibration: {cfg.method} needs calibration data; expected a `chatforge data "
                          "prepare` directory or a text/JSONL file")
    calibration = calibration.to(next(model.parameters()).device)
    positions = torch.arange(calibration.shape[1], device=calibration.device)
    x = model.wte(calibration) + model.wpe(positions)
    for index in tqdm(range(len(model.h)), desc=f"prune {cfg.method}", unit="block", disable=not progress):
        stats = _block_stats(model, index, x, cfg)
        for suffix, s in stats.items():
            prune_linear(model.h[index].get_submodule(suffix), cfg.method, cfg.sparsity, s, cfg)
        x = _run_block(model, index, x, cfg.batch_size)
    return measured_sparsity(model)


def measured_sparsity(model: GPT) -> dict[str, float]:
    """The share of exact zeros in each pruned layer's weight."""
    return {name: float((linear.weight == 0).float().mean()) for name, linear in pruned_linears(model)}


def sparsity_summary(model: GPT) -> dict[str, float]:
    """Zeros over the pruned layers' weights together, and over every parameter of the model."""
    linears = [linear for _, linear in pruned_linears(model)]
    zeros = sum(int((linear.weight == 0).sum()) for linear in linears)
    pruned = sum(linear.weight.numel() for linear in linears)
    params = list(model.parameters())
    return {"pruned_layers": zeros / pruned,
            "all_parameters": sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)}


# ---- calibration data ----------------------------------------------------------------------------------


def calibration_tokens(source: str, tokenizer: Any, samples: int, seq_len: int, seed: int = 0,
                       text_field: str = "text") -> torch.Tensor:
    """(samples, seq_len) token ids: random windows of a `chatforge data prepare` directory's train split
    (made by this tokenizer), or of a text/JSONL/Parquet source's documents tokenized here and joined
    with end-of-text tokens. A DataError names the source when it is missing, empty or too short."""
    rng = np.random.default_rng(seed)
    path = Path(source)
    try:
        if path.is_dir() and (path / META_NAME).is_file():
            data = TokenDataset(path, "train", expected_tokenizer_hash=tokenizer.hash)
            return data.sample_batch(rng, samples, seq_len)[0]
        stream = _token_stream(source, tokenizer, 4 * samples * seq_len, text_field)
    except DataError as e:
        raise DataError(f"--calibration: {e}") from e
    if len(stream) < seq_len:
        raise DataError(f"--calibration: {source}: {len(stream)} tokens; expected at least --seq-len {seq_len}")
    starts = rng.integers(0, len(stream) - seq_len + 1, size=samples)
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]))


def _token_stream(source: str, tokenizer: Any, limit: int, text_field: str) -> np.ndarray:
    """The source's documents as one stream of token ids (each followed by end-of-text), up to `limit`."""
    ids: list[int] = []
    for doc in iter_documents(source, text_field=text_field):
        ids += tokenizer.encode(doc) + [tokenizer.eot_id]
        if len(ids) >= limit:
            break
    return np.asarray(ids[:limit], dtype=np.int64)


# ---- checkpoints and the command -----------------------------------------------------------------------


def prune_checkpoint(checkpoint: str, out: str, cfg: PruneConfig, calibration: str | None = None,
                     text_field: str = "text", device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Prune a language-model checkpoint into `out` (an fp32 checkpoint, zeros in place) and return the
    record its config.json keeps under "pruning"."""
    source = resolve_checkpoint_dir(checkpoint)
    if Path(out).resolve() in (source.resolve(), source.parent.resolve()):
        raise ConfigError(f"--out {out}: is the checkpoint being pruned; expected a new directory")
    ckpt = load_checkpoint(source, device=device)
    if isinstance(ckpt.model, ScalarHeadModel):
        raise ConfigError(f"prune: {checkpoint} is a reward model (a scalar head); expected a language model")
    model = ckpt.model
    cfg.check(model)
    seq_len = cfg.seq_len or model.config.context_length
    calib = None
    if cfg.method in CALIBRATED:
        if not calibration:
            raise ConfigError(f"--calibration: {cfg.method} needs calibration data; expected a `chatforge data "
                              "prepare` directory or a text/JSONL file")
        calib = calibration_tokens(calibration, ckpt.tokenizer, cfg.samples, seq_len, cfg.seed, text_field)
    t0 = time.perf_counter()
    layers = prune_model(model, calib, cfg, progress=progress)
    record = {"method": cfg.method, "sparsity": cfg.sparsity.ratio,
              "pattern": f"{cfg.sparsity.n}:{cfg.sparsity.m}" if cfg.sparsity.structured else None,
              "calibration": calibration if calib is not None else None,
              "samples": len(calib) if calib is not None else 0, "seq_len": seq_len if calib is not None else 0,
              "seed": cfg.seed, "source": str(source), "seconds": round(time.perf_counter() - t0, 2),
              "settings": {k: v for k, v in asdict(cfg).items() if k in ("blocksize", "damp")},
              "measured": sparsity_summary(model), "layers": layers}
    extra = {k: v for k, v in ckpt.extra.items() if k != "pruning"} | {"pruning": record}
    save_checkpoint(out, model.cpu(), ckpt.tokenizer, generation_config=ckpt.generation_config, extra_config=extra)
    return record


@click.command("prune")
@click.argument("checkpoint")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the pruned checkpoint.")
@click.option("--method", type=click.Choice(METHODS), default="wanda", show_default=True)
@click.option("--sparsity", type=float, default=None, help="Share of each layer's weights zeroed, in (0, 1) "
              "[default: 0.5].")
@click.option("--pattern", default=None, help="N:M instead: keep N of every M consecutive input weights (2:4).")
@click.option("--calibration", default=None, help="wanda, sparsegpt: a `chatforge data prepare` directory (its "
              "train split) or a text/JSONL/Parquet file or directory.")
@click.option("--samples", default=128, show_default=True, help="Calibration sequences.")
@click.option("--seq-len", default=0, show_default=True, help="Tokens per calibration sequence (0: the context).")
@click.option("--seed", default=0, show_default=True, help="Which calibration windows are drawn.")
@click.option("--text-field", default="text", show_default=True, help="JSONL/Parquet field holding the text.")
@click.option("--device", default="cpu", show_default=True, help="Where to prune (cpu, cuda).")
def prune_command(checkpoint: str, out: str, method: str, sparsity: float | None, pattern: str | None,
                  calibration: str | None, samples: int, seq_len: int, seed: int, text_field: str,
                  device: str) -> None:
    """Prune a checkpoint's block weights (wanda, sparsegpt or magnitude) at a ratio or an N:M pattern."""
    cfg = PruneConfig(method=method, sparsity=parse_sparsity(sparsity, pattern), samples=samples,
                      seq_len=seq_len, seed=seed)
    record = prune_checkpoint(checkpoint, out, cfg, calibration, text_field, device, progress=True)
    measured = record["measured"]
    click.echo(f"prune: {method} {cfg.sparsity.describe()}: {measured['pruned_layers']:.1%} of the block weights "
               f"zero ({measured['all_parameters']:.1%} of all parameters) in {record['seconds']:.1f}s -> {out}")
