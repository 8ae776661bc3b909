"""LPBA40 (LONI Probabilistic Brain Atlas, Shattuck et al. 2008), as users download it.

Layout of the LONI "delineation space" archives (one folder per subject, any depth)::

    S01/S01.delineation.skullstripped.img + .hdr        (Analyze; .nii / .nii.gz copies also read)
    S01/S01.delineation.structure.label.img + .hdr

Labels: the 56 structure codes, of which the paper evaluates 54 mapped to ``1..54``
(:data:`psmamba.data.labels.LPBA40`; 181 cerebellum and 182 brainstem set to 0).
Protocol: subjects S01-S30 train (30x29 ordered pairs), S31-S40 test (10x9).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from psmamba.data.labels import LPBA40, LabelMap, as_label_map
from psmamba.data.sources import Skipped, SourceData, find_files
from psmamba.data.volume import FileVolumeRef
from psmamba.errors import PsmambaError

__all__ = ["read_lpba40", "LPBA40_IMAGE_GLOB", "LPBA40_LABEL_GLOB"]

LPBA40_IMAGE_GLOB = "**/*.delineation.skullstripped.*"
LPBA40_LABEL_GLOB = "**/*.delineation.structure.label.*"
# The subject is the "S01" token of the file name (any letter case: "s01" reads as "S01").
LPBA40_ID_PATTERN = r"(S\d+)"


def _id_regex(pattern: str) -> re.Pattern:
    try:
        rx = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise PsmambaError(f"id pattern {pattern!r}: not a regular expression ({exc})") from None
    if rx.groups < 1:
        raise PsmambaError(f"id pattern {pattern!r}: needs a group (...) around the subject id")
    return rx


def _subject_id(path: Path, rx: re.Pattern) -> str | None:
    m = rx.search(path.name)
    if not m or not m.group(1):
        return None
    sid = m.group(1)
    return sid.upper() if re.fullmatch(r"s\d+", sid, re.IGNORECASE) else sid


def _reasons(skipped: list[Skipped], most: int = 3) -> str:
    """The first few things left out, for an error that would otherwise hide them."""
    if not skipped:
        return ""
    more = f"; and {len(skipped) - most} more" if len(skipped) > most else ""
    return "; left out: " + "; ".join(str(s) for s in skipped[:most]) + more


def read_lpba40(
    root: str | os.PathLike,
    image_glob: str | Sequence[str] = LPBA40_IMAGE_GLOB,
    label_glob: str | Sequence[str] = LPBA40_LABEL_GLOB,
    id_pattern: str = LPBA40_ID_PATTERN,
    label_map: LabelMap | str | None = LPBA40,
    train_subjects: int = 30,
    require_labels: bool = True,
) -> SourceData:
    """List the LPBA40 volumes under ``root``.

    Args:
        root: the folder holding the subject folders (searched recursively).
        image_glob, label_glob: globs relative to ``root`` for images and label maps.
        id_pattern: regular expression whose first group is the subject id in a file name.
        label_map: code protocol (default: the paper's 54 ROIs); ``None`` keeps raw codes.
        train_subjects: subjects numbered ``1..train_subjects`` form the published training
            split, the rest the test split (the paper: 30 / 10).
        require_labels: leave out (and report) images without a label map.

    Raises:
        PsmambaError: ``root`` missing, or no image matches ``image_glob``.
    """
    root = Path(root)
    if not root.is_dir():
        raise PsmambaError(f"{root}: LPBA40 folder not found")
    label_map = as_label_map(label_map)
    rx = _id_regex(id_pattern)
    skipped: list[Skipped] = []
    images = find_files(root, image_glob, skipped)
    if not images:
        raise PsmambaError(
            f"{root}: no LPBA40 images found (expected files matching {image_glob!r}, "
            "e.g. S01/S01.delineation.skullstripped.img[.gz] + .hdr or .nii.gz)" + _reasons(skipped)
        )
    labels_by_id: dict[str, Path] = {}
    for p in find_files(root, label_glob, skipped):
        sid = _subject_id(p, rx)
        if sid is None:
            skipped.append(Skipped(str(p), f"no subject id matching {id_pattern!r} in the file name"))
        elif sid in labels_by_id:
            skipped.append(Skipped(str(p), f"second label map for {sid} (using {labels_by_id[sid].name})"))
        else:
            labels_by_id[sid] = p
    volumes: list[FileVolumeRef] = []
    seen: dict[str, Path] = {}
    for p in images:
        sid = _subject_id(p, rx)
        if sid is None:
            skipped.append(Skipped(str(p), f"no subject id matching {id_pattern!r} in the file name"))
            continue
        if sid in seen:
            skipped.append(Skipped(str(p), f"second image for {sid} (using {seen[sid].name})"))
            continue
        lab = labels_by_id.pop(sid, None)
        if lab is None and require_labels:
            skipped.append(Skipped(str(p), f"no label map matching {label_glob!r} for {sid}"))
            continue
        seen[sid] = p
        volumes.append(FileVolumeRef(sid, p, lab, subject=sid, label_map=label_map))
    for sid, lab in labels_by_id.items():
        skipped.append(Skipped(str(lab), f"label map without an image for {sid}"))
    # subject folders beside the subjects' that hold no image (an empty S16/): named, not just counted
    named = {Path(s.what) for s in skipped} | {Path(s.what).parent for s in skipped}
    image_dirs = {p.parent for p in images}
    subject_dirs = {d for d in image_dirs if _subject_id(d, rx) is not None}
    for folder in sorted({d.parent for d in subject_dirs if d.parent == root or root in d.parent.parents}):
        for d in sorted(c for c in folder.iterdir() if c.is_dir()):
            if _subject_id(d, rx) is not None and d not in named and d not in image_dirs:
                skipped.append(Skipped(str(d), f"subject folder without an image matching {image_glob!r}"))
    if not volumes:
        raise PsmambaError(f"{root}: no usable LPBA40 subject (an image with its label map)" + _reasons(skipped))
    volumes.sort(key=lambda v: (int(re.sub(r"\D", "", v.id) or 0), v.id))
    notes = []
    if len(volumes) != 40:
        notes.append(f"found {len(volumes)} usable LPBA40 subjects, the published set has 40")
    train, test = [], []
    for v in volumes:
        num = int(re.sub(r"\D", "", v.id) or 0)
        (train if num <= train_subjects else test).append(v.id)
    return SourceData(
        layout="lpba40", root=root, volumes=volumes, label_map=label_map,
        splits={"train": train, "test": test}, skipped=skipped, notes=notes, preprocessing="lpba40",
    )
