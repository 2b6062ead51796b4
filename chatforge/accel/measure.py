"""What weight-only int8 costs a trained chat model: the demo's `int8` stage.

The model is quantized as `chatforge quantize` does (accel/quantize.py) into a checkpoint beside it, then
both are judged on the same held-out prompts by the world's scorer (greedy answers, chatforge.evaluate)
and on the held-out conversations' loss. The fp32 model's figures are taken from the run's evaluation
when it has them (the same prompts, the same greedy decoding), so only the int8 model is evaluated here.
"""

from __future__ import annotations

from pathlib import Path

from chatforge.accel.quantize import load_quantized, quantize_checkpoint, weight_bytes
from chatforge.checkpoint import load_checkpoint
from chatforge.data.world import World
from chatforge.evaluate import EvalConfig, EvalResult, evaluate


def measure_int8(checkpoint: Path, out: Path, cfg: EvalConfig, world: World,
                 fp32: EvalResult | None = None) -> dict:
    """Quantize `checkpoint` to `out` and compare the two: weight bytes, checked score, accuracy and
    held-out loss of each, and the int8 model's change in each. `fp32`: the fp32 model's evaluation on
    `cfg`'s prompts, when already made."""
    quantize_checkpoint(checkpoint, out)
    dense = load_checkpoint(checkpoint)
    if fp32 is None:
        fp32 = evaluate(cfg, dense, world, progress="eval fp32")
    quantized = load_quantized(out)  # not load_for_inference: the scores need no kernels built (about 40 s)
    int8 = evaluate(cfg, quantized, world, progress="eval int8")
    rows = {name: {"weights_bytes": weight_bytes(ckpt.model), "score": result.overall["score"],
                   "accuracy": result.overall["accuracy"], "val_loss": result.overall["val_loss"]}
            for name, ckpt, result in (("fp32", dense, fp32), ("int8", quantized, int8))}
    change = {k: rows["int8"][k] - rows["fp32"][k] for k in ("score", "accuracy", "val_loss")}
    return {"checkpoint": str(checkpoint), "quantized": str(out), "prompts": int(int8.overall["n"]),
            "method": "int8 weight-only, per output channel, symmetric", **rows, "change": change,
            "weights_ratio": rows["int8"]["weights_bytes"] / rows["fp32"]["weights_bytes"]}
