"""What every reader returns (:class:`SourceData`), shared file-finding helpers, and
:func:`open_source`, which picks the reader for a path (or takes ``layout=``).

A reader never drops a file without saying so: everything it found but could not use is a
:class:`Skipped` entry (file, reason) and :meth:`SourceData.summary` prints them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psmamba.data.labels import LabelMap
from psmamba.data.volume import VolumeRef
from psmamba.errors import PsmambaError
from psmamba.io import READ_SUFFIXES

if TYPE_CHECKING:  # pragma: no cover
    from psmamba.data.dataset import PairDataset
    from psmamba.data.preprocess import Pipeline

__all__ = [
    "Skipped",
    "SourceData",
    "LAYOUTS",
    "open_source",
    "detect_layout",
    "find_files",
    "strip_image_ext",
    "IMAGE_EXTS",
]

# Extensions psmamba.io reads (any letter case).
IMAGE_EXTS: tuple[str, ...] = READ_SUFFIXES


def strip_image_ext(name: str) -> str:
    """``"S01.delineation.skullstripped.img"`` -> ``"S01.delineation.skullstripped"``."""
    low = name.lower()
    for ext in IMAGE_EXTS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def image_ext(name: str) -> str | None:
    """The image extension of a file name (``".nii.gz"``), or ``None`` if it is not an image."""
    low = name.lower()
    for ext in IMAGE_EXTS:
        if low.endswith(ext):
            return ext
    return None


def _junk(p: Path, root: Path) -> bool:
    """macOS archive litter: ``._name`` resource forks and ``__MACOSX`` folders."""
    try:
        parts = p.relative_to(root).parts
    except ValueError:
        parts = p.parts
    return p.name.startswith("._") or "__MACOSX" in parts


def find_files(root: Path, patterns: str | Sequence[str], skipped: list["Skipped"] | None = None) -> list[Path]:
    """Image files under ``root`` matching any glob in ``patterns`` (``**`` recurses), sorted.

    An Analyze/NIfTI pair counts once, as its header (``.hdr`` or ``.hdr.gz`` beside ``.img`` or
    ``.img.gz``, either gzipped, any letter case: :func:`psmamba.io.analyze_pair`); a lone half
    is reported in ``skipped``. Files with no image extension are ignored (they are not
    candidates), and so is macOS archive litter (``._*`` files, ``__MACOSX`` folders).
    """
    from psmamba.io import _folder_listing, analyze_pair

    if isinstance(patterns, str):
        patterns = [patterns]
    found: set[Path] = set()
    for pat in patterns:
        for p in _glob(root, pat):
            if p.is_file() and image_ext(p.name) is not None and not _junk(p, root):
                found.add(p)
    out = set()
    listings: dict[Path, dict[str, list[Path]]] = {}  # one listing per folder, not per file
    for p in sorted(found):
        ext = image_ext(p.name)
        if ext in (".img", ".img.gz", ".hdr", ".hdr.gz"):
            if p.parent not in listings:
                listings[p.parent] = _folder_listing(p.parent)
            hdr, img = analyze_pair(p, listings[p.parent])
            if hdr is None or img is None:
                if skipped is not None:
                    half = "image without its header" if hdr is None else "header without its image"
                    skipped.append(Skipped(str(p), f"Analyze {half} ({strip_image_ext(p.name)}"
                                                   f"{'.hdr' if hdr is None else '.img'}[.gz] is missing)"))
                continue
            out.add(hdr)  # the pair is listed once, through its header
            continue
        out.add(p)
    return sorted(out)


def _glob(root: Path, pattern: str) -> list[Path]:
    """``root.glob(pattern)``, but ``**`` also enters symbolic links to folders (a subject
    folder linked in from elsewhere was passed over in silence by pathlib before Python 3.13);
    a folder reached twice (a link to a sibling or back up the tree) is read once, under its own
    path. A bad pattern: a one-line error naming it."""
    from fnmatch import fnmatchcase

    from psmamba.errors import PsmambaError

    if Path(pattern).is_absolute():
        raise PsmambaError(f"file pattern {pattern!r}: must be relative to the data folder {root}")
    parts = [s for s in pattern.split("/") if s not in ("", ".")]
    if not parts:
        raise PsmambaError(f"file pattern {pattern!r}: empty")
    if any("**" in s and s != "**" for s in parts):
        raise PsmambaError(f"file pattern {pattern!r}: '**' can only be a whole path component")
    found: set[Path] = set()
    seen: set[tuple[int, int, int]] = set()  # (folder's device, inode, pattern part): walked once
    real_dirs: list[tuple[Path, int]] = [(root, 0)]
    linked_dirs: list[tuple[Path, int]] = []  # walked after every real folder: a file is found
    # under its own path, not a link's (``latest -> v2`` beside ``v2``: read once, as v2/...)

    def entries(d: Path):
        try:
            with os.scandir(d) as it:
                return sorted(((e.name, e.is_dir(), e.is_symlink()) for e in it), key=lambda x: x[0])
        except OSError:  # unreadable folder: nothing in it, as pathlib
            return []

    def push(d: Path, i: int, link: bool) -> None:
        (linked_dirs if link else real_dirs).append((d, i))

    while real_dirs or linked_dirs:  # a loop, not recursion: any depth of folders
        d, i = real_dirs.pop() if real_dirs else linked_dirs.pop(0)
        try:
            st = os.stat(d)  # the folder itself, through any link: (device, inode) names it
        except OSError:
            continue
        key = (st.st_dev, st.st_ino, i)
        if key in seen:
            continue
        seen.add(key)
        seg = parts[i]
        if seg == "**":
            if i + 1 < len(parts):
                push(d, i + 1, False)  # no folder at all
            for name, is_dir, is_link in entries(d):
                if is_dir:
                    push(d / name, i, is_link)
            continue
        for name, is_dir, is_link in entries(d):
            if not fnmatchcase(name, seg):
                continue
            if i + 1 == len(parts):
                found.add(d / name)
            elif is_dir:
                push(d / name, i + 1, is_link)
    return sorted(found)


@dataclass
class Skipped:
    """Something a reader found and did not use: ``what`` (a file or subject) and ``reason``."""

    what: str
    reason: str
    #: left out by a documented rule of the reader (a T2w beside the labelled T1w, a brain mask, a
    #: Mindboggle subset outside the protocol), not a sign of broken data: ``data inspect`` says
    #: it but does not count it as a problem
    expected: bool = False

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}"


@dataclass
class SourceData:
    """The volumes of one data set and its protocol.

    Attributes:
        layout: reader name (``"lpba40"``, ``"mindboggle"``, ``"abdomen"``, ``"pickle"``, ``"folder"``,
            ``"manifest"``, ``"demo"``).
        root: folder (or file) it was read from.
        volumes: lazy handles, in a stable order.
        label_map: the protocol turning codes into ``1..K`` (``None``: codes kept as they are).
        label_names: ``{label: name}``.
        splits: the published split by volume id (``{"train": [...], "test": [...]}``), or empty.
        pairs: explicit ordered ``(moving_id, fixed_id)`` lists per split (e.g. Learn2Reg's
            ``registration_val``); splits without one use all ordered pairs.
        skipped: what was found and left out, with the reason.
        notes: other remarks (missing subjects, assumptions such as "no affine in pickles").
        preprocessing: name of the :func:`~psmamba.data.preprocess.preset` of its protocol.
    """

    layout: str
    root: Path
    volumes: list[VolumeRef]
    label_map: LabelMap | None = None
    label_names: dict[int, str] = field(default_factory=dict)
    splits: dict[str, list[str]] = field(default_factory=dict)
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    preprocessing: str = "minmax"
    #: pipelines placed for these volumes (:meth:`pipeline`), by preset
    _pipelines: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = [v.id for v in self.volumes]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise PsmambaError(f"{self.root}: two volumes share the id {dup[0]!r}; ids must be unique")
        if self.label_map is not None and not self.label_names:
            self.label_names = self.label_map.label_names

    def __len__(self) -> int:
        return len(self.volumes)

    @property
    def ids(self) -> list[str]:
        """Volume ids in order."""
        return [v.id for v in self.volumes]

    def by_id(self) -> dict[str, VolumeRef]:
        """``{id: VolumeRef}``."""
        return {v.id: v for v in self.volumes}

    def subjects(self) -> dict[str, str]:
        """``{volume id: subject}``."""
        return {v.id: v.subject for v in self.volumes}

    # ------------------------------------------------------------------ splits and pairs
    def make_splits(
        self, val: float | int = 0, test: float | int = 0.2, seed: int = 0, use_protocol: bool = True
    ) -> dict[str, list[str]]:
        """Train/val/test volume ids, never putting one subject in two parts.

        With a published split (``use_protocol``) its parts are kept: train, val and test as
        published; train and test published: ``val`` subjects are drawn (seeded) from its
        training part; train and val published (e.g. ``Train/`` and ``Val/`` folders of
        pickles): ``test`` subjects are drawn from its training part, the published val stays
        the validation set. Otherwise subjects are drawn with the fractions (``< 1``) or counts
        (``>= 1``) ``val`` and ``test``. See :func:`psmamba.data.pairs.split_subjects`.
        """
        from psmamba.data.pairs import split_subjects

        subj = self.subjects()
        pub = self.splits
        if use_protocol and pub.get("train") and (pub.get("test") or pub.get("val")):
            _check_disjoint(pub, subj)
            if pub.get("val") and pub.get("test"):
                return {k: list(pub.get(k, [])) for k in ("train", "val", "test")}
            train_ids = list(pub["train"])
            if pub.get("test"):
                parts = split_subjects(train_ids, subj, val=val, test=0, seed=seed)
                return {"train": parts["train"], "val": parts["val"], "test": list(pub["test"])}
            parts = split_subjects(train_ids, subj, val=0, test=test, seed=seed)
            return {"train": parts["train"], "val": list(pub["val"]), "test": parts["test"]}
        return split_subjects(self.ids, subj, val=val, test=test, seed=seed)

    def pairs_for(self, split: str, ids: Sequence[str]) -> list[tuple[str, str]]:
        """The explicit pair list of ``split`` if there is one (restricted to ``ids``), else all
        ordered pairs of volumes of different subjects (two scans of one person, or a scan and
        its brain-extracted copy, are no inter-subject pair: they would inflate Dice)."""
        from psmamba.data.pairs import all_pairs

        if split in self.pairs:
            keep = set(ids)
            return [(m, f) for m, f in self.pairs[split] if m in keep and f in keep]
        subject = self.subjects()
        return [(m, f) for m, f in all_pairs(ids) if subject.get(m, m) != subject.get(f, f)]

    def pipeline(self, name: str = "preset") -> "Pipeline":
        """The preprocessing of preset ``name`` (``"preset"``: this protocol's) for these volumes:
        one crop window for all when they share a grid (:func:`psmamba.data.preprocess.shared_window`,
        placed once per source and preset)."""
        from psmamba.data.preprocess import preset, shared_window

        key = self.preprocessing if name == "preset" else name
        if key not in self._pipelines:
            self._pipelines[key] = shared_window(preset(key), self.volumes)
        return self._pipelines[key]

    def pair_dataset(
        self,
        split: str = "train",
        splits: dict[str, list[str]] | None = None,
        pipeline: "Pipeline | str | None" = "preset",
        cache_dir: str | os.PathLike | None = None,
        labels: bool = True,
        pairs: Sequence[tuple[str, str]] | None = None,
        use_cache: bool | None = None,
    ) -> "PairDataset":
        """A :class:`~psmamba.data.dataset.PairDataset` over one split.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            splits: from :meth:`make_splits` (default: ``make_splits()``).
            pipeline: a :class:`Pipeline`, a preset name, ``"preset"`` (this protocol's) or ``None``.
            cache_dir: preprocessed-volume cache (see :mod:`psmamba.data.cache`).
            labels: also return label maps.
            pairs: explicit pairs instead of the split's.
            use_cache: read/write preprocessed volumes in the cache (default: yes, except for the
                demo, whose volumes are stored ready to use).
        """
        from psmamba.data.dataset import PairDataset

        if isinstance(pipeline, str):
            pipeline = self.pipeline(pipeline)
        if pairs is None:
            splits = splits if splits is not None else self.make_splits()
            if split not in splits:
                raise PsmambaError(f"unknown split {split!r}; this source has {sorted(splits)}")
            pairs = self.pairs_for(split, splits[split])
        if use_cache is None:
            use_cache = self.layout != "demo"
        return PairDataset(self.volumes, pairs, pipeline=pipeline, cache_dir=cache_dir, labels=labels,
                           use_cache=use_cache)

    # ------------------------------------------------------------------ report
    def not_in_splits(self, splits: dict[str, list[str]] | None = None) -> list[str]:
        """Ids of the volumes that no part of ``splits`` holds (default: the published split;
        ``[]`` when there is none): read, but used by neither training nor evaluation."""
        parts = self.splits if splits is None else splits
        used = {i for ids in parts.values() for i in ids}
        return [] if not used else [i for i in self.ids if i not in used]

    def left_out_report(self, splits: dict[str, list[str]] | None = None, most: int = 10) -> list[str]:
        """What a run on this source will not use, one line each (at most ``most``, then a
        count): the files the reader left out with the reason, and the volumes in no split."""
        lines = [str(s) for s in self.skipped]
        unused = self.not_in_splits(splits)
        if unused:
            lines.append(f"{len(unused)} volume(s) in no split, unused: {_some(unused)}")
        if len(lines) > most:
            lines = lines[:most] + [f"... and {len(lines) - most} more (psmamba data inspect {self.root} lists them)"]
        return lines

    def summary(self) -> str:
        """Several lines: counts, splits, pair lists, label protocol, and everything left out."""
        lines = [f"{self.layout} source at {self.root}: {len(self.volumes)} volumes"
                 + (("" if self.layout == "pickle" else  # a pickle's labels are known once it is read
                     f" ({sum(v.has_labels for v in self.volumes)} with labels)") if self.volumes else "")]
        n_subjects = len({v.subject for v in self.volumes})
        if n_subjects < len(self.volumes):
            lines.append(f"subjects: {n_subjects} (several volumes of one subject stay in one split)")
        if self.label_map is not None:
            lines.append(f"labels: protocol {self.label_map.name}, {self.label_map.num_labels} ROIs")
        for name, ids in self.splits.items():
            lines.append(f"published split {name}: {len(ids)} volumes")
        for name, prs in self.pairs.items():
            lines.append(f"listed pairs {name}: {len(prs)}")
        lines.extend(f"note: {n}" for n in self.notes)
        unused = self.not_in_splits()
        if unused:
            lines.append(f"in no published split (unused by train and evaluate): {len(unused)} volumes: "
                         f"{_some(unused)}")
        if self.skipped:
            lines.append(f"left out: {len(self.skipped)}")
            lines.extend(f"  - {s}" for s in self.skipped)
        else:
            lines.append("left out: nothing")
        return "\n".join(lines)


# ---------------------------------------------------------------------- dispatch
LAYOUTS: tuple[str, ...] = ("lpba40", "mindboggle", "abdomen", "pickle", "folder", "manifest")


def detect_layout(path: str | os.PathLike) -> str:
    """Guess the layout of a path from its file names (see :data:`LAYOUTS`)."""
    p = Path(path)
    if not p.exists():
        raise PsmambaError(f"{p}: no such file or folder")
    if p.is_file():
        name = p.name.lower()
        if name.endswith("_dataset.json"):
            if name.startswith("abdomenctct"):
                return "abdomen"
            raise PsmambaError(f"{p}: of the Learn2Reg tasks only AbdomenCTCT's dataset JSON is read; give its "
                               "folder instead (imagesTr/labelsTr read as a folder of images and label maps) or a "
                               "manifest (.csv)")
        if name.endswith((".csv", ".json", ".tsv")):
            return "manifest"
        if name.endswith((".pkl", ".pickle")):
            return "pickle"
        raise PsmambaError(f"{p}: a file source must be a manifest (.csv/.json) or a pickle (.pkl)")
    if (p / "imagesTr").is_dir() and any(j.name.lower().startswith("abdomenctct") for j in p.glob("*_dataset.json")):
        return "abdomen"  # other Learn2Reg tasks: imagesTr/labelsTr as a folder of images and labels
    from psmamba.data.mindboggle import subset_name

    if subset_name(p.name) or any(c.is_dir() and subset_name(c.name) for c in p.iterdir()):
        return "mindboggle"
    if _glob(p, "**/*.delineation.skullstripped.*"):
        return "lpba40"
    if _pickle_files(p) and not any(image_ext(f.name) for f in p.rglob("*") if f.is_file()):
        return "pickle"  # pickles here or in Train/ Val/ Test/ sub-folders, and no NIfTI/Analyze file
    return "folder"


def open_source(path: str | os.PathLike, layout: str | None = None, **options: Any) -> SourceData:
    """Read a data set: ``layout`` one of :data:`LAYOUTS`, or detected from the file names.

    ``options`` go to the reader (``image_glob=``, ``label_glob=``, ``subsets=``, ...); see
    :func:`psmamba.data.lpba40.read_lpba40`, :func:`psmamba.data.mindboggle.read_mindboggle`,
    :func:`psmamba.data.abdomen.read_abdomen`, :func:`psmamba.data.pickles.read_pickles`,
    :func:`psmamba.data.folder.read_folder`, :func:`psmamba.data.folder.read_manifest`.
    """
    detected = layout is None
    layout = (layout or detect_layout(path)).lower()
    if layout == "lpba40":
        from psmamba.data.lpba40 import read_lpba40 as reader
    elif layout == "mindboggle":
        from psmamba.data.mindboggle import read_mindboggle as reader
    elif layout in ("abdomen", "abdomenctct"):
        from psmamba.data.abdomen import read_abdomen as reader
    elif layout == "pickle":
        from psmamba.data.pickles import read_pickles as reader
    elif layout == "folder":
        from psmamba.data.folder import read_folder as reader
    elif layout == "manifest":
        from psmamba.data.folder import read_manifest as reader
    else:
        raise PsmambaError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    import inspect

    accepted = [n for n in inspect.signature(reader).parameters if n != "root" and n != "path"]
    for name in options:
        if name not in accepted:
            raise PsmambaError(f"the {layout} reader has no option {name!r}; it takes {', '.join(accepted)}")
    src = reader(path, **options)
    if detected and Path(path).is_dir():
        src.skipped.extend(_other_layouts(Path(path), layout, len(src.volumes)))
    return src


def _some(ids: Sequence[str], most: int = 8) -> str:
    return ", ".join(ids[:most]) + (" ..." if len(ids) > most else "")


def _pickle_files(p: Path) -> list[Path]:
    """Pickles in ``p`` or one folder down (``Train/ Val/ Test/``), macOS litter aside."""
    return [f for g in ("*.pkl", "*.pickle", "*/*.pkl", "*/*.pickle") for f in p.glob(g)
            if f.is_file() and not f.name.startswith("._")]


def _other_layouts(p: Path, chosen: str, n_volumes: int) -> list["Skipped"]:
    """What a detected layout passes over in a folder that also holds another data set's files
    (one stray NIfTI beside Train/ Val/ Test/ pickles made them a 'folder' of one volume; a
    Mindboggle subset folder beside LPBA40's subjects hid all forty), as left-out entries."""
    from psmamba.data.mindboggle import subset_name

    found: list[Skipped] = []
    if chosen != "mindboggle":
        subsets = [c.name for c in sorted(p.iterdir()) if c.is_dir() and subset_name(c.name)]
        if subsets:
            found.append(Skipped(f"{p}/{subsets[0]}" + (f" (+{len(subsets) - 1} more)" if len(subsets) > 1 else ""),
                                 f"Mindboggle subset folder, not read: this folder was read as {chosen}; "
                                 "give --layout mindboggle to read that"))
    if chosen in ("abdomen", "mindboggle"):  # detection looked for LPBA40 files only after these
        lpba = find_files(p, "**/*.delineation.skullstripped.*")  # an Analyze pair counts once
        if lpba:
            found.append(Skipped(str(lpba[0].parent.parent), f"{len(lpba)} LPBA40 image(s) ({lpba[0].name}, ...), not "
                                 f"read: this folder was read as {chosen}; give --layout lpba40 to read them"))
    if chosen != "pickle":
        pickles = _pickle_files(p)
        if len(pickles) > n_volumes:  # more pickles than scans read: the data set is the pickles
            # (one splits_final.pkl beside an images/ + labels/ folder is not)
            found.append(Skipped(str(pickles[0].parent), f"{len(pickles)} pickle(s) ({pickles[0].name}, ...), not read: "
                                 f"this folder holds image files too, so it was read as {chosen}; give --layout "
                                 "pickle to read the pickles"))
    return found


def subject_number(text: str) -> int | None:
    """The last run of digits in ``text`` (``"S07"`` -> 7), or ``None``."""
    m = re.findall(r"\d+", text)
    return int(m[-1]) if m else None


def unique(items: Iterable[str]) -> list[str]:
    """Order-preserving de-duplication."""
    seen: set[str] = set()
    return [x for x in items if not (x in seen or seen.add(x))]


def _check_disjoint(splits: Mapping[str, Sequence[str]], subjects: Mapping[str, str]) -> None:
    """A published split must keep each subject in one part (else one line naming it)."""
    seen: dict[str, str] = {}
    for part in ("train", "val", "test"):
        for vid in splits.get(part, []):
            s = subjects.get(vid, vid)
            if seen.setdefault(s, part) != part:
                raise PsmambaError(f"the published split puts subject {s!r} in both {seen[s]!r} and {part!r} "
                                   f"(volume {vid}): a subject's volumes must stay in one part; fix the split")
