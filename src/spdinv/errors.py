"""The one exception type the CLI turns into a one-line message."""


class SpdinvError(ValueError):
    """Bad input or options: the message names the problem in one line."""
