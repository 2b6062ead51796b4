"""LoRA: low-rank adapters on the GPT's linear layers (Hu et al., 2021), through PEFT, saved in PEFT's layout.

With rank r, each target layer y = W·x + b keeps W and b frozen and learns y += (alpha / r)·B·A·x, where A is
(r, in) and B is (out, r), B starting at zero so training starts from the base model exactly. Only A and B
train (and a reward or value model's new head): r·(in + out) numbers per layer instead of in·out.

PEFT does the work: `add_adapters` calls `peft.inject_adapter_in_model` on our own `GPT`, whose linear
layers are named as transformers' GPT-2 names them (`h.{i}.attn.c_attn`, `attn.c_proj`, `mlp.c_fc`,
`mlp.c_proj`), so the GPT class stays plain and PEFT's `lora.Linear` wraps each target in place. A reward
model (`ScalarHeadModel`) gets its adapters on its backbone.

Files. A LoRA run's checkpoint directory is both a chatforge checkpoint and a PEFT adapter directory:

    model.safetensors          the adapted model with B·A folded into W: what generate, chat, serve and
                               eval load, as after full fine-tuning (`chatforge.checkpoint` calls
                               `merged_state_dict` whenever a model carries adapters)
    adapter_config.json        PEFT's LoraConfig: r, lora_alpha, target_modules, fan_in_fan_out true (HF
                               GPT-2's layers are Conv1D) and base_model_name_or_path, the base checkpoint
    adapter_model.safetensors  A and B under PEFT's names for a transformers GPT2LMHeadModel
                               (`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`); its metadata
                               holds a fingerprint of the base weights the adapters were trained on

so `peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_export_of_base), checkpoint_dir)`
computes what our model computes, and `chatforge merge` folds any such adapter (ours or PEFT's) into a
plain checkpoint. Resuming reads the adapters from adapter_model.safetensors and the rest that trained
(a reward model's head) from model.safetensors; the frozen weights come from the base, as at the start.
An adapter made for another base model is refused by its shapes or its fingerprint, naming the file.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from chatforge.checkpoint import load_checkpoint, read_json, save_checkpoint
from chatforge.errors import CheckpointError, ConfigError
from chatforge.model import GPT, ScalarHeadModel

ADAPTER = "default"  # PEFT's adapter name: the one adapter a model carries
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel over GPT2LMHeadModel, whose GPT is `transformer`
HF_TRUNK = "transformer."
FINGERPRINT = "chatforge_base_fingerprint"  # adapter_model.safetensors metadata
MODEL_KIND = "chatforge_model"  # "lm" or "scalar" (a reward model's backbone: its head is not in the adapter)
ADAPTER_PARTS = ("lora_A", "lora_B")
EMBEDDING = "wte"  # the token embedding's module name, ours and transformers' GPT-2's
TOKEN_DELTA = "wte.token_adapter.trainable_tokens_delta"  # trained token rows (PEFT's name, without the adapter's)
TIED_DELTA = "lm_head.token_adapter.trainable_tokens_delta"  # the LM head's copy of them, which PEFT may save too
# whole embedding matrices PEFT may save beside the adapters (save_embedding_layers): GPT-2 ties the two
EMBEDDINGS = ("transformer.wte.weight", "lm_head.weight", "transformer.wte.token_adapter.base_layer.weight",
              "lm_head.token_adapter.base_layer.weight")
# adapter_config.json settings we cannot honour, and the value that means "not used"
UNSUPPORTED = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "modules_to_save": None,
               "layers_to_transform": None}


class LoRAOptions(Protocol):
    """What `add_adapters` reads: `chatforge.train.config.LoRASettings` is one."""

    rank: int
    alpha: float
    dropout: float

    @property
    def targets(self) -> list[str]: ...


# ---- adding adapters -----------------------------------------------------------------------------


def adapted_gpt(model: nn.Module) -> GPT:
    """The GPT that carries the adapters: the model itself, or a reward/value model's backbone."""
    return model.backbone if isinstance(model, ScalarHeadModel) else model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's adapted layers by module name (relative to `model`)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def token_wrappers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT's trainable-token wrappers (the embedding's and the LM head's tied one) by module name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "token_adapter")}


