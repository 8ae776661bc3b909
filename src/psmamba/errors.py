"""The one exception type that carries a user-facing, one-line message."""


class PsmambaError(ValueError):
    """Bad input or configuration; the message names the file or value and the problem.

    The command line prints ``psmamba: error: <message>`` and exits with status 2 instead of
    a traceback. It subclasses ``ValueError`` so library callers can catch either.
    """
