"""Describe what a data source holds: volumes, shapes, spacings, labels found, problems.

Used by ``psmamba data inspect SOURCE``. Every volume is read once; a volume that fails to
load is reported with its one-line reason instead of stopping the report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from psmamba.data.labels import format_codes
from psmamba.data.sources import SourceData, open_source
from psmamba.errors import PsmambaError, first_line

__all__ = ["VolumeReport", "InspectReport", "inspect_source"]


@dataclass
class VolumeReport:
    """What one volume holds (``problem`` is set when it could not be used)."""

    id: str
    subject: str
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    orientation: str | None = None
    intensity: tuple[float, float] | None = None
    labels_present: list[int] = field(default_factory=list)
    labels_missing: list[int] = field(default_factory=list)
    dropped_codes: list[int] = field(default_factory=list)
    problem: str | None = None

    def line(self) -> str:
        if self.problem:
            return f"{self.id}: PROBLEM {self.problem}"
        sp = "x".join(f"{s:.3g}" for s in self.spacing) if self.spacing else "?"
        parts = [f"{self.id}: {'x'.join(map(str, self.shape))} voxels, {sp} mm, {self.orientation}",
                 f"intensity {self.intensity[0]:.4g}..{self.intensity[1]:.4g}"]
        if self.labels_present or self.labels_missing:
            parts.append(f"{len(self.labels_present)} labels")
            if self.labels_missing:
                parts.append(f"missing {format_codes(self.labels_missing, 8)}")
        else:
            parts.append("no labels")
        if self.dropped_codes:
            parts.append(f"dropped codes {format_codes(self.dropped_codes, 8)}")
        return ", ".join(parts)


@dataclass
class InspectReport:
    """A source and what each of its volumes holds."""

    source: SourceData
    volumes: list[VolumeReport]
    header: str | None = None

    @property
    def problems(self) -> list[tuple[str, str]]:
        """``[(what, reason)]``: volumes that failed plus what the reader left out."""
        out = [(v.id, v.problem) for v in self.volumes if v.problem]
        out += [(s.what, s.reason) for s in self.source.skipped if not s.expected]
        return out

    def format(self) -> str:
        """The printable report."""
        lines = [self.header] if self.header else []
        lines.append(self.source.summary())
        lines.append("volumes:")
        lines += [f"  {v.line()}" for v in self.volumes]
        ok = [v for v in self.volumes if not v.problem]
        if ok:
            shapes = sorted({v.shape for v in ok})
            spacings = sorted({tuple(round(s, 3) for s in v.spacing) for v in ok})
            lines.append(f"shapes: {', '.join('x'.join(map(str, s)) for s in shapes[:6])}"
                         + (f" (+{len(shapes) - 6} more)" if len(shapes) > 6 else ""))
            lines.append(f"spacings (mm): {', '.join('x'.join(map(str, s)) for s in spacings[:6])}"
                         + (f" (+{len(spacings) - 6} more)" if len(spacings) > 6 else ""))
            present = sorted({c for v in ok for c in v.labels_present})
            if present:
                names = self.source.label_names
                lines.append(f"labels found: {len(present)} ({format_codes(present, 12)})"
                             + (f" of {len(names)} defined" if names else ""))
        bad = [v for v in self.volumes if v.problem]
        unexpected = [s for s in self.source.skipped if not s.expected]
        by_rule = len(self.source.skipped) - len(unexpected)
        rule = f" ({by_rule} more left out by the reader's rules: not problems)" if by_rule else ""
        lines.append(f"problems: {len(bad)} volume(s) unusable, {len(unexpected)} file(s) left out by the reader{rule}"
                     if (bad or unexpected) else f"problems: none{rule}")
        return "\n".join(lines)


def _inspect_volume(ref, source: SourceData) -> VolumeReport:
    import nibabel as nib

    rep = VolumeReport(ref.id, ref.subject)
    try:
        vol = ref.load(remap=False)
    except PsmambaError as exc:
        rep.problem = first_line(exc)
        return rep
    rep.shape = vol.shape
    rep.spacing = vol.spacing
    rep.orientation = "".join(nib.aff2axcodes(vol.affine))
    rep.intensity = (float(vol.image.min()), float(vol.image.max()))
    if vol.labels is not None:
        codes = np.flatnonzero(np.bincount(vol.labels.ravel().astype(np.int64))) if vol.labels.min() >= 0 \
            else np.unique(vol.labels)
        lm = getattr(ref, "label_map", None)
        if lm is not None:
            kept, dropped, unknown = lm.classify(codes)
            if unknown and lm.unknown == "error":
                where = getattr(ref, "label_path", None) or ref.id
                rep.problem = (f"{where}: unknown label code {unknown[0]}"
                               + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else "")
                               + f" for protocol {lm.name}")
            c2l = lm.code_to_label()
            rep.labels_present = sorted(c2l[c] for c in kept)
            rep.labels_missing = sorted(set(range(1, lm.num_labels + 1)) - set(rep.labels_present))
            rep.dropped_codes = dropped + (unknown if lm.unknown == "drop" else [])
        else:
            rep.labels_present = [int(c) for c in codes if c != 0]
            if source.label_names:
                rep.labels_missing = sorted(set(source.label_names) - set(rep.labels_present))
        if not any(int(c) != 0 for c in codes) and rep.problem is None:  # refused by register/evaluate too
            where = getattr(ref, "label_path", None) or ref.id
            rep.problem = f"{where}: the label map holds no label (every voxel is 0)"
    return rep


def inspect_source(
    source: str | os.PathLike | SourceData,
    layout: str | None = None,
    max_volumes: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    demo_size: str = "small",
    **options: Any,
) -> InspectReport:
    """Read a source and each of its volumes.

    Args:
        source: a path, ``"demo"`` (builds the example if needed), or a :class:`SourceData`.
        layout: reader name (default: detected).
        max_volumes: read only the first N volumes (the listing and left-out report stay whole).
        cache_dir: for the demo.
        demo_size: ``"small"`` or ``"full"`` for the demo.
        **options: passed to the reader.
    """
    header = None
    if isinstance(source, SourceData):
        src = source
    elif str(source) == "demo" or layout == "demo":
        from psmamba.data.demo import build_demo

        ds = build_demo(demo_size, cache_dir=cache_dir)
        src = ds.source()
        header = ds.summary()
    else:
        src = open_source(source, layout=layout, **options)
    refs = src.volumes if max_volumes is None else src.volumes[: max(0, int(max_volumes))]
    return InspectReport(src, [_inspect_volume(r, src) for r in refs], header)
