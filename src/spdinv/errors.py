"""The one exception type the CLI turns into a one-line message."""


class SpdinvError(ValueError):
    """Bad input or options: the message names the problem in one line."""


def require_finite(values, what: str) -> None:
    """A one-line error when a tensor holds NaN or inf: a non-finite result is never reported, or
    written, as a success."""
    if not bool(values.isfinite().all()):
        raise SpdinvError(f"{what} is not finite (NaN or inf)")
