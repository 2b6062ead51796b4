"""The `chatforge` command line: one sub-command per stage, each a thin shell over a config.

Errors a user can cause are printed as one line (`error: …`) with exit status 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import typing
from pathlib import Path
from typing import Any

import click

from chatforge import config as configlib
from chatforge.accel.quantize_cli import quantize, quantize_option
from chatforge.detect.cli import detect, watermark_options
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.evaluate import EvalConfig
from chatforge.generate.params import SamplingParams
from chatforge.lora_cli import merge
from chatforge.prune import prune_command
from chatforge.serve.config import ServeConfig
from chatforge.train.config import (
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    PretrainConfig,
    RewardConfig,
    RLOOConfig,
    SFTConfig,
)

BUILTIN = "built-in corpus"


def config_options(cls: type):
    """Add `--config FILE` and one `--leaf-name` flag per config field; pass `cfg` to the command.

    List fields become repeatable flags (`--stop a --stop b`); dict fields take KEY=VALUE
    (`--logit-bias 50256=-100`). Each flag's `[default: …]` is the value an omitted flag takes: the
    field of `cls()`, so `reward`, `ppo` and `dpo` show their own training defaults.
    """
    leaves = stage_leaves(cls)
    check_distinct_flags(cls, leaves)

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(config_file: str | None, **kwargs: Any):
            flags = {}
            for leaf in leaves:
                value = kwargs.pop(leaf.name, None)
                if value is not None and value != ():
                    flags[leaf.path] = parse_pairs(leaf.name, value) if is_dict(leaf.type) else value
            return fn(cfg=configlib.build(cls, config_file, flags), **kwargs)

        for leaf in reversed(leaves):
            wrapper = leaf_option(leaf)(wrapper)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="YAML or JSON file with config fields (flags override it).")(wrapper)

    return decorate


def stage_leaves(cls: type) -> list[configlib.Leaf]:
    """The config's leaves with the defaults of `cls()` itself: a nested field's own default (a stage's
    `train: TrainConfig = field(default_factory=_ppo_train_defaults)`) wins over the nested class's."""
    defaults = cls()
    return [dataclasses.replace(leaf, default=functools.reduce(getattr, leaf.path, defaults))
            for leaf in configlib.leaves(cls)]


def flag_name(leaf: configlib.Leaf) -> str:
    return leaf.flag or leaf.name.replace("_", "-")


def check_distinct_flags(cls: type, leaves: list[configlib.Leaf]) -> None:
    """Two fields that would make the same flag (`train.seed` and `ppo.seed`) are a config error: the
    command line could set only one of them."""
    seen: dict[str, tuple[str, ...]] = {}
    for leaf in leaves:
        other = seen.setdefault(flag_name(leaf), leaf.path)
        if other != leaf.path:
            raise ConfigError(f"{cls.__name__}: fields {'.'.join(other)} and {'.'.join(leaf.path)} would both be "
                              f"--{flag_name(leaf)}; rename one")


def is_dict(tp: Any) -> bool:
    return typing.get_origin(tp) is dict


def leaf_option(leaf: configlib.Leaf):
    name = flag_name(leaf)
    help_text = f"{leaf.help} [default: {leaf.default!r}]".strip()
    extra: dict[str, Any] = {"envvar": leaf.envvar, "show_envvar": True} if leaf.envvar else {}
    if leaf.type is bool:
        return click.option(f"--{name}/--no-{name}", leaf.name, default=None, help=help_text, **extra)
    origin = typing.get_origin(leaf.type)
    if origin is list:
        (item,) = typing.get_args(leaf.type)
        return click.option(f"--{name}", leaf.name, type={int: int, float: float}.get(item, str), multiple=True,
                            help=f"{help_text} (repeatable)", **extra)
    if origin is dict:
        return click.option(f"--{name}", leaf.name, multiple=True, metavar="KEY=VALUE",
                            help=f"{help_text} (repeatable)", **extra)
    kind = click.Choice(leaf.choices) if leaf.choices else {int: int, float: float}.get(leaf.type, str)
    return click.option(f"--{name}", leaf.name, type=kind, default=None, help=help_text, **extra)


