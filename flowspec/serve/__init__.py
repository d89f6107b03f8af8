"""Serving apps: an OpenAI-compatible HTTP API, Prometheus metrics and a chat page on the head's event loop.

`Server(cluster, ServeConfig(...)).app()` is an aiohttp application; `flowspec serve` (flowspec/cli/serve.py)
runs it. Split as vLLM's OpenAI server: the routes (routes.py: the application, middlewares, thin handlers), the
serving logic over the Cluster (serving.py: admission, generation, streaming, draining, statistics) and the
protocol (protocol.py: request validation and the response shapes); the metrics are in metrics.py, the text
stream in flowspec/text.py.
"""

from flowspec.serve.protocol import ApiError, Limits
from flowspec.serve.routes import Server
from flowspec.serve.serving import ServeConfig

__all__ = ["ApiError", "Limits", "ServeConfig", "Server"]
