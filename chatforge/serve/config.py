"""`chatforge serve`'s settings: one dataclass that the command line's flags are generated from (as
every training stage's are), importable without FastAPI or the engine."""

from __future__ import annotations

from dataclasses import dataclass

from chatforge.config import setting


@dataclass
class ServeConfig:
    """What `serve.server.serve_checkpoint` serves, and how."""

    checkpoint: str = setting("", "A chat model (after `chatforge sft`, `ppo` or `dpo`); required.")
    host: str = setting("127.0.0.1", "Address to bind (0.0.0.0: every interface).")
    port: int = setting(8000, "Port to bind.")
    model_name: str = setting("", "Model id the API serves (empty: the checkpoint directory's name).")
    api_key: str | None = setting(None, "Require 'Authorization: Bearer KEY' on /v1, /api and /metrics "
                                  "(/health and the page stay open).", envvar="CHATFORGE_API_KEY", secret=True)
    cors_origins: list[str] = setting(help="Allow browser requests from this origin ('*' for any). Default: "
                                      "no CORS.", flag="cors-origin", default_factory=list)
    max_batch_size: int = setting(16, "Engine slots (sequences decoded together).")
    max_queue: int = setting(64, "Requests waiting for a slot before 429.")
    fused: bool = setting(True, "Decode 1-32 rows a step in chatforge's fused CPU step where its kernels build "
                          "here (AVX-512 or AVX2 on Linux; built once, about 40 s); --no-fused: torch's products only.")
    compile: bool = setting(False, "Also torch.compile the decode forward (the steps the fused one leaves), "
                            "compiled before serving (minutes); on AVX2 CPUs slower than the eager engine.")
    quantize: str = setting("none", "int8: quantize an fp32 checkpoint's weights on load (weight-only, one scale per "
                            "output channel; see `chatforge quantize`). A quantized checkpoint loads as stored.",
                            choices=("none", "int8"))
    max_body_bytes: int = setting(1_000_000, "Larger request bodies get 413.")
    max_prompts: int = setting(64, "Prompts in one /v1/completions request; more get 400.")
    web: bool = setting(True, "Serve the web chat page beside the API (--no-web: the API only, nothing stored).")
    db_url: str = setting("", "SQLAlchemy URL of the web page's conversation/feedback store (empty: "
                          "sqlite:///<run dir>/chatforge.db for <run dir>/<stage>/checkpoint, as the demo's; "
                          "else ./chatforge.db).", flag="db")
    builtin_tools: bool = setting(False, "Offer the built-in calculator and calendar to every chat request: the "
                                  "model sees them beside the request's tools and the server runs its calls.")
    moderation: str | None = setting(None, "Moderate inputs and outputs with this config file ('default': the "
                                     "built-in list). Default: off.")
    watermark_key: str | None = setting(None, "Watermark every answer (Kirchenbauer et al.) with this SECRET key: any "
                                        "text, or an integer (transformers' hashing_key). Never shown in responses, "
                                        "logs or /metrics; POST /v1/detect checks texts against it. Default: no "
                                        "watermark (a request may then bring its own).",
                                        envvar="CHATFORGE_WATERMARK_KEY", secret=True)
    watermark_gamma: float = setting(0.25, "The watermark's green list: this share of the vocabulary.")
    watermark_delta: float = setting(2.0, "The bias added to green tokens' logits (higher: easier to detect, "
                                     "further from the model's own choices).")
    watermark_seeding_scheme: str = setting("lefthash", "What seeds the green list: the previous tokens (lefthash) "
                                            "or those and the candidate token (selfhash: harder to scrub, slower).",
                                            choices=("lefthash", "selfhash"))
    watermark_context_width: int = setting(1, "Tokens that seed the green list (selfhash: the candidate included).")
    device: str = setting("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:1 ...")
    shutdown_timeout: float = setting(30.0, "Seconds running requests get to finish after SIGTERM.")
    log_level: str = setting("info", "How much the server logs.",
                             choices=("critical", "error", "warning", "info", "debug"))
