"""Figures: the registration overview (the paper's Figure 6) and Dice plots (Figures 2-5).

Everything draws with matplotlib's non-interactive ``Agg`` backend into PNG files, so it works
on machines without a display. matplotlib is imported inside the functions (``import psmamba``
stays cheap).

Slices are shown in world orientation when an affine is given (``nibabel.aff2axcodes``): axial
(anterior up), coronal and sagittal (superior up), the patient's right on the right of the image
(neurological convention); pixels are drawn with their physical aspect ratio.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from psmamba.errors import PsmambaError

__all__ = ["save_overview", "save_method_panel", "PanelEntry", "dice_boxplot", "pair_dice_plot",
           "read_training_log", "training_curves", "PLANES"]

PLANES = ("axial", "coronal", "sagittal")

# world axis letter of each plane's normal; the in-plane axis drawn vertically
_NORMAL = {"axial": "S", "coronal": "A", "sagittal": "R"}
_VERTICAL = {"axial": "A", "coronal": "S", "sagittal": "S"}
_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display needed, and never opens a window
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class _View:
    """How to cut and orient a 2-D slice out of a ``(D, H, W)`` volume."""

    normal: int  # voxel axis the slice is taken along
    index: int  # slice index along it
    vert: int  # voxel axis drawn vertically (increasing upward after the flip)
    horiz: int  # voxel axis drawn horizontally
    flip_v: bool
    flip_h: bool
    name: str

    def cut(self, vol: np.ndarray) -> np.ndarray:
        """``(D, H, W)`` -> ``(rows=vertical, cols=horizontal)``, row 0 at the bottom."""
        sl = np.take(vol, self.index, axis=self.normal)
        rest = [a for a in range(3) if a != self.normal]
        if rest.index(self.vert) == 1:
            sl = sl.T
        if self.flip_v:
            sl = sl[::-1]
        if self.flip_h:
            sl = sl[:, ::-1]
        return np.ascontiguousarray(sl)

    def inplane(self, ddf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """In-plane displacement components (vertical, horizontal) in display pixel units."""
        uv = self.cut(ddf[self.vert]) * (-1.0 if self.flip_v else 1.0)
        uh = self.cut(ddf[self.horiz]) * (-1.0 if self.flip_h else 1.0)
        return uv, uh


def _views(shape: Sequence[int], affine: np.ndarray | None, planes: Sequence[str], centre: Sequence[int]) -> list[_View]:
    if affine is not None:
        import nibabel as nib

        codes = list(nib.aff2axcodes(np.asarray(affine)))
    else:
        codes = ["S", "A", "R"]  # no affine: axis 0 taken as the slice axis of "axial"
    views = []
    for plane in planes:
        if plane not in PLANES:
            raise PsmambaError(f"plane must be one of {PLANES}, got {plane!r}")

        def axis_of(letter: str) -> tuple[int, bool]:
            for a, c in enumerate(codes):
                if c in (letter, _OPPOSITE[letter]):
                    return a, c != letter  # flip when the voxel axis points the other way
            raise PsmambaError(f"cannot find world axis {letter} in orientation {codes}")

        normal, _ = axis_of(_NORMAL[plane])
        vert, flip_v = axis_of(_VERTICAL[plane])
        horiz = next(a for a in range(3) if a not in (normal, vert))
        flip_h = codes[horiz] in ("L", "P", "I")
        views.append(_View(normal, int(centre[normal]), vert, horiz, flip_v, flip_h, plane))
    return views


def _centre(vol: np.ndarray) -> list[int]:
    """Centre of the non-zero bounding box (the middle of the volume when it is empty)."""
    nz = np.nonzero(vol)
    if len(nz[0]) == 0:
        return [s // 2 for s in vol.shape]
    return [int((a.min() + a.max()) // 2) for a in nz]


def _spacing(affine: np.ndarray | None) -> np.ndarray:
    if affine is None:
        return np.ones(3)
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(0))


def _label_cmap(labels: np.ndarray):
    """A colormap and a remapped array: each label code gets a distinct, stable colour."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    codes = np.unique(labels)
    codes = codes[codes != 0]
    tab = colormaps["tab20"](np.arange(20))
    base = np.concatenate([tab[0::2], tab[1::2]])  # 10 strong colours first, then their light twins
    extra = colormaps["hsv"](np.linspace(0, 1, max(1, len(codes) - 20), endpoint=False))
    colours = np.concatenate([base, extra])[: max(1, len(codes))]
    index = np.zeros(labels.shape, dtype=np.float32)
    for i, c in enumerate(codes):
        index[labels == c] = i + 1
    masked = np.ma.masked_where(index == 0, index)
    return ListedColormap(colours), masked, len(codes)


