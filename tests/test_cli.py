"""The command line, end to end on tiny budgets: the commands a user runs, and the errors they see."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from chatforge.cli import main
from chatforge.train.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, RLOOConfig, TrainConfig

TINY_MODEL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context-length", "32"]


def run_cli(*args):
    """Run `chatforge ARGS` in-process; returns the exit status (0 when it returns normally)."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return 0


def pretrain_args(data, out, *extra):
    return ["pretrain", "--data", data / "data", "--out", out, *TINY_MODEL, "--max-steps", "6",
            "--batch-size", "4", "--eval-every", "3", "--eval-batches", "2", "--log-every", "1",
            "--no-progress", *extra]


def test_tokenizer_train_and_data_prepare_on_user_files(tmp_path, capsys):
    src = tmp_path / "mine.txt"
    src.write_text("Hello there, general. " * 200 + "\nSecond line of text 123.\n" * 50)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} says hi"}) for i in range(40)))
    assert run_cli("tokenizer", "train", src, tmp_path / "docs.jsonl", "--out", tmp_path / "tok",
                   "--vocab-size", "300") == 0
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert run_cli("data", "prepare", src, tmp_path / "docs.jsonl", "--tokenizer", tmp_path / "tok",
                   "--out", tmp_path / "data", "--workers", "1", "--val-fraction", "0.1") == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["splits"]["train"]["tokens"] > 0
    assert "train /" in capsys.readouterr().out


def test_pretrain_writes_a_checkpoint_and_metrics_and_sample_continues_it(prepared_data, tmp_path, capsys):
    assert run_cli(*pretrain_args(prepared_data, tmp_path / "pt")) == 0
    assert (tmp_path / "pt" / "checkpoint" / "model.safetensors").exists()
    lines = (tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()
    assert run_cli("sample", "--checkpoint", tmp_path / "pt", "--prompt", "The capital of",
                   "--temperature", "0", "--max-tokens", "8") == 0
    greedy = capsys.readouterr().out
    assert greedy.startswith("The capital of") and len(greedy) > len("The capital of")
    run_cli("sample", "--checkpoint", tmp_path / "pt", "--prompt", "The capital of", "--temperature", "0",
            "--max-tokens", "8")
    assert capsys.readouterr().out == greedy  # greedy is deterministic
    outs = []
    for _ in range(2):
        run_cli("sample", "--checkpoint", tmp_path / "pt", "--temperature", "1.0", "--seed", "3", "--n", "2")
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and "choice 2" in outs[0]  # a seed makes sampling reproducible


def test_pretraining_can_train_on_windows_shorter_than_the_context(prepared_data, tmp_path, capsys):
    from chatforge.checkpoint import load_checkpoint

    assert run_cli(*pretrain_args(prepared_data, tmp_path / "pt", "--seq-len", "16")) == 0
    assert load_checkpoint(tmp_path / "pt").model.config.context_length == 32
    last = json.loads((tmp_path / "pt" / "metrics.jsonl").read_text().splitlines()[-1])
    assert round(last["tokens_per_s"] * last["step_time_s"]) == 4 * 16  # batch 4 of 16-token windows
    assert run_cli(*pretrain_args(prepared_data, tmp_path / "x", "--seq-len", "33")) == 2
    assert "seq_len (33) must be at most the model's context (32)" in capsys.readouterr().err


def test_export_hf_writes_a_directory_transformers_loads(prepared_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert run_cli(*pretrain_args(prepared_data, tmp_path / "pt", "--max-steps", "1")) == 0
    assert run_cli("export", "--checkpoint", tmp_path / "pt", "--format", "hf", "--out", tmp_path / "hf") == 0
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert model.config.n_layer == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "prepare", "{tmp}/nothing-*.txt", "--tokenizer", "{data}/tokenizer", "--out", "{tmp}/d"],
         "nothing-"),
        (["pretrain", "--data", "{tmp}/missing", "--tokenizer", "{data}/tokenizer", "--out", "{tmp}/o"], "meta.json"),
        (["sample", "--checkpoint", "{tmp}/no-such-checkpoint"], "does not exist"),
        (["pretrain", "--data", "{data}/data", "--out", "{tmp}/o", "--lr", "fast"], "lr"),
        (["pretrain", "--data", "{data}/data", "--out", "{tmp}/o", "--n-embd", "30", "--n-head", "4"], "n_embd"),
    ],
)
def test_user_errors_are_one_line_naming_the_file_or_field(prepared_data, tmp_path, capsys, args, message):
    filled = [a.format(tmp=tmp_path, data=prepared_data) for a in args]
    assert run_cli(*filled) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def test_shards_made_by_another_tokenizer_are_refused(prepared_data, tmp_path, capsys):
    assert run_cli("tokenizer", "train", prepared_data / "corpus" / "corpus.jsonl", "--out", tmp_path / "other",
                   "--vocab-size", "350") == 0
    code = run_cli("pretrain", "--data", prepared_data / "data", "--tokenizer", tmp_path / "other",
                   "--out", tmp_path / "o", *TINY_MODEL)
    assert code == 2 and "different tokenizer" in capsys.readouterr().err


