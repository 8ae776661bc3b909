"""The trained PSMamba-Net that ships inside the package (issue 14).

``psmamba register`` runs it by default (affine, then this network, then instance optimisation);
``--method network`` runs it alone; ``--checkpoint C`` replaces it with your own. The weights lie
in ``psmamba/weights/`` in half precision beside their model card (``MODEL_CARD.md``: data, grid,
steps, wall time, validation curve, the licences of the atlases the training labels came from).

Every load checks the file's SHA-256 against the value recorded here and loads the weights
strictly (:func:`psmamba.models.checkpoint.load_checkpoint`), so a damaged or swapped file fails
with one line instead of registering with wrong weights.

The shipped file is made from a ``psmamba train`` checkpoint (``best.pt`` of
``configs/pretrain.yaml``) by :func:`export_weights`::

    python -m psmamba.models.pretrained export runs/pretrain/best.pt src/psmamba/weights/NAME.pt
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psmamba.errors import PsmambaError, first_line

__all__ = [
    "DEFAULT", "SHIPPED", "ShippedWeights", "available", "export_weights", "load_shipped", "sha256_of", "shipped_path",
    "verify",
]

#: the folder of the shipped weights (package data)
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


@dataclass(frozen=True)
class ShippedWeights:
    """One shipped network: its file in :data:`WEIGHTS_DIR`, checksum, preset and grid."""

    name: str
    file: str
    sha256: str
    preset: str
    grid: tuple[int, int, int]

    @property
    def path(self) -> Path:
        return WEIGHTS_DIR / self.file


#: the shipped networks by name
SHIPPED: dict[str, ShippedWeights] = {
    # PSMamba-Net (the paper's architecture) after configs/pretrain.yaml: see weights/MODEL_CARD.md
    "psmamba-brain": ShippedWeights(
        name="psmamba-brain", file="psmamba_brain.pt", preset="paper", grid=(48, 64, 48),
        sha256="9a195cf67603ce2017ff21e5461d867a0356354c9a3c2e3efe216213d69e61ac"),
}

#: what ``register`` runs when no ``--checkpoint`` is given (None: nothing ships)
DEFAULT: str | None = "psmamba-brain"


def _entry(name: str | None) -> ShippedWeights:
    name = DEFAULT if name is None else name
    if name is None or name not in SHIPPED:
        known = ", ".join(SHIPPED) or "none"
        raise PsmambaError(f"no shipped network {name!r} (shipped: {known}); give --checkpoint C")
    return SHIPPED[name]


def available(name: str | None = None) -> bool:
    """Whether the shipped network ``name`` (default: :data:`DEFAULT`) is installed."""
    try:
        return _entry(name).path.is_file()
    except PsmambaError:
        return False


def shipped_path(name: str | None = None) -> Path:
    """The file of the shipped network ``name`` (default: :data:`DEFAULT`)."""
    entry = _entry(name)
    if not entry.path.is_file():
        raise PsmambaError(f"shipped network {entry.name}: {entry.path} is missing (reinstall psmamba)")
    return entry.path


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(name: str | None = None) -> Path:
    """Check the shipped file's SHA-256; its path. Raises :class:`PsmambaError` on a mismatch."""
    entry = _entry(name)
    path = shipped_path(entry.name)
    got = sha256_of(path)
    if got != entry.sha256:
        raise PsmambaError(f"shipped network {entry.name}: {path} is damaged or replaced (SHA-256 {got[:12]}..., "
                           f"expected {entry.sha256[:12]}...); reinstall psmamba")
    return path


def load_shipped(name: str | None = None, device: Any = "cpu"):
    """The shipped network ``name`` -> ``(model, checkpoint_dict)``, checked and strictly loaded.

    The model is in float32, eval mode, on ``device``; ``checkpoint_dict["image_size"]`` is the
    grid it runs on; ``model.psmamba_space`` the world box it was trained in
    (:class:`psmamba.engine.methods.NetworkSpace`: ``register`` resamples every pair into it).
    """
    from psmamba.engine.methods import load_model

    path = verify(name)
    return load_model(path, device=device)


def export_weights(checkpoint: str | os.PathLike, out: str | os.PathLike, **info: Any) -> Path:
    """Write a ``psmamba train`` checkpoint as a shippable file: half-precision weights, the grid
    (``image_size``), the training summary without optimiser state, and ``info`` under
    ``"shipped"``. Loading casts the weights back to float32.
    """
    import torch

    from psmamba.files import atomic_save
    from psmamba.models.checkpoint import load_checkpoint

    if not str(out).strip():
        raise PsmambaError("export: OUT is empty: name the file to write")
    out = Path(out).expanduser()
    if out.is_dir():
        raise PsmambaError(f"export: OUT {str(out)!r} must name a file, not a folder")
    if out.exists() and out.resolve() == Path(checkpoint).expanduser().resolve():
        raise PsmambaError(f"export: OUT {out} is CHECKPOINT itself: the training checkpoint would be replaced")
    from psmamba.files import probe_writable

    probe_writable(out.parent, "export: the folder of OUT")
    _, ckpt = load_checkpoint(checkpoint)  # strict: the weights fit their config
    if not ckpt.get("image_size"):
        raise PsmambaError(f"{checkpoint}: no image_size (not a psmamba train checkpoint)")
    state = {k: (v.half() if torch.is_floating_point(v) else v) for k, v in ckpt["state_dict"].items()}
    payload = {k: ckpt[k] for k in ("format", "format_version", "psmamba_version", "config", "image_size")}
    summary = ckpt.get("train_summary") or {}
    payload.update(state_dict=state, train_summary={k: summary[k] for k in ("config", "best", "val") if k in summary},
                   shipped={"weights_dtype": "float16", **info})
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return atomic_save(payload, out)
    except OSError as exc:
        raise PsmambaError(f"export: cannot write {out} ({exc.strerror or exc})") from None


def _main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m psmamba.models.pretrained",
                                description="export a training checkpoint as shipped weights, or check them")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="CHECKPOINT -> OUT (half precision) and print its SHA-256")
    e.add_argument("checkpoint")
    e.add_argument("out")
    sub.add_parser("verify", help="check the shipped files' SHA-256 and load them")
    args = p.parse_args(argv)
    try:
        if args.cmd == "export":
            path = export_weights(args.checkpoint, args.out)
            print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), sha256 {sha256_of(path)}")
        else:
            for name, entry in SHIPPED.items():
                load_shipped(name)
                print(f"{name}: {entry.path} ok")
    except PsmambaError as exc:
        print(f"psmamba: error: {first_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
