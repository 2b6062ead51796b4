"""chatforge's own fp32 CPU products (chatforge/accel/kernels.cpp), against F.linear.

They are built on this machine the first time (about 40 s); everything skips, with the reason,
where the CPU has no AVX-512 or the build fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatforge.accel import kernels
from chatforge.accel.linear import fast_kernel, fast_linear

# shapes with a K that is not a multiple of 16 or 64 (the masked tails), and O that is not a
# multiple of 16 (the last panel's padding)
SHAPES = [(768, 2304), (3072, 768), (100, 7), (17, 33), (5, 1), (64, 50), (48, 96)]


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("features, outputs", SHAPES)
def test_the_one_row_product_equals_f_linear(ops, features, outputs):
    torch.manual_seed(0)
    x, w, b = torch.randn(1, features), torch.randn(outputs, features), torch.randn(outputs)
    assert close(ops.linear(x, w, b), F.linear(x, w, b))
    assert close(ops.linear(x, w, None), F.linear(x, w))
    assert close(ops.linear(x[0], w, b), F.linear(x[0], w, b))  # a 1-D row keeps its shape


@pytest.mark.parametrize("features, outputs", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 15, 16, 17, 24, 32, 33, 64])
def test_the_packed_product_equals_f_linear_at_every_row_count(ops, rows, features, outputs):
    """Tiles are 16 rows: counts below, at and past it, and past several."""
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, features), torch.randn(outputs, features), torch.randn(outputs)
    packed = ops.pack(w)
    assert close(ops.packed_linear(x, packed, outputs, b), F.linear(x, w, b))
    assert close(ops.packed_linear(x, packed, outputs, None), F.linear(x, w))


def test_the_packed_product_takes_batched_three_dimensional_input(ops):
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 40), torch.randn(9, 40)
    assert close(ops.packed_linear(x, ops.pack(w), 9, None), F.linear(x, w))
    assert close(ops.packed_linear(x.transpose(0, 1), ops.pack(w), 9, None), F.linear(x.transpose(0, 1), w))


def test_the_pack_is_the_weights_transpose_in_panels_of_16_outputs_padded_with_zeros(ops):
    w = torch.arange(20 * 3, dtype=torch.float32).reshape(20, 3)  # 20 outputs: a full panel and 4
    packed = ops.pack(w)
    assert packed.shape == (2, 3, 16)
    assert torch.equal(packed[0], w[:16].T)
    assert torch.equal(packed[1, :, :4], w[16:].T)
    assert torch.equal(packed[1, :, 4:], torch.zeros(3, 12))


def test_a_wrong_call_is_a_clear_error_not_a_crash(ops):
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="one row"):
        ops.linear(torch.randn(2, 16), w, None)
    with pytest.raises(RuntimeError, match="features"):
        ops.linear(torch.randn(1, 15), w, None)
    with pytest.raises(RuntimeError, match="fp32"):
        ops.linear(torch.randn(1, 16, dtype=torch.float64), w.double(), None)
    with pytest.raises(RuntimeError, match="do not match"):
        ops.packed_linear(torch.randn(4, 15), ops.pack(w), 8, None)
    with pytest.raises(RuntimeError, match="2-D fp32"):
        ops.pack(torch.randn(8))
    with pytest.raises(RuntimeError, match="the bias must be 8 fp32 values"):
        ops.linear(torch.randn(1, 16), w, torch.randn(7))
    with pytest.raises(RuntimeError, match="do not match"):
        ops.packed_linear(torch.randn(4, 16), ops.pack(w), 40, None)  # a pack of 8 outputs, not 40


def test_fast_linear_uses_them_up_to_32_rows_once_loaded_and_torchs_products_otherwise(active):
    assert [fast_kernel(r) for r in (1, 2, 32)] == ["chatforge_gemv", "chatforge_packed", "chatforge_packed"]
    assert fast_kernel(33) not in ("chatforge_gemv", "chatforge_packed")  # MKL's gemm is faster from here
    kernels.set_active(False)
    assert fast_kernel(1) not in ("chatforge_gemv", "chatforge_packed")


@pytest.mark.parametrize("rows", [1, 2, 16, 32, 33, 64])
def test_fast_linear_through_them_equals_the_layer(active, rows):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 300)
    x = torch.randn(rows, 96)
    with torch.no_grad():
        assert close(fast_linear(layer, x), layer(x))


def test_fast_linear_packs_again_after_the_weight_changes(active):
    """The packed copy must follow training (optimizer steps, fused AdamW too) and loads."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 40)
    x = torch.randn(8, 32)
    with torch.no_grad():
        fast_linear(layer, x)
    for optimizer in (torch.optim.SGD(layer.parameters(), lr=1.0),
                      torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)):
        layer(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            assert close(fast_linear(layer, x), layer(x))
    with torch.no_grad():
        layer.load_state_dict({"weight": torch.randn(40, 32), "bias": torch.zeros(40)})
        assert close(fast_linear(layer, x), layer(x))


def test_they_are_not_built_when_switched_off(monkeypatch):
    monkeypatch.setenv("CHATFORGE_CPU_KERNELS", "0")
    assert kernels.unsupported_reason() == "CHATFORGE_CPU_KERNELS=0"
    assert kernels.load() is False and not kernels.active()


def test_the_reason_they_cannot_run_names_what_torch_reports_for_this_cpu(monkeypatch):
    from chatforge.accel import cpu

    monkeypatch.setattr(cpu, "capability", lambda: "SVE256")
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert kernels.unsupported_reason() == ("they need AVX-512; this aarch64 offers SVE256 "
                                            "(torch.backends.cpu.get_cpu_capability())")
    monkeypatch.setattr(cpu, "capability", lambda: "AVX512")
    monkeypatch.setattr(cpu.sys, "platform", "darwin")
    assert kernels.unsupported_reason() == "they are built with GCC's flags on Linux; this is darwin"
