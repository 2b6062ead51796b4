"""Serving: the OpenAI-compatible HTTP API (`app`), the engine's background loop (`runner`), and
the web chat page, its store and moderation (added by `web`, `store`, `feedback`, `moderation`).

Nothing is imported here, so `import chatforge.serve.<module>` pulls in only what it needs.
"""
