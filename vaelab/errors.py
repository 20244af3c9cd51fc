"""The project's own exceptions.

A `VaelabError` is a user-facing problem (bad input, missing file, bad option):
the CLI prints its message on one line and exits with status 2. Anything else
is a bug and keeps its traceback.
"""


class VaelabError(Exception):
    """A problem the user can fix; the message says what and how."""


class DataError(VaelabError):
    """A data file is missing, malformed or fails verification."""


class RunError(VaelabError):
    """A run directory is missing, incomplete or cannot be written."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (a library's may span several), or its type's name."""
    return " ".join(str(e).split()) or type(e).__name__