def save_overview(
    path: str | os.PathLike,
    *,
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    ddf: np.ndarray,
    jacobian: np.ndarray,
    warped_labels: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    planes: Sequence[str] = ("axial", "coronal"),
    title: str | None = None,
    grid_step: int | None = None,
    dpi: int = 110,
) -> Path:
    """Draw the paper's Figure 6 panels for one registration into a PNG.

    Columns: fixed, moving, warped image, warped labels (over the warped image), Jacobian
    determinant (jet, 0..2; folded voxels are dark blue), the field as RGB (channel i of the
    field -> colour i, 0.5 = no displacement), the deformed grid (``p + ddf(p)``, in-plane
    components); one row per plane.

    Args:
        path: the PNG to write.
        fixed, moving, warped, jacobian: ``(D, H, W)`` on the fixed grid.
        ddf: ``(3, D, H, W)`` voxel displacements on the fixed grid.
        warped_labels: ``(D, H, W)`` integer labels or None (the panel then shows the image only).
        affine: the fixed grid's affine (orientation and pixel aspect), or None.
        planes: two (or more) of ``"axial"``, ``"coronal"``, ``"sagittal"``.
        grid_step: pixels between drawn grid lines (default: about 24 lines across).
    """
    plt = _pyplot()
    from matplotlib.colors import Normalize

    fixed = np.asarray(fixed, dtype=np.float32)
    shape = fixed.shape
    for name, arr in (("moving", moving), ("warped", warped), ("jacobian", jacobian)):
        if np.shape(arr) != shape:
            raise PsmambaError(f"overview: {name} has shape {np.shape(arr)}, expected {shape}")
    if np.shape(ddf) != (3,) + tuple(shape):
        raise PsmambaError(f"overview: ddf has shape {np.shape(ddf)}, expected {(3,) + tuple(shape)}")
    # slices through the middle of the labels when there are any (so that panel shows them),
    # else through the middle of the image's non-zero part
    has_labels = warped_labels is not None and np.any(warped_labels)
    views = _views(shape, affine, planes, _centre(np.asarray(warped_labels) if has_labels else fixed))
    sp = _spacing(affine)
    lo, hi = np.percentile(fixed, [0.5, 99.5]) if fixed.size else (0.0, 1.0)
    mlo, mhi = np.percentile(moving, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    if mhi <= mlo:
        mhi = mlo + 1.0
    umax = float(np.abs(ddf).max()) or 1.0
    columns = ["fixed", "moving", "warped", "warped labels", "Jacobian det.", "field (RGB)", "deformation grid"]
    ncol, nrow = len(columns), len(views)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.3 * ncol, 2.5 * nrow + 0.6), squeeze=False)
    jet_norm = Normalize(vmin=0.0, vmax=2.0)
    jac_im = None
    for r, view in enumerate(views):
        aspect = sp[view.vert] / sp[view.horiz]
        show = dict(origin="lower", aspect=aspect, interpolation="nearest")
        axes[r, 0].imshow(view.cut(fixed), cmap="gray", vmin=lo, vmax=hi, **show)
        axes[r, 1].imshow(view.cut(np.asarray(moving)), cmap="gray", vmin=mlo, vmax=mhi, **show)
        wimg = view.cut(np.asarray(warped))
        axes[r, 2].imshow(wimg, cmap="gray", vmin=mlo, vmax=mhi, **show)
        axes[r, 3].imshow(wimg, cmap="gray", vmin=mlo, vmax=mhi, **show)
        if warped_labels is not None:
            cmap, masked, n = _label_cmap(view.cut(np.asarray(warped_labels)))
            axes[r, 3].imshow(masked, cmap=cmap, vmin=0.5, vmax=n + 0.5, alpha=0.6, **show)
        jac_im = axes[r, 4].imshow(view.cut(np.asarray(jacobian)), cmap="jet", norm=jet_norm, **show)
        rgb = np.stack([view.cut(np.asarray(ddf[c])) for c in range(3)], axis=-1)
        axes[r, 5].imshow(np.clip(0.5 + rgb / (2 * umax), 0, 1), **show)
        _draw_grid(axes[r, 6], view, np.asarray(ddf), aspect, grid_step)
        for c in range(ncol):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(columns[c], fontsize=10)
        axes[r, 0].set_ylabel(f"{view.name} {view.index}", fontsize=10)
    if jac_im is not None:
        # a horizontal bar inside the figure margin under the last Jacobian panel: it takes no
        # width from the panels (a side colour bar would shrink that column only)
        cax = axes[-1, 4].inset_axes([0.0, -0.16, 1.0, 0.06])
        cbar = fig.colorbar(jac_im, cax=cax, orientation="horizontal", ticks=[0, 0.5, 1, 1.5, 2])
        cbar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path, dpi=dpi, bbox_inches="tight")


