"""Logprobs the way lm-evaluation-harness reads them, and lm-evaluation-harness itself against a live server.

lm-evaluation-harness scores a multiple-choice answer by sending context + continuation as one prompt
with `echo: true, max_tokens: 1, logprobs: 1` and summing `token_logprobs[ctxlen:-1]`: it drops the last
entry as "the one generated token". So logprobs must list every generated token, an end token too
(<|endoftext|> or <|end|>, which usage counts but the text leaves out); otherwise the slice drops a
prompt token instead and every score is wrong. The tiny random model here is biased so that
<|endoftext|> is its greedy choice after every prompt: the generated token is always an end token.

The fast tests score the lm-eval way with the `openai` client; the slow ones run lm-evaluation-harness
(`local-completions` on a multiple-choice task, `local-chat-completions` on generate_until tasks, both
from task files written here over local JSONL data, nothing downloaded) and check what it recorded
against the model itself and against an Engine of our own on the same weights.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

openai = pytest.importorskip("openai")

from chatforge.chat import ChatTemplate, Message  # noqa: E402
from chatforge.checkpoint import export_hf  # noqa: E402
from chatforge.generate.params import SamplingParams  # noqa: E402
from chatforge.model import GPT  # noqa: E402

TOL = 1e-4
# (context, answer choices, index of the right one): lm-eval's multiple choice scores " " + choice after context
MC_DOCS = [
    ("Question: What is 3 plus 3?\nAnswer:", ["6", "7", "12"], 0),
    ("Question: What is the capital of Veloria?\nAnswer:", ["Kesh", "Mira", "the dog"], 0),
    ("Question: Who walked her dog?\nAnswer:", ["Kesh", "Mira"], 1),
]
CHAT_DOCS = [("Where does Mira live?", "Kesh"), ("What is 4 plus 4?", "8")]


def end_biased(model: GPT, eot: int) -> GPT:
    """Make `eot` the argmax at every position by a wide margin, other tokens' logits still depending on
    the context: the final LayerNorm's bias points along eot's (tied) embedding, which every other
    embedding is made orthogonal to."""
    with torch.no_grad():
        w = model.wte.weight
        w.mul_(10)  # spread the other tokens' logits so that choices score apart
        u = torch.nn.functional.normalize(w[eot], dim=0)
        w.sub_(torch.outer(w @ u, u))
        w[eot] = 3 * u
        model.ln_f.bias.copy_(3 * u)
    return model


@pytest.fixture(scope="module")
def tiny(make_tiny_gpt, small_tokenizer):
    return end_biased(make_tiny_gpt(128), small_tokenizer.eot_id), small_tokenizer


def token_logprobs(model: GPT, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, straight from the model."""
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def next_logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """log p(. | ids): the distribution of the token generated after `ids`."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)


def loglikelihood(model: GPT, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """lm-eval's (sum of the continuation's logprobs, whether greedy decoding would produce it)."""
    ids = ctx + cont
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    rows = lp[len(ctx) - 1: len(ids) - 1]
    chosen = rows[torch.arange(len(cont)), torch.tensor(cont)]
    return float(chosen.double().sum()), bool((rows.argmax(-1) == torch.tensor(cont)).all())


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split (TemplateLM._encode_pair): encode the whole, the context's tokens come first."""
    whole, ctx = encode(context + continuation), encode(context)
    assert whole[: len(ctx)] == ctx
    return ctx, whole[len(ctx):]


END_CASES = {  # how the one generated token is chosen -> (logit_bias, the token it must be)
    "endoftext-the-models-own-choice": (None, "eot"),
    "end-turn-by-logit-bias": ("end_turn", "end_turn"),
    "ordinary-token": ("ban", None),
}


def case_bias(tok, case: str) -> dict[str, int] | None:
    how = END_CASES[case][0]
    if how is None:
        return None
    if how == "ban":  # no special token may win: the model's best ordinary token is generated
        return {str(i): -100 for i in tok.special_ids.values()}
    return {str(tok.special_ids[how]): 100}


def expected_token(tok, case: str, next_lp: torch.Tensor, bias: dict[str, int] | None) -> int:
    special = END_CASES[case][1]
    if special is not None:
        return tok.special_ids[special]
    banned = next_lp.clone()
    for k in bias or {}:
        banned[int(k)] = -math.inf
    return int(banned.argmax())


# ---- fast: the lm-eval way, by hand, with the openai client ---------------------------------------------