def parse_pairs(name: str, pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--{name.replace('_', '-')}: expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="chatforge")
def cli() -> None:
    """chatforge: train a ChatGPT-style model from scratch and serve it."""


# ---- tokenizer ---------------------------------------------------------------------------------


@cli.group()
def tokenizer() -> None:
    """Train or inspect the byte-level BPE tokenizer."""


@tokenizer.command("train")
@click.argument("sources", nargs=-1)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for tokenizer.json.")
@click.option("--vocab-size", default=4096, show_default=True)
@click.option("--text-field", default="text", show_default=True, help="JSONL/Parquet field holding the text.")
def tokenizer_train(sources: tuple[str, ...], out: str, vocab_size: int, text_field: str) -> None:
    """Train a tokenizer on SOURCES (files, directories, globs; default: the built-in corpus)."""
    from chatforge.data.readers import iter_documents
    from chatforge.tokenizer import Tokenizer

    srcs = list(sources) or [str(builtin_corpus(Path(out).parent / "corpus"))]
    tok = Tokenizer.train(iter_documents(srcs, text_field=text_field), vocab_size=vocab_size, show_progress=True)
    path = tok.save(out)
    click.echo(f"tokenizer: {tok.vocab_size} tokens -> {path}")


# ---- data --------------------------------------------------------------------------------------


@cli.group()
def data() -> None:
    """Prepare token shards, or write the built-in corpus."""


@data.command("prepare")
@click.argument("sources", nargs=-1)
@click.option("--tokenizer", "tokenizer_path", required=True, help="tokenizer.json or its directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--val-fraction", default=0.01, show_default=True)
@click.option("--workers", default=0, help="Tokenizer processes (0: up to 4, one per core).")
@click.option("--text-field", default="text", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "uint16", "uint32"]), default="auto", show_default=True)
@click.option("--seed", default=0, show_default=True)
def data_prepare(sources, tokenizer_path, out, val_fraction, workers, text_field, dtype, seed) -> None:
    """Tokenize SOURCES (default: the built-in corpus) into train/val shards in OUT."""
    from chatforge.data.shards import prepare_shards
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    srcs = list(sources) or [str(builtin_corpus(Path(out).parent / "corpus"))]
    meta = prepare_shards(srcs, tok, out, val_fraction=val_fraction, num_workers=workers or None,
                          text_field=text_field, dtype=dtype, seed=seed)
    tok.save(Path(out) / "tokenizer.json")  # so `pretrain --data OUT` finds the tokenizer it needs
    splits = meta["splits"]
    click.echo(f"data: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens "
               f"({meta['dtype']}) -> {out}")


@data.command("world")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--size-mb", default=2.0, show_default=True)
@click.option("--world-seed", default=0, show_default=True)
@click.option("--seed", default=0, show_default=True)
def data_world(out: str, size_mb: float, world_seed: int, seed: int) -> None:
    """Write the built-in synthetic-world corpus as {"text"} JSONL."""
    from chatforge.data.world import write_corpus

    path = write_corpus(out, num_bytes=int(size_mb * 1e6), world_seed=world_seed, seed=seed)
    click.echo(f"corpus: {path.stat().st_size / 1e6:.2f} MB -> {path}")


