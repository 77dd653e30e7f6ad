"""Errors every layer raises alike."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration, checkpoint or argument that cannot be used, with the reason in the message."""
