"""psmamba plot and the figures of psmamba.viz: files exist, are PNGs, and slices are oriented right."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from psmamba.cli import main
from psmamba.errors import PsmambaError
from psmamba.viz import _views, dice_boxplot, pair_dice_plot, save_overview


def _png_shape(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(str(path)).shape


def _results_csv(path, method, rng, n_pairs=5, labels=(1, 2, 3, 4), offset=0.0):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "pair_id", "moving", "fixed", "label", "dice", "dice_before", "hd95_mm",
                    "folding_percent", "sdlogj", "seconds"])
        for p in range(n_pairs):
            for lab in labels:
                d = float(np.clip(0.6 + 0.05 * lab + offset + 0.03 * rng.standard_normal(), 0, 1))
                w.writerow([method, f"s{p}_to_s{p + 1}", "", "", lab, d, 0.5, 2.0, 0.1, 0.2, 1.0])
    return path


def test_plot_cli_writes_box_and_pair_plots(tmp_path, rng, capsys):
    a = _results_csv(tmp_path / "a.csv", "PSMamba", rng, offset=0.05)
    b = _results_csv(tmp_path / "b.csv", "VoxelMorph", rng)
    names = tmp_path / "names.csv"
    names.write_text("1,left thalamus\n2,left caudate\n3,left putamen\n4,left pallidum\n")
    out = tmp_path / "figs"
    assert main(["plot", str(a), str(b), "--label-names", str(names), "--out", str(out)]) == 0
    assert "dice_per_roi.png" in capsys.readouterr().out
    h, w, _ = _png_shape(out / "dice_per_roi.png")
    assert w > 500 and h > 300
    assert _png_shape(out / "dice_per_pair.png")[1] > 500
    # a per-pair CSV has no per-label rows: only the pair plot is drawn
    pairs_only = tmp_path / "p.csv"
    pairs_only.write_text("method,pair_id,dice_mean\nX,a,0.5\nX,b,0.6\n")
    out2 = tmp_path / "figs2"
    assert main(["plot", str(pairs_only), str(a), "--out", str(out2)]) == 0
    assert (out2 / "dice_per_pair.png").is_file()


def test_plot_bad_input(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.csv" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(PsmambaError):
        dice_boxplot({}, tmp_path / "x.png")
    with pytest.raises(PsmambaError):
        pair_dice_plot({}, tmp_path / "x.png")


def test_many_rois_wrap_onto_rows(tmp_path, rng):
    per_label = {m: {lab: list(rng.uniform(0.5, 0.9, 6)) for lab in range(1, 55)} for m in ("a", "b", "c")}
    path = dice_boxplot(per_label, tmp_path / "lpba.png", per_row=27)
    h, w, _ = _png_shape(path)
    assert h > 600  # two rows of 27 ROIs


def test_slices_follow_world_orientation():
    """A voxel at the patient's right/anterior/superior end shows up right/top whatever the voxel order."""
    shape = (10, 12, 14)
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    # LPS-like storage: axis 0 runs to the left, axis 1 to posterior, axis 2 superior
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    centre = [5, 6, 7]
    for aff, right_index, anterior_index in ((ras, 9, 11), (lps, 0, 0)):
        vol = np.zeros(shape, np.float32)
        vol[right_index, :, 7] = 1.0  # the rightmost column in the axial slice 7
        vol[:, anterior_index, 7] += 2.0  # the most anterior row
        axial = _views(shape, aff, ["axial"], centre)[0]
        img = axial.cut(vol)
        assert img.shape == (12, 10)  # rows: A/P (vertical), columns: L/R
        assert np.all(img[:, -1] >= 1.0)  # right on the right
        assert np.all(img[-1, :] >= 2.0)  # anterior at the top (origin="lower": last row is up)


def test_overview_panels(tmp_path):
    shape = (20, 22, 18)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    fixed = np.exp(-((z - 10) ** 2 + (y - 11) ** 2 + (x - 9) ** 2) / 30.0)
    ddf = np.stack([np.sin(y / 4.0), np.cos(x / 5.0), 0.5 * np.sin(z / 3.0)]).astype(np.float32)
    labels = (fixed > 0.5).astype(np.int16) + (fixed > 0.8)
    aff = np.diag([1.0, 1.2, 2.0, 1.0])  # anisotropic: panels drawn with their physical aspect
    path = save_overview(tmp_path / "ov.png", fixed=fixed, moving=fixed, warped=fixed, ddf=ddf,
                         jacobian=np.ones(shape, np.float32), warped_labels=labels, affine=aff, title="t")
    h, w, _ = _png_shape(path)
    assert w > 1200 and h > 400  # 7 panels across, 2 planes down
    with pytest.raises(PsmambaError, match="ddf"):
        save_overview(tmp_path / "bad.png", fixed=fixed, moving=fixed, warped=fixed, ddf=ddf[:2],
                      jacobian=fixed)
    assert not (tmp_path / "bad.png").exists()


def test_training_curves_from_metrics_csv(tmp_path):
    """Validation rows of two runs' metrics.csv -> one PNG; train rows ignored; steps sorted."""
    from psmamba.engine.logs import CSV_FIELDS
    from psmamba.viz import read_training_log, training_curves

    def write(path, rows):
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow(r)

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write(a, [{"step": 10, "split": "train", "loss": 0.5}, {"step": 100, "split": "val", "dice": 0.7},
              {"step": 50, "split": "val", "dice": 0.65, "folding_percent": 0.01}])
    write(b, [{"step": 50, "split": "val", "dice": 0.6}])
    log = read_training_log(a)
    np.testing.assert_array_equal(log["step"], [50, 100])
    np.testing.assert_allclose(log["dice"], [0.65, 0.7])
    out = training_curves({"paper": a, "baseline_conv": b}, tmp_path / "curve.png", baseline=0.6)
    assert _png_shape(out)[0] > 100
    write(tmp_path / "empty.csv", [{"step": 10, "split": "train", "loss": 0.5}])
    with pytest.raises(PsmambaError, match="no validation rows"):
        read_training_log(tmp_path / "empty.csv")
    with pytest.raises(PsmambaError, match="does not exist"):
        read_training_log(tmp_path / "missing.csv")
