"""Serving apps: an OpenAI-compatible HTTP API, Prometheus metrics and a chat page on the head's event loop.

`Server(cluster, ServeConfig(...)).app()` is an aiohttp application; `flowspec serve` (flowspec/cli/serve.py)
runs it. Request validation is in schema.py, the metrics in metrics.py, the text stream in text.py.
"""

from flowspec.serve.app import ServeConfig, Server
from flowspec.serve.schema import ApiError, Limits

__all__ = ["ApiError", "Limits", "ServeConfig", "Server"]
