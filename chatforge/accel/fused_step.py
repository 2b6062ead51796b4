"""One decode step of the whole GPT in one call: chatforge's CPU kernels, for the engine's fused path.

`chatforge_cpu::DecodeStep` (chatforge/accel/kernels.cpp) runs `GPT.forward` for one new token on each
of R rows, each row at its own position in its own cache row, with no Python, graph or op dispatch
between its products. In a compiled decode step those cost about 2 ms a token on GPT-2 small (the
graph's wrapper, dynamo's guards, the op calls), a tenth of the step; measured paired in one
process, the fused step is 1.1-1.2x faster than the torch.compile'd forward at 1 and 16 rows
(see docs/architecture.md).

It covers what it can compute exactly as `GPT` does: the GPT class itself (not a subclass), plain
nn.Linear / nn.LayerNorm / nn.Embedding layers without hooks, contiguous fp32 CPU weights, and at
most `kernels.MAX_ROWS` rows (past that MKL's packed gemm is faster than chatforge's). Anything
else keeps the engine's other decode path (torch.compile's graph where compiled, else eager).

A model in weight-only int8 (`accel.quantize.quantize_model`: every block's linear layers, the token
embedding and the LM head int8) runs the same step on kernels_int8.cpp's products, with each token's
embedding row dequantized as `Int8Embedding` does: the whole int8 forward with no Python between its
products, which is what lets int8 decode keep its 4x smaller weight stream's lead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from chatforge import model as gpt
from chatforge.accel import kernels
from chatforge.accel.linear import optimizer_steps, packed_weight
from chatforge.accel.quantize import Int8Embedding, Int8Linear
from chatforge.model import GPT, KVCache


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fused step cannot run `model` here, or None when it can."""
    if not kernels.active():
        return "chatforge's CPU kernels are not loaded"
    if type(model) is not GPT:
        return f"the model is a {type(model).__name__}, not chatforge's GPT"
    if model.training and model.config.dropout > 0:
        return "the model is in training mode with dropout"
    plain = (GPT, nn.Linear, nn.LayerNorm, nn.Embedding, nn.Dropout, nn.ModuleList, gpt.Block,
             gpt.CausalSelfAttention, gpt.MLP, Int8Linear, Int8Embedding)
    int8 = [isinstance(layer, (Int8Linear, Int8Embedding)) for layer in (model.wte, *_products(model, modules=True))]
    if any(int8) and not all(int8):
        return "some of its products are int8 and some are not"
    for name, module in model.named_modules():
        if type(module) not in plain:
            return f"{name or 'the model'} is a {type(module).__name__}"
        if module._forward_hooks or module._forward_pre_hooks:
            return f"{name or 'the model'} has a forward hook"
        if isinstance(module, nn.LayerNorm) and (module.weight is None or module.bias is None):
            return f"{name} has no affine weight and bias"
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        dtype = torch.int8 if name.endswith("qweight") else torch.float32
        if p.device.type != "cpu" or p.dtype != dtype or not p.is_contiguous():
            return f"{name} is not a contiguous {'int8' if dtype == torch.int8 else 'fp32'} CPU tensor"
        if type(p) not in (torch.Tensor, nn.Parameter, nn.Buffer):  # torchao's layouts: their data is not plain
            return f"{name} is a {type(p).__name__}, a tensor subclass"
    return None


def _is_int8(model: GPT) -> bool:
    return isinstance(model.wte, Int8Embedding)


def _matrix(layer: nn.Module) -> torch.Tensor:
    """What a product or the embedding multiplies by: the int8 matrix of a quantized layer, else its weight."""
    return layer.qweight if isinstance(layer, (Int8Linear, Int8Embedding)) else layer.weight


def _weights(model: GPT) -> list[torch.Tensor]:
    """In the order of GPT's forward, as DecodeStep takes them (the parameters themselves, so a
    `.data` assignment shows in their pointers)."""
    out = [_matrix(model.wte), model.wpe.weight]
    for b in model.h:
        out += [b.ln_1.weight, b.ln_1.bias, _matrix(b.attn.c_attn), b.attn.c_attn.bias, _matrix(b.attn.c_proj),
                b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, _matrix(b.mlp.c_fc), b.mlp.c_fc.bias,
                _matrix(b.mlp.c_proj), b.mlp.c_proj.bias]
    return out + [model.ln_f.weight, model.ln_f.bias, _matrix(model.lm_head)]


