"""`offloadgen serve`: an OpenAI-compatible HTTP server on the continuous batcher.

The web stack (FastAPI, uvicorn, sse-starlette, prometheus-client) is the `serve` extra, so
nothing here is imported by the rest of the package."""
