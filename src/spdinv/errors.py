"""The one exception type the CLI turns into a one-line message, and the one-line form of any error."""


class SpdinvError(ValueError):
    """Bad input or options: the message names the problem in one line."""


def require_finite(values, what: str) -> None:
    """A one-line error when a tensor holds NaN or inf: a non-finite result is never reported, or
    written, as a success."""
    if not bool(values.isfinite().all()):
        raise SpdinvError(f"{what} is not finite (NaN or inf)")


class Unavailable(Exception):
    """An evaluation model is absent; the message says which and where it was looked for."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
