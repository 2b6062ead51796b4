"""Running the app: from a checkpoint (`chatforge serve`), or in a background thread (tests, notebooks).

Graceful shutdown: on SIGTERM (or Ctrl-C) `GracefulServer` first tells the runner to stop
admitting — a request that still arrives gets 503 — then uvicorn stops listening, waits up to
`shutdown_timeout` seconds for running requests (streams included) to finish, and runs the app's
lifespan shutdown, which stops the engine thread.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from chatforge.checkpoint import CHECKPOINT_SUBDIR, resolve_checkpoint_dir
from chatforge.data.examples import example_prompts
from chatforge.errors import ConfigError
from chatforge.serve.app import ServeConfig, create_app

log = logging.getLogger("chatforge.serve")


def default_model_name(checkpoint: str | Path) -> str:
    """The checkpoint directory's name (its stage directory's name for `<stage>/checkpoint`)."""
    path = Path(checkpoint).resolve()
    return path.parent.name if path.name == CHECKPOINT_SUBDIR and path.parent.name else path.name


def default_db_url(checkpoint: str | Path) -> str:
    """`sqlite:///<run dir>/chatforge.db` for a stage's checkpoint `<run dir>/<stage>/checkpoint` (the run's
    one database, whichever of its stages is served, as `chatforge demo` has it; not inside the stage: a
    checkpoint directory is replaced whole when training saves again), else `./chatforge.db`."""
    resolved = resolve_checkpoint_dir(checkpoint).resolve()
    where = resolved.parent.parent if resolved.name == CHECKPOINT_SUBDIR else Path.cwd()
    return f"sqlite:///{where / 'chatforge.db'}"


def load_moderator(spec: str | None) -> Any:
    """None: no moderation; "default": the moderator's built-in list; else a moderation config file."""
    if not spec:
        return None
    try:
        from chatforge.serve.moderation import Moderator
    except ImportError as e:
        raise ConfigError(f"--moderation: moderation is not available in this installation ({e})") from None
    return Moderator.from_file(spec)


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_app(config: ServeConfig) -> FastAPI:
    """Load the checkpoint, build the engine and the app (what `chatforge serve` runs)."""
    from chatforge.accel.quantize import load_for_inference
    from chatforge.generate.engine import prepared_engine
    from chatforge.model import ScalarHeadModel

    if not config.checkpoint:
        raise ConfigError("serve: --checkpoint is required")
    ckpt = load_for_inference(config.checkpoint, device=pick_device(config.device), quantize=config.quantize)
    if isinstance(ckpt.model, ScalarHeadModel):
        raise ConfigError(f"serve: {config.checkpoint} is a reward model (a scalar head); expected a language model")
    if ckpt.tokenizer is None:
        raise ConfigError(f"serve: {config.checkpoint} has no tokenizer.json")
    config.model_name = config.model_name or default_model_name(config.checkpoint)
    config.db_url = config.db_url or default_db_url(config.checkpoint)
    # prepared before serving: the first requests would otherwise wait for the kernels, graphs and packs
    engine = prepared_engine(ckpt.model, ckpt.tokenizer, lambda line: print(line, flush=True),
                             max_batch_size=config.max_batch_size, fused=config.fused, compile=config.compile)
    return create_app(engine, config, moderator=load_moderator(config.moderation),
                      examples=example_prompts(config.checkpoint))


class GracefulServer(uvicorn.Server):
    """uvicorn, but the first exit signal first stops the runner admitting new requests (503)."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        app = self.config.app
        state = getattr(getattr(app, "state", None), "chatforge", None)
        if state is not None:
            state.runner.begin_shutdown()
        super().handle_exit(sig, frame)


def startup_line(config: ServeConfig) -> str:
    """Where things go: the address, the API, the page (or that there is none) and the feedback database."""
    url = f"http://{config.host}:{config.port}"
    where = (f"web chat at {url}/, API at {url}/v1; conversations and feedback are stored in {config.db_url}"
             if config.web else f"API at {url}/v1; no web page (--no-web), nothing is stored")
    return f"serving {config.checkpoint} as {config.model_name!r}: {where}{watermark_note(config)}"


def watermark_note(config: ServeConfig) -> str:
    """What the startup line says of the watermark: its settings when there is a key, never the key."""
    if config.watermark_key is None:
        return ""
    return (f"; every answer is watermarked (gamma {config.watermark_gamma:g}, delta {config.watermark_delta:g}, "
            f"{config.watermark_seeding_scheme}, context width {config.watermark_context_width}; "
            "POST /v1/detect checks a text)")


def serve_checkpoint(config: ServeConfig) -> None:
    app = build_app(config)
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                        timeout_graceful_shutdown=config.shutdown_timeout, lifespan="on")
    print(startup_line(config), flush=True)
    GracefulServer(uv).run()


class ServerThread:
    """Run an app with uvicorn in a background thread on a free port (tests, benchmarks, notebooks).

        with ServerThread(app) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key="-")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 10.0,
                 log_level: str = "warning") -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=shutdown_timeout)
        self.server = GracefulServer(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="chatforge-uvicorn")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        """What SIGTERM does: stop admitting, let running requests finish, exit (returns at once)."""
        import signal

        self.server.handle_exit(signal.SIGTERM, None)

    def stop(self, timeout: float = 30.0) -> None:
        self.shutdown()
        self.thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
