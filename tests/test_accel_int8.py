"""chatforge's weight-only int8 product (accel/int8.py, accel/kernels_int8.cpp) against the dequantized
fp32 product.

The kernel is checked in every build this CPU can run: the one `kernels.load()` builds (with the fp32
kernels, where they build), and kernels_int8.cpp built alone for AVX2 and as plain C++
(`int8.standalone`), so an AVX-512 machine checks the AVX2 code too and an AVX2 machine checks the
kernel before the combined extension builds there. Each build takes about 40 s the first time (then
torch's extension cache has it); a build that cannot run here skips with the reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import built_kernels  # tests/ is on sys.path (pytest prepends it)

from chatforge.accel import cpu, int8, kernels

# in and out features: K not a multiple of 8, 16 or 64 (the vector and line tails), O not a multiple
# of the tiles' 3 or 4 outputs
SHAPES = [(768, 2304), (3072, 768), (100, 7), (17, 33), (5, 1), (64, 50), (1, 3), (129, 130)]
ROWS = [1, 2, 3, 4, 5, 7, 13, 16, 32, 33]


def _build(isa: str):
    if isa == "native":
        return built_kernels()
    if isa == "avx2":
        if cpu.capability() not in ("AVX2", "AVX512"):
            pytest.skip(f"this CPU runs no AVX2 code: {cpu.capability()}")
        if kernels.unsupported_reason() is None and kernels._build() and torch.ops.chatforge_cpu.int8_isa() == "avx2":
            pytest.skip("the native build is the AVX2 one")
    try:
        return int8.standalone(isa)
    except Exception as e:  # noqa: BLE001 - no compiler: nothing to check
        pytest.skip(f"kernels_int8.cpp did not build for {isa}: {type(e).__name__}: {e}")


@pytest.fixture(scope="module", params=["native", "avx2", "scalar"])
def int8_ops(request):
    return _build(request.param)


def quantized(outputs: int, features: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (outputs, features), dtype=torch.int8, generator=g)
    scale = torch.rand(outputs, generator=g) * 0.01 + 1e-3
    return q, scale, torch.randn(outputs, generator=g)


def assert_close(got: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias):
    """Equal to the dequantized product to fp32 rounding: within 1e-5 of the sum of the terms'
    magnitudes (float64), the error bound of any fp32 summation order."""
    want = F.linear(x.double(), q.double() * scale.double()[:, None], None if bias is None else bias.double())
    bound = F.linear(x.double().abs(), q.double().abs() * scale.double()[:, None],
                     None if bias is None else bias.double().abs())
    assert got.shape == want.shape and got.dtype == torch.float32
    assert ((got.double() - want).abs() <= 1e-5 * bound + 1e-30).all(), (got.double() - want).abs().max()
    assert torch.allclose(got, int8.reference(x, q, scale, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("features, outputs", SHAPES)
def test_the_kernel_is_the_dequantized_product_at_every_row_count(int8_ops, features, outputs):
    q, scale, bias = quantized(outputs, features)
    for rows in ROWS if outputs * features < 100_000 else (1, 2, 3, 16, 33):  # GPT-2's shapes: fewer
        x = torch.randn(rows, features)
        assert_close(int8_ops.int8_linear(x, q, scale, bias), x, q, scale, bias)
        assert_close(int8_ops.int8_linear(x, q, scale, None), x, q, scale, None)


def test_the_kernel_takes_any_leading_shape_and_strides(int8_ops):
    q, scale, bias = quantized(9, 40)
    x = torch.randn(2, 3, 40)
    assert_close(int8_ops.int8_linear(x, q, scale, bias), x, q, scale, bias)
    xt = x.transpose(0, 1)  # not contiguous
    assert_close(int8_ops.int8_linear(xt, q, scale, None), xt, q, scale, None)
    assert_close(int8_ops.int8_linear(x[0, 0], q, scale, bias), x[0, 0], q, scale, bias)  # a 1-D row keeps its shape
    assert int8_ops.int8_linear(torch.randn(0, 40), q, scale, bias).shape == (0, 9)
    empty = int8_ops.int8_linear(torch.randn(2, 0), q[:, :0], scale, bias)  # no features: the bias
    assert torch.equal(empty, bias.expand(2, 9))


def test_a_wrong_call_is_a_clear_error_not_a_crash(int8_ops):
    q, scale, bias = quantized(8, 16)
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="x must be fp32"):
        int8_ops.int8_linear(x.double(), q, scale, None)
    with pytest.raises(RuntimeError, match="2-D int8"):
        int8_ops.int8_linear(x, q.float(), scale, None)
    with pytest.raises(RuntimeError, match="x has 15 features, the weight 16"):
        int8_ops.int8_linear(torch.randn(2, 15), q, scale, None)
    with pytest.raises(RuntimeError, match="the scale must be 8 fp32 values"):
        int8_ops.int8_linear(x, q, scale[:7], None)
    with pytest.raises(RuntimeError, match="the bias must be 8 fp32 values"):
        int8_ops.int8_linear(x, q, scale, bias[:7])


def test_the_fake_kernel_gives_the_shapes_torch_compile_traces(int8_ops):
    q, scale, bias = quantized(9, 40)
    torch.library.opcheck(int8_ops.int8_linear, (torch.randn(3, 40), q, scale, bias),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.fixture
def kernel(monkeypatch):
    """int8_linear's kernel path switched on, through the build this CPU runs (the native one where
    kernels.load() builds, else kernels_int8.cpp alone)."""
    native = kernels.unsupported_reason() is None and kernels._build()
    if native:
        kernels.set_active(True)
    else:
        built = _build("avx2" if cpu.capability() in ("AVX2", "AVX512") else "scalar")
        monkeypatch.setattr(kernels, "active", lambda: True)
        monkeypatch.setattr(torch.ops, "chatforge_cpu", built, raising=False)
    return torch.ops.chatforge_cpu


def test_int8_linear_runs_the_kernel_up_to_max_rows_without_gradients_and_the_reference_otherwise(kernel):
    q, scale, bias = quantized(50, 64)
    x = torch.randn(int8.MAX_ROWS, 64)
    with torch.no_grad():
        assert int8.uses_kernel(x, q, scale, bias) and int8.uses_kernel(x[:1], q, scale, None)
        assert int8.uses_kernel(x.view(4, -1, 64), q, scale, bias)
        assert not int8.uses_kernel(torch.randn(int8.MAX_ROWS + 1, 64), q, scale, bias)  # a long prefill
        assert not int8.uses_kernel(x.double(), q, scale.double(), bias.double())
        assert not int8.uses_kernel(x, q.t().contiguous().t(), scale, bias)  # a transposed weight
        assert not int8.uses_kernel(x, q.float(), scale, bias)
    assert int8.uses_kernel(x, q, scale, bias)  # nothing needs a gradient
    assert not int8.uses_kernel(x.requires_grad_(), q, scale, bias)
    for rows in (1, 2, 33, int8.MAX_ROWS + 1):
        xr = torch.randn(rows, 64)
        with torch.no_grad():
            assert_close(int8.int8_linear(xr, q, scale, bias), xr, q, scale, bias)
    xg = torch.randn(2, 64, requires_grad=True)  # the reference, so the gradient flows
    int8.int8_linear(xg, q, scale, bias).sum().backward()
    assert torch.allclose(xg.grad, (q.float() * scale[:, None]).sum(0).expand(2, 64), rtol=1e-5, atol=1e-5)


def test_without_the_kernels_int8_linear_is_the_reference():
    assert not kernels.active()  # conftest's autouse fixture: off unless a test turns them on
    q, scale, bias = quantized(50, 64)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert not int8.uses_kernel(x, q, scale, bias)
        assert torch.equal(int8.int8_linear(x, q, scale, bias), int8.reference(x, q, scale, bias))
