"""Tests of the peer networks (psmamba.models.peers): parameter counts against the spec, a
gradient for every parameter, shapes on odd sizes, checkpoints, and recovery of a known shift.

Every network is built once per module (the large ones take a second to build) and torch runs
on one thread (tiny volumes; the machine is shared).
"""

from __future__ import annotations

import pytest
import torch

from psmamba import spatial
from psmamba.errors import PsmambaError
from psmamba.models import RegistrationOutput, build_model, load_checkpoint, save_checkpoint
from psmamba.models.peers import PEER_TRAINING, PEERS, build_peer
from psmamba.models.peers._common import NEIGHBOUR_OFFSETS, neighbourhood_field
from psmamba.models.peers.prnet_pp import CORRELATION_OFFSETS, correlation3d
from psmamba.models.peers.swin import _partition, _unpartition, shifted_window_mask

#: trainable parameters of each public network, measured (``shared/spec/peers.md``). TransMatch:
#: those that receive a gradient. MambaMorphFeat: the public count includes a 4,115-parameter
#: read-out head used only by an auxiliary contrastive loss, which we do not build.
SPEC_PARAMS = {
    "transmorph": 46_771_251,
    "im2grid": 886_003,
    "prnet_pp": 1_236_965,
    "modet": 1_029_670,
    "pivit": 664_873,
    "mambamorph": 7_305_459,
    "mambamorph_feat": 7_594_646,
    "transmatch": 70_793_235,
    "voxelmorph": 327_331,
}
ODD_SIZE = (20, 18, 22)  # no axis a multiple of 8, 16 or 32: exercises pad + crop
#: cheaper odd size for the networks that pad to 16 (or 8): padded to 32 x 16 x 16 (24 x 16 x 16)
SMALL_ODD_SIZE = (20, 14, 15)
#: cheap enough for the fast shift test (a few seconds per step at most on a loaded machine)
FAST_FIT = ("im2grid", "pivit", "voxelmorph")
# stochastic depth off in the tests: a dropped residual branch would get no gradient
NO_DROP = {"transmorph": {"drop_path": 0.0}, "transmatch": {"drop_path": 0.0}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def nets():
    """name -> network (stochastic depth off), each built on first use only."""
    cache: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = build_peer(name, **NO_DROP.get(name, {}))
        return cache[name]

    return get


def smooth_pair(size=ODD_SIZE):
    """Two different smooth images: balls of different centres plus a gentle ramp."""
    g = spatial.identity_grid(size)[0]
    c = torch.tensor([(s - 1) / 2 for s in size]).view(3, 1, 1, 1)
    ball = lambda centre: torch.sigmoid((min(size) / 4 - (g - centre).pow(2).sum(0).sqrt()) / 1.5)  # noqa: E731
    ramp = g[0] / (4 * size[0])
    moving = ball(c + torch.tensor([2.0, -1.0, 1.0]).view(3, 1, 1, 1)) + ramp
    fixed = ball(c) + ramp
    return moving[None, None], fixed[None, None]


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", sorted(PEERS))
def test_parameter_count_matches_spec(name, nets):
    model = nets(name)
    ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
    spec = SPEC_PARAMS[name]
    print(f"{name}: ours {ours:,}  spec {spec:,}  ({100 * (ours - spec) / spec:+.3f} %)")
    assert abs(ours - spec) <= 0.005 * spec, (name, ours, spec)


def test_counts_are_exact_where_we_build_everything():
    """Only MambaMorphFeat leaves something out (see SPEC_PARAMS); the rest match exactly,
    TransMorph with both window settings of the spec."""
    for name, spec in SPEC_PARAMS.items():
        if name in ("mambamorph_feat", "transmorph", "transmatch"):
            continue
        assert sum(p.numel() for p in build_peer(name).parameters()) == spec, name
    tm = build_peer("transmorph", window=[5, 6, 5])
    assert sum(p.numel() for p in tm.parameters()) == 46_745_907
    assert sum(p.numel() for p in build_peer("mambamorph_feat").parameters()) == 7_594_646 - 4_115


# --------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("name", sorted(PEERS))
def test_shapes_and_every_parameter_gets_a_gradient(name, nets):
    """Odd-sized input: output shapes, warped = warp(moving, ddf), and after one backward pass
    every parameter has a finite, non-zero gradient. Im2Grid takes a second step: its
    projections start at exactly zero, so its encoder's gradient is zero until they move."""
    model = nets(name)
    model.train()
    size = ODD_SIZE if model.divisor > 16 else SMALL_ODD_SIZE
    moving, fixed = smooth_pair(size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = 2 if name == "im2grid" else 1
    for step in range(steps):
        out = model(moving, fixed)
        if step == 0:
            assert isinstance(out, RegistrationOutput)
            assert out.warped.shape == (1, 1, *size) and out.ddf.shape == (1, 3, *size)
            torch.testing.assert_close(out.warped, spatial.warp(moving, out.ddf))
            assert bool(torch.isfinite(out.ddf).all())
        loss = (out.warped - fixed).pow(2).mean() + 0.1 * out.ddf.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if step < steps - 1:
            opt.step()
    bad = [
        pname
        for pname, p in model.named_parameters()
        if p.grad is None or not bool(torch.isfinite(p.grad).all()) or float(p.grad.abs().max()) == 0.0
    ]
    assert not bad, f"{name}: no usable gradient for {bad[:8]} ({len(bad)} in all)"


def test_input_checks_and_small_inputs():
    model = build_peer("pivit")
    moving, fixed = smooth_pair((9, 8, 10))
    assert model(moving, fixed).ddf.shape == (1, 3, 9, 8, 10)
    with pytest.raises(PsmambaError, match="same shape"):
        model(moving, fixed[..., :-1])
    with pytest.raises(PsmambaError, match=r"\(B, 1, D, H, W\)"):
        model(moving[0], fixed[0])
    with pytest.raises(PsmambaError, match="NaN"):
        model(moving * float("nan"), fixed)
    with pytest.raises(PsmambaError, match="too small"):  # level-5 instance norm on one voxel
        build_peer("modet")(*smooth_pair((16, 12, 9)))


def test_batch_of_two_equals_two_single_pairs():
    model = build_peer("modet").eval()
    m1, f1 = smooth_pair(SMALL_ODD_SIZE)
    m2, f2 = f1.flip(-1), m1.flip(-1)
    with torch.no_grad():
        both = model(torch.cat([m1, m2]), torch.cat([f1, f2])).ddf
        torch.testing.assert_close(both[:1], model(m1, f1).ddf, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(both[1:], model(m2, f2).ddf, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- layers
def test_neighbourhood_field_finds_the_matching_offset():
    """Queries equal to the key at offset o (and large) put all weight on o: the field is o."""
    torch.manual_seed(0)
    size = (6, 7, 5)
    keys = torch.nn.functional.normalize(torch.randn(1, 2, 64, *size), dim=2)  # unit vectors
    target = [(1, 0, -1), (-1, 1, 1)]  # one offset per head
    q = torch.empty_like(keys)
    for h, (a, b, c) in enumerate(target):
        # q(p) = 30 k(p + o): roll by -o brings k(p + o) to p (wrapping only at the border);
        # the match scores 30, other offsets 30 x N(0, 1/64) (std 3.75)
        q[:, h] = 30 * torch.roll(keys[:, h], shifts=(-a, -b, -c), dims=(-3, -2, -1))
    field = neighbourhood_field(q, keys)
    assert field.shape == (1, 2, 3, *size)
    for h, o in enumerate(target):
        inner = field[0, h, :, 1:-1, 1:-1, 1:-1]
        expected = torch.tensor(o, dtype=torch.float32).view(3, 1, 1, 1).expand_as(inner)
        torch.testing.assert_close(inner, expected, atol=1e-3, rtol=0)
    # a bias alone (zero features) decides the offset as well
    bias = torch.full((1, 27), -50.0)
    bias[0, NEIGHBOUR_OFFSETS.index((0, 1, 0))] = 0.0
    zero = torch.zeros(1, 1, 4, *size)
    torch.testing.assert_close(neighbourhood_field(zero, zero, bias)[0, 0, :, 2, 3, 2], torch.tensor([0.0, 1.0, 0.0]))


def test_correlation_is_the_window_mean_of_dot_products():
    torch.manual_seed(0)
    m, f = torch.randn(1, 3, 6, 7, 8), torch.randn(1, 3, 6, 7, 8)
    corr = correlation3d(m, f)
    assert corr.shape == (1, 27, 6, 7, 8)
    p = (3, 3, 4)
    for idx in (0, 13, 20):
        o = CORRELATION_OFFSETS[idx]
        total = 0.0
        for dz in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (p[0] + dz, p[1] + dy, p[2] + dx)
                    r = tuple(q[i] + o[i] for i in range(3))
                    if all(0 <= r[i] < f.shape[2 + i] for i in range(3)):
                        total += float((m[0, :, q[0], q[1], q[2]] * f[0, :, r[0], r[1], r[2]]).sum())
        assert abs(float(corr[0, idx, p[0], p[1], p[2]]) - total / 27) < 1e-4


def test_window_partition_round_trip_and_shift_mask():
    x = torch.randn(2, 10, 12, 14, 3)
    w = _partition(x, (5, 6, 7))
    assert w.shape == (2 * 2 * 2 * 2, 5 * 6 * 7, 3)
    torch.testing.assert_close(_unpartition(w, (5, 6, 7), (10, 12, 14)), x)
    mask = shifted_window_mask((10, 12, 14), (5, 6, 7), (2, 3, 3), torch.device("cpu"))
    assert mask.shape == (8, 210, 210)
    assert float(mask[0].abs().max()) == 0.0  # the first window holds one region only
    assert float(mask[-1].min()) == -100.0 and torch.equal(mask, mask.transpose(1, 2))


# --------------------------------------------------------------------------- registry, configs, checkpoints
def test_build_model_by_name_and_config_dict():
    assert type(build_model("pivit")).__name__ == "PIViT"
    net = build_model({"model": "modet", "channels": 4, "head_dim": 6, "heads": [8, 4, 2, 1, 1]})
    assert type(net).__name__ == "ModeT" and net.config.heads == (8, 4, 2, 1, 1)
    assert build_model("mambamorph_feat").config.features is True
    with pytest.raises(PsmambaError, match="unknown key"):
        build_model("im2grid", chanels=4)
    with pytest.raises(PsmambaError, match="comparison networks"):
        build_model("transmorf")
    with pytest.raises(PsmambaError, match="finest level"):
        build_model("modet", heads=[8, 4, 2, 1, 2])
    with pytest.raises(PsmambaError, match="unknown mamba_backend"):
        build_model("mambamorph", mamba_backend="gpu-magic")
    assert build_peer("transmorph").checkpoint_config()["model"] == "transmorph"


def test_training_defaults_follow_table_1():
    assert set(PEER_TRAINING) == set(PEERS)
    for name, t in PEER_TRAINING.items():
        lam, lr = t["loss"]["reg_weight"], t["optim"]["lr"]
        if name.startswith("mambamorph"):
            assert (t["loss"]["dice_weight"], lam, lr) == (1.0, 0.1, 1e-4)
        elif name == "transmatch":
            assert (t["loss"]["similarity"], lam, lr) == ("lncc", 4.0, 4e-4)
        else:
            assert (t["loss"]["similarity"], t["loss"]["window"], lam, lr) == ("lncc", 9, 1.0, 1e-4)


def test_checkpoint_round_trip_strict(tmp_path):
    model = build_peer("pivit")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint(tmp_path / "pivit.pt", model, epoch=2)
    loaded, ckpt = load_checkpoint(path)
    assert type(loaded) is type(model) and loaded.name == "pivit" and not loaded.training
    assert ckpt["config"] == {"model": "pivit", **model.config.to_dict()} and ckpt["epoch"] == 2
    moving, fixed = smooth_pair(SMALL_ODD_SIZE)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(moving, fixed).ddf, model(moving, fixed).ddf)
    # the stored name decides the class; a run-time scan backend replaces the stored one
    mm = build_peer("mambamorph")
    loaded_mm, _ = load_checkpoint(save_checkpoint(tmp_path / "mm.pt", mm), mamba_backend="reference")
    assert loaded_mm.config.mamba_backend == "reference"
    assert all(m.backend == "reference" for m in loaded_mm.mambas)
    # weights of another peer under this name fail loudly
    ckpt["config"] = {"model": "voxelmorph", **build_peer("voxelmorph").config.to_dict()}
    torch.save(ckpt, tmp_path / "wrong.pt")
    with pytest.raises(PsmambaError, match="weights do not match"):
        load_checkpoint(tmp_path / "wrong.pt")


# --------------------------------------------------------------------------- optimisation
def textured_pair(n=24, shift=(3.0, -2.0, 2.0)):
    """A textured ball (fixed) and the same ball moved by ``shift`` voxels (moving), as in
    ``tests/test_models.py``: the field that registers moving onto fixed is ``+shift``."""
    gen = torch.Generator().manual_seed(1)
    g = spatial.identity_grid((n, n, n))[0]
    dist = sum((g[i] - (n - 1) / 2) ** 2 for i in range(3)).sqrt()
    radius = 10.0 * n / 32
    soft = torch.sigmoid(radius - dist)[None, None]
    mask = (dist <= radius).float()[None, None]
    noise = torch.randn(1, 1, n, n, n, generator=gen)
    taps = torch.exp(-torch.arange(-4, 5.0) ** 2 / 8.0)
    taps = taps / taps.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 9
        noise = torch.nn.functional.conv3d(noise, taps.view(shape), padding=[4 if i == axis else 0 for i in range(3)])
    noise = (noise - noise.mean()) / noise.std()
    fixed = soft * (1 + noise.clamp(-2, 2) / 2)
    fixed = fixed / fixed.max()
    field = -torch.tensor(shift).view(1, 3, 1, 1, 1).expand(1, 3, n, n, n)
    return fixed, spatial.warp(fixed, field), mask, spatial.warp(mask, field, mode="nearest")


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


def fit_shift(name: str, steps: int = 10, lr: float = 1e-3) -> tuple[float, float, torch.Tensor]:
    """Adam on one pair with LNCC (window 9) + 1 x diffusion; ``(Dice before, after, ddf)``."""
    from psmamba.losses import LNCC, Diffusion

    torch.manual_seed(0)
    fixed, moving, fixed_mask, moving_mask = textured_pair()
    model = build_peer(name, **NO_DROP.get(name, {}))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    similarity, regulariser = LNCC(window=9), Diffusion()
    for _ in range(steps):
        out = model(moving, fixed)
        loss = similarity(out.warped, fixed) + regulariser(out.ddf)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ddf = model(moving, fixed).ddf
    return _dice(moving_mask, fixed_mask), _dice(spatial.warp(moving_mask, ddf, mode="nearest"), fixed_mask), ddf


def _check_fit(name: str) -> None:
    initial, final, ddf = fit_shift(name)
    print(f"{name}: Dice {initial:.3f} -> {final:.3f}")
    assert initial < 0.62
    assert final > initial + 0.15, (name, initial, final)
    assert bool(torch.isfinite(ddf).all())


@pytest.mark.parametrize("name", FAST_FIT)
def test_recovers_a_shift(name):
    """Ten Adam steps (lr 1e-3) on a 24^3 textured ball moved by (3, -2, 2): Dice rises clearly."""
    _check_fit(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(PEERS) - set(FAST_FIT)))
def test_recovers_a_shift_slow(name):
    """The same for the networks too slow for the default run (tens of seconds per step on
    two shared cores for the transformers; ModeT and PR++ a few seconds)."""
    _check_fit(name)
