"""The one exception type that carries a user-facing, one-line message, and its helper."""

from __future__ import annotations


class PsmambaError(ValueError):
    """Bad input or configuration; the message names the file or value and the problem.

    The command line prints ``psmamba: error: <message>`` and exits with status 2 instead of
    a traceback. It subclasses ``ValueError`` so library callers can catch either.
    """


def require_file(path, what: str) -> None:
    """A one-line PsmambaError unless ``path`` is a regular file: missing, a folder, or a device
    or pipe (``/dev/null``), each said as such, with ``what`` (e.g. ``"pair list"``) and the path."""
    import os

    p = os.fspath(path)
    if not os.path.exists(p):
        raise PsmambaError(f"{what} {p} does not exist")
    if os.path.isdir(p):
        raise PsmambaError(f"{what} {p} is a folder, not a file")
    if not os.path.isfile(p):
        raise PsmambaError(f"{what} {p} is not a regular file (a device or a pipe)")


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first non-empty line of an exception's message (its type name when it has none).

    The one helper that turns a library's multi-line error into the one line psmamba shows.
    """
    text = str(exc).strip()
    if text.startswith("Weights only load failed"):
        # torch.load's first line advises weights_only=False (unsafe for a file of unknown
        # origin); the reason is on a later line
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        reason = detail[0].strip() if detail and detail[0].strip() else "unsupported content"
        return f"not a torch file of tensors and plain data: {reason}"
    if not text:
        return type(exc).__name__ if default is None else default
    line = text.splitlines()[0]
    if not any(c.isalpha() for c in line):  # e.g. torch.load's KeyError('101') on a text file
        return f"{type(exc).__name__}: {line}"
    return line


def check_on_device(ok, message: str) -> None:
    """Raise ``PsmambaError(message)`` unless the boolean tensor ``ok`` is true, without making
    an accelerator wait for the answer.

    On the CPU (and on devices without an asynchronous assert) the check reads ``ok`` at once.
    On a CUDA device, and while ``torch.compile`` traces, it is ``torch._assert_async``: the
    host does not wait for the device (reading a GPU value each training step stalls the
    launch queue); a false value fails at the device's next synchronisation with
    ``message`` in a RuntimeError (a device-side assert: the CUDA context is unusable
    afterwards, so data loaders should check on the host first, as ``collate_pairs`` does).
    """
    import torch

    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    if ok.device.type == "cuda" or compiling:
        try:
            torch._assert_async(ok, message)
        except TypeError:  # a torch without the message overload
            torch._assert_async(ok)
        return
    if not bool(ok):
        raise PsmambaError(message)
