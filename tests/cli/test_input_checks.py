"""Every input of ``psmamba evaluate`` (and ``train``'s numbers) checked before any work: one line
``psmamba: error: ...`` naming the flag or file, exit status 2, nothing written."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from psmamba.cli import main
from psmamba.engine.evaluate import Pair, evaluate_pairs
from psmamba.errors import PsmambaError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

S = 12


def _save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def case(tmp_path):
    """Images f, m and their label maps fl, ml (labels 1 and 2), all 12^3, in tmp_path."""
    f = np.zeros((S, S, S), np.int16)
    f[2:6, 2:6, 2:6], f[8:10, 8:10, 8:10] = 1, 2
    m = np.zeros_like(f)
    m[3:7, 2:6, 2:6], m[8:10, 8:10, 9:11] = 1, 2
    for name, arr in (("f", (f > 0) + 0.1), ("m", (m > 0) + 0.1)):
        _save(tmp_path / f"{name}.nii.gz", arr.astype(np.float32))
    _save(tmp_path / "fl.nii.gz", f)
    _save(tmp_path / "ml.nii.gz", m)
    return tmp_path


def _csv(folder, text, name="pairs.csv"):
    p = folder / name
    p.write_text(text)
    return str(p)


GOOD = "m.nii.gz,f.nii.gz,ml.nii.gz,fl.nii.gz,a\n"


def _fails(capsys, argv, *needles):
    """``main(argv)`` exits 2 with one line holding every needle, before any pair ran."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("psmamba: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert "[1/" not in captured.err  # no pair was registered
    return err


def _nothing_written(folder):
    assert not folder.exists() or not any(folder.iterdir())


