"""Any folder of scans, or a CSV/JSON manifest that lists them.

Folder matching (:func:`read_folder`):

* with ``image_glob`` and/or ``label_glob`` (alone, every other image file is an image): the texts matched by the wildcards
  (``*``, ``?``, ``**/``) of each glob, joined by ``/`` and without the file extension, are the
  volume id; an image
  and a label map with the same id belong together. Example: ``image_glob="img/*_t1.nii.gz"``,
  ``label_glob="seg/*_labels.nii.gz"`` pairs ``img/sub1_t1.nii.gz`` with ``seg/sub1_labels.nii.gz``.
  Files matching ``label_glob`` are never taken as images.
* without globs: ``images*/`` + ``labels*/`` (or ``segs/``, ``masks/``) sub-folders, in any
  letter case, are matched by file name (an nnU-Net ``_0000`` channel suffix is ignored, and so
  is a label suffix such as ``_seg``; other image files are reported as left out); otherwise every image file
  below the folder is read, and files named ``<id>_seg``/``_label(s)``/``_aseg``/``_dseg``/
  ``_mask`` are the label maps of ``<id>`` in the same folder. Either way a label map of ``<id>``
  also pairs with a lone image ``<id>_image``/``_T1w``/``_t1``/``_ct``/... (BIDS ``sub-01_T1w`` with
  ``sub-01_dseg``), and a label map left over pairs with the one image of its BIDS subject and
  session (``derivatives/fs/sub-01/anat/sub-01_dseg`` with ``sub-01/anat/sub-01_T1w``), or with
  the only image of its folder (``OAS1_0001/aligned_seg35`` with ``OAS1_0001/aligned_norm``; a
  label suffix may end in a number).

Manifest (:func:`read_manifest`): CSV with a header, or JSON (a list of objects, or
``{"volumes": [...], "pairs": {"train": [[moving, fixed], ...]}}``); columns/keys ``image``
(required), ``label``/``labels``, ``id``, ``subject``, ``split``. Paths are relative to the
manifest's folder.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from psmamba.data.labels import LabelMap, as_label_map
from psmamba.data.sources import IMAGE_EXTS, Skipped, SourceData, find_files, image_ext, strip_image_ext
from psmamba.data.volume import FileVolumeRef
from psmamba.errors import PsmambaError

__all__ = ["read_folder", "read_manifest", "glob_to_regex"]

_LABEL_SUFFIX = re.compile(r"^(?P<id>.+?)[_.-](seg|segmentation|label|labels|labelmap|aseg|dseg|mask|parc)\d*$", re.I)
#: a file named by a label word alone (``sub1/label.nii.gz``, neurite-OASIS's ``seg35``, ``mask``):
#: a label map (or mask) of its folder's image
_LABEL_STEM = re.compile(r"^(seg|segmentation|label|labels|labelmap|aseg|dseg|mask|brainmask|parc)\d*$", re.I)
#: of several images in a folder, the skull-stripped / normalised scan a segmentation belongs to
#: (FreeSurfer's and neurite-OASIS's ``norm``, ``*_brain``)
_PREFERRED_SCAN = re.compile(r"(^|[_.-])(norm|brain)($|[_.-])", re.I)
#: an image's name with a modality or "image" suffix (``S1_image``, BIDS ``sub-01_T1w``): the id
#: its label map may carry without it (``S1_label``, ``sub-01_dseg``)
_IMAGE_SUFFIX = re.compile(r"^(?P<id>.+?)[_.-](image|img|t1|t1w|t2|t2w|flair|ct|mr|mri|brain|scan|vol|volume)$", re.I)
# sub-folder names, matched in any letter case
_IMAGE_DIRS = ("images", "imagestr", "imagests", "image", "imgs", "img")
_LABEL_DIRS = ("labels", "labelstr", "labelsts", "label", "segs", "seg", "segmentations", "masks")


def _subdir(root: Path, names: Sequence[str]) -> Path | None:
    """The first sub-folder of ``root`` named one of ``names`` (any letter case), in their order."""
    found = {c.name.lower(): c for c in sorted(root.iterdir()) if c.is_dir()}
    return next((found[n] for n in names if n in found), None)


def _pair_by_image_suffix(images: dict[str, Path], labels: dict[str, Path]) -> None:
    """Re-key label maps that match no image id to the image whose id, without a modality or
    "image" suffix, is theirs (``S1_label`` -> ``S1`` -> ``S1_image``); unique matches only."""
    by_stem: dict[str, list[str]] = {}
    for vid in images:
        m = _IMAGE_SUFFIX.match(vid.rsplit("/", 1)[-1])
        if m:
            head = vid.rsplit("/", 1)[0] + "/" if "/" in vid else ""
            by_stem.setdefault(head + m.group("id"), []).append(vid)
    for lid in [k for k in labels if k not in images]:
        match = by_stem.get(lid, [])
        if len(match) == 1 and match[0] not in labels:
            labels[match[0]] = labels.pop(lid)


_BIDS_SUBJECT = re.compile(r"(?:^|/)(sub-[A-Za-z0-9]+)(?:/|_|$)")
_BIDS_SESSION = re.compile(r"(?:^|[/_])(ses-[A-Za-z0-9]+)(?:/|_|$)")


def _bids_subject(vid: str) -> str | None:
    """The BIDS ``sub-<label>`` of an id with the folders above it (``site1/sub-01`` and
    ``site2/sub-01`` are two people; a ``derivatives/<pipeline>/`` part is dropped, so a
    derivative belongs to its raw scan's subject), or None."""
    m = _BIDS_SUBJECT.search(vid)
    if m is None:
        return None
    above = re.sub(r"(?:^|/)derivatives/[^/]+$", "", vid[: m.start(1)].rstrip("/"))
    return f"{above}/{m.group(1)}" if above else m.group(1)


def _pair_by_bids_subject(images: dict[str, Path], labels: dict[str, Path]) -> None:
    """Re-key a label map that matches no image id to the one image without a label map of the
    same BIDS subject (and session): ``derivatives/<pipeline>/sub-01/anat/sub-01_dseg`` with
    ``sub-01/anat/sub-01_T1w``. Unique matches only (T1w and T2w of one subject: left as is)."""
    def key(vid: str):
        subject = _bids_subject(vid)
        session = _BIDS_SESSION.search(vid)
        return None if subject is None else (subject, session and session.group(1))

    free: dict[tuple, list[str]] = {}
    for vid in images:
        k = key(vid)
        if k is not None and vid not in labels:
            free.setdefault(k, []).append(vid)
    for lid in [k for k in labels if k not in images]:
        k = key(lid)
        match = free.get(k, []) if k is not None else []
        if len(match) == 1 and match[0] not in labels:
            labels[match[0]] = labels.pop(lid)


def _pair_in_folder(images: dict[str, Path], labels: dict[str, Path]) -> None:
    """A label map left over (id ``<folder>/<name>``) pairs with the one image of its folder
    named ``<name>_<kind>`` that has none (``OAS1_0001/aligned_seg35`` with
    ``OAS1_0001/aligned_norm``); never with an image of another name (``t2_seg`` with ``t1``).
    A label map named by a label word alone (``sub1/label``, ``seg35``) pairs with its folder's
    one image without a label map. Of several candidates, the one scan named ``norm``/``brain``
    (``aligned_norm`` beside ``aligned_orig``) is taken."""
    for lid in [k for k in labels if k not in images]:
        folder, _, name = lid.rpartition("/")
        if _LABEL_STEM.match(name):
            head = (folder + "/") if folder else ""
            match = [vid for vid in images if vid.startswith(head) and "/" not in vid[len(head):]]
        else:
            heads = lid + "_", lid + "-", lid + "."
            match = [vid for vid in images if vid.startswith(heads) and "/" not in vid[len(lid):]]
        if len(match) > 1:  # (among all the candidates, labelled or not: no second choice by elimination)
            match = [vid for vid in match if _PREFERRED_SCAN.search(vid.rpartition("/")[2])]
        if len(match) == 1 and match[0] not in labels:
            labels[match[0]] = labels.pop(lid)


def _other_scans_of_labelled_folders(images: dict[str, Path], labels: dict[str, Path],
                                     skipped: list[Skipped]) -> None:
    """In a sub-folder where one image has the label map, the folder's other images (the raw
    ``orig`` beside the ``norm`` a segmentation belongs to, a T2w beside the T1w) are left out
    and said so: training would otherwise pair label-less other contrasts and processing stages."""
    by_folder: dict[str, list[str]] = {}
    for vid in images:
        folder = vid.rpartition("/")[0]
        if folder:
            by_folder.setdefault(folder, []).append(vid)
    for vids in by_folder.values():
        with_labels = [v for v in vids if v in labels]
        if len(with_labels) != 1 or len(vids) == 1:
            continue
        for v in vids:
            if v not in labels:
                skipped.append(Skipped(str(images.pop(v)), f"another image of the folder whose label map pairs with "
                                                           f"{with_labels[0]} (--image-glob chooses otherwise)",
                                       expected=True))


def _one_per_file(images: dict[str, Path], skipped: list[Skipped]) -> None:
    """One volume per file: an image reached under two names (a link ``latest/sub01.nii.gz ->
    ../v2/sub01.nii.gz``) is read once, under the name that is not a link (it was two
    volumes, one in training and one in test)."""
    first: dict[tuple[int, int], str] = {}
    for vid in sorted(images, key=lambda v: (images[v].is_symlink(), v)):
        try:
            st = images[vid].stat()
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in first:
            skipped.append(Skipped(str(images.pop(vid)), f"the same file as {first[key]} (a link): read once"))
        else:
            first[key] = vid


def glob_to_regex(pattern: str) -> re.Pattern:
    """A glob as a regular expression whose groups capture what each wildcard matched."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append(r"((?:[^/]+/)*)")
            i += 3
        elif pattern[i] == "*":
            out.append(r"([^/]*)")
            i += 1
        elif pattern[i] == "?":
            out.append(r"([^/])")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"$")


def _glob_id(rel: str, rx: re.Pattern) -> str | None:
    m = rx.match(rel)
    if m is None:
        return None
    # each wildcard's text is one part of the id: "*/*_t1.nii" on "a/b_t1.nii" gives "a/b"
    parts = [g.strip("/") for g in m.groups() if g and g.strip("/")]
    return strip_image_ext("/".join(parts)).strip("_.-/") or None


def _as_list(x: str | Sequence[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def read_folder(
    root: str | os.PathLike,
    image_glob: str | Sequence[str] | None = None,
    label_glob: str | Sequence[str] | None = None,
    label_map: LabelMap | str | Sequence[int] | None = None,
    subject_pattern: str | None = None,
    require_labels: bool = False,
    preprocessing: str = "minmax",
) -> SourceData:
    """List the scans of a folder, matching label maps to images (see the module doc).

    Args:
        root: the folder.
        image_glob, label_glob: globs relative to ``root`` (strings or lists of strings).
        label_map: protocol for the codes (a :class:`LabelMap`, a protocol name, or a list of
            codes mapped to ``1..K`` in order); ``None`` keeps the codes found.
        subject_pattern: regular expression whose first group, searched in the id, is the
            subject (for data with several scans per person); default: the id.
        require_labels: leave out (and report) images without a label map.
        preprocessing: preset name used by :meth:`SourceData.pair_dataset`.

    Raises:
        PsmambaError: missing folder, or no image file found.
    """
    root = Path(root)
    if not root.is_dir():
        raise PsmambaError(f"{root}: folder not found")
    label_map = as_label_map(label_map)
    skipped: list[Skipped] = []
    notes: list[str] = []
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}

    def add(table: dict[str, Path], vid: str | None, p: Path, what: str) -> None:
        if vid is None:
            skipped.append(Skipped(str(p), f"could not derive a volume id for this {what}"))
        elif vid in table:
            skipped.append(Skipped(str(p), f"second {what} for id {vid} (using {table[vid].name})",
                                   expected=what == "label map"))
        else:
            table[vid] = p

    if label_glob is not None and image_glob is None:
        # label maps named by a glob, images not: every other image file (the label glob was
        # ignored before, and the label maps read as images)
        image_glob = "**/*"
        notes.append(f"images: every image file not matching {label_glob!r}")
    if image_glob is not None:
        label_files: list[Path] = []
        if label_glob is not None:
            label_files = find_files(root, _as_list(label_glob), skipped)
            if not label_files:  # a typo gave a data set without labels, in silence
                raise PsmambaError(f"{root}: no label maps match the label glob {label_glob!r}")
            rxs = [glob_to_regex(g) for g in _as_list(label_glob)]
            for p in label_files:
                rel = p.relative_to(root).as_posix()
                add(labels, next((i for i in (_glob_id(rel, rx) for rx in rxs) if i), None), p, "label map")
        label_set = set(label_files)
        rxs = [glob_to_regex(g) for g in _as_list(image_glob)]
        for p in find_files(root, _as_list(image_glob), skipped):
            if p in label_set:
                continue
            rel = p.relative_to(root).as_posix()
            add(images, next((i for i in (_glob_id(rel, rx) for rx in rxs) if i), None), p, "image")
        expected = f"files matching {image_glob!r}"
    else:
        img_dir = _subdir(root, _IMAGE_DIRS)
        lab_dir = _subdir(root, _LABEL_DIRS)
        if img_dir is not None:
            for p in find_files(img_dir, "*", skipped):
                add(images, re.sub(r"_0000$", "", strip_image_ext(p.name)), p, "image")
            if lab_dir is not None:
                # a segmentation before a (brain) mask of the same id: the first one found wins
                for p in sorted(find_files(lab_dir, "*", skipped), key=_mask_last):
                    lid = re.sub(r"_0000$", "", strip_image_ext(p.name))
                    m = _LABEL_SUFFIX.match(lid)
                    add(labels, lid if lid in images or not m else m.group("id"), p, "label map")
            notes.append(f"images from {img_dir.name}/" + (f", labels from {lab_dir.name}/" if lab_dir else ", no label folder"))
            used = {img_dir} | ({lab_dir} if lab_dir is not None else set())
            for p in find_files(root, "**/*"):
                if not any(d in p.parents for d in used):
                    skipped.append(Skipped(str(p), f"outside {img_dir.name}/ and {lab_dir.name if lab_dir else '(no label folder)'}/"))
            expected = f"image files in {img_dir}"
        else:
            for p in sorted(find_files(root, "**/*", skipped), key=_mask_last):
                rel = p.relative_to(root)
                stem = strip_image_ext(p.name)
                if re.search(r"[_.-]probseg$", stem, re.I):  # BIDS tissue probabilities (fMRIPrep)
                    skipped.append(Skipped(str(p), "a probability map (BIDS _probseg): neither a scan nor a label map",
                                           expected=True))
                    continue
                prefix = "" if rel.parent == Path(".") else rel.parent.as_posix() + "/"
                m = _LABEL_SUFFIX.match(stem)
                if m:
                    add(labels, prefix + m.group("id"), p, "label map")
                elif _LABEL_STEM.match(stem):
                    add(labels, prefix + stem, p, "label map")
                else:
                    add(images, prefix + stem, p, "image")
            expected = f"image files ({', '.join(IMAGE_EXTS)}) below {root}"
    if not images:
        raise PsmambaError(f"{root}: no images found (expected {expected})")
    _one_per_file(images, skipped)
    _pair_by_image_suffix(images, labels)
    _pair_by_bids_subject(images, labels)
    _pair_in_folder(images, labels)
    if image_glob is None:
        _other_scans_of_labelled_folders(images, labels, skipped)
    if subject_pattern:
        try:
            subject_rx = re.compile(subject_pattern)
        except re.error as exc:
            raise PsmambaError(f"subject pattern {subject_pattern!r}: not a regular expression ({exc})") from None

    subject_of = {} if subject_pattern else _default_subjects(list(images), notes)
    volumes: list[FileVolumeRef] = []
    for vid in sorted(images, key=_natural_key):
        lab = labels.pop(vid, None)
        if lab is None and require_labels:
            skipped.append(Skipped(str(images[vid]), f"no label map with id {vid}"))
            continue
        subject = subject_of.get(vid, vid)
        if subject_pattern:
            m = subject_rx.search(vid)
            subject = m.group(1) if m and m.groups() else (m.group(0) if m else vid)
        volumes.append(FileVolumeRef(vid, images[vid], lab, subject=subject, label_map=label_map))
    labelled_folders = {v.id.rpartition("/")[0] for v in volumes if v.has_labels and "/" in v.id}
    for vid, p in labels.items():
        # a mask, or a label map named by a label word alone beside a labelled scan (neurite-OASIS's
        # native-space seg35 beside aligned_norm + aligned_seg35): expected, not broken data
        bare = _LABEL_STEM.match(vid.rpartition("/")[2]) and vid.rpartition("/")[0] in labelled_folders
        skipped.append(Skipped(str(p), f"label map without an image (id {vid}; taken for a label map by its name: "
                                       "--image-glob/--label-glob choose otherwise)", expected=bool(bare or _is_mask(p))))
    n_lab = sum(v.has_labels for v in volumes)
    if 0 < n_lab < len(volumes):
        notes.append(f"{len(volumes) - n_lab} of {len(volumes)} images have no label map")
    return SourceData(layout="folder", root=root, volumes=volumes, label_map=label_map,
                      skipped=skipped, notes=notes, preprocessing=preprocessing)


def _default_subjects(ids: list[str], notes: list[str]) -> dict[str, str]:
    """Whose scans are these, when no ``subject_pattern`` says: the BIDS ``sub-<label>`` of an
    id, with the folders above it (``site1/sub-01`` and ``site2/sub-01`` are two people; a
    ``derivatives/<pipeline>/`` part is dropped), so one person's scans stay in one split. Other
    files are a subject each; a sub-folder holding several scans is named in a note (one person's
    folder or a group of people: only ``subject_pattern`` can say which)."""
    out = {vid: s for vid in ids if (s := _bids_subject(vid)) is not None}
    if len(set(out.values())) < len(out):
        notes.append("subjects: the BIDS sub-<label> of each file (one person's scans stay in one split)")
    per_folder: dict[str, int] = {}
    for vid in ids:
        if vid not in out and "/" in vid:
            folder = vid.rsplit("/", 1)[0]
            per_folder[folder] = per_folder.get(folder, 0) + 1
    crowded = sorted(f for f, n in per_folder.items() if n > 1)
    if crowded:
        notes.append(f"subjects: each file is its own; {len(crowded)} sub-folder(s) hold several scans "
                     f"({crowded[0]}/, ...): if a sub-folder is one person's, give a subject pattern "
                     "(--subject-pattern '^([^/]+)/', data.options.subject_pattern in a config) so that "
                     "person stays in one split")
    return out


def _is_mask(p: Path) -> bool:
    """A (brain) mask by its name: ``*_mask``, ``mask``, ``brainmask``, ``mask2``."""
    return re.search(r"mask\d*$", strip_image_ext(p.name), re.I) is not None


def _mask_last(p: Path) -> tuple[bool, str]:
    """Sort key: masks after the other label maps (a segmentation wins over a mask)."""
    return _is_mask(p), str(p)


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], Any]:
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PsmambaError(f"{path}: not valid JSON ({exc})") from None
        pairs = None
        if isinstance(data, dict):
            if "volumes" not in data:
                raise PsmambaError(f"{path}: a JSON manifest object needs a 'volumes' list")
            pairs = data.get("pairs")
            data = data["volumes"]
        if not isinstance(data, list):
            raise PsmambaError(f"{path}: expected a list of volume entries")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise PsmambaError(f"{path}: entry {i} must be an object with an 'image' key, got {row!r:.60}")
        return data, pairs
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter=delim))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise PsmambaError(f"{path}: not a readable CSV file ({exc})") from None
    for n, r in enumerate(rows, start=2):
        if None in r:  # DictReader keeps the cells beyond the header under the key None
            raise PsmambaError(f"{path} line {n}: {len(r) - 1 + len(r[None])} cells, but the header names "
                               f"{len(r) - 1} columns ({', '.join(k for k in r if k is not None)})")
    return [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in rows], None


def read_manifest(
    path: str | os.PathLike,
    label_map: LabelMap | str | Sequence[int] | None = None,
    preprocessing: str = "minmax",
) -> SourceData:
    """List the volumes of a CSV/JSON manifest (see the module doc).

    Raises:
        PsmambaError: unreadable manifest, an entry without ``image``, duplicate ids, an
            unknown split name, or pairs naming unknown ids; the message names the entry.
    """
    path = Path(path)
    if not path.is_file():
        raise PsmambaError(f"{path}: manifest not found")
    label_map = as_label_map(label_map)
    rows, pairs_raw = _read_rows(path)
    if not rows:
        raise PsmambaError(f"{path}: the manifest lists no volumes")
    if path.suffix.lower() != ".json" and "image" not in rows[0]:  # every row has the header's keys
        named = ", ".join(repr(k) for k in rows[0]) or "nothing"
        raise PsmambaError(f"{path}: the header has no 'image' column (it names {named}; columns: image, "
                           f"label, id, subject, split, separated by {'tabs' if path.suffix.lower() == '.tsv' else 'commas'})")
    base = path.parent
    volumes: list[FileVolumeRef] = []
    skipped: list[Skipped] = []
    splits: dict[str, list[str]] = {}
    for i, row in enumerate(rows):
        where = f"entry {i}" if path.suffix.lower() == ".json" else f"row {i + 2}"
        image = row.get("image")
        if not image:
            raise PsmambaError(f"{path}: {where} has no 'image' entry")
        img = (base / str(image)).resolve() if not Path(str(image)).is_absolute() else Path(str(image))
        lab_rel = row.get("label") or row.get("labels") or row.get("seg")
        lab = None
        if lab_rel:
            lab = (base / str(lab_rel)).resolve() if not Path(str(lab_rel)).is_absolute() else Path(str(lab_rel))
        vid = str(row.get("id") or strip_image_ext(img.name))
        if any(v.id == vid for v in volumes):
            raise PsmambaError(f"{path}: {where} repeats the id {vid!r}; ids must be unique")
        if not img.is_file() or image_ext(img.name) is None:
            skipped.append(Skipped(str(img), f"{where} of {path.name}: image file not found or not NIfTI/Analyze"))
            continue
        if lab is not None and not lab.is_file():
            skipped.append(Skipped(str(lab), f"{where} of {path.name}: label file not found (volume left out)"))
            continue
        volumes.append(FileVolumeRef(vid, img, lab, subject=str(row.get("subject") or vid), label_map=label_map))
        split = str(row.get("split") or "").lower()
        if split:
            if split not in ("train", "val", "test"):
                raise PsmambaError(f"{path}: {where} has split {split!r}; use train, val or test")
            splits.setdefault(split, []).append(vid)
    if not volumes:
        raise PsmambaError(f"{path}: none of the listed images exist (first: {skipped[0]})")
    pairs: dict[str, list[tuple[str, str]]] = {}
    if pairs_raw is not None:
        known = {v.id for v in volumes}
        groups = pairs_raw if isinstance(pairs_raw, dict) else {"all": pairs_raw}
        for name, items in groups.items():
            out = []
            for j, item in enumerate(items or []):
                if isinstance(item, dict):
                    if "moving" not in item or "fixed" not in item:
                        raise PsmambaError(f"{path}: pairs {name}[{j}] needs 'moving' and 'fixed' entries")
                    m, f = str(item["moving"]), str(item["fixed"])
                elif isinstance(item, (list, tuple)) and len(item) == 2:
                    m, f = str(item[0]), str(item[1])
                else:
                    raise PsmambaError(f"{path}: pairs {name}[{j}] must be [moving, fixed] or {{moving, fixed}}")
                for v in (m, f):
                    if v not in known:
                        raise PsmambaError(f"{path}: pairs {name}[{j}] names {v!r}, which is not a usable volume")
                out.append((m, f))
            pairs[name] = out
    return SourceData(layout="manifest", root=path, volumes=volumes, label_map=label_map, splits=splits,
                      pairs=pairs, skipped=skipped, preprocessing=preprocessing)
