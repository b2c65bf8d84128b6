"""One exception type for every user-facing error.

The CLI catches :class:`LcmkitError` and prints its message on one line with a non-zero exit code; library
callers get an ordinary exception. Messages say what is wrong and how to fix it.
"""


class LcmkitError(Exception):
    """A user-facing error: bad input, a missing file, an impossible setting."""

    exit_code = 2
