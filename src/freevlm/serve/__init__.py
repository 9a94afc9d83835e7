"""`freevlm serve`: an OpenAI-compatible HTTP server over the early-exit engine (docs/serving.md).

config.py (what the operator sets), protocol.py (requests in, responses out: parsing, validation, OpenAI-shaped bodies),
scheduler.py (the one thread that owns the model: continuous batching between decode steps), metrics.py (Prometheus
text), app.py (the HTTP layer: FastAPI routes, uvicorn).
"""