def tuner_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module PEFT put in place of one of ours: the adapted layers and the token wrappers."""
    return lora_layers(model) | token_wrappers(model)


def block_linears(gpt: GPT) -> dict[str, nn.Linear]:
    """The transformer blocks' linear layers by name (`h.0.attn.c_attn`): what adapters may target. Of a layer
    that carries an adapter, its frozen base layer (under the layer's own name)."""
    out: dict[str, nn.Linear] = {}
    for name, m in gpt.h.named_modules():  # parents come before their children
        full = f"h.{name}"
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            out[full] = m.get_base_layer()
        elif isinstance(m, nn.Linear) and not any(full.startswith(f"{k}.") for k in out):
            out[full] = m
    return out


def matching(names: list[str], target: str) -> list[str]:
    """Module names that a PEFT target string selects: the name itself or a dotted suffix of it."""
    return [n for n in names if n == target or n.endswith("." + target)]


def check_targets(gpt: GPT, targets: list[str], rank: int) -> dict[str, nn.Linear]:
    """The layers `targets` select; ConfigError naming the flag when one selects no linear layer of the blocks,
    something else, or a layer narrower than the rank."""
    linears = block_linears(gpt)
    every = [name for name, _ in gpt.named_modules() if name]
    chosen: dict[str, nn.Linear] = {}
    for target in targets:
        hits = matching(every, target)
        wrong = [n for n in hits if n not in linears]
        if not hits or wrong:
            what = f"selects {wrong[0]}, which is not a linear layer of a block" if wrong else "names no layer"
            raise ConfigError(f"lora: --lora-target-modules {target!r} {what}; expected some of c_attn, c_proj, "
                              "c_fc, attn.c_proj, mlp.c_proj")
        chosen.update({n: linears[n] for n in hits})
    for name, layer in chosen.items():
        width = min(layer.in_features, layer.out_features)
        if rank > width:
            raise ConfigError(f"lora: --lora-rank {rank} is larger than {name}'s width ({layer.in_features} in, "
                              f"{layer.out_features} out); expected at most {width}")
    return chosen


def add_adapters(model: nn.Module, options: LoRAOptions, base: str = "", tokens: Sequence[int] = ()) -> nn.Module:
    """Freeze `model`'s GPT and give its target layers rank-`options.rank` adapters, in place (nothing when the
    rank is 0). `tokens`: ids whose embedding rows train too (PEFT's trainable tokens, tied to the LM head as the
    GPT ties them): SFT's chat tokens, which a pretrained model never saw. `base` is recorded as the adapters'
    base_model_name_or_path. Returns `model`."""
    if not options.rank:
        return model
    gpt = adapted_gpt(model)
    check_targets(gpt, options.targets, options.rank)
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(options.targets), base_model_name_or_path=base or None,
                        trainable_token_indices={EMBEDDING: sorted(tokens)} if tokens else None)
    inject_adapter_in_model(config, gpt)  # freezes every weight of gpt but the adapters (and the token rows)
    if tokens:
        tie_output_tokens(gpt)
    return model


def tie_output_tokens(gpt: GPT) -> None:
    """Make the LM head read the trained token rows too: PEFT's tied token layer over it, following the
    embedding's (what PEFT does for a transformers model that ties its embeddings)."""
    from peft.utils.other import TrainableTokensWrapper

    adapter = gpt.wte.token_adapter
    gpt.lm_head = TrainableTokensWrapper(gpt.lm_head, ADAPTER, token_indices=adapter.token_indices[ADAPTER],
                                         tied_adapter=adapter)


def trained_tokens(gpt: GPT) -> list[int]:
    """The token ids whose embedding rows train beside the adapters (none without trainable tokens)."""
    adapter = getattr(gpt.wte, "token_adapter", None)
    return list(adapter.token_indices[ADAPTER]) if adapter is not None else []