@data.command("tasks")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the JSONL files.")
@click.option("--world", "world_file", default="", help="world.json to build on (default: the built-in world).")
@click.option("--world-seed", default=0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--tools", is_flag=True, help="Add the tool families: calc, dates and functions.")
@click.option("--declare-builtin-tools/--no-declare-builtin-tools", default=True, show_default=True,
              help="With --tools: declare the calculator and calendar in calc and dates prompts.")
@click.option("--step-by-step/--no-step-by-step", default=True, show_default=True,
              help="Answer arithmetic, word tasks and two-hop questions in steps; without, the same prompts get "
                   "direct answers (the ablation).")
def data_tasks(out: str, world_file: str, world_seed: int, seed: int, tools: bool, declare_builtin_tools: bool,
               step_by_step: bool) -> None:
    """Write the built-in task data: SFT conversations, ranked preferences, RL prompts, held-out eval."""
    from chatforge.data.tasks import TaskConfig, write_tasks
    from chatforge.data.world import World

    world = World.load(world_file) if world_file else World.build(seed=world_seed)
    config = TaskConfig(declare_builtin_tools=declare_builtin_tools, step_by_step=step_by_step)
    paths = write_tasks(out, world, seed=seed, config=config.with_tools() if tools else config)
    for name, path in paths.items():
        click.echo(f"{name}: {path}")


def builtin_corpus(directory: Path, size_mb: float = 2.0) -> Path:
    """The default data when none is given: the built-in world's corpus, written once."""
    from chatforge.data.world import write_corpus

    path = directory / "corpus.jsonl"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        click.echo(f"no data given: writing the {BUILTIN} to {path}")
        write_corpus(path, num_bytes=int(size_mb * 1e6))
    return path


# ---- training ----------------------------------------------------------------------------------


def resume_options(fn):
    """--resume and --overwrite, shared by every training stage."""
    fn = click.option("--overwrite", is_flag=True, help="Start over even if OUT already holds a checkpoint.")(fn)
    return click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint exactly where it stopped.")(fn)


def run_stage(run, cfg, resume: bool, overwrite: bool):
    """Run a stage's `run_*(cfg, dist, ...)` inside the process group torchrun set up (or one process)."""
    from chatforge.train.distributed import init_distributed, shutdown

    dist = init_distributed(cfg.train.device)
    try:
        return dist, run(cfg, dist, resume=resume, overwrite=overwrite)
    finally:
        shutdown()


@cli.command()
@config_options(PretrainConfig)
@resume_options
def pretrain(cfg, resume: bool, overwrite: bool) -> None:
    """Pretrain a GPT on token shards (data-parallel under torchrun)."""
    import os

    from chatforge.train.pretrain import run_pretrain

    if not cfg.data:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("pretrain: under torchrun pass --data (prepare it once with `chatforge data prepare`)")
        from chatforge.demo import prepare_builtin_data

        click.echo(f"no --data given: using the {BUILTIN}")
        cfg.data = str(prepare_builtin_data(Path(cfg.out).parent))
    dist, result = run_stage(run_pretrain, cfg, resume, overwrite)
    if dist.is_main:
        click.echo(finish_message("pretrain", result, cfg.out))


def load_language_model(path: str, command: str, quantize: str = "none"):
    """A checkpoint whose model writes text (a quantized one too, or quantized on load with `quantize`); a
    reward model (scalar head) is refused by name."""
    from chatforge.accel.quantize import load_for_inference
    from chatforge.model import ScalarHeadModel

    ckpt = load_for_inference(path, quantize=quantize)
    if isinstance(ckpt.model, ScalarHeadModel):
        raise ConfigError(f"{command}: {path} is a reward model (a scalar head); expected a language model "
                          "(pretrain, sft, ppo, grpo, rloo or dpo output)")
    return ckpt


def finish_message(stage: str, result, out: str) -> str:
    last = result.metrics[-1] if result.metrics else {}
    state = "interrupted at" if result.interrupted else "finished at"
    losses = "; ".join(f"{k} {last[k]:.4f}" for k in ("train/loss", "val/loss") if k in last)
    return f"{stage}: {state} step {result.step}; {losses} -> {out}/checkpoint"


@cli.command()
@config_options(SFTConfig)
@resume_options
def sft(cfg, resume: bool, overwrite: bool) -> None:
    """Supervised fine-tuning on conversations (loss on assistant tokens only)."""
    from chatforge.train.sft import run_sft

    dist, result = run_stage(run_sft, cfg, resume, overwrite)
    if dist.is_main:
        click.echo(finish_message("sft", result, cfg.out))


@cli.command()
@config_options(RewardConfig)
@resume_options
def reward(cfg, resume: bool, overwrite: bool) -> None:
    """Train a reward model on ranked responses (all pairs of a prompt's ranking, InstructGPT's loss)."""
    from chatforge.train.reward import run_reward

    dist, result = run_stage(run_reward, cfg, resume, overwrite)
    if dist.is_main:
        last = [m for m in result.metrics if "val/accuracy" in m]
        held_out = f"; held-out pairwise accuracy {last[-1]['val/accuracy']:.1%}" if last else ""
        click.echo(finish_message("reward", result, cfg.out) + held_out)


@cli.command()
@config_options(PPOConfig)
@resume_options
def ppo(cfg, resume: bool, overwrite: bool) -> None:
    """RLHF: PPO on the SFT policy against a reward model, with a KL penalty to the SFT model.

    Less memory: --frozen-dtype bfloat16 keeps the frozen reference and reward model in bf16;
    --shared-value-head puts the value head on the policy's trunk instead of a second model.
    A run resumes only with the options it started with.
    """
    from chatforge.train.ppo import run_ppo

    dist, result = run_stage(run_ppo, cfg, resume, overwrite)
    if dist.is_main:
        last = result.metrics[-1] if result.metrics else {}
        figures = ", ".join(f"{k.split('/')[-1]} {last[k]:.3f}" for k in ("train/score", "train/kl", "train/beta")
                            if k in last)
        state = "interrupted at" if result.interrupted else "finished at"
        click.echo(f"ppo: {state} step {result.step}; {figures} -> {cfg.out}/checkpoint")


def group_rl_finished(stage: str, dist, result, out: str) -> None:
    """The last line of `grpo` and `rloo`: where it stopped, the last reward, KL and held-out reward."""
    if dist.is_main:
        last = result.metrics[-1] if result.metrics else {}
        figures = ", ".join(f"{k.split('/')[-1]} {last[k]:.3f}" for k in ("train/score", "train/kl") if k in last)
        held_out = f"; held-out score {last['val/score']:.3f}" if "val/score" in last else ""
        state = "interrupted at" if result.interrupted else "finished at"
        click.echo(f"{stage}: {state} step {result.step}; {figures}{held_out} -> {out}/checkpoint")


@cli.command()
@config_options(GRPOConfig)
@resume_options
def grpo(cfg, resume: bool, overwrite: bool) -> None:
    """RL by GRPO: G answers per prompt, advantages normalised within each group, k3 KL penalty in the loss.

    Rewards from the reward model (--reward model), the verifier of answers a program checks (--reward
    verifier: +1/-1; other prompts left out), or both. No value model. A run resumes only with the
    options it started with.
    """
    from chatforge.train.group_rl import run_grpo

    dist, result = run_stage(run_grpo, cfg, resume, overwrite)
    group_rl_finished("grpo", dist, result, cfg.out)


@cli.command()
@config_options(RLOOConfig)
@resume_options
def rloo(cfg, resume: bool, overwrite: bool) -> None:
    """RL by RLOO: k answers per prompt, each one's baseline the mean reward of the other k - 1; the KL to the
    SFT model folded into the reward; REINFORCE on whole answers. Rewards as `grpo`'s (--reward)."""
    from chatforge.train.group_rl import run_rloo

    dist, result = run_stage(run_rloo, cfg, resume, overwrite)
    group_rl_finished("rloo", dist, result, cfg.out)


@cli.command()
@config_options(DPOConfig)
@resume_options
def dpo(cfg, resume: bool, overwrite: bool) -> None:
    """Direct preference optimization of the SFT model on preference pairs (no reward model, no sampling)."""
    from chatforge.train.dpo import run_dpo

    dist, result = run_stage(run_dpo, cfg, resume, overwrite)
    if dist.is_main:
        last = [m for m in result.metrics if "val/accuracy" in m]
        held_out = f"; held-out implicit-reward accuracy {last[-1]['val/accuracy']:.1%}" if last else ""
        click.echo(finish_message("dpo", result, cfg.out) + held_out)


@cli.command()
@click.option("--checkpoint", required=True, help="A reward model (after `chatforge reward`).")
@click.option("--prompt", "prompts", multiple=True, help="A user message (repeatable, paired with --response).")
@click.option("--response", "responses", multiple=True, help="The answer to score (repeatable).")
@click.option("--data", "data_file", default=None, help='JSONL of {"prompt": text or messages, "response": text}.')
def score(checkpoint: str, prompts: tuple[str, ...], responses: tuple[str, ...], data_file: str | None) -> None:
    """Print the reward of (prompt, response) pairs."""
    from chatforge.chat import ChatTemplate, Message
    from chatforge.checkpoint import load_checkpoint
    from chatforge.data.chat_readers import prompt_messages
    from chatforge.data.readers import iter_jsonl
    from chatforge.model import ScalarHeadModel
    from chatforge.train.reward import score_texts

    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt.model, ScalarHeadModel):
        raise ConfigError(f"score: {checkpoint} is a language model; expected a reward model (`chatforge reward`)")
    if len(prompts) != len(responses):
        raise ConfigError(f"score: {len(prompts)} --prompt but {len(responses)} --response; give them in pairs")
    pairs = [([Message("user", p)], r) for p, r in zip(prompts, responses)]
    if data_file:
        for line, obj in iter_jsonl(data_file, 'a {"prompt", "response"} object'):
            if not isinstance(obj.get("response"), str):
                raise ConfigError(f"{data_file}:{line}: 'response' must be a string")
            pairs.append((prompt_messages(obj.get("prompt"), f"{data_file}:{line}"), obj["response"]))
    if not pairs:
        raise ConfigError("score: nothing to score; give --prompt/--response pairs or --data")
    rewards = score_texts(ckpt.model.eval(), ChatTemplate(ckpt.tokenizer), [p for p, _ in pairs], [r for _, r in pairs])
    for (prompt, response), value in zip(pairs, rewards):
        click.echo(f"{value:+.4f}\t{prompt[-1].content!r} -> {response!r}")


