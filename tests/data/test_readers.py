"""Readers on fixture folders generated in each published layout, and every bad-input case."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from psmamba.cli import main
from psmamba.data import open_source
from psmamba.data.labels import DKT31_CODES, LPBA40_CODES
from psmamba.data.pairs import all_pairs
from psmamba.data.sources import detect_layout
from psmamba.errors import PsmambaError

SHAPE = (10, 12, 8)


def _image(seed: int, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, dtype=np.float32)
    img[2:-2, 2:-2, 2:-2] = rng.uniform(10, 100, size=tuple(s - 4 for s in shape))
    return img


def _labels(codes, seed: int, shape=SHAPE, dtype=np.int16) -> np.ndarray:
    """Every code in ``codes`` in at least one voxel, the rest background."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(int(np.prod(shape)), dtype=dtype)
    pos = rng.permutation(lab.size)[: len(codes)]
    lab[pos] = np.asarray(codes, dtype=dtype)
    return lab.reshape(shape)


def _save(path: Path, data: np.ndarray, affine=None, analyze: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.0, 1.0, 1.0, 1.0]) if affine is None else affine
    img = nib.AnalyzeImage(data, affine) if analyze else nib.Nifti1Image(data, affine)
    nib.save(img, str(path))
    return path


# ---------------------------------------------------------------------- LPBA40
def make_lpba40(root: Path, n: int = 4) -> Path:
    """S01.. in the LONI layout: Analyze .hdr/.img for odd subjects, .nii.gz / .nii for the others."""
    codes = list(LPBA40_CODES) + [181, 182]
    for i in range(1, n + 1):
        sid = f"S{i:02d}"
        d = root / "LPBA40" / "delineation_space" / sid
        if i % 2 == 1:
            ext, analyze = ".hdr", True
        else:
            ext, analyze = (".nii.gz" if i % 4 == 2 else ".nii"), False
        _save(d / f"{sid}.delineation.skullstripped{ext}", _image(i), analyze=analyze)
        _save(d / f"{sid}.delineation.structure.label{ext}", _labels(codes, i), analyze=analyze)
    return root


def test_lpba40_layout(tmp_path):
    make_lpba40(tmp_path, n=4)
    src = open_source(tmp_path, train_subjects=2)
    assert src.layout == "lpba40"
    assert src.ids == ["S01", "S02", "S03", "S04"]
    assert {v.image_path.name for v in src.volumes} == {
        "S01.delineation.skullstripped.hdr", "S02.delineation.skullstripped.nii.gz",
        "S03.delineation.skullstripped.hdr", "S04.delineation.skullstripped.nii"}
    assert src.skipped == []
    assert src.splits == {"train": ["S01", "S02"], "test": ["S03", "S04"]}
    assert len(src.pairs_for("train", src.splits["train"])) == 2 * 1
    assert len(all_pairs(src.ids)) == 4 * 3
    assert any("40" in n for n in src.notes)  # 4 of the published 40 subjects: said, not hidden
    for ref in src.volumes:
        vol = ref.load()
        assert vol.labels.max() == 54 and len(np.unique(vol.labels)) == 55  # 54 ROIs + background
        raw = ref.load(remap=False).labels
        # code by code on real files: each voxel's code becomes its paper label, 181/182 -> 0
        c2l = {c: k + 1 for k, c in enumerate(LPBA40_CODES)}
        for code in np.unique(raw):
            expect = c2l.get(int(code), 0)
            assert np.all(vol.labels[raw == code] == expect)
        assert vol.spacing == (1.0, 1.0, 1.0) and vol.image.dtype == np.float32
    ds = src.pair_dataset("test", cache_dir=tmp_path / "cache", pipeline="minmax")
    assert len(ds) == 2


def test_lpba40_paper_split_and_missing_label(tmp_path):
    make_lpba40(tmp_path, n=3)
    (tmp_path / "LPBA40/delineation_space/S03/S03.delineation.structure.label.hdr").unlink()
    src = open_source(tmp_path, layout="lpba40")
    assert src.ids == ["S01", "S02"]
    reasons = " | ".join(str(s) for s in src.skipped)
    assert "S03.delineation.skullstripped.hdr" in reasons and "no label map" in reasons
    assert "S03.delineation.structure.label.img" in reasons  # the orphaned .img half is reported too
    assert src.splits["train"] == ["S01", "S02"] and src.splits["test"] == []
    assert "left out: 2" in src.summary()


def _gzip_half(path: Path) -> Path:
    """``x.img`` -> ``x.img.gz`` (the original removed), as LONI ships LPBA40."""
    out = path.with_name(path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return out


def test_lpba40_loni_release_gzipped_images_plain_headers(tmp_path):
    """LONI's "delineation space" archive: ``S01.delineation.skullstripped.img.gz`` beside a plain
    ``.hdr``; lower-case subject names, an upper-case pair and macOS litter read as well."""
    make_lpba40(tmp_path, n=3)
    d = tmp_path / "LPBA40/delineation_space"
    for f in sorted(d.glob("S0[13]/*.img")):
        _gzip_half(f)
    ref = nib.load(str(_save(tmp_path / "ref.hdr", _image(1), analyze=True)))
    (d / "S02").rename(d / "s02")
    for f in sorted((d / "s02").iterdir()):
        f.rename(f.with_name(f.name.replace("S02", "s02")))
    (d / "S03" / "._S03.delineation.skullstripped.hdr").write_bytes(b"\0\5\x16\x07junk")
    (tmp_path / "__MACOSX" / "S01").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "S01" / "._S01.delineation.skullstripped.hdr").write_bytes(b"junk")
    src = open_source(tmp_path)
    assert src.layout == "lpba40" and src.ids == ["S01", "S02", "S03"], src.summary()
    assert src.skipped == []
    s01 = src.volumes[0]
    assert s01.image_path.name == "S01.delineation.skullstripped.hdr"
    vol = s01.load(remap=False)
    assert np.array_equal(vol.image, _image(1)) and vol.labels.max() > 100
    from psmamba.io import load_image

    img = load_image(s01.image_path)  # the image half named directly works too, same affine as nibabel's
    assert np.allclose(load_image(str(s01.image_path)[:-4] + ".img.gz").data, img.data)
    assert np.allclose(img.affine, ref.affine)


