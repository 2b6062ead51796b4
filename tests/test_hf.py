"""GPT-2 interop with transformers: the same logits both ways, exported directories that load, and the
exported chat template that renders our token ids through `apply_chat_template`."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from chatforge.chat import CHAT_TEMPLATE, ChatTemplate, Conversation  # noqa: E402
from chatforge.checkpoint import export_hf, load_checkpoint  # noqa: E402
from chatforge.errors import CheckpointError  # noqa: E402
from chatforge.model import GPT, GPTConfig  # noqa: E402


def random_hf_gpt2(tmp_path, **kw):
    torch.manual_seed(0)
    settings = dict(n_layer=3, n_embd=48, n_head=4, vocab_size=300, n_positions=64, bos_token_id=0, eos_token_id=0)
    settings.update(kw)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings)).eval()
    model.save_pretrained(tmp_path)
    return model


def test_a_transformers_gpt2_directory_loads_with_equal_logits(tmp_path):
    hf = random_hf_gpt2(tmp_path)
    ours = load_checkpoint(tmp_path, tokenizer=False).model.eval()
    x = torch.randint(0, 300, (3, 50))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() < 1e-4


def test_an_exported_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, small_tokenizer):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=64, n_layer=2, n_head=2,
                         n_embd=32)).eval()
    export_hf(ours, small_tokenizer, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, small_tokenizer.vocab_size, (2, 40))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() < 1e-4


def test_exported_tokenizer_encodes_like_ours_in_transformers(tmp_path, small_tokenizer, tiny_model):
    tiny = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=32, n_layer=1, n_head=2, n_embd=16))
    export_hf(tiny, small_tokenizer, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The capital of Veloria is Kesh. 12 plus 7 is 19 🙂"
    assert hf_tok.encode(text) == small_tokenizer.encode(text)
    assert hf_tok.eos_token_id == small_tokenizer.eot_id


def test_export_then_import_round_trips_exactly(tmp_path, small_tokenizer):
    torch.manual_seed(2)
    ours = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=32, n_layer=2, n_head=2, n_embd=16))
    export_hf(ours, small_tokenizer, tmp_path / "hf")
    back = load_checkpoint(tmp_path / "hf")
    assert back.tokenizer.hash == small_tokenizer.hash
    for k, v in ours.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k


def test_unsupported_gpt2_variants_are_refused_by_name(tmp_path):
    random_hf_gpt2(tmp_path, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        load_checkpoint(tmp_path, tokenizer=False)


def test_pickled_weights_are_not_loaded(tmp_path):
    random_hf_gpt2(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(tmp_path, tokenizer=False)


def test_exported_files_get_ordinary_permissions_not_owner_only(tmp_path, small_tokenizer):
    """Files are made as `open` makes them (0666 less the umask), so an export can be shared as is."""
    import os

    from chatforge.gguf_export import export_gguf

    tiny = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=32, n_layer=1, n_head=2, n_embd=16))
    old = os.umask(0o022)
    try:
        export_hf(tiny, small_tokenizer, tmp_path / "hf")
        export_gguf(tiny, small_tokenizer, tmp_path / "model.gguf")
    finally:
        os.umask(old)
    files = [*sorted((tmp_path / "hf").iterdir()), tmp_path / "model.gguf"]
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o644" for f in files}


def test_hf_is_pure_conversion_that_imports_no_checkpoint_code():
    """checkpoint.py reads and writes HF directories through hf.py's conversions; hf.py never imports it back."""
    import subprocess
    import sys

    code = "import sys, chatforge.hf; print(sorted(m for m in sys.modules if m.startswith('chatforge.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "chatforge.checkpoint" not in out and "chatforge.files" not in out


# ---- the chat template in tokenizer_config.json ------------------------------------------------------

WEATHER = {"name": "weather", "description": "The weather in a city ☀",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CLOCK = {"name": "clock", "parameters": {"type": "object", "properties": {}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]


def call(name: str, arguments, call_id: str | None = None) -> dict:
    return {"id": call_id or f"call_{name}", "type": "function", "function": {"name": name, "arguments": arguments}}


CHATS = {
    "system": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And Veloria?"}], None),
    "no-system": ([{"role": "user", "content": "What is 3 plus 3?"}, {"role": "assistant", "content": "6."}], None),
    "developer": ([{"role": "developer", "content": "Be kind."}, {"role": "user", "content": "Hi"}], None),
    "tools": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Kesh?"}], TOOLS),
    "tools-no-system": ([{"role": "user", "content": "Time?"}], [WEATHER, CLOCK]),  # bare function objects
    "calls-and-results": ([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Kesh and Mira's town?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            call("weather", {"city": "Kesh"}),  # a mapping: tojson writes it
            call("weather", '{"city": "Mira\'s town ☀"}')]},  # a string: written as is (canonical JSON)
        {"role": "tool", "tool_call_id": "call_weather", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_weather", "content": "rain"},
        {"role": "assistant", "content": "Sunny in Kesh, rain there."}, {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": [call("clock", {})]},  # a call with no text
        {"role": "tool", "tool_call_id": "call_clock", "content": "noon"}], TOOLS),
}


@pytest.fixture(scope="module")
def exported_tokenizer(tmp_path_factory, small_tokenizer):
    tiny = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, context_length=32, n_layer=1, n_head=2, n_embd=16))
    out = export_hf(tiny, small_tokenizer, tmp_path_factory.mktemp("chat") / "hf")
    return transformers.AutoTokenizer.from_pretrained(out), out


def test_exported_tokenizer_config_carries_our_chat_template(exported_tokenizer):
    import json

    _, out = exported_tokenizer
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CHATS))
def test_apply_chat_template_gives_exactly_our_token_ids(exported_tokenizer, small_tokenizer, name,
                                                         generation_prompt):
    hf_tok, _ = exported_tokenizer
    messages, tools = CHATS[name]
    theirs = hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                        tokenize=True, return_dict=False)
    template = ChatTemplate(small_tokenizer)
    conv = Conversation.from_openai(messages, tools=tools, need_assistant=False)
    ours = template.generation_prompt(conv) if generation_prompt else template.render(conv).ids
    assert list(theirs) == ours
