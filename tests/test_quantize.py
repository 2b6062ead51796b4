"""Weight-only int8 (chatforge/accel/quantize.py), quantized checkpoints, training's refusal of them, and GGUF q8_0."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_cli import run_cli  # tests/ is on sys.path (pytest prepends it)
from torch import nn

from chatforge.accel import kernels
from chatforge.accel.linear import FastLinear, fast_view
from chatforge.accel.quantize import (
    Int8Embedding,
    Int8Linear,
    dequantize,
    load_for_inference,
    quantize_model,
    quantize_weight,
    weight_bytes,
)
from chatforge.checkpoint import load_checkpoint, save_checkpoint
from chatforge.errors import CheckpointError, ConfigError
from chatforge.generate.engine import Engine
from chatforge.generate.params import SamplingParams
from chatforge.model import GPT, GPTConfig, ScalarHeadModel

VOCAB = 304  # the small tokenizer's 300 ids and 4 unused


def make_model(n_embd: int = 32, seed: int = 0, vocab: int = VOCAB) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=vocab, context_length=32, n_layer=2, n_head=2, n_embd=n_embd))
    with torch.no_grad():  # non-zero biases and norms; blocks that outweigh the token embedding (greedy then
        for name, p in m.named_parameters():  # varies instead of repeating the last token) and peaked logits
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.startswith("h."):
                p.mul_(10)
        m.ln_f.weight.mul_(30)
    return m.eval()


def dequantized_copy(model: GPT, quantized: GPT) -> GPT:
    """An fp32 GPT holding exactly the weights the quantized model multiplies by."""
    fp = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, (Int8Linear, Int8Embedding)):
                fp.get_submodule(name).weight.copy_(dequantize(module.qweight, module.scale))
    return fp


def test_quantization_error_is_at_most_half_a_step_in_every_channel():
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    w[5] = 0.0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (w - dequantize(q, scale)).abs().amax(dim=1)
    assert torch.all(err <= scale / 2 * (1 + 1e-6))
    assert torch.equal(q.abs().amax(dim=1)[torch.arange(64) != 5], torch.full((63,), 127, dtype=torch.int8))
    assert scale[5] == 1.0 and not q[5].any()  # a zero row: no division by zero


def test_int8_linear_is_the_dequantized_product_within_the_error_bound():
    torch.manual_seed(1)
    linear = nn.Linear(48, 40)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, 48)
    y = layer(x)
    ref = F.linear(x, dequantize(layer.qweight, layer.scale), linear.bias)
    assert (y - ref).abs().max() <= 1e-6  # (torch.testing's first call costs 2 s)
    bound = x.abs() @ (layer.scale / 2).expand(48, 40)  # sum_i |x_i| * s_o / 2
    assert torch.all((y - linear(x)).abs() <= bound + 1e-5)
    assert {n for n, _ in layer.named_buffers()} == {"qweight", "scale", "bias"} and not list(layer.parameters())


def test_quantize_model_replaces_every_product_and_shares_the_tied_rows():
    model = make_model()
    fp32_bytes = weight_bytes(model)
    quantize_model(model)
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert isinstance(model.wte, Int8Embedding) and model.lm_head.qweight is model.wte.qweight
    assert all(isinstance(b.attn.c_attn, Int8Linear) and isinstance(b.mlp.c_proj, Int8Linear) for b in model.h)
    assert weight_bytes(model) < 0.4 * fp32_bytes
    view = fast_view(model)  # the engine's view leaves int8 layers alone
    assert not [m for m in view.modules() if isinstance(m, FastLinear)]
    assert view.h[0].attn.c_attn is model.h[0].attn.c_attn
    with pytest.raises(ConfigError, match="int4"):
        quantize_model(make_model(), "int4")
    with pytest.raises(ConfigError, match="ScalarHeadModel"):
        quantize_model(ScalarHeadModel(make_model()))


def test_engine_greedy_tokens_of_int8_equal_the_dequantized_fp32_models(small_tokenizer):
    model = make_model()
    quantized = quantize_model(copy.deepcopy(model))
    fp = dequantized_copy(model, quantized)
    prompts = [small_tokenizer.encode(t) for t in ("The capital of", "Mira walked her dog.", "7 plus")]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)

    def greedy(m: GPT) -> list[list[int]]:
        engine = Engine(m, small_tokenizer, max_batch_size=4, stop_token_ids=[], fused=True)
        return [c.outputs[0].token_ids for c in engine.generate(prompts, params)]

    # where the kernels build, the fused step runs the int8 model on its int8 products
    assert Engine(quantized, small_tokenizer, fused=True).fused == (kernels.unsupported_reason() is None)
    assert greedy(quantized) == greedy(fp)
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        ref = fp(ids)  # the same product up to float rounding (an int8 kernel sums in another order)
        assert (quantized(ids) - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-4


def test_quantize_command_round_trip_and_loading_for_inference(small_tokenizer, tmp_path, capsys):
    model = make_model()
    save_checkpoint(tmp_path / "fp32", model, small_tokenizer)
    assert run_cli("quantize", tmp_path / "fp32", "--out", tmp_path / "q8") == 0
    assert "quantize: int8" in capsys.readouterr().out
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["quantization"]["method"] == "int8_weight_only" and config["quantization"]["group"] == "per_channel"
    state = load_file(str(tmp_path / "q8" / "model.safetensors"))
    assert state["h.0.attn.c_attn.qweight"].dtype == torch.int8 and state["wte.scale"].dtype == torch.float32
    assert not [k for k in state if k.startswith("lm_head")]  # the tied head is stored once
    for name in ("tokenizer.json", "generation_config.json"):
        assert (tmp_path / "q8" / name).read_bytes() == (tmp_path / "fp32" / name).read_bytes()

    kernels._STATE["active"] = False  # as a process starts (the autouse fixture restores it)
    loaded = load_for_inference(tmp_path / "q8").model
    assert loaded.lm_head.qweight is loaded.wte.qweight and not loaded.wte.qweight.is_meta
    # loading an int8 model turns chatforge's kernels on wherever they build: its products run the int8
    # kernel on every path (--no-fused and eval too), not the dequantizing reference
    assert kernels.active() == (kernels.unsupported_reason() is None)
    on_load = load_for_inference(tmp_path / "fp32", quantize="int8").model
    ids = torch.tensor([small_tokenizer.encode("The capital of Veloria")])
    with torch.no_grad():
        assert torch.equal(loaded(ids), quantize_model(copy.deepcopy(model))(ids))
        assert torch.equal(on_load(ids), loaded(ids))

    args = ["--prompt", "The capital of", "--temperature", "0", "--max-tokens", "6", "--no-fused"]
    assert run_cli("generate", "--checkpoint", tmp_path / "q8", *args) == 0
    stored = capsys.readouterr().out
    assert run_cli("generate", "--checkpoint", tmp_path / "fp32", "--quantize", "int8", *args) == 0
    assert capsys.readouterr().out == stored and stored.startswith("The capital of")

    assert run_cli("quantize", tmp_path / "q8", "--out", tmp_path / "again") == 2
    assert "already quantized" in capsys.readouterr().err
    stage = tmp_path / "stage"  # a stage directory: its checkpoint/ is the source, and survives
    save_checkpoint(stage / "checkpoint", model, small_tokenizer)
    for out in (stage, stage / "checkpoint", tmp_path):
        assert run_cli("quantize", stage, "--out", out) == 2
        assert "is or holds the checkpoint" in capsys.readouterr().err
    assert run_cli("quantize", stage, "--out", tmp_path / "fp32" / "tokenizer.json") == 2
    assert (stage / "checkpoint" / "model.safetensors").exists()


def test_serve_loads_a_quantized_checkpoint(small_tokenizer, tmp_path):
    from chatforge.serve.config import ServeConfig
    from chatforge.serve.server import build_app

    save_checkpoint(tmp_path / "fp32", make_model(), small_tokenizer)
    app = build_app(ServeConfig(checkpoint=str(tmp_path / "fp32"), quantize="int8", web=False, fused=False))
    assert isinstance(app.state.chatforge.engine.model.h[0].mlp.c_fc, Int8Linear)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo", "ppo"])
def test_training_refuses_a_quantized_checkpoint(stage, small_tokenizer, tmp_path, capsys):
    save_checkpoint(tmp_path / "fp32", make_model(), small_tokenizer)
    assert run_cli("quantize", tmp_path / "fp32", "--out", tmp_path / "q8") == 0
    q8, data = tmp_path / "q8", tmp_path / "data.jsonl"
    if stage == "pretrain":
        from chatforge.train.config import PretrainConfig
        from chatforge.train.pretrain import build_model

        with pytest.raises(CheckpointError, match="training needs fp32 weights") as e:
            build_model(PretrainConfig(init_from=str(q8)), small_tokenizer)
        assert str(q8) in str(e.value) and "\n" not in str(e.value)
        return
    args = {"ppo": ["--policy", q8, "--reward-model", tmp_path / "fp32", "--prompts", data]}.get(
        stage, ["--init-from", q8, "--data", data])
    capsys.readouterr()
    assert run_cli(stage, *args, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {q8}: a quantized checkpoint") and "training needs fp32 weights" in err
    assert str(tmp_path / "fp32") in err and "\n" not in err  # names the checkpoint it came from
    with pytest.raises(CheckpointError, match="training needs fp32 weights"):
        load_checkpoint(q8)


# ---- GGUF q8_0 ----------------------------------------------------------------------------------------


def test_gguf_q8_0_round_trip_within_q8_0s_bound(small_tokenizer, tmp_path):
    gguf = pytest.importorskip("gguf")
    from chatforge.gguf_export import export_gguf, gguf_tensors

    model = make_model()
    path = export_gguf(model, small_tokenizer, tmp_path / "m.gguf", dtype="q8_0")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType.MOSTLY_Q8_0
    want = {k: v.numpy() for k, v in gguf_tensors(model).items()}
    Q = gguf.GGMLQuantizationType
    for t in reader.tensors:
        w = want[t.name]
        quantized = w.ndim == 2 and t.name != "position_embd.weight"
        assert t.tensor_type == (Q.Q8_0 if quantized else Q.F32), t.name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if not quantized:
            np.testing.assert_array_equal(got, w, err_msg=t.name)
            continue
        blocks = np.abs(w).reshape(w.shape[0], -1, 32).max(-1, keepdims=True)  # each block's absmax
        bound = blocks / 127 * (0.5 + 127 * 2.0**-11)  # half a step, plus the f16 rounding of the scale
        err = np.abs(got - w).reshape(w.shape[0], -1, 32)
        assert np.all(err <= bound + 1e-7), t.name
    assert {t.name for t in reader.tensors} == set(want)


def test_gguf_q8_0_refuses_a_width_that_is_not_a_multiple_of_32(small_tokenizer, tmp_path, capsys):
    pytest.importorskip("gguf")
    save_checkpoint(tmp_path / "ckpt", make_model(n_embd=16), small_tokenizer)
    out = tmp_path / "m.gguf"
    assert run_cli("export", "--checkpoint", tmp_path / "ckpt", "--format", "gguf", "--dtype", "q8_0",
                   "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: GGUF q8_0: token_embd.weight has rows of 16 values") and "\n" not in err
    assert "multiple of 32" in err and not list(tmp_path.glob("*.gguf*"))


def test_llama_cpp_greedy_decodes_the_q8_0_file_as_our_fp32_model(small_tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from chatforge.gguf_export import export_gguf

    model = make_model()
    path = export_gguf(model, small_tokenizer, tmp_path / "m.gguf", dtype="q8_0")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, verbose=False)
    prompt = small_tokenizer.encode("The capital of Veloria is")
    llm.eval(prompt)
    theirs = []
    for _ in range(8):  # argmax of the last position's logits after each decode
        theirs.append(int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax()))
        llm.eval(theirs[-1:])
    engine = Engine(model, small_tokenizer, stop_token_ids=[])
    ours = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert theirs == ours.outputs[0].token_ids and len(set(theirs)) > 2  # a varied answer, not one token repeated