@pytest.mark.parametrize("case", list(END_CASES))
def test_echo_with_one_generated_token_scores_multiple_choice_like_lm_eval(client, tiny, case):
    model, tok = tiny
    bias = case_bias(tok, case)
    context, choices, _ = MC_DOCS[0]
    assert int(next_logprobs(model, tok.encode(context + " " + choices[0])).argmax()) == tok.eot_id  # the model's own
    for choice in choices[:2]:
        ctx, cont = encode_pair(tok.encode, context, " " + choice)
        ids = ctx + cont
        want_next = expected_token(tok, case, next_logprobs(model, ids), bias)
        extra = {} if bias is None else {"logit_bias": bias}
        kw = dict(model="tiny", prompt=ids, echo=True, max_tokens=1, logprobs=1, temperature=0, seed=1234, **extra)
        r = client.completions.create(**kw)
        choice0 = r.choices[0]
        lp = choice0.logprobs
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1
        # every prompt token and the one generated token, whatever it is
        assert len(lp.tokens) == len(ids) + 1, (case, lp.tokens)
        assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
        assert lp.tokens[: len(ids)] == [tok.token_bytes(i).decode("utf-8", errors="replace") for i in ids]
        assert lp.tokens[-1] == tok.token_bytes(want_next).decode("utf-8", errors="replace")
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        direct = token_logprobs(model, ids + [want_next])
        assert lp.token_logprobs[1:] == pytest.approx(direct, abs=TOL)
        if END_CASES[case][1] is not None:
            assert choice0.finish_reason == "stop"
            assert choice0.text == tok.decode(ids)  # the end token is listed but is not text
            assert lp.text_offset[-1] == len(choice0.text)
        else:
            assert choice0.finish_reason == "length"
        # what lm-eval's LocalCompletionsAPI.parse_logprobs makes of it
        ctxlen = len(ctx)
        score = sum(lp.token_logprobs[ctxlen:-1])
        greedy = all(t == max(top.values()) for t, top in zip(lp.token_logprobs[ctxlen:-1], lp.top_logprobs[ctxlen:-1]))
        want_score, want_greedy = loglikelihood(model, ctx, cont)
        assert score == pytest.approx(want_score, abs=TOL)
        assert greedy == want_greedy
        # streamed, the same entries arrive in order
        chunks = list(client.completions.create(stream=True, **kw))
        streamed = [(t, p) for c in chunks if c.choices and c.choices[0].logprobs
                    for t, p in zip(c.choices[0].logprobs.tokens, c.choices[0].logprobs.token_logprobs)]
        assert streamed == list(zip(lp.tokens, lp.token_logprobs))


@pytest.mark.parametrize("case", list(END_CASES))
def test_chat_logprobs_list_the_one_generated_token_end_tokens_included(client, tiny, case):
    model, tok = tiny
    bias = case_bias(tok, case)
    prompt = ChatTemplate(tok).generation_prompt([Message("user", "What is 3 plus 3?")])
    next_lp = next_logprobs(model, prompt)
    assert int(next_lp.argmax()) == tok.eot_id
    want = expected_token(tok, case, next_lp, bias)
    extra = {} if bias is None else {"logit_bias": bias}
    kw = dict(model="tiny", messages=[{"role": "user", "content": "What is 3 plus 3?"}], max_tokens=1,
              temperature=0, logprobs=True, top_logprobs=2, **extra)
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 1
    entries = c.logprobs.content
    assert [e.token for e in entries] == [tok.token_bytes(want).decode("utf-8", errors="replace")], case
    assert entries[0].logprob == pytest.approx(float(next_lp[want]), abs=TOL)
    top = next_lp.topk(2)
    assert [t.token for t in entries[0].top_logprobs] == [tok.token_bytes(i).decode("utf-8", errors="replace")
                                                          for i in top.indices.tolist()]
    assert [t.logprob for t in entries[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=TOL)
    if END_CASES[case][1] is not None:
        assert c.finish_reason == "stop" and c.message.content == ""
    else:
        assert c.finish_reason == "length" and c.message.content == entries[0].token
    streamed = [e.token for chunk in client.chat.completions.create(stream=True, **kw)
                for ch in chunk.choices if ch.logprobs and ch.logprobs.content for e in ch.logprobs.content]
    assert streamed == [e.token for e in entries]


# ---- slow: lm-evaluation-harness itself ---------------------------------------------------------------


def write_task(task_dir, name: str, rows: list[dict], **config) -> None:
    """A local lm-eval task: its data a JSONL file, its config YAML (written as JSON, which YAML reads)."""
    task_dir.mkdir(exist_ok=True)
    data = task_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(task_dir / "cache")},
            "test_split": "test", **config}
    (task_dir / f"{name}.yaml").write_text(json.dumps(spec, indent=1))


def run_harness(lm_eval, task_dir, tasks: list[str], model: str, model_args: dict, **kw) -> dict:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = lm_eval.evaluator.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                            log_samples=True, num_fewshot=0, bootstrap_iters=0, **kw)
    assert out is not None
    return out


