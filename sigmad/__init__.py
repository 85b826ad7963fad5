"""Sigma: a container orchestrator that pools hosts into one big server."""

__version__ = "0.1.0"