@cli.command("eval")
@config_options(EvalConfig)
def eval_command(cfg) -> None:
    """Score a chat model on held-out prompts (accuracy per family, refusals, length) and held-out loss."""
    from chatforge.checkpoint import resolve_checkpoint_dir
    from chatforge.evaluate import evaluate, format_table, write_result

    if not cfg.checkpoint:
        raise ConfigError("eval: --checkpoint is required")
    result = evaluate(cfg, load_language_model(cfg.checkpoint, "eval"), progress="eval")
    click.echo(format_table({cfg.checkpoint: result}))
    out = cfg.out or resolve_checkpoint_dir(cfg.checkpoint).parent / "eval.json"
    click.echo(f"eval: -> {write_result(result, out)}")


fused_option = click.option(
    "--fused/--no-fused", default=True, show_default=True,
    help="Decode in chatforge's fused CPU step where its kernels build here (AVX-512 or AVX2 on Linux; built once, "
         "about 40 s); --no-fused: torch's products only.")


tools_option = click.option(
    "--tools", "use_tools", is_flag=True,
    help="Offer the built-in calculator and calendar: the model sees them in its system turn, chatforge runs "
         "the calls it writes and feeds the results back; calls and results are shown.")


def make_engine(model, tokenizer, **kwargs: Any):
    """A prepared engine that reports on stderr (stdout carries the command's output)."""
    from chatforge.generate.engine import prepared_engine

    return prepared_engine(model, tokenizer, lambda line: click.echo(line, err=True), **kwargs)


