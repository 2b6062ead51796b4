"""The fastest product for a few rows on this CPU, and a view of a model whose linear layers use it.

Decode reads every weight once a token with a few rows of activations, so it is bound by how fast
the matrix-vector kernel streams the weights, and the fastest kernel PyTorch offers depends on the
CPU and the row count (measured with benchmarks/bench_decode.py and bench_serve.py, 1 and 2 threads):
- AMD EPYC: oneDNN's fp32 linear (the op inductor itself calls on CPU) reads GPT-2 small's weights
  at about 1.7x the rate of F.linear's MKL gemv (21 against 13 GB/s for the LM head);
- Intel Xeon (Sapphire Rapids): MKL streams the weights at the measured bandwidth for one or two
  rows; from three rows MKL's gemm on a weight packed once in its own panel layout
  (cblas_sgemm_pack, the op inductor's freezing pass uses) is 18-31% faster than F.linear, which
  packs the weight again on every call (GPT-2 small at 4 and 16 rows; 28% for a 4-layer width-256
  model at 16 rows on one thread), and oneDNN is slower than both at every row count.
Where the CPU has AVX-512 and `kernels.load()` built chatforge's own kernels (the fused engine does),
they take 1-32 rows: they stream the weights faster than MKL there (see accel/kernels.py); 33-64
rows stay with MKL's packed gemm. The choice is fixed per machine and process, not timed at run
time, so the same setup always computes the same numbers.

The model never calls these: the engine runs its forwards through `fast_view(model)`, which shares
every weight with the model and differs only in its linear layers (`FastLinear`). Training, PPO and
DPO call the model itself, so their log-probs are F.linear's, bit for bit, with or without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from chatforge.accel import kernels
from chatforge.accel.cpu import vendor

_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_ONEDNN_MAX_ROWS = 64  # no faster than F.linear past this (prefill, training)
_MKL_OPS = getattr(torch.ops, "mkl", None)
_MKL_PACKED = torch._C.has_mkl and hasattr(_MKL_OPS, "_mkl_linear") and hasattr(_MKL_OPS, "_mkl_reorder_linear_weight")
_MKL_PACKED_MIN_ROWS, _MKL_PACKED_MAX_ROWS = 3, 64
_INTEL = vendor() == "GenuineIntel"
# weight -> {kernel: (what it was when packed, packed weight)}; weak, so a dropped model frees its packs, and
# kept off the module, so state_dict and deepcopy never see them
_PACKS = WeakIdKeyDictionary()
_OPTIMIZER_STEPS = [0]  # every optimizer step anywhere: fused AdamW changes weights without bumping their version


def _count_optimizer_step(*_: object) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """Optimizer steps taken in this process since chatforge.accel was imported (packs follow them)."""
    return _OPTIMIZER_STEPS[0]


def fast_kernel(rows: int) -> str:
    """Which product `fast_linear` uses for `rows` rows here: "chatforge_gemv" or "chatforge_packed"
    (our own kernels, once `kernels.load()` built them), "mkl_packed", "onednn" or "linear"."""
    if kernels.active() and rows <= kernels.MAX_ROWS:
        return "chatforge_gemv" if rows == 1 else "chatforge_packed"
    if _INTEL:
        ok = _MKL_PACKED and _MKL_PACKED_MIN_ROWS <= rows <= _MKL_PACKED_MAX_ROWS
        return "mkl_packed" if ok else "linear"
    ok = _ONEDNN_LINEAR is not None and rows <= _ONEDNN_MAX_ROWS and torch.backends.mkldnn.is_available()
    return "onednn" if ok else "linear"


def packed_weight(w: torch.Tensor, kernel: str) -> torch.Tensor:
    """The weight in `kernel`'s packed layout ("mkl_packed": MKL's; "chatforge_packed": panels of 16
    outputs), packed again whenever it may have changed: it was replaced, changed in place (a load
    bumps its version) or any optimizer stepped. (A write through `.data` bypasses all three.) The
    layout does not depend on the row count."""
    key = (w.data_ptr(), w._version, tuple(w.shape), optimizer_steps())
    packs = _PACKS.setdefault(w, {})  # a pack per kernel that has used this weight
    entry = packs.get(kernel)
    if entry is None or entry[0] != key:
        if kernel == "mkl_packed":
            packed = _MKL_OPS._mkl_reorder_linear_weight(w, _MKL_PACKED_MAX_ROWS)
        else:
            packed = torch.ops.chatforge_cpu.pack(w)
        entry = packs[kernel] = (key, packed)
    return entry[1]


def _fast_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    kernel = fast_kernel(rows)
    if kernel == "chatforge_gemv":
        return torch.ops.chatforge_cpu.linear(x, weight, bias)
    if kernel == "chatforge_packed":
        return torch.ops.chatforge_cpu.packed_linear(x, packed_weight(weight, kernel), weight.shape[0], bias)
    if kernel == "mkl_packed":
        return _MKL_OPS._mkl_linear(x, packed_weight(weight, kernel), weight, bias, rows)
    if kernel == "onednn":
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# The same product as an opaque op for torch.compile: inductor otherwise lowers every linear to a
# plain addmm, and the packed weight lives in a Python map that tracing cannot see into. Registered
# through the low-level Library API: `torch.library.custom_op` adds ~50 us of Python to every call.
_OPS = torch.library.Library("chatforge", "DEF")
_OPS.define("fast_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_OPS.impl("fast_linear", _fast_product, "CPU")


@torch.library.register_fake("chatforge::fast_linear")
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_PLAIN = (torch.Tensor, nn.Parameter)  # a weight of any other type is a subclass with products of its own


def fast_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`; for a plain nn.Linear on a few fp32 CPU rows under no_grad, the same product
    through the kernel that is faster on this CPU (see above). A weight that is a tensor subclass
    (torchao's quantized layouts, say) keeps F.linear, which dispatches to the subclass's own product."""
    if not (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and layer.weight.dtype == torch.float32
        and type(layer.weight) in _PLAIN
    ):
        return F.linear(x, layer.weight, layer.bias)
    if torch.compiler.is_compiling():
        # the one-row graph (dynamo specializes a size of 1; a symbolic size is >= 2, so this adds no
        # guard): the graph calls the kernel itself, without the op's Python around it
        if x.numel() == x.shape[-1]:
            kernel = fast_kernel(1)
            if kernel == "chatforge_gemv":
                return torch.ops.chatforge_cpu.linear(x, layer.weight, layer.bias)
            if kernel == "linear":
                return F.linear(x, layer.weight, layer.bias)
        # otherwise the op picks the kernel per call: choosing here would guard on the row count
        return torch.ops.chatforge.fast_linear(x, layer.weight, layer.bias)
    return _fast_product(x, layer.weight, layer.bias)


