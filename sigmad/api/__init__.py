"""The HTTP API (docs/api.md): routes, read views from the state cache, and writes."""

from sigmad.api.routes import make_app

__all__ = ["make_app"]