def trainable_parameters(model: nn.Module) -> int:
    """Numbers the optimizer updates (tied weights once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Compute as the base model inside the block (PEFT's switch on every adapted layer and token layer), then
    switch back."""
    layers = [m for m in model.modules() if hasattr(m, "enable_adapters") and hasattr(m, "base_layer")]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class BaseModelView(nn.Module):
    """The base model under an adapted GPT: its forward runs the GPT with the adapters off. It holds no
    parameter of its own (the GPT is kept outside the module tree), so freezing it or handing it to an
    optimizer touches nothing: PPO's reference model at no memory cost."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self._gpt = (gpt,)  # a tuple: not registered as a submodule
        self.config = gpt.config

    @property
    def gpt(self) -> GPT:
        return self._gpt[0]

    def forward(self, idx: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        with adapters_off(self.gpt):
            return self.gpt(idx, **kwargs)


# ---- folding adapters into weights -------------------------------------------------------------------


def _under(key: str, names: Iterable[str]) -> bool:
    return any(key.startswith(f"{name}.") for name in names)


def plain_weights(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The weight (and bias) of the ordinary layer that computes what a PEFT layer computes, adapters on."""
    if hasattr(layer, "token_adapter"):  # the embedding or the LM head with trained token rows
        adapter = layer.token_adapter
        off = adapter.disable_adapters or adapter.merged
        return {"weight": adapter.base_layer.weight if off else adapter.get_merged_weights([ADAPTER])}
    base = layer.get_base_layer()
    weight = base.weight
    if not layer.merged and not layer.disable_adapters:
        weight = weight + layer.get_delta_weight(ADAPTER).to(weight)  # W + (alpha/r)·B·A
    return {"weight": weight} | ({"bias": base.bias} if base.bias is not None else {})


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under their plain names, each adapted W replaced by W + (alpha/r)·B·A and trained token
    rows put in place: the weights of an ordinary model that computes what the adapted one computes (adapters
    on, no dropout)."""
    tuners = tuner_layers(model)
    out = {k: v for k, v in model.state_dict().items() if not _under(k, tuners)}
    for name, layer in tuners.items():
        out |= {f"{name}.{k}": v for k, v in plain_weights(layer).items()}
    return out


@torch.no_grad()
def fold_adapters(model: nn.Module) -> nn.Module:
    """Fold the adapters into their layers' weights and put the plain layers back, in place: `model` is then an
    ordinary model (no adapter left). Returns it."""
    for name, layer in tuner_layers(model).items():
        inner = layer.token_adapter if hasattr(layer, "token_adapter") else layer
        if getattr(inner, "tied_adapter", None) is None:  # the LM head's tied token layer shares the embedding's
            inner.merge(adapter_names=[ADAPTER])
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, inner.get_base_layer())
    for module in model.modules():
        if "peft_config" in module.__dict__:
            del module.peft_config
    return model


# ---- adapter files ------------------------------------------------------------------------------


def peft_key(name: str) -> str:
    """Our GPT's adapter parameter name -> PEFT's saved name for GPT2LMHeadModel (the adapter's name left out)."""
    return PEFT_PREFIX + HF_TRUNK + name.replace(f".{ADAPTER}.weight", ".weight").removesuffix(f".{ADAPTER}")


def our_key(key: str) -> str:
    """PEFT's saved name (ours, or PEFT's for a transformers GPT-2) -> our GPT's adapter parameter name."""
    name = key.removeprefix(PEFT_PREFIX).removeprefix(HF_TRUNK)
    for part in ADAPTER_PARTS:
        name = name.replace(f".{part}.weight", f".{part}.{ADAPTER}.weight")
    return f"{name}.{ADAPTER}" if name == TOKEN_DELTA else name


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What trains in the adapted GPT (A and B of each layer, trained token rows) under PEFT's names, contiguous
    on the CPU; the LM head's tied copy of the token rows is left out, as PEFT leaves it."""
    gpt = adapted_gpt(model)
    return {peft_key(k): p.detach().to("cpu").contiguous() for k, p in gpt.named_parameters()
            if ".lora_" in k or k.startswith(TOKEN_DELTA)}


@torch.no_grad()
def base_fingerprint(gpt: GPT, modules: list[str]) -> str:
    """sha256 over the named layers' base weights and biases (names, shapes and bytes): which base model an
    adapter belongs to. Works on a plain GPT or on one carrying adapters (it reads the frozen base layer)."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        layer = gpt.get_submodule(name)
        layer = layer.get_base_layer() if hasattr(layer, "base_layer") else layer
        for tensor in (layer.weight, layer.bias):
            if tensor is not None:
                t = tensor.detach().to("cpu", torch.float32).contiguous()
                digest.update(f"{name}:{tuple(t.shape)}".encode())
                digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def write_adapter(model: nn.Module, directory: str | Path) -> None:
    """adapter_config.json and adapter_model.safetensors of `model`'s adapters into `directory` (PEFT's layout)."""
    directory = Path(directory)
    gpt = adapted_gpt(model)
    config = copy.deepcopy(gpt.peft_config[ADAPTER])
    config.fan_in_fan_out = True  # transformers' GPT-2 keeps Conv1D layers, (in, out): PEFT transposes for them
    config.task_type = "CAUSAL_LM" if gpt is model else None
    config.save_pretrained(str(directory))
    metadata = {"format": "pt", FINGERPRINT: base_fingerprint(gpt, list(lora_layers(gpt))),
                MODEL_KIND: "lm" if gpt is model else "scalar"}
    save_file(adapter_state(model), str(directory / ADAPTER_WEIGHTS_FILE), metadata=metadata)


def resolve_adapter_dir(path: str | Path) -> Path:
    """A directory holding adapter_config.json and adapter_model.safetensors, or a stage directory whose
    `checkpoint/` does."""
    path = Path(path)
    for candidate in (path, path / "checkpoint"):
        if (candidate / ADAPTER_CONFIG_FILE).exists():
            if not (candidate / ADAPTER_WEIGHTS_FILE).exists():
                raise CheckpointError(f"{candidate / ADAPTER_WEIGHTS_FILE}: missing; expected the adapter weights "
                                      f"beside {ADAPTER_CONFIG_FILE} (safetensors)")
            return candidate
    raise CheckpointError(f"{path}: no {ADAPTER_CONFIG_FILE}; expected a LoRA adapter directory (a LoRA run's "
                          "checkpoint, or one PEFT saved)")


def read_adapter_config(directory: Path) -> dict:
    """adapter_config.json, refused unless it is plain LoRA (no DoRA, per-layer ranks, trained biases...)."""
    file = directory / ADAPTER_CONFIG_FILE
    config = read_json(file, "adapter config")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type {config['peft_type']!r} is not supported; expected LORA")
    for key, unused in UNSUPPORTED.items():
        if config.get(key, unused) not in (unused, None, {}, [], False):
            raise CheckpointError(f"{file}: {key}={config[key]!r} is not supported; expected plain LoRA ({key} unset)")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise CheckpointError(f"{file}: r must be a positive integer, got {config.get('r')!r}")
    return config


def read_adapter_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter's tensors under the file's (PEFT's) names, and the file's metadata."""
    file = directory / ADAPTER_WEIGHTS_FILE
    try:
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(file))
    except Exception as e:  # a truncated or foreign file: safetensors' own errors vary
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    return state, metadata


