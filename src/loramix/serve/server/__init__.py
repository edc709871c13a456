"""``loramix serve``: an OpenAI-compatible HTTP server for one base model and many adapters.

``engine.py`` (the thread that owns the model and decodes all requests in one batch, each row
through its adapter), ``app.py`` (the FastAPI app: the OpenAI endpoints over the engine),
``limits.py`` (limits, error bodies, the API key and body-size middleware), ``admin.py`` (adding
and removing adapters while serving), ``command.py`` (the command line).
"""
