"""chatforge: a complete ChatGPT system, from tokenizer to RLHF to an OpenAI-compatible server."""

__version__ = "0.1.0"