def test_resume_with_a_changed_model_is_refused_and_the_checkpoint_kept(prepared_data, tmp_path, capsys):
    assert run_cli(*pretrain_args(prepared_data, tmp_path / "pt", "--max-steps", "2")) == 0
    before = (tmp_path / "pt" / "checkpoint" / "model.safetensors").read_bytes()
    args = pretrain_args(prepared_data, tmp_path / "pt", "--max-steps", "4", "--resume")
    args[args.index("--n-embd") + 1] = "64"
    assert run_cli(*args) == 2
    assert "model.n_embd" in capsys.readouterr().err
    assert (tmp_path / "pt" / "checkpoint" / "model.safetensors").read_bytes() == before


def test_a_yaml_config_file_sets_fields_and_flags_override_it(prepared_data, tmp_path):
    (tmp_path / "cfg.yaml").write_text("model: {n_layer: 1, n_head: 2, n_embd: 16, context_length: 16}\n"
                                       "train: {max_steps: 3, batch_size: 2, lr: 0.01, progress: false}\n")
    assert run_cli("pretrain", "--config", tmp_path / "cfg.yaml", "--data", prepared_data / "data",
                   "--out", tmp_path / "pt", "--max-steps", "2") == 0
    state = json.loads((tmp_path / "pt" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["train_config"]["lr"] == 0.01
    assert state["run_config"]["model"]["n_embd"] == 16


@pytest.mark.slow
def test_two_processes_with_batch_b_each_equal_one_process_with_batch_2b(prepared_data, tmp_path):
    """torchrun data parallelism (gloo on CPU) reproduces the single-process loss curve."""
    common = ["pretrain", "--data", str(prepared_data / "data"), *TINY_MODEL, "--max-steps", "5",
              "--batch-size", "8", "--eval-every", "5", "--log-every", "1", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "chatforge", *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "chatforge", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]

    def curve(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["train/loss"] for x in lines]

    assert len(curve("two")) == 5
    assert curve("two") == pytest.approx(curve("one"), abs=1e-5)


def test_pretrain_without_data_uses_the_built_in_world(tmp_path, capsys):
    assert run_cli("pretrain", "--out", tmp_path / "run" / "pretrain", *TINY_MODEL, "--max-steps", "1",
                   "--batch-size", "2", "--no-progress") == 0
    assert "built-in corpus" in capsys.readouterr().out
    assert (tmp_path / "run" / "corpus" / "world.json").exists()
    assert (tmp_path / "run" / "data" / "meta.json").exists()
    assert (tmp_path / "run" / "pretrain" / "checkpoint" / "model.safetensors").exists()


def test_generate_takes_every_decoding_option_and_reports_json(prepared_data, tmp_path, capsys):
    assert run_cli(*pretrain_args(prepared_data, tmp_path / "pt", "--max-steps", "2")) == 0
    capsys.readouterr()
    banned = 7
    assert run_cli("generate", "--checkpoint", tmp_path / "pt", "--prompt", "The capital of", "--prompt", "Kesh",
                   "--json", "--max-tokens", "6", "--min-tokens", "2", "--temperature", "0.9", "--top-k", "20",
                   "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.1", "--presence-penalty", "0.5",
                   "--frequency-penalty", "0.2", "--logit-bias", f"{banned}=-100", "--stop", "zzz", "--n", "2",
                   "--best-of", "3", "--logprobs", "3", "--seed", "1") == 0
    completions = json.loads(capsys.readouterr().out)
    assert len(completions) == 2 and all(len(c["outputs"]) == 2 for c in completions)
    for out in (o for c in completions for o in c["outputs"]):
        assert banned not in out["token_ids"] and len(out["token_ids"]) >= 2
        assert all(len(entry["top"]) == 3 for entry in out["logprobs"])
    assert run_cli("generate", "--checkpoint", tmp_path / "pt", "--prompt", "The", "--num-beams", "3",
                   "--length-penalty", "0.5", "--no-repeat-ngram-size", "2", "--max-tokens", "5", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["outputs"][0]["finish_reason"] in ("stop", "length")
    assert run_cli("generate", "--checkpoint", tmp_path / "pt", "--top-p", "1.5") == 2
    assert "top_p" in capsys.readouterr().err
    assert run_cli("generate", "--checkpoint", tmp_path / "pt", "--logit-bias", "oops") == 2
    assert "KEY=VALUE" in capsys.readouterr().err


# ---- each stage's --help shows the defaults it runs with ------------------------------------------

STAGE_CONFIGS = {"reward": RewardConfig, "ppo": PPOConfig, "grpo": GRPOConfig, "rloo": RLOOConfig,
                 "dpo": DPOConfig}


def option_help(help_text: str, flag: str, metavar: str) -> str:
    """The help of `--flag METAVAR` in a rendered --help page (whitespace and wrapping normalised)."""
    flat = " ".join(help_text.split())
    found = re.search(rf"(?<!\S)--{flag} {metavar} (.*?)(?= --[a-z]|$)", flat)
    assert found, f"--{flag} is not in the help text"
    return found.group(1)


@pytest.mark.parametrize("command", sorted(STAGE_CONFIGS))
def test_stage_help_shows_the_stage_defaults_that_an_omitted_flag_takes(command, tmp_path, capsys, monkeypatch):
    import chatforge.cli as cli_module

    own, generic = STAGE_CONFIGS[command]().train, TrainConfig()
    # the stage's own training defaults differ from the generic ones, so the help must show the right set
    assert own.max_steps != generic.max_steps and own.lr != generic.lr

    assert run_cli(command, "--help") == 0
    help_text = capsys.readouterr().out
    assert option_help(help_text, "max-steps", "INTEGER") == f"[default: {own.max_steps!r}]"
    assert option_help(help_text, "lr", "FLOAT") == f"[default: {own.lr!r}]"
    params = {p.name: p for p in cli_module.cli.commands[command].params}
    for field in dataclasses.fields(TrainConfig):  # every training flag, not only those two
        assert params[field.name].help.endswith(f"[default: {getattr(own, field.name)!r}]"), field.name

    seen = []

    def record(run, cfg, resume, overwrite):  # the config the command builds, without training anything
        seen.append(cfg)
        return SimpleNamespace(is_main=False), None

    monkeypatch.setattr(cli_module, "run_stage", record)
    assert run_cli(command, "--out", tmp_path / command) == 0
    assert seen[-1].train == own  # omitted flags: the stage's defaults, the ones the help shows
    assert run_cli(command, "--out", tmp_path / command, "--lr", "0.5", "--max-steps", "7") == 0
    assert seen[-1].train == dataclasses.replace(own, lr=0.5, max_steps=7)


# ---- serve ----------------------------------------------------------------------------------------


def test_serve_binds_localhost_port_8000_by_default(tmp_path, capsys, monkeypatch):
    import chatforge.serve.server as server
    from chatforge.serve.app import ServeConfig

    seen = []
    monkeypatch.setattr(server, "serve_checkpoint", seen.append)  # the config it would serve; nothing binds
    assert run_cli("serve", "--checkpoint", tmp_path / "chat") == 0
    assert (seen[-1].host, seen[-1].port) == ("127.0.0.1", 8000)
    assert (ServeConfig().host, ServeConfig().port) == ("127.0.0.1", 8000)
    assert run_cli("serve", "--help") == 0
    help_text = capsys.readouterr().out
    assert option_help(help_text, "host", "TEXT").endswith("[default: '127.0.0.1']")
    assert option_help(help_text, "port", "INTEGER").endswith("[default: 8000]")
    assert run_cli("serve", "--checkpoint", tmp_path / "chat", "--host", "0.0.0.0", "--port", "9001") == 0
    assert (seen[-1].host, seen[-1].port) == ("0.0.0.0", 9001)


def test_serve_flags_are_made_from_serve_config_so_every_field_has_one(tmp_path, monkeypatch):
    import chatforge.serve.server as server
    from chatforge.serve.config import ServeConfig

    seen = []
    monkeypatch.setattr(server, "serve_checkpoint", seen.append)
    monkeypatch.setenv("CHATFORGE_API_KEY", "from-env")
    assert run_cli("serve", "--checkpoint", "c", "--max-prompts", "3", "--cors-origin", "https://a.example",
                   "--cors-origin", "*", "--db", "sqlite://", "--no-web", "--log-level", "debug") == 0
    assert seen[-1] == ServeConfig(checkpoint="c", max_prompts=3, cors_origins=["https://a.example", "*"],
                                   db_url="sqlite://", web=False, log_level="debug", api_key="from-env")
    (tmp_path / "serve.yaml").write_text("port: 9100\nmax_queue: 5\n")
    assert run_cli("serve", "--config", tmp_path / "serve.yaml", "--checkpoint", "c", "--port", "9200") == 0
    assert (seen[-1].port, seen[-1].max_queue) == (9200, 5)  # the flag wins over the file


def test_serve_refuses_a_missing_checkpoint_and_an_unknown_log_level(tmp_path, capsys):
    assert run_cli("serve") == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    assert run_cli("serve", "--checkpoint", "c", "--log-level", "loud") == 2
    assert "--log-level" in capsys.readouterr().err
    (tmp_path / "serve.yaml").write_text("log_level: loud\n")
    assert run_cli("serve", "--config", tmp_path / "serve.yaml", "--checkpoint", "c") == 2
    assert "log_level: expected one of" in capsys.readouterr().err


def test_two_nested_fields_that_would_make_one_flag_are_refused_when_the_command_is_built():
    from chatforge.cli import config_options
    from chatforge.errors import ConfigError

    @dataclasses.dataclass
    class Inner:
        seed: int = 0

    @dataclasses.dataclass
    class Outer:
        seed: int = 1
        inner: Inner = dataclasses.field(default_factory=Inner)

    with pytest.raises(ConfigError, match=r"seed and inner\.seed would both be --seed"):
        config_options(Outer)


def test_every_command_built_from_a_config_has_distinct_flags():
    from chatforge.cli import cli

    for name, command in cli.commands.items():
        flags = [opt for p in command.params for opt in p.opts + p.secondary_opts]
        assert len(flags) == len(set(flags)), (name, sorted(f for f in flags if flags.count(f) > 1))


def test_the_command_line_and_every_config_class_load_without_the_trainers():
    code = ("import sys, chatforge.cli, chatforge.train.config, chatforge.serve.config\n"
            "print(sorted(m for m in sys.modules if m.startswith('chatforge.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['chatforge.train', 'chatforge.train.config']"