def check_adapter_fits(gpt: GPT, state: dict[str, torch.Tensor], rank: int, file: Path,
                       tokens: Sequence[int] = ()) -> list[str]:
    """The adapted layers' names, after checking that every tensor (PEFT's names) is the lora_A (r, in) or
    lora_B (out, r) of a linear layer of `gpt`'s blocks, or the rows of `tokens`; CheckpointError naming the
    file and what this base expects otherwise."""
    linears = block_linears(gpt)
    vocab, width = gpt.config.vocab_size, gpt.config.n_embd
    shape = f"{gpt.config.n_layer} layers of width {width}"
    found: dict[str, set[str]] = {}
    for key in sorted(state):
        whole = key.removeprefix(PEFT_PREFIX) in EMBEDDINGS  # the whole embedding, which PEFT may save
        if whole or our_key(key) == f"{TOKEN_DELTA}.{ADAPTER}" or key.removeprefix(PEFT_PREFIX) == TIED_DELTA:
            expected = (vocab, width) if whole else (len(tokens), width)
            if tuple(state[key].shape) != expected or any(not 0 <= t < vocab for t in tokens):
                raise CheckpointError(f"{file}: {key} has shape {tuple(state[key].shape)}, expected {expected} for "
                                      f"this base model (vocabulary {vocab}, width {width}); the adapter was made "
                                      "for another base model")
            continue
        name, _, part = our_key(key).rpartition(f".{ADAPTER}.weight")[0].rpartition(".")
        if part not in ADAPTER_PARTS or name not in linears:
            raise CheckpointError(f"{file}: tensor {key} is not a LoRA weight of a layer of this base model ({shape}); "
                                  "expected an adapter made for it")
        layer = linears[name]
        expected = (rank, layer.in_features) if part == "lora_A" else (layer.out_features, rank)
        if tuple(state[key].shape) != expected:
            raise CheckpointError(f"{file}: {key} has shape {tuple(state[key].shape)}, expected {expected} for this "
                                  f"base model ({shape}, rank {rank}); the adapter was made for another base model")
        found.setdefault(name, set()).add(part)
    if not found:
        raise CheckpointError(f"{file}: holds no LoRA weights; expected lora_A and lora_B of each adapted layer")
    half = [name for name, parts in found.items() if len(parts) < len(ADAPTER_PARTS)]
    if half:
        raise CheckpointError(f"{file}: {half[0]} has only {sorted(found[half[0]])}; expected lora_A and lora_B")
    return sorted(found)


