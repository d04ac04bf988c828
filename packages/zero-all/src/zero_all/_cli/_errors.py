"""The error every ``zero`` subcommand raises for a user's mistake (its own and the ones it hosts)."""

__all__ = ["UsageError"]


class UsageError(Exception):
    """A user mistake: reported as one line, exit status 2."""