@cli.command()
@click.option("--checkpoint", required=True, help="A chat model (after `chatforge sft`).")
@click.option("--system", default="", help="System prompt.")
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--seed", default=None, type=int, help="Make sampling reproducible.")
@fused_option
@quantize_option
@tools_option
@watermark_options
def chat(checkpoint: str, system: str, temperature: float, top_p: float, max_tokens: int, seed: int | None,
         fused: bool, quantize: str, use_tools: bool, watermark) -> None:
    """Chat in the terminal (streamed; /help lists the commands: /clear, /temperature, /top_p, /max_tokens ...)."""
    from chatforge.chat import ChatTemplate
    from chatforge.terminal import ChatSession, run_chat
    from chatforge.tools import builtin_tools

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            watermark=watermark)
    ckpt = load_language_model(checkpoint, "chat", quantize)
    engine = make_engine(ckpt.model.eval(), ckpt.tokenizer, max_batch_size=1, fused=fused,
                         stop_token_ids=ChatTemplate(ckpt.tokenizer).stop_ids)
    session = ChatSession(ckpt, system=system, params=params, engine=engine, tools=builtin_tools() if use_tools else {})
    session.check(params)

    def write(text: str) -> None:
        click.echo(text, nl=False)
        sys.stdout.flush()

    run_chat(session, read=lambda prompt: click.prompt(prompt, prompt_suffix="", default="", show_default=False),
             write=write)


