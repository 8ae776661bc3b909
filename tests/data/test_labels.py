"""Label protocols: the LPBA40 code map code by code, DKT31, abdomen, and the rules for other codes."""

from __future__ import annotations

import numpy as np
import pytest

from psmamba.data.labels import (
    ABDOMEN,
    DKT31,
    DKT31_CODES,
    LPBA40,
    LPBA40_CODES,
    SUBCORTICAL,
    LabelMap,
    as_label_map,
    format_codes,
)
from psmamba.errors import PsmambaError

# The paper's list, written out independently of the module: 21-34, 41-50, 61-68, 81-92,
# 101, 102, 121, 122, 161-166 -> 1..54 in this order.
PAPER_LPBA = (list(range(21, 35)) + list(range(41, 51)) + list(range(61, 69)) + list(range(81, 93))
              + [101, 102, 121, 122] + list(range(161, 167)))


def test_lpba40_code_map_code_by_code():
    assert len(PAPER_LPBA) == 54  # 14 + 10 + 8 + 12 + 2 + 2 + 6
    assert len(PAPER_LPBA) + 2 == 56  # with 181 (cerebellum) and 182 (brainstem), LPBA40's 56 codes
    assert LPBA40.num_labels == 54
    assert list(LPBA40_CODES) == PAPER_LPBA
    codes = np.array([0] + PAPER_LPBA + [181, 182], dtype=np.int16)
    mapped = LPBA40.apply(codes)
    assert mapped[0] == 0
    for k, code in enumerate(PAPER_LPBA):
        assert mapped[1 + k] == k + 1, f"code {code} should map to {k + 1}, got {mapped[1 + k]}"
    assert mapped[-2] == 0 and mapped[-1] == 0  # 181, 182 dropped
    assert mapped.dtype == np.uint8
    names = LPBA40.label_names
    assert names[1] == "L superior frontal gyrus" and names[54] == "R hippocampus"
    assert names[47] == "L cingulate gyrus"  # code 121
    assert LPBA40.code_to_label()[161] == 49 and LPBA40.code_to_label()[166] == 54


def test_lpba40_unknown_code_names_code_and_file():
    vol = np.zeros((3, 3, 3), dtype=np.int16)
    vol[1, 1, 1] = 35  # not an LPBA40 code
    with pytest.raises(PsmambaError) as err:
        LPBA40.apply(vol, "S07.delineation.structure.label.hdr")
    msg = str(err.value)
    assert "S07.delineation.structure.label.hdr" in msg and "35" in msg and "\n" not in msg


def test_dkt31_62_cortical_regions():
    left = [c for c in DKT31_CODES if c < 2000]
    right = [c for c in DKT31_CODES if c >= 2000]
    assert len(left) == 31 and len(right) == 31 and DKT31.num_labels == 62
    # DK's 34 regions are 1001-1035 without 1004; DKT drops bankssts (1001), frontal and temporal pole
    assert set(left) == set(range(1001, 1036)) - {1001, 1004, 1032, 1033}
    assert right == [c + 1000 for c in left]
    assert DKT31.label_names[1] == "ctx-lh-caudalanteriorcingulate"
    assert DKT31.label_names[62] == "ctx-rh-insula"
    vol = np.array([0, 2, 17, 41, 1002, 2035, 1035], dtype=np.int32)  # aseg codes < 1000 -> 0
    np.testing.assert_array_equal(DKT31.apply(vol), [0, 0, 0, 0, 1, 62, 31])
    with pytest.raises(PsmambaError, match="1032"):
        DKT31.apply(np.array([1032], dtype=np.int32), "labels.DKT31.manual+aseg.MNI152.nii.gz")


def test_abdomen_identity_and_subcortical():
    assert ABDOMEN.num_labels == 13 and ABDOMEN.label_names[1] == "spleen"
    assert ABDOMEN.label_names[13] == "left adrenal gland"
    np.testing.assert_array_equal(ABDOMEN.apply(np.arange(14)), np.arange(14))
    with pytest.raises(PsmambaError, match="14"):
        ABDOMEN.apply(np.array([14]), "x.nii.gz")
    assert SUBCORTICAL.num_labels == 14
    fs = np.array([10, 11, 12, 13, 17, 18, 26, 49, 50, 51, 52, 53, 54, 58, 2, 41])
    np.testing.assert_array_equal(SUBCORTICAL.apply(fs), list(range(1, 15)) + [0, 0])  # unknown="drop"


def test_label_map_validation_and_helpers():
    with pytest.raises(PsmambaError):
        LabelMap("x", (1, 1), ("a", "b"))
    with pytest.raises(PsmambaError):
        LabelMap("x", (1,), ("a",), dropped=frozenset({1}))
    with pytest.raises(PsmambaError, match="integers"):
        LPBA40.apply(np.array([21.5]))
    custom = as_label_map([5, 3])
    np.testing.assert_array_equal(custom.apply(np.array([0, 3, 5])), [0, 2, 1])
    assert as_label_map("mindboggle") is DKT31
    with pytest.raises(PsmambaError, match="unknown label protocol"):
        as_label_map("nope")
    assert format_codes([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"
    assert LPBA40.with_unknown("drop").apply(np.array([999, 21])).tolist() == [0, 1]


def test_label_groups_cover_every_evaluation_label_once():
    from psmamba.data.labels import LPBA40_NAMES, label_groups, label_map_by_name

    for name in ("lpba40", "mindboggle", "abdomen", "subcortical14"):
        groups = label_groups(name)
        labels = sorted(lab for labs in groups.values() for lab in labs)
        assert labels == list(range(1, label_map_by_name(name).num_labels + 1)), name
    lpba = label_groups("lpba40")
    assert [LPBA40_NAMES[k - 1] for k in lpba["occipital"]][::2] == [
        "L superior occipital gyrus", "L middle occipital gyrus", "L inferior occipital gyrus", "L cuneus"]
    assert lpba["hippocampus"] == (53, 54) and len(lpba["frontal"]) == 14
    dkt = label_groups("dkt31")
    assert len(dkt["insula"]) == 2 and sum(map(len, dkt.values())) == 62
    assert label_groups("subcortical14")["caudate"] == (2, 9)
