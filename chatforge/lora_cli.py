"""`chatforge merge`: fold a LoRA adapter into its base model, giving a plain checkpoint (chatforge.lora)."""

from __future__ import annotations

import click


@click.command()
@click.option("--base", required=True, help="The base checkpoint the adapter was trained on (ours or a transformers "
                                            "GPT-2 directory).")
@click.option("--adapter", required=True, help="A LoRA run's checkpoint (or stage) directory, or any directory with "
                                               "PEFT's adapter_config.json and adapter_model.safetensors for GPT-2.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the merged checkpoint.")
def merge(base: str, adapter: str, out: str) -> None:
    """Fold a LoRA adapter into its base model: W + (alpha/r)·B·A in every adapted layer, saved as a plain
    checkpoint (with the base's tokenizer) that every command reads."""
    from chatforge.lora import merge_checkpoint

    path = merge_checkpoint(base, adapter, out)
    click.echo(f"merge: {adapter} folded into {base} -> {path}")