# ---- inference and export ----------------------------------------------------------------------


@cli.command()
@click.option("--checkpoint", required=True, help="A checkpoint directory (ours or Hugging Face GPT-2).")
@click.option("--prompt", "prompts", multiple=True, help="Text to continue (repeatable: a batch). Default: "
              "the start of a document.")
@click.option("--json", "as_json", is_flag=True, help="Print the completions (with logprobs) as JSON.")
@click.option("--max-batch-size", default=16, show_default=True, help="Engine slots (sequences decoded together).")
@fused_option
@click.option("--compile", "compile_decode", is_flag=True,
              help="Also torch.compile the decode forward (the steps the fused one leaves), compiled first "
                   "(minutes); on AVX2 CPUs slower than the eager engine.")
@quantize_option
@tools_option
@watermark_options
@config_options(SamplingParams)
def generate(checkpoint: str, prompts: tuple[str, ...], as_json: bool, max_batch_size: int, fused: bool,
             compile_decode: bool, quantize: str, use_tools: bool, cfg, watermark) -> None:
    """Generate with every decoding option: sampling, penalties, beams, stops, n/best_of, logprobs.
    With --tools each prompt is a user's message to a chat model that may call the built-in tools;
    with --watermark-key the output carries a watermark that `chatforge detect` finds."""
    cfg = dataclasses.replace(cfg, watermark=watermark)
    ckpt = load_language_model(checkpoint, "generate", quantize)
    tok = ckpt.tokenizer
    engine = make_engine(ckpt.model, tok, max_batch_size=max_batch_size, fused=fused, compile=compile_decode)
    texts = list(prompts) or [""]
    ids = [tok.encode(t) if t else [tok.eot_id] for t in texts]
    use = None
    if use_tools:
        ids, use, cfg = tool_prompts(tok, texts, cfg)
    if len(ids) == 1 and cfg.n == 1 and cfg.num_beams == 1 and not as_json:
        from chatforge.terminal import ToolEcho

        click.echo(texts[0] + ("\n" if use else ""), nl=False)  # the prompt is always shown
        echo = ToolEcho()
        for event in engine.stream(ids[0], cfg, tool_use=use):
            click.echo(echo.text(event), nl=False)
        click.echo()
        return
    completions = engine.generate(ids, cfg, tool_use=use)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(c) for c in completions], indent=2))
        return
    for number, (text, completion) in enumerate(zip(texts, completions), start=1):
        for out in completion.outputs:
            click.echo(f"--- prompt {number}, choice {out.index + 1} ({out.finish_reason})")
            calls = "".join(f"[call] {t.call}\n[result] {t.result}\n" for t in out.tool_turns)
            click.echo(text + ("\n" + calls if calls else "") + out.text)


def tool_prompts(tokenizer: Any, texts: list[str], cfg: SamplingParams) -> tuple[list[list[int]], Any, SamplingParams]:
    """`generate --tools`: each text as a user turn with the built-in tools declared, the tool use that
    runs them, and chat-reply settings (special tokens add no text)."""
    from chatforge.chat import ChatTemplate, Conversation, Message
    from chatforge.generate.tool_loop import ToolUse
    from chatforge.tools import builtin_tools

    try:
        template = ChatTemplate(tokenizer)
    except KeyError:
        raise click.UsageError("--tools needs a chat model (its tokenizer has no chat tokens)") from None
    tools = builtin_tools()
    specs = [t.spec() for t in tools.values()]
    ids = [template.generation_prompt(Conversation([Message("user", t or " ")], tools=specs)) for t in texts]
    cfg = dataclasses.replace(cfg, skip_special_tokens=True, strip_leading_whitespace=True,
                              stop_token_ids=sorted(set(cfg.stop_token_ids) | set(template.stop_ids)))
    return ids, ToolUse(tools), cfg


cli.add_command(generate, "sample")  # the name issue 2 introduced; same command

from chatforge.serve.feedback import feedback  # noqa: E402  (a click group of its own module)

