"""Mindboggle-101 (Klein & Tourville 2012), as the OSF archives unpack.

Layout: one folder per subset, one folder per subject::

    NKI-RS-22_volumes/NKI-RS-22-1/t1weighted_brain.MNI152.nii.gz
    NKI-RS-22_volumes/NKI-RS-22-1/labels.DKT31.manual+aseg.MNI152.nii.gz
    NKI-TRT-20_volumes/...   OASIS-TRT-20_volumes/...

Labels: the 62 DKT31 cortical regions mapped to ``1..62``
(:data:`psmamba.data.labels.DKT31`); the FreeSurfer ``aseg`` codes (< 1000) in the
"manual+aseg" files are not evaluated and become 0.
Protocol (the paper): train on NKI-RS-22 + NKI-TRT-20 (42 volumes), test on OASIS-TRT-20
(20 volumes, 20x19 pairs). Other subsets found are listed as left out unless asked for.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from psmamba.data.labels import DKT31, LabelMap, as_label_map
from psmamba.data.sources import Skipped, SourceData, find_files
from psmamba.data.volume import FileVolumeRef
from psmamba.errors import PsmambaError

__all__ = ["read_mindboggle", "PAPER_TRAIN_SUBSETS", "PAPER_TEST_SUBSETS"]

PAPER_TRAIN_SUBSETS: tuple[str, ...] = ("NKI-RS-22", "NKI-TRT-20")
PAPER_TEST_SUBSETS: tuple[str, ...] = ("OASIS-TRT-20",)
MINDBOGGLE_IMAGE = "t1weighted_brain.MNI152.nii.gz"
MINDBOGGLE_LABELS = "labels.DKT31.manual+aseg.MNI152.nii.gz"


#: a subset's folder: ``NKI-RS-22_volumes`` (native space) or ``NKI-RS-22_volumes_in_MNI152``
SUBSET_FOLDER = re.compile(r"^(.+?)_volumes(?:_in_MNI152)?$", re.IGNORECASE)


def subset_name(folder: str) -> str | None:
    """``"NKI-RS-22_volumes"`` / ``"NKI-RS-22_volumes_in_MNI152"`` -> ``"NKI-RS-22"``, else None."""
    m = SUBSET_FOLDER.match(folder)
    return m.group(1) if m else None


def read_mindboggle(
    root: str | os.PathLike,
    subsets: Sequence[str] | None = None,
    image_glob: str | Sequence[str] = MINDBOGGLE_IMAGE,
    label_glob: str | Sequence[str] = MINDBOGGLE_LABELS,
    label_map: LabelMap | str | None = DKT31,
    train_subsets: Sequence[str] = PAPER_TRAIN_SUBSETS,
    test_subsets: Sequence[str] = PAPER_TEST_SUBSETS,
    require_labels: bool = True,
) -> SourceData:
    """List the Mindboggle-101 volumes under ``root``.

    Args:
        root: folder holding the ``<subset>_volumes`` folders (or one such folder).
        subsets: subset names to read (default: the paper's train + test subsets).
        image_glob, label_glob: globs inside each subject folder.
        label_map: code protocol (default: DKT31, 62 ROIs); ``None`` keeps raw codes.
        train_subsets, test_subsets: the published split.
        require_labels: leave out (and report) subjects without a label map.
    """
    root = Path(root)
    if not root.is_dir():
        raise PsmambaError(f"{root}: Mindboggle folder not found")
    label_map = as_label_map(label_map)
    subsets = list(subsets) if subsets is not None else list(train_subsets) + list(test_subsets)
    skipped: list[Skipped] = []
    notes: list[str] = []
    subset_dirs: dict[str, Path] = {}
    for c in [root] if subset_name(root.name) else sorted(root.iterdir()):
        name = subset_name(c.name) if c.is_dir() else None
        if name is None:
            continue
        if name in subset_dirs:
            skipped.append(Skipped(str(c), f"second folder for subset {name} (using {subset_dirs[name].name})"))
            continue
        subset_dirs[name] = c
    for name, d in subset_dirs.items():
        if name not in subsets:
            skipped.append(Skipped(str(d), f"subset {name} is not in the chosen subsets {subsets} (pass subsets= to add it)",
                                   expected=True))
    volumes: list[FileVolumeRef] = []
    subset_of: dict[str, str] = {}
    for name in subsets:
        d = subset_dirs.get(name)
        if d is None:
            notes.append(f"subset folder {name}_volumes not found under {root}")
            continue
        for subj in sorted((c for c in d.iterdir() if c.is_dir()), key=_natural):
            imgs = find_files(subj, image_glob, skipped)
            labs = find_files(subj, label_glob, skipped)
            if not imgs:  # an empty folder too: a subject that failed to download or unpack
                what = "no image matching" if labs or any(subj.iterdir()) else "empty subject folder, no image matching"
                skipped.append(Skipped(str(subj), f"{what} {image_glob!r}"))
                continue
            if len(imgs) > 1:
                skipped.extend(Skipped(str(p), f"second image in {subj.name} (using {imgs[0].name})") for p in imgs[1:])
            if not labs and require_labels:
                skipped.append(Skipped(str(subj), f"no label map matching {label_glob!r}"))
                continue
            if len(labs) > 1:
                skipped.extend(Skipped(str(p), f"second label map in {subj.name} (using {labs[0].name})") for p in labs[1:])
            volumes.append(FileVolumeRef(subj.name, imgs[0], labs[0] if labs else None, subject=subj.name,
                                         label_map=label_map, meta={"subset": name}))
            subset_of[subj.name] = name
    if not volumes:
        raise PsmambaError(
            f"{root}: no Mindboggle volumes found (expected <subset>_volumes/<subject>/{image_glob} "
            f"for subsets {', '.join(subsets)})"
        )
    splits = {
        "train": [v.id for v in volumes if subset_of[v.id] in train_subsets],
        "test": [v.id for v in volumes if subset_of[v.id] in test_subsets],
    }
    return SourceData(
        layout="mindboggle", root=root, volumes=volumes, label_map=label_map, splits=splits,
        skipped=skipped, notes=notes, preprocessing="mindboggle",
    )


def _natural(p: Path):
    """Sort ``NKI-RS-22-2`` before ``NKI-RS-22-10``."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
