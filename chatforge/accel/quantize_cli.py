"""`chatforge quantize` and the `--quantize` flag of `generate` and `chat` (`serve` has it from ServeConfig).

Kept out of cli.py so the command line's other sub-commands stay as they are; this module imports only
click until a command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

QUANTIZE_CHOICES = ("none", "int8")

quantize_option = click.option(
    "--quantize", type=click.Choice(QUANTIZE_CHOICES), default="none", show_default=True,
    help="int8: quantize an fp32 checkpoint's weights on load (weight-only, one scale per output channel, as "
         "`chatforge quantize` stores them; a quarter of the weight memory). A quantized checkpoint loads as "
         "stored either way.")


@click.command("quantize")
@click.argument("checkpoint")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the quantized checkpoint.")
@click.option("--dtype", type=click.Choice(["int8"]), default="int8", show_default=True,
              help="int8: weight-only, symmetric, one fp32 scale per output channel (the blocks' linear layers and "
                   "the tied embedding / LM head; norms, biases and positions stay fp32).")
def quantize(checkpoint: str, out: str, dtype: str) -> None:
    """Write CHECKPOINT's weights in DTYPE to OUT, a checkpoint for generate, chat, eval and serve (not for
    training: the training stages refuse it)."""
    from chatforge.accel.quantize import quantize_checkpoint
    from chatforge.checkpoint import WEIGHTS_FILE, resolve_checkpoint_dir

    before = (resolve_checkpoint_dir(checkpoint) / WEIGHTS_FILE).stat().st_size
    path = quantize_checkpoint(checkpoint, out, dtype)
    after = (Path(path) / WEIGHTS_FILE).stat().st_size
    click.echo(f"quantize: {dtype}, weights {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB -> {path}")