class FastLinear(nn.Linear):
    """An nn.Linear of a `fast_view`: the same weight and bias (the very tensors), computed through
    `fast_linear`. Where its source layer has hooks (a user's, or an adapter's), the source runs."""

    source: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source._forward_hooks or self.source._forward_pre_hooks:
            return self.source(x)
        return fast_linear(self, x)


def fast_view(model: nn.Module) -> nn.Module:
    """`model` with each plain nn.Linear computed by `FastLinear`: a new module tree along the paths to
    those layers that shares every parameter, buffer and other submodule with `model` (no weight is
    copied; training changes it in place and the view sees it). Replace a submodule of `model` and make
    a new view. The view's train/eval mode is its own: `sync_mode` copies the model's."""
    if type(model) is nn.Linear:
        view = FastLinear.__new__(FastLinear)
        nn.Module.__init__(view)  # hooks of its own (none): the source's run where the source runs
        view.__dict__["_parameters"] = model._parameters  # shared: an assigned weight shows in both
        view.in_features, view.out_features, view.training = model.in_features, model.out_features, model.training
        object.__setattr__(view, "source", model)  # not a submodule: state_dict and .to() never see it
        return view
    children = {name: fast_view(child) if child is not None else None for name, child in model._modules.items()}
    if all(new is old for new, old in zip(children.values(), model._modules.values())):
        return model  # nothing below to speed up: the module itself
    view = model.__class__.__new__(model.__class__)
    view.__dict__.update(model.__dict__)
    view.__dict__["_modules"] = children
    return view


def sync_mode(view: nn.Module, model: nn.Module) -> None:
    """Put the view in the model's train/eval mode (dropout and the like), when it differs."""
    if view is not model and view.training != model.training:
        for v, m in zip(view.modules(), model.modules()):
            v.training = m.training
