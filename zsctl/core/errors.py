"""The two failure kinds the CLI maps to exit codes."""


class BadInput(Exception):
    """Bad usage or bad input: exit code 2, one line naming the thing and what to do."""


class RunFailure(Exception):
    """A runtime failure (engine died mid-run, training diverged): exit code 1."""