def our_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights under our GPT's names (embedding matrices left out: `saved_embedding`; and the LM head's
    copy of the token rows, which the tied token layer shares)."""
    return {our_key(k): v for k, v in state.items() if k.removeprefix(PEFT_PREFIX) not in (*EMBEDDINGS, TIED_DELTA)}


def saved_embedding(state: dict[str, torch.Tensor], file: Path) -> torch.Tensor | None:
    """The token embedding PEFT saved beside the adapters, if it did (it does when it thinks the vocabulary was
    resized); the tied input and output matrices must agree."""
    found = [state[PEFT_PREFIX + k] for k in EMBEDDINGS if PEFT_PREFIX + k in state]
    if any(not torch.equal(found[0], other) for other in found[1:]):
        raise CheckpointError(f"{file}: the saved token embedding and LM head differ; expected the tied token "
                              "embedding of GPT-2")
    return found[0] if found else None


def check_fingerprint(gpt: GPT, modules: list[str], metadata: dict[str, str], file: Path, base: str,
                      made_for: str | None = None) -> None:
    """Refuse an adapter whose recorded base fingerprint is not this base's (an adapter without one, from PEFT
    itself, is checked by its shapes only). `made_for`: the base_model_name_or_path it records."""
    recorded = metadata.get(FINGERPRINT)
    if recorded and recorded != (found := base_fingerprint(gpt, modules)):
        origin = f" {made_for}" if made_for else ""
        raise CheckpointError(f"{file}: made for another base model{origin} (base weights fingerprint "
                              f"{recorded[:12]}; {base or 'this base'} has {found[:12]}); expected the base "
                              "checkpoint the adapter was trained on")


def adapter_tokens(config: dict, file: Path) -> list[int]:
    """The token ids whose embedding rows the adapter trained (adapter_config.json's trainable_token_indices: a
    list, or {"wte": list} as PEFT writes it for GPT-2)."""
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict) and len(indices) == 1 and next(iter(indices)).split(".")[-1] == EMBEDDING:
        indices = next(iter(indices.values()))
    if indices is None or (isinstance(indices, list) and all(isinstance(t, int) for t in indices)):
        return list(indices or [])
    raise CheckpointError(f"{file}: trainable_token_indices={indices!r} is not supported; expected token ids of "
                          f"the token embedding ({EMBEDDING})")


def load_adapter(model: nn.Module, directory: str | Path, base: str = "") -> nn.Module:
    """Give `model` (a plain GPT) the adapter saved in `directory` (ours or PEFT's for GPT-2), checked against
    it; `base` names the model in errors. Returns `model`."""
    directory = resolve_adapter_dir(directory)
    config = read_adapter_config(directory)
    state, metadata = read_adapter_weights(directory)
    if metadata.get(MODEL_KIND) == "scalar":
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_FILE}: the adapters of a reward model, whose head is in "
                              "the model.safetensors beside it (already merged); expected a language model's adapters")
    gpt = adapted_gpt(model)
    file = directory / ADAPTER_WEIGHTS_FILE
    tokens = adapter_tokens(config, directory / ADAPTER_CONFIG_FILE)
    modules = check_adapter_fits(gpt, state, config["r"], file, tokens)
    check_fingerprint(gpt, modules, metadata, file, base, config.get("base_model_name_or_path"))
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=config["r"], lora_alpha=config.get("lora_alpha", 8), lora_dropout=0.0,
                      use_rslora=bool(config.get("use_rslora", False)), target_modules=modules,
                      base_model_name_or_path=config.get("base_model_name_or_path"),
                      trainable_token_indices={EMBEDDING: tokens} if tokens else None)
    embedding = saved_embedding(state, file)
    if embedding is not None:
        with torch.no_grad():
            gpt.wte.weight.copy_(embedding)  # PEFT's loader puts it in place of the base's too
    inject_adapter_in_model(lora, gpt)
    if tokens:
        tie_output_tokens(gpt)
    gpt.load_state_dict(our_state(state), strict=False)
    return model


def load_trained_state(model: nn.Module, weights_file: Path) -> None:
    """Resume an adapted model from its checkpoint: the adapters from adapter_model.safetensors beside
    `weights_file`, and what else trains (a reward model's head, its gain and bias) from `weights_file`; the
    frozen weights stay the base's, checked by the adapter's fingerprint."""
    directory = weights_file.parent
    gpt = adapted_gpt(model)
    file = directory / ADAPTER_WEIGHTS_FILE
    if not file.exists():
        raise CheckpointError(f"{file}: missing; expected the adapters of this LoRA run's checkpoint")
    state, metadata = read_adapter_weights(directory)
    tokens = trained_tokens(gpt)
    modules = check_adapter_fits(gpt, state, next(iter(lora_layers(gpt).values())).r[ADAPTER], file, tokens)
    has_rows = any(our_key(k) == f"{TOKEN_DELTA}.{ADAPTER}" for k in state)
    if sorted(modules) != sorted(lora_layers(gpt)) or has_rows != bool(tokens):
        raise CheckpointError(f"{file}: adapts {modules[:3]}...{' and token rows' if has_rows else ''}, this run "
                              f"{sorted(lora_layers(gpt))[:3]}...{' and token rows' if tokens else ''}; expected the "
                              "same --lora-target-modules (and chat tokens) as the run it resumes")
    check_fingerprint(gpt, modules, metadata, file, "the run's base")
    gpt.load_state_dict(our_state(state), strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    tuners = tuner_layers(model)
    wanted = [k for k in model.state_dict() if not _under(k, tuners) and (k not in params or params[k].requires_grad)]
    if not wanted:
        return
    saved = load_file(str(weights_file))
    missing = [k for k in wanted if k not in saved]
    if missing:
        raise CheckpointError(f"{weights_file}: missing {missing[:3]}; expected the trained head of this run")
    model.load_state_dict({k: saved[k] for k in wanted}, strict=False)


def merge_checkpoint(base: str, adapter: str, out: str) -> Path:
    """`chatforge merge`: the base checkpoint (ours or a transformers GPT-2 directory) with the adapter folded
    in, saved as a plain checkpoint at `out` with the base's tokenizer."""
    ckpt = load_checkpoint(base)
    if isinstance(ckpt.model, ScalarHeadModel):
        raise ConfigError(f"merge: --base {base} is a reward model; expected the language model the adapter was "
                          "trained on")
    directory = resolve_adapter_dir(adapter)
    if ckpt.tokenizer is not None and ckpt.model.config.vocab_size < ckpt.tokenizer.vocab_size:
        ckpt.model.resize_token_embeddings(ckpt.tokenizer.vocab_size)  # GPT-2 + the chat tokens, as `sft` grew it
    model = fold_adapters(load_adapter(ckpt.model, directory, base=base))
    extra = {"stage": "merge", "merged": {"base": str(base), "adapter": str(directory)}}
    return save_checkpoint(out, model, ckpt.tokenizer, generation_config=ckpt.generation_config or None,
                           extra_config=extra)
