"""Fakes for unit tests: an in-memory store that honours guards and the fence, a fake engine."""
