"""The error a config that cannot run raises, apart so that every part of the config can raise it."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config that cannot run as written; the message is one line naming the key path."""
