"""The ``psmamba`` command line: a thin layer over the library.

Each sub-command lives in its own module under :mod:`psmamba.commands` and provides

* ``HELP``: a one-line description,
* ``add_arguments(parser)``: its argparse options,
* ``run(args) -> int``: the work, with heavy imports inside the function so that
  ``psmamba --help`` stays fast;
* optionally ``KEEP_FREED_MEMORY = True``: inference-type commands (``register``,
  ``evaluate``, ``demo``) call :func:`psmamba.runtime.keep_freed_memory` first (faster on
  the CPU; ``train`` does not, as it would raise the training step's peak memory).

User errors (:class:`psmamba.PsmambaError`, missing files, ...) print one line
``psmamba: error: ...`` and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import signal
import sys
import threading
import warnings

from psmamba import __version__
from psmamba.errors import PsmambaError, first_line


def _command_modules():
    import psmamba.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        yield info.name.replace("_", "-"), importlib.import_module(f"psmamba.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psmamba",
        description="PSMamba-Net deformable registration of 3-D medical images.",
    )
    parser.add_argument("--version", action="version", version=f"psmamba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _command_modules():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _keep_memory=bool(getattr(module, "KEEP_FREED_MEMORY", False)))
    return parser


def quiet_openmp(environ=None, modules=None) -> bool:
    """Make idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``).

    PyTorch's OpenMP pool and numba's kernels take turns in every registration step; with
    spinning (GNU OpenMP's default) the idle pool burns the cores the other one needs: a
    64x80x64 registration took 30.8 s on 2 threads of a loaded 2-core machine against 3.6 s
    with PASSIVE (benchmarks/README.md). It must be set before the OpenMP runtime loads, i.e.
    before torch is imported; a value the user set is kept. Returns whether it was set here.
    """
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "torch" in modules or "OMP_WAIT_POLICY" in environ:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def main(argv: list[str] | None = None) -> int:
    quiet_openmp()
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    if args._keep_memory:
        from psmamba.runtime import keep_freed_memory

        keep_freed_memory()  # reuse freed tensor memory (faster on the CPU, see psmamba.runtime)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return int(args._run(args) or 0)
    except (PsmambaError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"psmamba: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except _Terminated:
        print("psmamba: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("psmamba: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop), raised where Python code runs next so that
    staged outputs are removed as on Ctrl-C (``psmamba train`` handles it itself: it saves first)."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line for a command-line user (Python's format adds the file, line and
    source of the ``warnings.warn`` call)."""
    text = str(message).strip()
    if text.startswith("psmamba: "):
        text = text[len("psmamba: "):]
    kind = "" if category in (UserWarning, RuntimeWarning) else f" ({category.__name__})"
    return f"psmamba: warning{kind}: {text}\n"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