cli.add_command(feedback)
cli.add_command(detect)
cli.add_command(prune_command)
cli.add_command(merge)
cli.add_command(quantize)


@cli.command()
@click.option("--checkpoint", required=True)
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default="hf", show_default=True)
@click.option("--out", required=True, type=click.Path(),
              help="hf: an output directory; gguf: an output FILE.gguf.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "q8_0"]), default="f32", show_default=True,
              help="gguf only: weight precision (f16 keeps norms and biases in f32; q8_0, llama.cpp's 8-bit blocks "
                   "of 32, also the position embedding, as llama.cpp's converter does).")
def export(checkpoint: str, fmt: str, out: str, dtype: str) -> None:
    """Export a checkpoint (hf: a transformers GPT2LMHeadModel directory; gguf: one file for llama.cpp)."""
    if fmt == "gguf":
        from chatforge.gguf_export import export_checkpoint_gguf

        path = export_checkpoint_gguf(checkpoint, out, dtype=dtype)
    else:
        if Path(out).is_file():
            raise ConfigError(f"{out}: is a file; expected an output directory for --format hf")
        from chatforge.checkpoint import export_checkpoint_hf

        path = export_checkpoint_hf(checkpoint, out)
    click.echo(f"export: {fmt} -> {path}")


# ---- serving -----------------------------------------------------------------------------------


@cli.command()
@config_options(ServeConfig)
def serve(cfg: ServeConfig) -> None:
    """Serve a model with the OpenAI API (/v1/completions, /v1/chat/completions) and the web chat page."""
    from chatforge.serve.server import serve_checkpoint

    if not cfg.checkpoint:
        raise ConfigError("serve: --checkpoint is required")
    serve_checkpoint(cfg)


# ---- demo --------------------------------------------------------------------------------------


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["fast", "full", "large"]), default="full", show_default=True,
              help="The budget: full (the default, under 15 minutes on 2 cores), large (about an hour: a larger "
                   "model, longer pretraining and SFT) or fast (seconds: the CI smoke run).")
@click.option("--fast", is_flag=True, help="Short for --preset fast.")
@click.option("--overwrite", is_flag=True, help="Start from scratch instead of reusing finished stages.")
@click.option("--no-serve", is_flag=True, help="Stop after the evaluation instead of serving the chat model.")
@click.option("--serve-stage", type=click.Choice(["sft", "ppo", "dpo"]), default="ppo", show_default=True,
              help="Which trained chat model to serve at the end.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--seeds", type=int, multiple=True,
              help="Also train PPO once per seed (repeat: --seeds 0 --seeds 1 --seeds 2) and PPO with beta = 0 at "
                   "the first, judge them against SFT and put the table in the run report: the RLHF proof "
                   "(about 1.5 minutes a PPO run).")
@click.option("--ablation", is_flag=True,
              help="Also run the stages after pretraining on direct answers instead of step-by-step ones "
                   "(OUT/no-steps) and put the chain-of-thought ablation in the report (about 5 minutes more).")
def demo(out: str, preset: str, fast: bool, overwrite: bool, no_serve: bool, serve_stage: str, host: str, port: int,
         seeds: tuple[int, ...], ablation: bool) -> None:
    """Run the whole pipeline on the built-in data, then serve the chat model (web page and API)."""
    from chatforge.demo import run_demo, serve_demo

    run_demo(Path(out), preset="fast" if fast else preset, overwrite=overwrite, seeds=list(seeds), ablation=ablation)
    if not no_serve:
        serve_demo(Path(out), serve_stage, host, port)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Where to write (default: RUN_DIR).")
@click.option("--samples", default=1, show_default=True, help="Sample prompts shown per task family.")
def report(run_dir: str, out: str | None, samples: int) -> None:
    """Write report.md and a self-contained report.html (plots, configs, eval table, samples) for a run."""
    from chatforge.report import write_report

    md, page, written = write_report(run_dir, out, samples=samples)
    click.echo(f"report: {md}, {page} ({len(written.images)} plots in {md.parent / 'report'})")


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="chatforge", standalone_mode=False)
    except ChatforgeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # bad flags: the same one-line form, naming the option
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(2)
