"""llama.cpp as the benchmarks' peer: the same weights written as a GGUF by chatforge's exporter, decoded
greedily through llama-cpp-python (bench_decode.py in f32, bench_quant.py in q8_0)."""

from __future__ import annotations

from collections.abc import Callable

from chatforge.model import GPT

Decoder = Callable[[list[int], int], list[int]]  # (prompt ids, new tokens) -> greedy ids


def llama_decoder(model: GPT, threads: int, tmp: str, dtype: str = "f32") -> Decoder | None:
    """Greedy decode through llama.cpp on `model`'s weights as a `dtype` GGUF (argmax over its logits after each
    single-token `llama_decode`), or None without llama-cpp-python. The runner's `size` is the file's bytes."""
    try:
        import llama_cpp
        import numpy as np
    except ImportError:
        return None
    from chatforge.data.world import World
    from chatforge.gguf_export import export_gguf
    from chatforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(texts=World.build(0).corpus(200_000), vocab_size=512)
    path = export_gguf(model, tokenizer, f"{tmp}/model-{dtype}.gguf", dtype=dtype)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.context_length, n_batch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    vocab = llm.n_vocab()

    def run(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        out = []
        for _ in range(n):
            out.append(int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).argmax()))
            if len(out) < n:
                llm.eval(out[-1:])
        return out

    run.size = path.stat().st_size  # type: ignore[attr-defined]  # its weights (the head a copy) + the vocabulary
    return run