def _draw_grid(ax, view: _View, ddf: np.ndarray, aspect: float, grid_step: int | None) -> None:
    """The deformation grid: lines of constant row/column moved by the in-plane displacement."""
    uv, uh = view.inplane(ddf)
    rows, cols = uv.shape
    step = grid_step or max(1, int(round(max(rows, cols) / 24)))
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    ys, xs = yy + uv, xx + uh
    for i in range(0, rows, step):
        ax.plot(xs[i, :], ys[i, :], color="k", lw=0.5)
    for j in range(0, cols, step):
        ax.plot(xs[:, j], ys[:, j], color="k", lw=0.5)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(-0.5, rows - 0.5)
    ax.set_aspect(aspect)
    ax.set_facecolor("white")


@dataclass(frozen=True)
class PanelEntry:
    """One method's registration of the panel's pair, on the fixed grid.

    Attributes:
        warped: ``(D, H, W)`` the moving image warped.
        ddf: ``(3, D, H, W)`` voxel displacements.
        warped_labels: ``(D, H, W)`` integer labels warped (nearest), or None.
    """

    warped: np.ndarray
    ddf: np.ndarray
    warped_labels: np.ndarray | None = None


def _label_rgba(labels: np.ndarray, colours: Mapping[int, tuple], alpha: float = 0.6) -> np.ndarray:
    """``(rows, cols)`` integer labels -> RGBA with one fixed colour per code (0 transparent)."""
    out = np.zeros(labels.shape + (4,), dtype=np.float32)
    for code, colour in colours.items():
        m = labels == code
        out[m, :3] = colour[:3]
        out[m, 3] = alpha
    return out