def test_lpba40_analyze_half_missing_and_nothing_usable(tmp_path):
    make_lpba40(tmp_path, n=1)
    (tmp_path / "LPBA40/delineation_space/S01/S01.delineation.structure.label.img").unlink()
    with pytest.raises(PsmambaError, match=r"no usable LPBA40 subject.*left out:.*label\.hdr"):
        open_source(tmp_path, layout="lpba40")
    with pytest.raises(PsmambaError, match=r"id pattern '\(S\[': not a regular expression"):
        open_source(tmp_path, layout="lpba40", id_pattern="(S[")


def test_bad_glob_is_one_line(tmp_path):
    from psmamba.data.sources import find_files

    with pytest.raises(PsmambaError, match="must be relative"):
        find_files(tmp_path, "/abs/*.nii.gz")
    with pytest.raises(PsmambaError, match=r"file pattern 'img\*\*/x.nii.gz'"):
        find_files(tmp_path, "img**/x.nii.gz")


def test_mindboggle_volumes_in_mni152_folders(tmp_path):
    make_mindboggle(tmp_path, per_subset=1, extra_subset=False)
    for d in sorted(tmp_path.glob("*_volumes")):
        d.rename(d.with_name(d.name + "_in_MNI152"))
    src = open_source(tmp_path)
    assert src.layout == "mindboggle" and len(src) == 3
    assert src.splits["test"] == ["OASIS-TRT-20-1"]


def test_learn2reg_json_of_another_task_is_not_read_as_abdomen(tmp_path):
    j = tmp_path / "OASIS_dataset.json"
    j.write_text("{}")
    with pytest.raises(PsmambaError, match="only AbdomenCTCT"):
        detect_layout(j)
    (tmp_path / "imagesTr").mkdir()
    assert detect_layout(tmp_path) == "folder"


# ---------------------------------------------------------------------- Mindboggle
def make_mindboggle(root: Path, per_subset: int = 2, extra_subset: bool = True) -> Path:
    codes = list(DKT31_CODES) + [2, 4, 10, 17, 41, 49, 24]  # cortical + some aseg codes
    subsets = ["NKI-RS-22", "NKI-TRT-20", "OASIS-TRT-20"] + (["MMRR-21"] if extra_subset else [])
    for s, subset in enumerate(subsets):
        for i in range(1, per_subset + 1):
            d = root / f"{subset}_volumes" / f"{subset}-{i}"
            _save(d / "t1weighted_brain.MNI152.nii.gz", _image(10 * s + i))
            _save(d / "labels.DKT31.manual+aseg.MNI152.nii.gz", _labels(codes, 10 * s + i, dtype=np.int32))
    return root


def test_mindboggle_layout(tmp_path):
    make_mindboggle(tmp_path, per_subset=2)
    src = open_source(tmp_path)
    assert src.layout == "mindboggle" and len(src) == 6
    assert src.splits["train"] == ["NKI-RS-22-1", "NKI-RS-22-2", "NKI-TRT-20-1", "NKI-TRT-20-2"]
    assert src.splits["test"] == ["OASIS-TRT-20-1", "OASIS-TRT-20-2"]
    assert len(src.pairs_for("test", src.splits["test"])) == 2  # 20x19 in the real set
    assert any("MMRR-21" in s.what for s in src.skipped)  # other subsets are reported, not dropped silently
    vol = src.volumes[0].load()
    assert vol.labels.max() == 62 and len(np.unique(vol.labels)) == 63
    assert src.label_names[62] == "ctx-rh-insula"
    splits = src.make_splits(val=1, seed=3)
    assert len(splits["val"]) == 1 and splits["test"] == src.splits["test"]
    assert not set(splits["val"]) & set(splits["train"])


def test_mindboggle_subject_without_labels(tmp_path):
    make_mindboggle(tmp_path, per_subset=1, extra_subset=False)
    (tmp_path / "NKI-TRT-20_volumes/NKI-TRT-20-1/labels.DKT31.manual+aseg.MNI152.nii.gz").unlink()
    src = open_source(tmp_path, layout="mindboggle")
    assert len(src) == 2
    assert any("NKI-TRT-20-1" in s.what and "label" in s.reason for s in src.skipped)


