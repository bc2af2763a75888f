"""Errors a user can cause.

Library code raises a `ScalelabError` (or a subclass) with a message written for the user; the CLI turns it
into one line on stderr and exit status 2. Anything else is a bug and keeps its traceback.
"""


class ScalelabError(Exception):
    """A problem with the user's input: config, files, flags, servers."""


class ConfigError(ScalelabError):
    """A bad config key or value."""


class DataError(ScalelabError):
    """A missing, empty or unreadable corpus or data file."""


class CheckpointError(ScalelabError):
    """A missing, corrupt or incompatible checkpoint."""
