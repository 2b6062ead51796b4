"""GGUF export: read the file back with `gguf` (tensors, metadata, vocabulary); llama.cpp logits when available."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatforge.chat import CHAT_TEMPLATE
from chatforge.checkpoint import save_checkpoint
from chatforge.cli import main
from chatforge.model import GPT, GPTConfig, ScalarHeadModel
from chatforge.tokenizer import SPECIAL_TOKENS

gguf = pytest.importorskip("gguf")

from chatforge.gguf_export import export_gguf  # noqa: E402  (after the skip: needs gguf)

VOCAB = 304  # the small tokenizer has 300 ids: 4 padding ids exercise the [PAD] tokens


def run_cli(*args):
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=VOCAB, context_length=32, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():  # non-zero biases and norms, so a mix-up of tensors shows
        for name, p in m.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def field(reader, key):
    """A GGUF metadata value: str, number, or list of them (works across gguf versions)."""
    f = reader.fields[key]
    kind = f.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def expected_tensors(m: GPT) -> dict[str, np.ndarray]:
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    out = {"token_embd.weight": sd["wte.weight"], "position_embd.weight": sd["wpe.weight"],
           "output_norm.weight": sd["ln_f.weight"], "output_norm.bias": sd["ln_f.bias"],
           "output.weight": sd["wte.weight"]}  # tied head written out, as llama.cpp's converter does
    parts = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    for i in range(m.config.n_layer):
        for ours, theirs in parts.items():
            for suffix in ("weight", "bias"):
                out[f"blk.{i}.{theirs}.{suffix}"] = sd[f"h.{i}.{ours}.{suffix}"]
    return out


def test_gguf_file_holds_every_tensor_the_metadata_and_the_vocabulary(model, small_tokenizer, tmp_path):
    path = export_gguf(model, small_tokenizer, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)

    tensors = {t.name: t for t in reader.tensors}
    expected = expected_tensors(model)
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert tuple(t.data.shape) == want.shape, name  # numpy order: nn.Linear's (out, in)
        assert list(t.shape) == list(reversed(want.shape)), name  # ggml order (ne0 = in)
        np.testing.assert_array_equal(t.data, want, err_msg=name)

    c = model.config
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "gpt2.context_length") == c.context_length
    assert field(reader, "gpt2.embedding_length") == c.n_embd
    assert field(reader, "gpt2.feed_forward_length") == 4 * c.n_embd
    assert field(reader, "gpt2.block_count") == c.n_layer
    assert field(reader, "gpt2.attention.head_count") == c.n_head
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(c.layer_norm_eps)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32

    tok = small_tokenizer
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    ours = [tok.backend.id_to_token(i) for i in range(tok.vocab_size)]
    assert tokens[: tok.vocab_size] == ours
    assert tokens[tok.vocab_size :] == [f"[PAD{i}]" for i in range(tok.vocab_size, VOCAB)]
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(types) == VOCAB
    for name, tid in tok.special_ids.items():
        assert types[tid] == gguf.TokenType.CONTROL, name
        assert tokens[tid] == SPECIAL_TOKENS[name]
    special = set(tok.special_ids.values())
    assert all(types[i] == gguf.TokenType.NORMAL for i in range(tok.vocab_size) if i not in special)
    assert all(t == gguf.TokenType.UNUSED for t in types[tok.vocab_size :])
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == tok.vocab_size - 256 - len(SPECIAL_TOKENS)  # one merge per learned token
    assert all(len(m.split(" ")) == 2 for m in merges)
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.eot_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eot_id
    assert field(reader, "tokenizer.ggml.eot_token_id") == tok.special_ids["end_turn"]
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE  # the template transformers and vLLM get


def test_cli_exports_f16_from_a_checkpoint(model, small_tokenizer, tmp_path):
    save_checkpoint(tmp_path / "ckpt", model, small_tokenizer)
    out = tmp_path / "sub" / "m16.gguf"
    assert run_cli("export", "--checkpoint", tmp_path / "ckpt", "--format", "gguf", "--dtype", "f16", "--out", out) == 0
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    expected = expected_tensors(model)
    for t in reader.tensors:
        want = expected[t.name]
        kind = gguf.GGMLQuantizationType.F16 if want.ndim == 2 else gguf.GGMLQuantizationType.F32
        assert t.tensor_type == kind, t.name
        np.testing.assert_allclose(np.asarray(t.data, dtype=np.float32), want, rtol=1e-3, atol=1e-4, err_msg=t.name)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_reward_model_checkpoint_is_refused(small_tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    rm = ScalarHeadModel(GPT(GPTConfig(vocab_size=VOCAB, context_length=16, n_layer=1, n_head=2, n_embd=16)))
    save_checkpoint(tmp_path / "rm", rm, small_tokenizer)
    assert run_cli("export", "--checkpoint", tmp_path / "rm", "--format", "gguf", "--out", tmp_path / "rm.gguf") == 2
    assert "reward/value model" in capsys.readouterr().err
    assert not (tmp_path / "rm.gguf").exists()
    # nor can a GPT2LMHeadModel directory hold its scalar head
    assert run_cli("export", "--checkpoint", tmp_path / "rm", "--format", "hf", "--out", tmp_path / "rm-hf") == 2
    assert "is a reward model" in capsys.readouterr().err
    assert not (tmp_path / "rm-hf").exists()


@pytest.mark.parametrize(
    ("out", "message"),
    [("model.bin", "expected an output file name ending in .gguf"),
     ("a_file/model.gguf", "cannot create the directory"),
     ("a_dir.gguf", "is a directory")],
)
def test_bad_output_paths_are_clear_errors(model, small_tokenizer, tmp_path, capsys, out, message):
    save_checkpoint(tmp_path / "ckpt", model, small_tokenizer)
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "a_dir.gguf").mkdir()
    assert run_cli("export", "--checkpoint", tmp_path / "ckpt", "--format", "gguf", "--out", tmp_path / out) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_llama_cpp_logits_match_ours(model, small_tokenizer, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path = export_gguf(model, small_tokenizer, tmp_path / "m.gguf")
    ids = small_tokenizer.encode("The capital of Veloria is Kesh. 3 plus 3 is 6.")[:24]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.context_length, logits_all=True, verbose=False)
    assert llm.tokenize(b"The capital of Veloria is Kesh. 3 plus 3 is 6.", add_bos=False)[:24] == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-3, atol=1e-3)


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def test_file_alone_reproduces_our_logits_with_llama_cpps_gpt2_graph(model, small_tokenizer, tmp_path):
    """A NumPy forward pass over the tensors read back, following llama.cpp's GPT-2 graph (ggml_mul_mat(W, x)
    with W of ne (in, out) is x @ W.T in NumPy order; qkv split q|k|v along its output rows)."""
    reader = gguf.GGUFReader(export_gguf(model, small_tokenizer, tmp_path / "m.gguf"))
    W = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    n_head, eps = field(reader, "gpt2.attention.head_count"), field(reader, "gpt2.attention.layer_norm_epsilon")
    ids = small_tokenizer.encode("Mira walked her dog. 5 plus 5 is 10.")[:20]
    T = len(ids)
    x = W["token_embd.weight"][ids] + W["position_embd.weight"][:T]
    C = x.shape[1]
    hd = C // n_head
    for i in range(field(reader, "gpt2.block_count")):
        def p(n, i=i):
            return W[f"blk.{i}.{n}"]
        h = _layer_norm(x, p("attn_norm.weight"), p("attn_norm.bias"), eps)
        qkv = h @ p("attn_qkv.weight").T + p("attn_qkv.bias")
        q, k, v = (qkv[:, j * C:(j + 1) * C].reshape(T, n_head, hd).transpose(1, 0, 2) for j in range(3))
        att = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(1, 0, 2).reshape(T, C)
        x = x + y @ p("attn_output.weight").T + p("attn_output.bias")
        h = _layer_norm(x, p("ffn_norm.weight"), p("ffn_norm.bias"), eps)
        u = h @ p("ffn_up.weight").T + p("ffn_up.bias")
        u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
        x = x + u @ p("ffn_down.weight").T + p("ffn_down.bias")
    logits = _layer_norm(x, W["output_norm.weight"], W["output_norm.bias"], eps) @ W["output.weight"].T
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].double().numpy()
    np.testing.assert_allclose(logits, ours, rtol=1e-4, atol=1e-5)