# ---------------------------------------------------------------------- AbdomenCTCT
def make_abdomen(root: Path, n: int = 5, val_pairs=((4, 5), (5, 4))) -> Path:
    training = []
    for i in range(1, n + 1):
        name = f"AbdomenCTCT_{i:04d}_0000.nii.gz"
        ct = _image(100 + i) * 10 - 1000
        _save(root / "imagesTr" / name, ct, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
        _save(root / "labelsTr" / name, _labels(list(range(14)), 100 + i, dtype=np.uint8),
              affine=np.diag([2.0, 2.0, 2.0, 1.0]))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    info = {
        "name": "AbdomenCTCT",
        "labels": {"0": {"0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney",
                         "4": "gall bladder", "5": "esophagus", "6": "liver", "7": "stomach", "8": "aorta",
                         "9": "inferior vena cava", "10": "portal and splenic vein", "11": "pancreas",
                         "12": "right adrenal gland", "13": "left adrenal gland"}},
        "numTraining": n,
        "training": training,
        "registration_val": [{"fixed": f"./imagesTr/AbdomenCTCT_{f:04d}_0000.nii.gz",
                              "moving": f"./imagesTr/AbdomenCTCT_{m:04d}_0000.nii.gz"} for m, f in val_pairs],
    }
    (root / "AbdomenCTCT_dataset.json").write_text(json.dumps(info, indent=1))
    return root


def test_abdomen_layout(tmp_path):
    make_abdomen(tmp_path, n=5)
    src = open_source(tmp_path)
    assert src.layout == "abdomen" and len(src) == 5
    assert src.ids[0] == "AbdomenCTCT_0001"
    assert src.pairs["test"] == [("AbdomenCTCT_0004", "AbdomenCTCT_0005"), ("AbdomenCTCT_0005", "AbdomenCTCT_0004")]
    assert src.splits["train"] == ["AbdomenCTCT_0001", "AbdomenCTCT_0002", "AbdomenCTCT_0003"]
    splits = src.make_splits()
    assert src.pairs_for("train", splits["train"]) == all_pairs(splits["train"])  # 3x2
    assert len(src.pairs_for("test", splits["test"])) == 2
    assert src.label_map.num_labels == 13 and src.label_names[4] == "gall bladder"  # names from the JSON
    vol = src.volumes[0].load()
    assert vol.labels.max() == 13 and vol.spacing == (2.0, 2.0, 2.0)
    ds = src.pair_dataset("test", splits=splits, cache_dir=tmp_path / "cache", pipeline="none")
    item = ds[0]
    assert item["moving_id"] == "AbdomenCTCT_0004" and item["moving_labels"].max() == 13
    # the JSON file itself is a source too
    assert len(open_source(tmp_path / "AbdomenCTCT_dataset.json")) == 5


def test_abdomen_missing_json_entry(tmp_path):
    make_abdomen(tmp_path, n=3, val_pairs=((2, 3),))
    info = json.loads((tmp_path / "AbdomenCTCT_dataset.json").read_text())
    del info["registration_val"][0]["moving"]
    (tmp_path / "AbdomenCTCT_dataset.json").write_text(json.dumps(info))
    with pytest.raises(PsmambaError) as err:
        open_source(tmp_path)
    msg = str(err.value)
    assert "AbdomenCTCT_dataset.json" in msg and "registration_val[0]" in msg and "'moving'" in msg
    assert "\n" not in msg
    info["registration_val"][0]["moving"] = "./imagesTr/AbdomenCTCT_0009_0000.nii.gz"
    (tmp_path / "AbdomenCTCT_dataset.json").write_text(json.dumps(info))
    with pytest.raises(PsmambaError, match="AbdomenCTCT_0009"):
        open_source(tmp_path)
    del info["training"][1]["image"]
    (tmp_path / "AbdomenCTCT_dataset.json").write_text(json.dumps(info))
    with pytest.raises(PsmambaError, match=r"training\[1\] has no 'image'"):
        open_source(tmp_path)


def test_abdomen_json_errors_name_their_cause(tmp_path):
    """A listed pair whose volume was left out said only 'not a usable training volume'; the
    real cause (backslash paths, no 'label' key) was hidden. Entries without a 'label' key now
    take labelsTr/'s file of the same name; a pair of a volume with itself is refused."""
    make_abdomen(tmp_path, n=3, val_pairs=((2, 3),))
    path = tmp_path / "AbdomenCTCT_dataset.json"
    info = json.loads(path.read_text())
    for item in info["training"]:
        del item["label"]
    path.write_text(json.dumps(info))
    src = open_source(tmp_path)
    assert len(src) == 3 and all(v.has_labels for v in src.volumes) and src.skipped == []
    info["training"][1]["image"] = "imagesTr\\AbdomenCTCT_0002_0000.nii.gz"  # written on Windows: read
    path.write_text(json.dumps(info))
    assert len(open_source(tmp_path)) == 3
    (tmp_path / "imagesTr" / "AbdomenCTCT_0002_0000.nii.gz").unlink()
    with pytest.raises(PsmambaError, match=r"registration_val\[0\] moving .* \(.*not on disk\)"):
        open_source(tmp_path)
    info = json.loads(path.read_text())
    info["training"] = info["training"][:1] + info["training"][2:]
    info["registration_val"] = [{"fixed": info["training"][0]["image"], "moving": info["training"][0]["image"]}]
    path.write_text(json.dumps(info))
    with pytest.raises(PsmambaError, match=r"registration_val\[0\] pairs .* with itself"):
        open_source(tmp_path)


# ---------------------------------------------------------------------- pickles
def test_pickles(tmp_path):
    for i in range(3):
        with (tmp_path / f"subject_{i}.pkl").open("wb") as f:
            pickle.dump((_image(i), _labels(list(LPBA40_CODES[:5]) + [181], i)), f)
    src = open_source(tmp_path, label_map="lpba40")
    assert src.layout == "pickle" and len(src) == 3
    assert any("affine" in n for n in src.notes)
    vol = src.volumes[0].load()
    assert set(np.unique(vol.labels)) == {0, 1, 2, 3, 4, 5} and np.array_equal(vol.affine, np.eye(4))
    raw = open_source(tmp_path).volumes[0].load()  # no protocol: codes kept
    assert 181 in np.unique(raw.labels)


def test_pickles_in_split_folders(tmp_path):
    """TransMorph-style preprocessed sets: atlas.pkl beside Train/ Val/ Test/ folders of pickles."""
    def dump(path: Path, seed: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            pickle.dump((_image(seed), _labels([1, 2], seed)), f)

    dump(tmp_path / "atlas.pkl", 0)
    for k, (folder, n) in enumerate((("Train", 3), ("Val", 1), ("Test", 2))):
        for i in range(n):
            dump(tmp_path / folder / f"subject_{i}.pkl", 10 * k + i)
    (tmp_path / "Train" / "._subject_0.pkl").write_bytes(b"junk")
    assert detect_layout(tmp_path) == "pickle"
    src = open_source(tmp_path)
    assert len(src) == 7 and src.skipped == [], src.summary()
    assert src.splits == {"train": ["Train/subject_0", "Train/subject_1", "Train/subject_2"],
                          "val": ["Val/subject_0"], "test": ["Test/subject_0", "Test/subject_1"]}
    assert "atlas" in src.ids  # beside the split folders: in no split, and said so
    assert src.not_in_splits() == ["atlas"] and "in no published split" in src.summary()
    assert src.left_out_report() == ["1 volume(s) in no split, unused: atlas"]
    assert src.make_splits(val=1) == {k: src.splits[k] for k in ("train", "val", "test")}  # all published
    # Train/ and Val/ only: the published val validates, test subjects come from Train/ (seeded)
    import shutil

    shutil.rmtree(tmp_path / "Test")
    src = open_source(tmp_path)
    assert set(src.splits) == {"train", "val"}
    parts = src.make_splits(val=0.5, test=1, seed=0)
    assert parts["val"] == ["Val/subject_0"] and len(parts["test"]) == 1
    assert sorted(parts["train"] + parts["test"]) == src.splits["train"]
    assert src.make_splits(val=0.5, test=1, seed=0) == parts
    assert src.make_splits(test=0)["train"] == src.splits["train"]
    # a subject in two published parts is refused, naming it (a manifest's rows, say)
    src.splits["val"] = ["Train/subject_1"]
    with pytest.raises(PsmambaError, match=r"subject 'Train/subject_1' in both 'train' and 'val'"):
        src.make_splits()


def test_pickle_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    with (tmp_path / "evil.pkl").open("wb") as f:
        pickle.dump((Evil(), None), f)
    src = open_source(tmp_path / "evil.pkl")
    with pytest.raises(PsmambaError, match="evil.pkl.*refusing"):
        src.volumes[0].load()


# ---------------------------------------------------------------------- folder and manifest
def test_folder_images_labels_subfolders(tmp_path):
    for i in range(3):
        _save(tmp_path / "images" / f"case{i}_0000.nii.gz", _image(i))
        _save(tmp_path / "labels" / f"case{i}.nii.gz", _labels([1, 2, 3], i, dtype=np.uint8))
    _save(tmp_path / "images" / "case9_0000.nii.gz", _image(9))
    src = open_source(tmp_path)
    assert src.layout == "folder" and src.ids == ["case0", "case1", "case2", "case9"]
    assert [v.has_labels for v in src.volumes] == [True, True, True, False]
    assert any("1 of 4" in n for n in src.notes)
    src = open_source(tmp_path, layout="folder", require_labels=True)
    assert len(src) == 3 and any("case9" in s.what for s in src.skipped)


def test_folder_suffix_matching_and_globs(tmp_path):
    for i in range(2):
        _save(tmp_path / f"sub{i}" / f"sub{i}_T1w.nii", _image(i))
        _save(tmp_path / f"sub{i}" / f"sub{i}_T1w_seg.nii", _labels([4, 8], i, dtype=np.uint8))
    src = open_source(tmp_path, layout="folder")
    assert src.ids == ["sub0/sub0_T1w", "sub1/sub1_T1w"] and all(v.has_labels for v in src.volumes)
    src = open_source(tmp_path, layout="folder", image_glob="*/*_T1w.nii", label_glob="*/*_T1w_seg.nii",
                      label_map=[4, 8], subject_pattern=r"(sub\d+)")
    assert src.ids == ["sub0/sub0", "sub1/sub1"] and src.volumes[0].subject == "sub0"
    assert set(np.unique(src.volumes[1].load().labels)) == {0, 1, 2}


@pytest.mark.parametrize("img_dir, lab_dir, img_name, lab_name", [
    ("Images", "Labels", "S{i}", "S{i}"),              # folder names in any case
    ("imgs", "segs", "S{i}.nii.gz", "S{i}"),           # other common folder names
    ("images", "labels", "S{i}", "S{i}_seg"),          # a label suffix in the label folder
    ("images", "labels", "S{i}_image", "S{i}_label"),  # an "image" suffix against a label suffix
])
def test_folder_subfolder_variants_pair_images_with_labels(tmp_path, img_dir, lab_dir, img_name, lab_name):
    for i in range(2):
        _save(tmp_path / img_dir / (img_name.format(i=i).removesuffix(".nii.gz") + ".nii.gz"), _image(i))
        _save(tmp_path / lab_dir / f"{lab_name.format(i=i)}.nii.gz", _labels([1, 2], i, dtype=np.uint8))
    src = open_source(tmp_path)
    assert src.layout == "folder" and len(src) == 2, src.summary()
    assert all(v.has_labels for v in src.volumes) and src.skipped == [], src.summary()


def test_folder_segmentation_wins_over_mask_and_stray_files_are_reported(tmp_path):
    for i in range(2):
        _save(tmp_path / "images" / f"S{i}.nii.gz", _image(i))
        _save(tmp_path / "labels" / f"S{i}_mask.nii.gz", (_image(i) > 0).astype(np.uint8))
        _save(tmp_path / "labels" / f"S{i}_seg.nii.gz", _labels([1, 2], i, dtype=np.uint8))
    _save(tmp_path / "extra.nii.gz", _image(5))
    src = open_source(tmp_path)
    assert [v.label_path.name for v in src.volumes] == ["S0_seg.nii.gz", "S1_seg.nii.gz"], src.summary()
    reasons = " | ".join(str(s) for s in src.skipped)
    assert "S0_mask" in reasons and "extra.nii.gz: outside images/ and labels/" in reasons, reasons


def test_folder_bids_like_names_pair_in_one_folder(tmp_path):
    for i in range(2):
        _save(tmp_path / f"sub-0{i}_T1w.nii.gz", _image(i))
        _save(tmp_path / f"sub-0{i}_dseg.nii.gz", _labels([1, 2], i, dtype=np.uint8))
    src = open_source(tmp_path, layout="folder")
    assert src.ids == ["sub-00_T1w", "sub-01_T1w"] and all(v.has_labels for v in src.volumes), src.summary()
    with pytest.raises(PsmambaError, match=r"subject pattern '\(sub': not a regular expression"):
        open_source(tmp_path, layout="folder", subject_pattern="(sub")


def test_manifest_csv_and_json(tmp_path):
    rows = ["id,image,label,subject,split"]
    for i in range(4):
        _save(tmp_path / "data" / f"v{i}.nii.gz", _image(i))
        _save(tmp_path / "data" / f"v{i}_lab.nii.gz", _labels([1, 2], i, dtype=np.uint8))
        rows.append(f"v{i},data/v{i}.nii.gz,data/v{i}_lab.nii.gz,p{i // 2},{'test' if i == 3 else 'train'}")
    rows.append("v9,data/missing.nii.gz,,p9,train")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    src = open_source(tmp_path / "list.csv")
    assert src.layout == "manifest" and src.ids == ["v0", "v1", "v2", "v3"]
    assert src.volumes[1].subject == "p0" and src.splits["test"] == ["v3"]
    assert any("missing.nii.gz" in s.what for s in src.skipped)
    spec = {"volumes": [{"image": f"data/v{i}.nii.gz", "label": f"data/v{i}_lab.nii.gz"} for i in range(3)],
            "pairs": {"train": [["v0", "v1"], {"moving": "v2", "fixed": "v0"}]}}
    (tmp_path / "list.json").write_text(json.dumps(spec))
    src = open_source(tmp_path / "list.json")
    assert src.pairs["train"] == [("v0", "v1"), ("v2", "v0")]
    spec["volumes"][1] = {"label": "data/v1_lab.nii.gz"}
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(PsmambaError, match=r"bad.json: entry 1 has no 'image'"):
        open_source(tmp_path / "bad.json")


# ---------------------------------------------------------------------- bad input, one line each
def _one_line_error(fn, *needles):
    with pytest.raises(PsmambaError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_folder_with_no_images(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    _one_line_error(lambda: open_source(tmp_path, layout="folder"), str(tmp_path), "no images")
    _one_line_error(lambda: open_source(tmp_path, layout="lpba40"), "no LPBA40 images", "delineation")
    _one_line_error(lambda: open_source(tmp_path / "absent"), "absent")


def test_label_shape_differs(tmp_path):
    _save(tmp_path / "images" / "a.nii.gz", _image(0))
    _save(tmp_path / "labels" / "a.nii.gz", np.zeros((10, 12, 9), dtype=np.uint8))
    ref = open_source(tmp_path).volumes[0]
    _one_line_error(ref.load, "a.nii.gz", "(10, 12, 9)", "(10, 12, 8)")


def test_label_affine_differs(tmp_path):
    _save(tmp_path / "images" / "a.nii.gz", _image(0))
    _save(tmp_path / "labels" / "a.nii.gz", np.zeros(SHAPE, dtype=np.uint8), affine=np.diag([2.0, 2, 2, 1]))
    _one_line_error(open_source(tmp_path).volumes[0].load, "labels/a.nii.gz", "same grid")


def test_unknown_label_code_names_code_and_file(tmp_path):
    make_lpba40(tmp_path, n=1)
    lab_path = tmp_path / "LPBA40/delineation_space/S01/S01.delineation.structure.label.hdr"
    lab = _labels([21, 22, 250], 0)
    _save(lab_path, lab, analyze=True)
    ref = open_source(tmp_path).volumes[0]
    _one_line_error(ref.load, "S01.delineation.structure.label.hdr", "unknown label code 250")


def test_4d_and_corrupt_files(tmp_path):
    _save(tmp_path / "images" / "four.nii.gz", np.zeros((*SHAPE, 2), dtype=np.float32))
    (tmp_path / "images").mkdir(exist_ok=True)
    with gzip.open(tmp_path / "images" / "broken.nii.gz", "wb") as f:
        f.write(b"not a nifti file at all")
    src = open_source(tmp_path)
    by = src.by_id()
    _one_line_error(by["four"].load, "four.nii.gz")
    _one_line_error(by["broken"].load, "broken.nii.gz")


def test_long_run_reports_what_was_left_out(tmp_path, capsys):
    for i in range(3):
        _save(tmp_path / "images" / f"c{i}.nii.gz", _image(i))
    with gzip.open(tmp_path / "images" / "c3.nii.gz", "wb") as f:
        f.write(b"corrupt")
    src = open_source(tmp_path)
    ds = src.pair_dataset("train", pairs=all_pairs(src.ids), pipeline="minmax", cache_dir=tmp_path / "cache")
    assert len(ds) == 12
    bad = ds.prepare_all(on_error="skip")
    assert [b[0] for b in bad] == ["c3"] and "c3.nii.gz" in bad[0][1]
    assert len(ds) == 6  # the pairs that used c3 are gone, and the caller was told which and why
    # the CLI says it too, and exits 1
    code = main(["data", "prepare", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert code == 1 and "left out 1 volume(s)" in out and "c3" in out
    code = main(["data", "inspect", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1 and "c3: PROBLEM" in out and "c0: 10x12x8 voxels" in out


def test_cli_inspect_flags_empty_label_maps_and_missing_listed_files(tmp_path, capsys):
    """An all-zero label map (refused by register/evaluate) and a manifest row naming a missing
    file are problems: exit 1 (0 and "problems: none"/a bare count before)."""
    for i in range(2):
        _save(tmp_path / "img" / f"s{i}_t1.nii.gz", _image(i))
        _save(tmp_path / "seg" / f"s{i}_labels.nii.gz", _labels([1, 2], i) if i == 0 else np.zeros(SHAPE, np.int16))
    code = main(["data", "inspect", str(tmp_path), "--image-glob", "img/*_t1.nii.gz", "--label-glob",
                 "seg/*_labels.nii.gz"])
    out = capsys.readouterr().out
    assert code == 1 and "s1: PROBLEM" in out and "s1_labels.nii.gz: the label map holds no label" in out
    (tmp_path / "man.csv").write_text("image,labels\nimg/s0_t1.nii.gz,seg/s0_labels.nii.gz\nimg/gone.nii.gz,\n")
    assert main(["data", "inspect", str(tmp_path / "man.csv")]) == 1
    assert "gone.nii.gz" in capsys.readouterr().out
    # an image with a singular affine beside a good label map: the image is named (its labels were, before)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(SHAPE)
    hdr.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    nib.save(nib.Nifti1Image(_image(2), None, header=hdr), str(tmp_path / "img" / "s2_t1.nii.gz"))
    _save(tmp_path / "seg" / "s2_labels.nii.gz", _labels([1, 2], 2), affine=np.eye(4))
    assert main(["data", "inspect", str(tmp_path), "--image-glob", "img/*_t1.nii.gz", "--label-glob",
                 "seg/*_labels.nii.gz"]) == 1
    out = capsys.readouterr().out
    assert "s2: PROBLEM image " in out and "s2_t1.nii.gz: its voxel-to-world affine is singular" in out
    (tmp_path / "wide.csv").write_text("image,labels\nimg/s0_t1.nii.gz,seg/s0_labels.nii.gz,extra\n")
    assert main(["data", "inspect", str(tmp_path / "wide.csv")]) == 2  # an AttributeError traceback before
    assert "wide.csv line 2: 3 cells, but the header names 2 columns (image, labels)" in capsys.readouterr().err
    for flag, needle in ((["--max-volumes", "0"], "--max-volumes must be an integer > 0, got 0"),
                         (["--cache-dir", str(tmp_path / "man.csv")], "is a file, not a folder")):
        assert main(["data", "inspect", str(tmp_path / "man.csv"), *flag]) == 2
        assert needle in capsys.readouterr().err


def test_detect_layout_and_cli_inspect(tmp_path, capsys):
    make_lpba40(tmp_path / "lpba", n=2)
    make_mindboggle(tmp_path / "mb", per_subset=1, extra_subset=False)
    make_abdomen(tmp_path / "abd", n=3, val_pairs=((2, 3),))
    assert detect_layout(tmp_path / "lpba") == "lpba40"
    assert detect_layout(tmp_path / "mb") == "mindboggle"
    assert detect_layout(tmp_path / "mb" / "NKI-RS-22_volumes") == "mindboggle"
    assert detect_layout(tmp_path / "abd") == "abdomen"
    assert main(["data", "inspect", str(tmp_path / "lpba")]) == 0
    out = capsys.readouterr().out
    assert "lpba40 source" in out and "S02: 10x12x8 voxels, 1x1x1 mm, LAS" in out
    assert "54 labels" in out and "dropped codes 181-182" in out and "problems: none" in out
    assert main(["data", "inspect", str(tmp_path / "abd"), "--layout", "abdomen", "--max-volumes", "1"]) == 0
    out = capsys.readouterr().out
    assert "listed pairs test: 1" in out and "13 labels" in out
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 2
    assert "psmamba: error:" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "abd"), "--image-glob", "*.nii.gz"]) == 2
    assert "abdomen reader has no option 'image_glob'" in capsys.readouterr().err


def test_label_glob_alone_and_a_label_glob_that_matches_nothing(tmp_path):
    """``--label-glob`` without ``--image-glob`` was ignored (the label maps read as images, six
    volumes without labels); one that matches nothing gave a data set without labels in silence."""
    for i in range(1, 4):
        _save(tmp_path / f"case{i}.nii.gz", _image(i))
        _save(tmp_path / f"case{i}_gt.nii.gz", _labels([1, 2], i))
    src = open_source(tmp_path, layout="folder", label_glob="*_gt.nii.gz")
    assert src.ids == ["case1", "case2", "case3"] and all(v.has_labels for v in src.volumes)
    assert [v.label_path.name for v in src.volumes] == [f"case{i}_gt.nii.gz" for i in range(1, 4)]
    with pytest.raises(PsmambaError, match=r"no label maps match the label glob '\*_label.nii.gz'"):
        open_source(tmp_path, layout="folder", label_glob="*_label.nii.gz")
    with pytest.raises(PsmambaError, match="no label maps match"):
        open_source(tmp_path, layout="folder", image_glob="case?.nii.gz", label_glob="seg/*.nii.gz")


def test_a_subject_folder_linked_in_is_read(tmp_path):
    """A symbolic link to a subject folder (data assembled from several disks): ``**`` globs
    passed over it in silence (39 of 40 LPBA40 subjects, 'left out: nothing'); a link back up
    the tree is entered once, not forever."""
    make_lpba40(tmp_path / "a", n=3)
    space = tmp_path / "a" / "LPBA40" / "delineation_space"
    (space / "S03").rename(tmp_path / "S03_elsewhere")
    (space / "S03").symlink_to(tmp_path / "S03_elsewhere", target_is_directory=True)
    (space / "S01" / "loop").symlink_to(space, target_is_directory=True)
    src = open_source(tmp_path / "a", layout="lpba40")
    assert src.ids == ["S01", "S02", "S03"]
    assert src.volumes[2].image_path.parent == space / "S03" and src.skipped == []
    # a link to a sibling (latest -> v2): its files once, under v2/ (test = training set before)
    for i in range(1, 5):
        _save(tmp_path / "f" / "v2" / f"sub0{i}.nii.gz", _image(i))
        _save(tmp_path / "f" / "v2" / f"sub0{i}_seg.nii.gz", _labels([1, 2], i))
    (tmp_path / "f" / "latest").symlink_to(tmp_path / "f" / "v2", target_is_directory=True)
    src = open_source(tmp_path / "f", layout="folder")
    assert src.ids == [f"v2/sub0{i}" for i in range(1, 5)] and all(v.has_labels for v in src.volumes)


def test_a_very_deep_folder_tree_is_read(tmp_path):
    """Folders nested deeper than Python's recursion limit (1,100 levels): a RecursionError
    traceback from the glob's walk before. Here 300 levels under a limit of 150."""
    import sys

    from psmamba.data.sources import find_files

    deep = tmp_path
    for _ in range(300):
        deep = deep / "d"
        deep.mkdir()
    _save(deep / "a.nii.gz", _image(0))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(150)
    try:
        found = find_files(tmp_path, "**/*.nii.gz")
    finally:
        sys.setrecursionlimit(limit)
    assert found == [deep / "a.nii.gz"]



def test_a_detected_layout_names_the_other_data_set_it_passes_over(tmp_path):
    """One stray NIfTI beside Train/ Val/ Test/ pickles read the folder as one volume, and a
    Mindboggle subset folder beside LPBA40's subjects hid all of them, with 'left out: nothing'."""
    for folder in ("Train", "Test"):
        for i in range(2):
            (tmp_path / "pk" / folder).mkdir(parents=True, exist_ok=True)
            with (tmp_path / "pk" / folder / f"s{i}.pkl").open("wb") as f:
                pickle.dump((_image(i), _labels([1, 2], i)), f)
    _save(tmp_path / "pk" / "atlas.nii.gz", _image(9))
    src = open_source(tmp_path / "pk")
    assert src.layout == "folder" and len(src.volumes) == 1
    assert any("pickle(s)" in s.reason and "--layout pickle" in s.reason for s in src.skipped), src.summary()
    assert open_source(tmp_path / "pk", layout="pickle").skipped == []  # asked for: nothing to say
    for i in range(5):  # more scans than pickles: an nnU-Net splits_final.pkl beside them is no data set
        _save(tmp_path / "pk" / f"case{i}.nii.gz", _image(i))
    assert not any("pickle" in s.reason for s in open_source(tmp_path / "pk").skipped)
    make_lpba40(tmp_path / "mix", n=2)
    make_mindboggle(tmp_path / "mb", per_subset=1, extra_subset=False)
    next((tmp_path / "mb").iterdir()).rename(tmp_path / "mix" / "NKI-RS-22_volumes")
    src = open_source(tmp_path / "mix")
    assert src.layout == "mindboggle"
    assert any("2 LPBA40 image(s)" in s.reason and "--layout lpba40" in s.reason for s in src.skipped), src.summary()


def test_one_persons_scans_stay_in_one_split(tmp_path):
    """BIDS sub-<label> files are one subject (sub-01_T1w and sub-01_desc-brain_T1w fell in
    training and test), scoped by the folders above (site1/sub-01 and site2/sub-01 are two
    people). Sub-folders of several scans are not guessed (a person's folder, or a modality's,
    a cohort's, a split's: merging people was a silent wrong result): a note names them and
    subject_pattern, which groups them when asked."""
    for i in range(1, 5):
        for name in ("sub-0{i}_T1w", "sub-0{i}_desc-brain_T1w"):
            _save(tmp_path / "bids" / f"sub-0{i}" / "anat" / f"{name.format(i=i)}.nii.gz", _image(i))
        for site in (1, 2):
            _save(tmp_path / "bsite" / f"site{site}" / f"sub-0{i}" / "anat" / f"sub-0{i}_T1w.nii.gz", _image(i + site))
        for name in ("aligned_norm", "aligned_orig"):
            _save(tmp_path / "oasis" / f"OASIS_OAS1_000{i}_MR1" / f"{name}.nii.gz", _image(10 * i + len(name)))
        for mod in ("T1", "T2"):
            _save(tmp_path / "mod" / mod / f"person{i}.nii.gz", _image(i))
    src = open_source(tmp_path / "bids", layout="folder")
    by_id = {v.id: v.subject for v in src.volumes}
    assert len(src.volumes) == 8 and len(set(by_id.values())) == 4 and any("BIDS" in n for n in src.notes)
    for seed in range(5):
        parts = src.make_splits(val=0, test=0.5, seed=seed)
        train, test = ({by_id[v] for v in parts[k]} for k in ("train", "test"))
        assert train and test and not train & test, (seed, parts)
    pairs = src.pairs_for("train", src.ids)  # no pair of one person's two scans
    assert len(pairs) == 8 * 7 - 4 * 2 and all(by_id[m] != by_id[f] for m, f in pairs)
    src = open_source(tmp_path / "bsite", layout="folder")
    assert sorted({v.subject for v in src.volumes}) == [f"site{s}/sub-0{i}" for s in (1, 2) for i in range(1, 5)]
    for folder in ("oasis", "mod"):
        src = open_source(tmp_path / folder, layout="folder")
        assert len({v.subject for v in src.volumes}) == 8, folder
        assert any("hold several scans" in n and "subject_pattern" in n for n in src.notes), src.notes
    src = open_source(tmp_path / "oasis", layout="folder", subject_pattern=r"^([^/]+)/")
    assert len({v.subject for v in src.volumes}) == 4


def test_empty_subject_folders_are_named(tmp_path):
    """An empty LPBA40 S04/ only lowered a count; an empty Mindboggle subject folder was not
    mentioned at all (a subject that failed to download)."""
    make_lpba40(tmp_path / "l", n=3)
    (tmp_path / "l" / "LPBA40" / "delineation_space" / "S04").mkdir()
    src = open_source(tmp_path / "l")
    assert [s.what.endswith("S04") and "subject folder without an image" in s.reason for s in src.skipped] == [True]
    make_mindboggle(tmp_path / "m", per_subset=1, extra_subset=False)
    (tmp_path / "m" / "OASIS-TRT-20_volumes" / "OASIS-TRT-20-9").mkdir()
    src = open_source(tmp_path / "m")
    assert any(s.what.endswith("OASIS-TRT-20-9") and "empty subject folder" in s.reason for s in src.skipped)


@pytest.mark.parametrize("header, named", [("img,seg", "'img', 'seg'"), ("image;label", "'image;label'")])
def test_manifest_header_without_an_image_column_is_named(tmp_path, header, named):
    """'row 2 has no 'image' entry' blamed a row for a header that used other names or ';'."""
    _save(tmp_path / "a.nii.gz", _image(0))
    sep = ";" if ";" in header else ","
    (tmp_path / "m.csv").write_text(f"{header}\na.nii.gz{sep}\n")
    with pytest.raises(PsmambaError, match=f"the header has no 'image' column \\(it names {named}"):
        open_source(tmp_path / "m.csv")


def test_data_prepare_leaves_out_an_empty_label_map_as_inspect_does(tmp_path, capsys):
    """`data prepare` cached a label map with no label that `inspect` calls unusable."""
    make_lpba40(tmp_path / "l", n=2)
    lab = tmp_path / "l" / "LPBA40" / "delineation_space" / "S02" / "S02.delineation.structure.label.nii.gz"
    _save(lab, np.zeros(SHAPE, np.int16))
    assert main(["data", "prepare", str(tmp_path / "l"), "--cache-dir", str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "prepared 1 of 2" in out and "holds no label" in out


def test_bids_derivative_label_maps_pair_with_their_subjects_scan(tmp_path):
    """derivatives/<pipeline>/sub-01/anat/sub-01_dseg: 'label map without an image' before."""
    for i in range(1, 4):
        _save(tmp_path / f"sub-0{i}" / "anat" / f"sub-0{i}_T1w.nii.gz", _image(i))
        _save(tmp_path / "derivatives" / "fs" / f"sub-0{i}" / "anat" / f"sub-0{i}_dseg.nii.gz", _labels([1, 2], i))
    src = open_source(tmp_path, layout="folder")
    assert len(src.volumes) == 3 and all(v.has_labels for v in src.volumes) and src.skipped == [], src.summary()
    assert src.volumes[0].label_path.parent.parts[-3:] == ("fs", "sub-01", "anat")


def test_numbered_segmentations_are_label_maps_not_images(tmp_path):
    """neurite-OASIS aligned_seg35 / aligned_seg4 were read as images (9 volumes, 0 labelled)."""
    for i in range(1, 3):
        d = tmp_path / f"OASIS_OAS1_000{i}_MR1"
        _save(d / "aligned_norm.nii.gz", _image(i))
        _save(d / "aligned_seg35.nii.gz", _labels([1, 2, 3], i))
        _save(d / "aligned_seg4.nii.gz", _labels([1, 2], i))
    src = open_source(tmp_path, layout="folder")
    assert [v.id for v in src.volumes] == ["OASIS_OAS1_0001_MR1/aligned_norm", "OASIS_OAS1_0002_MR1/aligned_norm"]
    assert all(v.label_path.name == "aligned_seg35.nii.gz" for v in src.volumes)  # the folder's one image
    assert sorted(s.reason.split(" (")[0] for s in src.skipped) == ["second label map for id OASIS_OAS1_0001_MR1/aligned",
                                                                    "second label map for id OASIS_OAS1_0002_MR1/aligned"]
    assert not any("seg" in v.id for v in src.volumes)


def test_a_whole_neurite_oasis_folder_and_label_words_alone(tmp_path, capsys):
    """A neurite-OASIS subject folder as downloaded (aligned_norm/orig/seg4/seg35, norm, orig,
    seg4, seg35, mask): the masks and the native-space segmentations were read as scans and
    trained on; now each subject is aligned_norm with aligned_seg35, the rest left out by rule
    (inspect: no problems). A per-subject folder of image.nii.gz + label.nii.gz read its label
    maps as scans too."""
    for i in range(1, 4):
        d = tmp_path / "oasis" / f"OASIS_OAS1_000{i}_MR1"
        for name in ("aligned_norm", "aligned_orig", "norm", "orig"):
            _save(d / f"{name}.nii.gz", _image(10 * i + len(name)))
        for name in ("aligned_seg35", "seg35"):
            _save(d / f"{name}.nii.gz", _labels([1, 2, 3], i))
        for name in ("aligned_seg4", "seg4", "mask"):
            _save(d / f"{name}.nii.gz", _labels([1, 2], i))
        for name, lab in (("image", "label"), ("t1", "seg")):
            _save(tmp_path / name / f"s{i}" / f"{name}.nii.gz", _image(i))
            _save(tmp_path / name / f"s{i}" / f"{lab}.nii.gz", _labels([1, 2], i))
    src = open_source(tmp_path / "oasis", layout="folder")
    assert [v.id for v in src.volumes] == [f"OASIS_OAS1_000{i}_MR1/aligned_norm" for i in range(1, 4)]
    assert all(v.label_path.name == "aligned_seg35.nii.gz" for v in src.volumes)
    assert len(src.skipped) == 3 * 7 and all(s.expected for s in src.skipped), [str(s) for s in src.skipped]
    assert main(["data", "inspect", str(tmp_path / "oasis")]) == 0
    assert "problems: none (21 more left out by the reader's rules: not problems)" in capsys.readouterr().out
    for name, lab in (("image", "label"), ("t1", "seg")):
        src = open_source(tmp_path / name, layout="folder")
        assert [(v.id, v.label_path.name) for v in src.volumes] == [(f"s{i}/{name}", f"{lab}.nii.gz")
                                                                    for i in range(1, 4)]
    # a bare `mask` beside a bare `seg`: the segmentation is the label map (the mask sorted first)
    for i in (1, 2):
        _save(tmp_path / "masked" / f"s{i}" / "image.nii.gz", _image(i))
        _save(tmp_path / "masked" / f"s{i}" / "seg.nii.gz", _labels([1, 2, 3], i))
        _save(tmp_path / "masked" / f"s{i}" / "mask.nii.gz", _labels([1], i))
    src = open_source(tmp_path / "masked", layout="folder")
    assert [v.label_path.name for v in src.volumes] == ["seg.nii.gz", "seg.nii.gz"]
    assert all(s.expected and "mask.nii.gz" in s.what for s in src.skipped)
    # a folder whose two scans neither is preferred: the label map pairs with neither, and is said
    _save(tmp_path / "two" / "s1" / "t1.nii.gz", _image(1))
    _save(tmp_path / "two" / "s1" / "t2.nii.gz", _image(2))
    _save(tmp_path / "two" / "s1" / "seg.nii.gz", _labels([1, 2], 1))
    src = open_source(tmp_path / "two", layout="folder")
    assert len(src.volumes) == 2 and not any(v.has_labels for v in src.volumes)
    assert [s.expected for s in src.skipped] == [False] and "label map without an image" in src.skipped[0].reason


def test_file_links_wrong_pairs_and_probability_maps(tmp_path):
    """A scan linked under a second name was two volumes (one in training, one in test); a label
    map left over was paired with its folder's only scan whatever its name (a T2 segmentation
    scored on the T1); fMRIPrep's _probseg maps were read as scans."""
    for i in range(1, 4):
        _save(tmp_path / "fl" / "v2" / f"sub0{i}.nii.gz", _image(i))
        (tmp_path / "fl" / "latest").mkdir(exist_ok=True)
        (tmp_path / "fl" / "latest" / f"sub0{i}.nii.gz").symlink_to(f"../v2/sub0{i}.nii.gz")
    src = open_source(tmp_path / "fl", layout="folder")
    assert src.ids == ["v2/sub01", "v2/sub02", "v2/sub03"]
    assert sum("(a link): read once" in s.reason for s in src.skipped) == 3
    for i in range(1, 3):
        _save(tmp_path / "mc" / f"p{i}" / "t1.nii.gz", _image(i))
        _save(tmp_path / "mc" / f"p{i}" / "t2_seg.nii.gz", _labels([1], i))
    src = open_source(tmp_path / "mc", layout="folder")
    assert not any(v.has_labels for v in src.volumes)
    assert sum("label map without an image" in s.reason and "--image-glob" in s.reason for s in src.skipped) == 2
    anat = tmp_path / "fp" / "derivatives" / "fmriprep" / "sub-01" / "anat"
    _save(anat / "sub-01_desc-preproc_T1w.nii.gz", _image(1))
    _save(anat / "sub-01_dseg.nii.gz", _labels([1, 2, 3], 1))
    for t in ("CSF", "GM", "WM"):
        _save(anat / f"sub-01_label-{t}_probseg.nii.gz", _image(2))
    src = open_source(tmp_path / "fp", layout="folder")
    assert [v.label_path.name for v in src.volumes] == ["sub-01_dseg.nii.gz"]
    assert sum("_probseg" in s.reason for s in src.skipped) == 3


def test_inspect_takes_a_subject_pattern(tmp_path, capsys):
    for i in range(1, 4):
        for name in ("norm", "orig"):
            _save(tmp_path / f"P{i}" / f"{name}.nii.gz", _image(i))
    assert main(["data", "inspect", str(tmp_path)]) == 0
    assert "--subject-pattern" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path), "--subject-pattern", "^([^/]+)/"]) == 0
    assert "subjects: 3 (several volumes of one subject" in capsys.readouterr().out
