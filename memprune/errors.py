"""One exception type for every bad input: the CLI turns it into one sentence and exit code 1."""


class MemPruneError(Exception):
    """A user-facing error: the message says what is wrong, where, and what to do."""