def save_method_panel(
    path: str | os.PathLike,
    *,
    fixed: np.ndarray,
    moving: np.ndarray,
    methods: Mapping[str, PanelEntry],
    fixed_labels: np.ndarray | None = None,
    moving_labels: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    plane: str = "axial",
    title: str | None = None,
    grid_step: int | None = None,
    dpi: int = 110,
) -> Path:
    """The paper's Figure 6: every method's registration of ONE pair, side by side.

    Columns: fixed, moving, then one per method (in the order given). Rows: the (warped) image,
    the (warped) labels over it, the displacement magnitude ``|ddf|`` in voxels (jet, one scale
    for all methods), the field as RGB (channel i -> colour i, 0.5 = no displacement, one scale
    for all) and the deformed grid. The fixed and moving columns show their image and labels
    only. Label colours are the same code for code in every panel.

    Args:
        path: the PNG to write.
        fixed, moving: ``(D, H, W)`` on the fixed grid (moving resampled onto it).
        methods: ``{name: PanelEntry}`` on the same grid.
        fixed_labels, moving_labels: ``(D, H, W)`` integer labels or None.
        affine: the fixed grid's affine (orientation and pixel aspect), or None.
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    """
    plt = _pyplot()
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    fixed = np.asarray(fixed, dtype=np.float32)
    shape = fixed.shape
    if not methods:
        raise PsmambaError("method panel: no methods to draw")
    arrays = {"moving": moving, "fixed labels": fixed_labels, "moving labels": moving_labels}
    for name, e in methods.items():
        arrays.update({f"{name} warped": e.warped, f"{name} warped labels": e.warped_labels})
        if np.shape(e.ddf) != (3,) + tuple(shape):
            raise PsmambaError(f"method panel: {name}'s ddf has shape {np.shape(e.ddf)}, expected {(3,) + tuple(shape)}")
    for name, arr in arrays.items():
        if arr is not None and np.shape(arr) != shape:
            raise PsmambaError(f"method panel: {name} has shape {np.shape(arr)}, expected {shape}")
    has_labels = fixed_labels is not None and np.any(fixed_labels)
    (view,) = _views(shape, affine, [plane], _centre(np.asarray(fixed_labels) if has_labels else fixed))
    sp = _spacing(affine)
    aspect = sp[view.vert] / sp[view.horiz]
    show = dict(origin="lower", aspect=aspect, interpolation="nearest")
    lo, hi = np.percentile(fixed, [0.5, 99.5])
    mlo, mhi = np.percentile(np.asarray(moving), [0.5, 99.5])
    hi, mhi = (hi if hi > lo else lo + 1.0), (mhi if mhi > mlo else mlo + 1.0)
    # one colour per label code, the same in every panel
    codes = set()
    for lab in (fixed_labels, moving_labels, *(e.warped_labels for e in methods.values())):
        if lab is not None:
            codes |= {int(c) for c in np.unique(lab) if c != 0}
    tab = colormaps["tab20"](np.arange(20))
    base = np.concatenate([tab[0::2], tab[1::2]])
    extra = colormaps["hsv"](np.linspace(0, 1, max(1, len(codes) - 20), endpoint=False))
    palette = np.concatenate([base, extra])
    colours = {c: tuple(palette[i]) for i, c in enumerate(sorted(codes))}
    mags = {name: np.sqrt((np.asarray(e.ddf, dtype=np.float32) ** 2).sum(0)) for name, e in methods.items()}
    mag_max = max(float(np.max([view.cut(m).max() for m in mags.values()])), 1e-6)
    umax = max(float(np.abs(np.asarray(e.ddf)).max()) for e in methods.values()) or 1.0
    rows = ["image", "labels", "|ddf| (voxels)", "field (RGB)", "deformation grid"]
    columns = ["fixed", "moving", *methods]
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.3 * len(rows) + 0.8), squeeze=False)
    mag_im = None
    for c, col in enumerate(columns):
        if col == "fixed":
            img, lab, rng = fixed, fixed_labels, (lo, hi)
        elif col == "moving":
            img, lab, rng = np.asarray(moving), moving_labels, (mlo, mhi)
        else:
            e = methods[col]
            img, lab, rng = np.asarray(e.warped), e.warped_labels, (mlo, mhi)
        sl = view.cut(img)
        axes[0, c].imshow(sl, cmap="gray", vmin=rng[0], vmax=rng[1], **show)
        axes[1, c].imshow(sl, cmap="gray", vmin=rng[0], vmax=rng[1], **show)
        if lab is not None:
            axes[1, c].imshow(_label_rgba(view.cut(np.asarray(lab)), colours), **show)
        if col in methods:
            ddf = np.asarray(methods[col].ddf, dtype=np.float32)
            mag_im = axes[2, c].imshow(view.cut(mags[col]), cmap="jet", norm=Normalize(0.0, mag_max), **show)
            rgb = np.stack([view.cut(ddf[k]) for k in range(3)], axis=-1)
            axes[3, c].imshow(np.clip(0.5 + rgb / (2 * umax), 0, 1), **show)
            _draw_grid(axes[4, c], view, ddf, aspect, grid_step)
        else:
            for r in range(2, len(rows)):
                axes[r, c].axis("off")
        for r in range(len(rows)):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[0, c].set_title(col, fontsize=10)
    for r, name in enumerate(rows):
        axes[r, 0 if r < 2 else 2].set_ylabel(name, fontsize=9)
    if mag_im is not None:
        cax = axes[2, 1].inset_axes([0.45, 0.05, 0.1, 0.9])
        cbar = fig.colorbar(mag_im, cax=cax)
        cbar.ax.tick_params(labelsize=7)
        cbar.set_label("|ddf| (voxels)", fontsize=8)
    fig.suptitle(title or f"{view.name} slice {view.index}", fontsize=11)
    return _save(fig, path, dpi=dpi, bbox_inches="tight")


