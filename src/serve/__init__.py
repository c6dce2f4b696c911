"""``hpi serve``: the HTTP front of a running deployment (OpenAI-compatible routes, SSE, API key).

The model stays loaded on the plan's ranks (``hpi.executor.serve_loop``); this package answers HTTP, owns the
tokenizer and talks to rank 0 (``engine_client``). Entry point: ``hpi.serve.server.serve``.
"""
