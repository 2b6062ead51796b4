"""chatforge's own fp32 CPU products (chatforge/accel/kernels.cpp), against F.linear.

They are built on this machine the first time (about 40 s), for the widest instruction set it has
(AVX-512 or AVX2; CHATFORGE_CPU_ISA=avx2 picks the AVX2 build on an AVX-512 CPU); everything skips,
with the reason, where the CPU has neither or the build fails. The build this process does not load is
checked once in a subprocess (slow: it builds the other one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from chatforge.accel import cpu, kernels
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
    assert ops.panel_width() == 16 and packed.shape == (2, 3, 16)
    assert torch.equal(packed[0], w[:16].T)
    assert torch.equal(packed[1, :, :4], w[16:].T)
    assert torch.equal(packed[1, :, 4:], torch.zeros(3, 12))


def test_the_build_loaded_is_the_one_this_cpu_and_chatforge_cpu_isa_pick(ops):
    assert ops.isa() == kernels.isa() == cpu.kernels_isa() in ("avx512", "avx2")


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
    monkeypatch.delenv("CHATFORGE_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu, "capability", lambda: "SVE256")
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert kernels.unsupported_reason() == ("they need AVX2 or AVX-512; this aarch64 offers SVE256 "
                                            "(torch.backends.cpu.get_cpu_capability())")
    for offered, build in (("AVX512", "avx512"), ("AVX2", "avx2")):
        monkeypatch.setattr(cpu, "capability", lambda offered=offered: offered)
        assert cpu.kernels_isa() == build and kernels.unsupported_reason() is None
    monkeypatch.setattr(cpu.sys, "platform", "darwin")
    assert kernels.unsupported_reason() == "they are built with GCC's flags on Linux; this is darwin"


def test_chatforge_cpu_isa_picks_a_narrower_build_never_a_wider_one(monkeypatch):
    monkeypatch.setattr(cpu, "capability", lambda: "AVX512")
    monkeypatch.setenv("CHATFORGE_CPU_ISA", "AVX2")
    assert cpu.kernels_isa() == "avx2" and kernels.unsupported_reason() is None
    monkeypatch.setattr(cpu, "capability", lambda: "AVX2")
    monkeypatch.setenv("CHATFORGE_CPU_ISA", "avx512")
    assert kernels.unsupported_reason() == "CHATFORGE_CPU_ISA=avx512 asks for more than this CPU offers (AVX2)"
    monkeypatch.setenv("CHATFORGE_CPU_ISA", "neon")
    assert kernels.unsupported_reason() == "CHATFORGE_CPU_ISA=neon is not one of avx512, avx2"


_OTHER_BUILD = """
import json, torch
import torch.nn.functional as F
from chatforge.accel import kernels
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.model import GPT, GPTConfig
assert kernels.load(), kernels.unsupported_reason()
ops, worst = torch.ops.chatforge_cpu, 0.0
torch.manual_seed(0)
for features, outputs in [(768, 2304), (100, 7), (17, 33), (5, 1)]:
    w, b = torch.randn(outputs, features), torch.randn(outputs)
    for rows in (1, 2, 7, 16, 17, 32):
        x = torch.randn(rows, features)
        got = ops.linear(x, w, b) if rows == 1 else ops.packed_linear(x, ops.pack(w), outputs, b)
        worst = max(worst, ((got - F.linear(x, w, b)).abs() / (1e-3 + 1e-4 * F.linear(x, w, b).abs())).max().item())
class Letters:
    special_ids = {}
    def token_bytes(self, token_id):
        return bytes([97 + token_id % 26])
model = GPT(GPTConfig(vocab_size=300, context_length=48, n_layer=3, n_head=6, n_embd=42)).eval()
with torch.no_grad():
    model.wte.weight.mul_(30)
prompts, params = [[1, 2, 3], [7], [5, 5, 9, 30], [60, 2]], SamplingParams(max_tokens=12, temperature=0)
tokens = {}
for fused in (True, False):
    engine = Engine(model, Letters(), max_batch_size=4, stop_token_ids=[], fused=fused)
    assert engine.fused == fused, engine.fused_reason
    tokens[fused] = [c.outputs[0].token_ids for c in engine.generate(prompts, params)]
    tokens[fused].append([c.outputs[0].token_ids for c in engine.generate(prompts[:1], params)][0])
print(json.dumps({"isa": ops.isa(), "worst": worst, "same_tokens": tokens[True] == tokens[False]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_the_build_this_process_does_not_load_computes_the_same_products_and_tokens(isa):
    """In a subprocess under CHATFORGE_CPU_ISA (one process holds one build): the products at 1-32 rows
    against F.linear, and a fused engine's greedy tokens at 4 rows and 1 against the eager engine's.
    This process's own build is what the other tests check; a build this CPU cannot run skips."""
    if isa == cpu.kernels_isa():
        pytest.skip(f"the {isa} build is this process's: the other tests check it")
    env = {**os.environ, "CHATFORGE_CPU_ISA": isa}
    reason = subprocess.run([sys.executable, "-c", "from chatforge.accel import kernels; "
                             "print(kernels.unsupported_reason())"], env=env, capture_output=True, text=True)
    if reason.stdout.strip() != "None":
        pytest.skip(f"the {isa} build cannot run here: {reason.stdout.strip() or reason.stderr[-300:]}")
    out = subprocess.run([sys.executable, "-c", _OTHER_BUILD], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["isa"] == isa and got["worst"] <= 1.0 and got["same_tokens"]