# --------------------------------------------------------------------------- numeric flags
@pytest.mark.parametrize("flags,needle", [
    (["--iters", "5", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--iters", "5", "--lr", "-0.1"], "--lr must be a finite number > 0, got -0.1"),
    (["--iters", "5", "--lambda", "-1"], "--lambda must be a finite number >= 0, got -1.0"),
    (["--iters", "5", "--lambda", "nan"], "--lambda must be a finite number >= 0, got nan"),
    (["--iters", "5", "--lambda", "inf"], "--lambda must be a finite number >= 0, got inf"),
    (["--iters", "-3"], "--iters must be an integer >= 0, got -3"),
    (["--identity", "--max-pairs", "0"], "--max-pairs must be an integer > 0, got 0"),
    (["--iters", "5", "--model-size", "8", "1", "8"], "--model-size must be an integer >= 2, got 1"),
    (["--identity", "--demo-size", "full"], "--demo-size is the size of --demo's pairs"),  # ignored before
    (["--method", "io", "--refine", "field"], "--refine chooses what --iters optimises"),  # ignored before
])
def test_numeric_flags_fail_first(tmp_path, capsys, flags, needle):
    out = tmp_path / "new" / "r.csv"
    # the pair list does not even exist: the flag is what is reported
    _fails(capsys, ["evaluate", "--pairs", str(tmp_path / "missing.csv"), *flags, "--out", str(out)], needle)
    _nothing_written(tmp_path / "new")


# --------------------------------------------------------------------------- pair lists
def test_header_of_unknown_columns_is_not_read_as_a_pair(case, capsys):
    out = case / "r.csv"
    p = _csv(case, "source,target,source_labels,target_labels\n" + GOOD)
    _fails(capsys, ["evaluate", "--pairs", p, "--identity", "--out", str(out)],
           f"pair list {p} line 1", "looks like a header", "moving, fixed, moving_labels, fixed_labels, pair_id")
    p = _csv(case, "moving,target\n" + GOOD)
    _fails(capsys, ["evaluate", "--pairs", p, "--identity", "--out", str(out)],
           f"pair list {p} line 1", "no ['fixed'] column", "moving, fixed, moving_labels")
    # a header alone (nothing to compare with): the missing-file error says what a header must name
    p = _csv(case, "source,target\n")
    _fails(capsys, ["evaluate", "--pairs", p, "--identity", "--out", str(out)],
           "line 1", "source does not exist", "if this row is a header, name its columns moving, fixed")
    assert not out.exists()


# --------------------------------------------------------------------------- files checked before the first pair
def test_every_file_is_loaded_before_the_first_pair(case, capsys):
    out = case / "res" / "r.csv"
    raw = bytearray((case / "f.nii.gz").read_bytes())
    raw[-6] ^= 0xFF  # the gzip CRC: nibabel alone would load this file
    (case / "crc.nii.gz").write_bytes(bytes(raw))
    (case / "cut.nii.gz").write_bytes(bytes(raw[: len(raw) // 2]))
    nan = np.asarray(nib.load(str(case / "m.nii.gz")).dataobj).copy()
    nan[0, 0, :2] = np.nan
    _save(case / "nan.nii.gz", nan)
    _save(case / "const.nii.gz", np.full((S, S, S), 3.0, np.float32))
    _save(case / "tiny.nii.gz", np.random.default_rng(0).random((4, 4, 4)).astype(np.float32))
    _save(case / "frac.nii.gz", np.full((S, S, S), 0.5, np.float32))
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((S, S, S))
    hdr.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    nib.save(nib.Nifti1Image(np.asarray(nib.load(str(case / "f.nii.gz")).dataobj), None, header=hdr),
             str(case / "sing.nii.gz"))
    for second, needles in [
        ("m.nii.gz,crc.nii.gz", ("fixed image", "crc.nii.gz", "cannot be read", "CRC check failed")),
        ("m.nii.gz,cut.nii.gz", ("fixed image", "cut.nii.gz", "cannot be read")),
        ("nan.nii.gz,f.nii.gz", ("moving image", "nan.nii.gz", "holds 2 NaN voxel value(s) of 1728; if they mark the "
                                 "background (as SPM writes it), set them to 0 first")),
        ("const.nii.gz,f.nii.gz", ("moving image", "const.nii.gz", "constant (every voxel is 3)")),
        ("m.nii.gz,tiny.nii.gz", ("fixed image", "tiny.nii.gz", "of shape 4x4x4 is too small",
                                  "the metrics need 5 voxels a side")),
        ("m.nii.gz,sing.nii.gz", ("fixed image", "sing.nii.gz", "affine is singular")),
        ("sing.nii.gz,f.nii.gz", ("moving image", "sing.nii.gz", "affine is singular")),
        ("m.nii.gz,f.nii.gz,frac.nii.gz,fl.nii.gz", ("moving labels", "frac.nii.gz", "integer values")),
    ]:
        # the bad file is in the SECOND pair: the first one must not have run
        cells = second.split(",")
        p = _csv(case, GOOD + ",".join(cells + [""] * (4 - len(cells)) + ["b"]) + "\n")
        _fails(capsys, ["evaluate", "--pairs", p, "--identity", "--out", str(out)], *needles)
        _nothing_written(case / "res")


def test_label_maps_are_checked_against_images_and_each_other(case, capsys):
    out = case / "res" / "r.csv"
    fl = np.asarray(nib.load(str(case / "fl.nii.gz")).dataobj)
    _save(case / "other.nii.gz", ((fl > 0) * 100 + fl).astype(np.int16))  # codes 101, 102: another protocol
    _save(case / "grid.nii.gz", fl, np.diag([2.0, 2.0, 2.0, 1.0]))
    _save(case / "shape.nii.gz", fl[:-1])
    _save(case / "empty.nii.gz", np.zeros_like(fl))
    for second, needles in [
        ("m.nii.gz,f.nii.gz,other.nii.gz,fl.nii.gz", (
            "pair b: fixed labels", "fl.nii.gz (labels 1-2) and moving labels", "other.nii.gz (labels 101-102)",
            "share no label")),
        ("m.nii.gz,f.nii.gz,ml.nii.gz,grid.nii.gz", ("pair b: fixed labels", "grid.nii.gz", "different affines")),
        ("m.nii.gz,f.nii.gz,shape.nii.gz,fl.nii.gz", ("pair b: moving labels", "shape.nii.gz", "has shape (11, 12, 12)")),
        ("m.nii.gz,f.nii.gz,empty.nii.gz,fl.nii.gz", ("empty.nii.gz: the label map holds no label",)),
    ]:
        p = _csv(case, GOOD + second + ",b\n")
        _fails(capsys, ["evaluate", "--pairs", p, "--identity", "--out", str(out)], *needles)
        _nothing_written(case / "res")
    # --labels: the codes to score must be in both maps
    _fails(capsys, ["evaluate", "--pairs", _csv(case, GOOD), "--identity", "--labels", "3,4", "--out", str(out)],
           "pair a: none of the labels to score (3-4) is in both")
    # a code in no label map of any pair: refused (scored as empty rows before), one absent
    # from some pairs only is allowed (a structure one subject lacks)
    _fails(capsys, ["evaluate", "--pairs", _csv(case, GOOD), "--identity", "--labels", "2,99", "--out", str(out)],
           "--labels: label code(s) 99 in no label map of the 1 pair(s) (codes there: 1-2)")
    for bad, needle in (("", "--labels names no label code"), ("0,1", "--labels must be an integer > 0, got 0"),
                        ("1,x", "--labels must be comma-separated integers")):
        _fails(capsys, ["evaluate", "--pairs", _csv(case, GOOD), "--identity", "--labels", bad, "--out", str(out)],
               needle)
    _nothing_written(case / "res")


def test_repeated_rows_are_named_for_what_they_are(case, capsys):
    out = case / "r.csv"
    # two label protocols of one pair, no pair_id: "duplicate pair id 'm_to_f'" (an id nobody wrote) before
    p = _csv(case, "m.nii.gz,f.nii.gz,ml.nii.gz,fl.nii.gz\nm.nii.gz,f.nii.gz,fl.nii.gz,ml.nii.gz\n")
    _fails(capsys, ["evaluate", "--pairs", p, "--identity", "--out", str(out)],
           "line 2: the same moving and fixed files as an earlier row", "give each row a pair_id")
    p = _csv(case, GOOD + GOOD)
    _fails(capsys, ["evaluate", "--pairs", p, "--identity", "--out", str(out)], "line 2: duplicate pair id 'a'")
    assert not out.exists()


def test_out_folder_is_created_only_when_all_is_well(case, capsys):
    out = case / "new" / "deeper" / "r.csv"
    bad = _csv(case, GOOD + "m.nii.gz,missing.nii.gz\n", name="bad.csv")
    _fails(capsys, ["evaluate", "--pairs", bad, "--identity", "--out", str(out)], "missing.nii.gz")
    assert not (case / "new").exists()
    two = _csv(case, GOOD + "f.nii.gz,m.nii.gz,fl.nii.gz,ml.nii.gz,b\n")
    assert main(["evaluate", "--pairs", two, "--identity", "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.csv", "r_pairs.csv", "r_summary.md"]
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {int(r["label"]) for r in rows} == {1, 2}
    # --compare writes into a new folder too
    cmp_out = case / "cmp" / "tests.csv"
    assert main(["evaluate", "--compare", str(out), str(out.parent / "r_pairs.csv"), "--names", "a", "b",
                 "--out", str(cmp_out)]) == 0
    assert cmp_out.is_file()
    # plot --labels: a code these results never scored is named (a vague "no per-label rows" before)
    _fails(capsys, ["plot", str(out), "--labels", "99", "--out", str(case / "figs")],
           "--labels: label code(s) 99 in no label map of these results (codes there: 1-2)")
    assert not (case / "figs").exists()


def test_results_are_all_or_nothing(case, monkeypatch):
    """A failure while writing the results leaves no file and no folder behind."""
    from psmamba.engine import results as results_mod

    res = evaluate_pairs([Pair("a", case / "m.nii.gz", case / "f.nii.gz", case / "ml.nii.gz", case / "fl.nii.gz")],
                         identity=True)
    calls = []

    def broken(columns, rows, digits):
        def write(name):
            calls.append(name)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            with open(name, "w") as fh:
                fh.write("x")
        return write

    monkeypatch.setattr(results_mod, "_csv_writer", broken)
    with pytest.raises(PsmambaError, match="No space left on device"):
        res.write(case / "out" / "r.csv")
    assert len(calls) == 2 and not (case / "out").exists()


def test_in_memory_pairs_are_checked_before_the_first(case):
    lines = []
    good = np.random.default_rng(1).random((S, S, S)).astype(np.float32)
    bad = good.copy()
    bad[3, 3, 3] = np.inf
    pairs = [Pair("a", good, good), Pair("b", bad, good)]
    with pytest.raises(PsmambaError, match=r"^pair b: moving image: the image holds 1 Inf voxel value\(s\) of 1728$"):
        evaluate_pairs(pairs, identity=True, progress=lines.append)
    assert lines == []
    pairs = [Pair("a", good, good), Pair("b", good, np.zeros((S, S, S), np.float32))]
    with pytest.raises(PsmambaError, match="^pair b: fixed image: the image is constant"):
        evaluate_pairs(pairs, identity=True, progress=lines.append)
    assert lines == []


def test_each_file_is_read_once(case, monkeypatch):
    """A file named in several pairs is checked once."""
    from psmamba import checks

    seen = []
    real = checks.check_volume_file

    def spy(path, what, **kw):
        seen.append(str(path))
        return real(path, what, **kw)

    monkeypatch.setattr(checks, "check_volume_file", spy)
    p = _csv(case, GOOD + "f.nii.gz,m.nii.gz,fl.nii.gz,ml.nii.gz,b\nm.nii.gz,m.nii.gz,ml.nii.gz,ml.nii.gz,c\n")
    from psmamba.engine.evaluate import check_pairs, pair_files

    assert check_pairs(pair_files(p)) == 4
    assert len(seen) == 4


# --------------------------------------------------------------------------- train
def test_train_seed_out_of_range_names_the_flag(tmp_path, capsys):
    for seed in ("-1", str(2**64)):
        assert main(["train", "--seed", seed, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"psmamba: error: --seed must be an integer in [0, 2**63), got {seed}", err
        assert main(["train", "--set", f"run.seed={seed}", "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("psmamba: error:") and "run.seed" in err and "\n" not in err, err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- warnings
def test_warnings_print_as_one_line_during_a_command(tmp_path, monkeypatch):
    """Python's default format adds the file, line number and source of the warn call."""
    import warnings

    import psmamba.engine.register
    from psmamba.cli import _one_line_warning

    seen = []

    def fake(*args, **kwargs):
        seen.append(warnings.formatwarning("psmamba: could not write the cache entry x", UserWarning, "f.py", 3))
        seen.append(warnings.formatwarning("old", DeprecationWarning, "f.py", 3))
        raise PsmambaError("stop here")

    monkeypatch.setattr(psmamba.engine.register, "register_pair", fake)
    before = warnings.formatwarning
    assert main(["register", "--fixed", "f", "--moving", "m", "--out", str(tmp_path / "o")]) == 2
    assert seen == ["psmamba: warning: could not write the cache entry x\n",
                    "psmamba: warning (DeprecationWarning): old\n"]
    assert warnings.formatwarning is before and before is not _one_line_warning
