"""The per-host node agent."""