def _save(fig, path: str | os.PathLike, **kwargs) -> Path:
    """Save a figure atomically (temporary file in the same folder, then rename) and close it."""
    from psmamba.files import atomic_write

    plt = _pyplot()
    try:
        return atomic_write(path, lambda name: fig.savefig(name, format="png", **kwargs), suffix=".png")
    finally:
        plt.close(fig)


def _method_colours(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def dice_boxplot(
    per_label: Mapping[str, Mapping[int, Sequence[float]]],
    path: str | os.PathLike,
    *,
    label_names: Mapping[int, str] | None = None,
    title: str | None = "Dice per ROI",
    per_row: int = 27,
    dpi: int = 110,
) -> Path:
    """Per-ROI Dice box plots, one box per method side by side (the paper's Figures 2-5).

    Args:
        per_label: ``{method: {label code: [Dice of each pair]}}``.
        path: the PNG to write.
        label_names: optional ``{label code: name}`` for the x-axis.
        per_row: ROIs per panel row (long label lists wrap onto several rows).
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    methods = list(per_label)
    if not methods:
        raise PsmambaError("dice_boxplot: no methods to plot")
    labels = sorted({int(k) for m in methods for k in per_label[m]})
    if not labels:
        raise PsmambaError("dice_boxplot: no labels to plot")
    colours = _method_colours(len(methods))
    chunks = [labels[i : i + per_row] for i in range(0, len(labels), per_row)]
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(
        len(chunks), 1, figsize=(max(6.0, 0.32 * len(methods) * min(len(labels), per_row) + 2), 3.2 * len(chunks) + 0.8),
        squeeze=False,
    )
    for ax, chunk in zip(axes[:, 0], chunks):
        for m, name in enumerate(methods):
            data = [np.asarray([v for v in per_label[name].get(lab, []) if np.isfinite(v)]) for lab in chunk]
            pos = np.arange(len(chunk)) + (m - (len(methods) - 1) / 2) * width
            keep = [i for i, d in enumerate(data) if len(d)]
            if not keep:
                continue
            bp = ax.boxplot(
                [data[i] for i in keep], positions=pos[keep], widths=width * 0.9, patch_artist=True,
                showfliers=True, flierprops=dict(marker=".", markersize=2),
                medianprops=dict(color="k", lw=0.8),
            )
            for box in bp["boxes"]:
                box.set_facecolor(colours[m])
                box.set_linewidth(0.6)
        names = [label_names.get(lab, str(lab)) if label_names else str(lab) for lab in chunk]
        ax.set_xticks(np.arange(len(chunk)))
        ax.set_xticklabels(names, rotation=90 if label_names else 0, fontsize=8)
        ax.set_xlim(-0.6, len(chunk) - 0.4)
        ax.set_ylim(0, 1)
        ax.set_ylabel("Dice")
        ax.grid(axis="y", lw=0.3)
    # legend above the top panel, right-aligned, title on the left: neither hides a box
    axes[0, 0].legend(
        handles=[Patch(facecolor=colours[i], label=n) for i, n in enumerate(methods)],
        loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, ncol=min(len(methods), 6), frameon=False,
    )
    if title:
        axes[0, 0].set_title(title, loc="left")
    axes[-1, 0].set_xlabel("ROI")
    fig.tight_layout()
    return _save(fig, path, dpi=dpi)


def pair_dice_plot(
    per_pair: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    title: str | None = "Mean Dice per pair",
    dpi: int = 110,
) -> Path:
    """Mean Dice of every pair, one series per method, pairs sorted by the first method's Dice.

    Args:
        per_pair: ``{method: {pair id: mean Dice}}``; pairs missing from a method are gaps.
        path: the PNG to write.
    """
    plt = _pyplot()

    methods = list(per_pair)
    if not methods:
        raise PsmambaError("pair_dice_plot: no methods to plot")
    pairs = sorted({p for m in methods for p in per_pair[m]})
    first = per_pair[methods[0]]
    pairs.sort(key=lambda p: (first.get(p, np.inf), p))
    colours = _method_colours(len(methods))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.12 * len(pairs) + 4)), 3.8))
    x = np.arange(len(pairs))
    for m, name in enumerate(methods):
        y = np.array([per_pair[name].get(p, np.nan) for p in pairs], dtype=float)
        ax.plot(x, y, marker="o", ms=3, lw=0.8 if len(pairs) <= 60 else 0, color=colours[m],
                label=f"{name} (mean {np.nanmean(y):.3f})")
    if len(pairs) <= 30:
        ax.set_xticks(x)
        ax.set_xticklabels(pairs, rotation=90, fontsize=7)
    else:
        ax.set_xlabel(f"pair (sorted by {methods[0]}'s Dice; {len(pairs)} pairs)")
    ax.set_ylabel("mean Dice")
    ax.grid(axis="y", lw=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, dpi=dpi)


def read_training_log(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The validation rows of a run's ``metrics.csv``: ``{"step", "dice", "loss", "folding_percent",
    "time"}`` arrays in step order (a resumed run's rows are already de-duplicated by the trainer).

    Raises:
        PsmambaError: missing file, or no validation rows yet.
    """
    import csv

    p = Path(path)
    if not p.is_file():
        raise PsmambaError(f"training log {p} does not exist (a run's metrics.csv)")
    cols: dict[str, list[float]] = {k: [] for k in ("step", "dice", "loss", "folding_percent", "time")}
    with p.open(newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            if row.get("split") != "val":
                continue
            for k, values in cols.items():
                try:
                    values.append(float(row.get(k) or "nan"))
                except ValueError:
                    values.append(float("nan"))
    if not cols["step"]:
        raise PsmambaError(f"{p}: no validation rows yet")
    order = np.argsort(cols["step"], kind="stable")
    return {k: np.asarray(v, dtype=np.float64)[order] for k, v in cols.items()}


def training_curves(
    runs: Mapping[str, str | os.PathLike],
    path: str | os.PathLike,
    *,
    baseline: float | None = None,
    title: str | None = "Validation Dice",
    dpi: int = 110,
) -> Path:
    """Validation Dice (network alone) against optimiser steps, one line per run.

    Args:
        runs: ``{name: metrics.csv of a run}``.
        path: the PNG to write.
        baseline: a horizontal reference line (e.g. the Dice before registration).
    """
    plt = _pyplot()
    if not runs:
        raise PsmambaError("training_curves: no runs to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (name, csv_path), colour in zip(runs.items(), _method_colours(len(runs))):
        log = read_training_log(csv_path)
        ax.plot(log["step"], log["dice"], marker=".", ms=3, lw=1.2, color=colour, label=name)
    if baseline is not None:
        ax.axhline(baseline, color="0.4", lw=0.8, ls="--", label="no registration")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("mean Dice (validation pairs)")
    ax.grid(lw=0.3)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title, loc="left")
    fig.tight_layout()
    return _save(fig, path, dpi=dpi)