@pytest.mark.slow
def test_lm_eval_local_completions_loglikelihoods_equal_the_models(lm_eval_offline, tmp_path, server, tiny):
    model, tok = tiny
    hf_dir = export_hf(model, tok, tmp_path / "hf")  # lm-eval tokenizes with the exported HF tokenizer
    hf_tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(hf_dir))
    write_task(tmp_path / "tasks", "chatforge_mc",
               [{"context": c, "choices": ch, "answer": a} for c, ch, a in MC_DOCS],
               output_type="multiple_choice", doc_to_text="{{context}}", doc_to_choice="choices",
               doc_to_target="answer", metric_list=[{"metric": "acc"}])
    out = run_harness(lm_eval_offline, tmp_path / "tasks", ["chatforge_mc"], "local-completions",
                      {"model": "tiny", "base_url": server.url + "/v1/completions", "tokenizer": str(hf_dir),
                       "tokenizer_backend": "huggingface", "max_retries": 1, "max_length": 128})
    samples = out["samples"]["chatforge_mc"]
    assert len(samples) == len(MC_DOCS)
    right = 0
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        context, choices, answer = MC_DOCS[sample["doc_id"]]
        assert len(sample["resps"]) == len(choices)
        ours = []
        for (ll, greedy), choice in zip([r[0] for r in sample["resps"]], choices):
            ctx, cont = encode_pair(tok.encode, context, " " + choice)
            # the same token ids as lm-eval's: it splits with the exported Hugging Face tokenizer
            assert (ctx, cont) == encode_pair(lambda s: hf_tok(s, add_special_tokens=False).input_ids, context,
                                              " " + choice)
            ids = ctx + cont
            # the generated token after every prompt is an end token: the case lm-eval's [ctxlen:-1] slice needs listed
            assert int(next_logprobs(model, ids).argmax()) == tok.eot_id
            want_ll, want_greedy = loglikelihood(model, ctx, cont)
            assert ll == pytest.approx(want_ll, abs=TOL), (context, choice, ll, want_ll)
            assert greedy == want_greedy
            ours.append(want_ll)
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(ours, abs=TOL)
        right += max(range(len(ours)), key=ours.__getitem__) == answer
    assert out["results"]["chatforge_mc"]["acc,none"] == pytest.approx(right / len(MC_DOCS))


@pytest.mark.slow
def test_lm_eval_local_chat_completions_generations_equal_the_engines(lm_eval_offline, tmp_path, server, tiny, local):
    model, tok = tiny
    ban = {str(i): -100 for i in tok.special_ids.values()}
    rows = [{"question": q, "answer": a} for q, a in CHAT_DOCS]
    common = dict(output_type="generate_until", doc_to_text="{{question}}", doc_to_target="{{answer}}",
                  metric_list=[{"metric": "exact_match"}])
    # the model would end at once (empty answers); with its end tokens banned it writes max_gen_toks tokens
    write_task(tmp_path / "tasks", "chatforge_chat_end", rows, generation_kwargs={"until": ["\n\n"], "max_gen_toks": 4},
               **common)
    write_task(tmp_path / "tasks", "chatforge_chat_text", rows,
               generation_kwargs={"until": ["\n\n"], "max_gen_toks": 8, "logit_bias": ban}, **common)
    out = run_harness(lm_eval_offline, tmp_path / "tasks", ["chatforge_chat_end", "chatforge_chat_text"],
                      "local-chat-completions",
                      {"model": "tiny", "base_url": server.url + "/v1/chat/completions", "max_retries": 1},
                      apply_chat_template=True)
    template = ChatTemplate(tok)
    for task, max_tokens, bias in (("chatforge_chat_end", 4, {}), ("chatforge_chat_text", 8, ban)):
        samples = out["samples"][task]
        assert len(samples) == len(CHAT_DOCS)
        for sample in samples:
            question = CHAT_DOCS[sample["doc_id"]][0]
            (chat, gen_kwargs), = sample["arguments"]  # what lm-eval sent: the chat as JSON (a JsonChatStr)
            chat = chat if isinstance(chat, str) else getattr(chat, "prompt", None) or chat[0]
            assert json.loads(chat) == [{"role": "user", "content": question}]
            assert gen_kwargs["until"] == ["\n\n"] and gen_kwargs["max_gen_toks"] == max_tokens
            prompt = template.generation_prompt([Message("user", question)])
            params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=["\n\n"],
                                    logit_bias={int(k): v for k, v in bias.items()})
            expected = local.generate([prompt], params)[0].outputs[0]
            assert sample["resps"] == [[expected.text]], (task, question)
            if not bias:
                assert expected.text == "" and expected.finish_reason == "stop"
            else:
                assert len(expected.token_ids) == max_tokens
