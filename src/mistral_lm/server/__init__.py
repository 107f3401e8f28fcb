"""OpenAI-compatible HTTP server with continuous batching (needs the `serve` extra: fastapi, uvicorn).

- `protocol`: OpenAI request validation and response bodies (pure, no HTTP).
- `engine`: one thread owns the model and batches every active request into each forward pass.
- `prefix_cache`: prefilled prompts the engine reuses for requests that start with them.
- `app`: the FastAPI/uvicorn transport, and `serve(...)`, what `mistral-lm serve` runs.

Nothing is imported here, so `protocol` and `engine` work without the web stack installed.
"""