def _products(model: GPT, modules: bool = False) -> list:
    """The weights DecodeStep multiplies by, in its order: four a block, then the LM head (their
    layers with `modules`)."""
    layers = [layer for b in model.h for layer in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    layers.append(model.lm_head)
    # the parameters themselves: their packs are kept per parameter
    return layers if modules else [layer.weight for layer in layers]


def _int8_scales(model: GPT) -> list[torch.Tensor]:
    """An int8 model's per-row scales in DecodeStep's order: wte's, four a block, the LM head's."""
    return [model.wte.scale, *(layer.scale for layer in _products(model, modules=True))]


# Parameters or submodules assigned anywhere (`model.wte = ...`, resize_token_embeddings): walking a
# model for its weights costs ~0.7 ms (GPT-2 small), so a step walks again only after one of these.
_ASSIGNMENTS = 0


def _count_assignment(*_: object) -> None:
    global _ASSIGNMENTS
    _ASSIGNMENTS += 1


register_module_parameter_registration_hook(_count_assignment)
register_module_module_registration_hook(_count_assignment)


class FusedDecodeStep:
    """Logits of one decode step through chatforge_cpu::DecodeStep, built again whenever a weight may
    have changed: replaced, changed in place, or an optimizer stepped (the packs must follow)."""

    def __init__(self, model: GPT) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fused decode step cannot run this model: {reason}")
        self.model = model
        self._assignments: int | None = None  # _ASSIGNMENTS when the weights were last listed
        self._reason: str | None = None
        self._weights: list[torch.Tensor] = []
        self._key: tuple | None = None
        self._one_row = self._many_rows = None  # built on first use: the packs cost a copy of the weights

    def covers(self, rows: int) -> bool:
        """Whether this step can run `rows` rows of the model as it is now (after a layer was
        replaced, say, it may no longer)."""
        if not (1 <= rows <= kernels.MAX_ROWS and kernels.active()):
            return False
        if self._assignments != _ASSIGNMENTS:
            self._assignments, self._key = _ASSIGNMENTS, None
            self._reason = unsupported_reason(self.model)
            self._weights = _weights(self.model) if self._reason is None else []
        return self._reason is None

    def __call__(self, tokens: list[int], positions: list[int], cache: KVCache) -> torch.Tensor:
        """(R, vocab) logits of tokens[r] at positions[r] of cache row r; writes their keys and values."""
        if not self.covers(len(tokens)):
            raise ValueError(f"the fused decode step cannot run {len(tokens)} rows of this model: "
                             f"{self._reason or f'it takes 1..{kernels.MAX_ROWS} with its kernels loaded'}")
        key = (tuple((w.data_ptr(), w._version) for w in self._weights), optimizer_steps())
        if key != self._key:
            self._key, self._one_row, self._many_rows = key, None, None
        with torch.no_grad():
            return self._step(len(tokens) > 1).forward(tokens, positions, cache.k, cache.v)

    def _step(self, many: bool):
        c = self.model.config
        if _is_int8(self.model) and self._one_row is None:  # int8 needs no packs: one step for any rows
            self._one_row = self._many_rows = torch.classes.chatforge_cpu.DecodeStep(
                self._weights, [], c.n_head, c.layer_norm_eps, _int8_scales(self.model))
        if many and self._many_rows is None:
            packs = [packed_weight(w, "chatforge_packed") for w in _products(self.model)]
            self._many_rows = torch.classes.chatforge_cpu.DecodeStep(self._weights, packs, c.n_head,
                                                                      c.layer_norm_eps, [])
        if not many and self._one_row is None:
            self._one_row = torch.classes.chatforge_cpu.DecodeStep(self._weights, [], c.n_head, c.layer_norm_eps, [])
        return self._many_rows if many else self._one_row
