"""Atomic file and folder writes: the one implementation every writer of psmamba uses.

A file is written to a temporary name in its destination folder (same file system), flushed and
``fsync``-ed, then renamed over the destination (``os.replace`` is atomic on POSIX and Windows):
a reader never sees half a file, and a crash or an error leaves the old file (or none) behind,
never a partial one. Temporary files get the permissions a plain ``open(path, "w")`` would give
(``mkstemp``'s own are 0600).

A folder of outputs is written the same way (:class:`StagingDir`): into a temporary folder beside
it, moved into place only once everything succeeded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from psmamba.errors import PsmambaError

__all__ = [
    "temp_beside",
    "atomic_write",
    "atomic_write_all",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_save",
    "probe_writable",
    "StagingDir",
]


def _umask_mode(folder: bool = False) -> int:
    """The mode a plain ``open(path, "w")`` (``folder``: ``mkdir``) would give."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def temp_beside(path: str | os.PathLike, suffix: str = ".tmp") -> str:
    """A new, empty temporary file in ``path``'s folder with the usual permissions; its name.

    ``suffix`` matters to writers that pick a format from the name (matplotlib, nibabel).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _umask_mode())
    except OSError:  # pragma: no cover - file systems without modes
        pass
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], suffix: str = ".tmp") -> Path:
    """Call ``write(temp_name)`` on a temporary file beside ``path``, then rename it over ``path``.

    ``write`` gets a file NAME (so that libraries which open files themselves can be used);
    the file is fsync-ed before the rename. On any error the temporary file is removed and the
    error propagates.
    """
    path = Path(path)
    tmp = temp_beside(path, suffix)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_all(writes: Sequence[tuple[str | os.PathLike, Callable[[str], Any]]]) -> list[Path]:
    """Write several files all or nothing, creating their folders.

    Each ``(path, write)`` is written as in :func:`atomic_write` to a temporary file beside
    ``path``; only when every one succeeded are they renamed into place. On any error the
    temporary files and the folders created here are removed and the error propagates: the
    destinations keep their old content (or stay absent).
    """
    paths = [Path(p) for p, _ in writes]
    created: list[Path] = []
    temps: list[str] = []
    try:
        for path in paths:
            created += _make_folders(path.parent)
        for path, (_, write) in zip(paths, writes):
            temps.append(temp_beside(path))
            write(temps[-1])
            fd = os.open(temps[-1], os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    return paths


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the folders created, outermost first."""
    missing = []
    f = folder.expanduser().absolute()
    while not f.exists():
        missing.append(f)
        if f.parent == f:
            break
        f = f.parent
    for m in reversed(missing):
        m.mkdir(exist_ok=True)
    return list(reversed(missing))


def _with_file(mode: str, fill: Callable[[IO], Any], **open_kw: Any) -> Callable[[str], None]:
    def write(name: str) -> None:
        with open(name, mode, **open_kw) as fh:
            fill(fh)

    return write


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, _with_file("wb", lambda fh: fh.write(data)))


def atomic_write_text(path: str | os.PathLike, text: str, newline: str | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, _with_file("w", lambda fh: fh.write(text), encoding="utf-8", newline=newline))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically."""
    import torch

    return atomic_write(path, _with_file("wb", lambda fh: torch.save(obj, fh)))


def _existing_anchor(path: Path) -> Path:
    anchor = path
    while not anchor.exists():
        parent = anchor.parent
        if parent == anchor:
            break
        anchor = parent
    return anchor


def probe_writable(folder: str | os.PathLike, what: str) -> Path:
    """Check, creating nothing that stays, that ``folder`` (or its nearest existing ancestor,
    where it will be created) is a writable folder; ``what`` names it in the one-line error.

    A real write is tried: ``os.access`` says yes to root even on read-only file systems.
    """
    folder = Path(folder).expanduser()
    anchor = _existing_anchor(folder)
    if not anchor.is_dir():
        raise PsmambaError(f"{what} {folder} cannot be created: {anchor} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".psmamba-write-test-", dir=anchor)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise PsmambaError(f"{what} {folder} is not writable ({anchor}: {exc.strerror or exc})") from None
    return folder


class StagingDir:
    """A temporary folder beside an output folder; :meth:`commit` moves its files into place.

    Creating it is also the writability check, done before any computation. ``owned`` lists
    the file names this kind of output may hold: on commit into an existing folder, an owned
    file that this run did not write (say labels from an earlier run that had labels) is
    removed, so the folder never mixes two runs.
    """

    def __init__(self, out_dir: str | os.PathLike, owned: Iterable[str] = ()) -> None:
        self.out = Path(out_dir).expanduser().absolute()
        self.owned = tuple(owned)
        if self.out.exists() and not self.out.is_dir():
            raise PsmambaError(f"output folder {self.out} exists and is not a folder")
        # the nearest existing ancestor holds the staging folder, so the final move is a rename
        anchor = _existing_anchor(self.out.parent)
        if not anchor.is_dir():
            raise PsmambaError(f"cannot create output folder {self.out}: {anchor} is not a folder")
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=anchor))
        except OSError as exc:
            raise PsmambaError(f"output folder {self.out} is not writable ({exc.strerror or exc} in {anchor})") from None
        try:  # mkdtemp's folder is 0700; renamed into place it must be what mkdir would make
            os.chmod(self.tmp, _umask_mode(folder=True))
        except OSError:  # pragma: no cover - file systems without modes
            pass

    def commit(self) -> Path:
        """Move the staged files into the output folder (one rename when it did not exist)."""
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            if not self.out.exists():
                os.replace(self.tmp, self.out)
            else:
                new = {item.name for item in self.tmp.iterdir()}
                for item in sorted(self.tmp.iterdir()):
                    os.replace(item, self.out / item.name)
                for name in self.owned:
                    if name not in new and (self.out / name).is_file():
                        (self.out / name).unlink()
        except OSError as exc:
            raise PsmambaError(f"cannot write output folder {self.out}: {exc.strerror or exc}") from None
        return self.out

    def cleanup(self) -> None:
        """Remove the staging folder (after a commit there is nothing left to remove)."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StagingDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()
