"""Tests of PSMamba-Net (psmamba.models): configs, presets, shapes, gradients, SIR, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from psmamba import spatial
from psmamba.config import load_yaml, save_yaml
from psmamba.errors import PsmambaError
from psmamba.models import (
    PRESETS,
    ModelConfig,
    PSMambaNet,
    RegistrationOutput,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from psmamba.models.refinement import SubstrateIterativeRefinement
from psmamba.nn.blocks import inert_parameters

# the spec's section 6 (c = 4), in millions, with the per-part keys of parameter_breakdown()
SPEC_BREAKDOWN_M = {
    "encoder": 0.886,
    "decoder_level1": 0.024,
    "decoder_level2": 0.092,
    "decoder_level3": 0.358,
    "decoder_level4": 1.413,
    "decoder_level5": 5.611,
    "level5_sfe": 4.0,
    "mamba_layers": 0.60,
}
ODD_SIZE = (20, 24, 28)  # not a multiple of 16 on any axis: exercises pad + crop
# cheaper still (pads to 32x16x16, a quarter of 32^3) for the tests that run every preset
SMALL_ODD_SIZE = (20, 14, 15)
# optimisation tests: paper at 32^3 costs about 2.5 s per Adam step on 2 idle cores
FAST_STEPS = 10
SLOW_STEPS = 60


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def blob(size, center, radius, width=1.5):
    """A smooth ball image ``(1, 1, *size)`` in [0, 1] and its mask (radius in voxels)."""
    g = spatial.identity_grid(size)[0]
    dist = sum((g[i] - center[i]) ** 2 for i in range(3)).sqrt()
    return torch.sigmoid((radius - dist) / width)[None, None], (dist <= radius).float()[None, None]


def smooth_pair(size=ODD_SIZE, batch=1):
    """Two different smooth images (balls of different centres plus a gentle ramp)."""
    c = [(s - 1) / 2 for s in size]
    m, _ = blob(size, [c[0] + 2, c[1] - 1, c[2] + 1], min(size) / 4)
    f, _ = blob(size, c, min(size) / 4)
    ramp = spatial.identity_grid(size)[:, :1] / (4 * size[0])
    return (m + ramp).repeat(batch, 1, 1, 1, 1), (f + ramp).repeat(batch, 1, 1, 1, 1)


# --------------------------------------------------------------------------- parameter count
def test_parameter_count_matches_reference_plus_se_fix():
    paper = build_model("paper")
    diff = build_model("paper_diff")
    n_paper = sum(p.numel() for p in paper.parameters() if p.requires_grad)
    n_diff = sum(p.numel() for p in diff.parameters() if p.requires_grad)
    got = paper.parameter_breakdown()
    print("\nparameters of 'paper' (ours vs spec section 6):")
    for key, value in got.items():
        spec = SPEC_BREAKDOWN_M.get(key)
        print(f"  {key:16s} {value:>10,d}   spec {f'{spec:.3f} M' if spec is not None else '-'}")
    print(f"  paper_diff total {n_diff:,d} (spec 8,408,807 + 16)")
    assert n_paper == 8_408_047 + 16 == got["total"]
    assert n_diff == 8_408_807 + 16
    for key, spec in SPEC_BREAKDOWN_M.items():
        # the spec rounds to 3 decimals (level-5 SFE to 1, Mamba to 2)
        decimals = 1 if key == "level5_sfe" else 2 if key == "mamba_layers" else 3
        assert round(got[key] / 1e6, decimals) == spec, key
    # the 16 extra parameters of the SE fix: SE(8) and SE(16) each get one hidden unit
    assert got["encoder"] == 886_456


# --------------------------------------------------------------------------- config & presets
def test_config_validation_errors_are_one_line():
    bad = [
        dict(channels=0),
        dict(sir_iters=0),
        dict(sir_iters=1.5),
        dict(diff="yes"),
        dict(sir_block="lstm"),
        dict(level_block="transformer"),
        dict(mamba_backend=""),
        dict(sir_block="transformer", attn_heads=7),
    ]
    for kwargs in bad:
        with pytest.raises(PsmambaError) as info:
            ModelConfig(**kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(PsmambaError, match="unknown mamba_backend"):
        build_model("paper", mamba_backend="gpu-magic")
    with pytest.raises(PsmambaError, match="unknown model preset"):
        build_model("papper")
    with pytest.raises(PsmambaError, match="unknown key"):
        ModelConfig.from_dict({"channels": 4, "chanels": 4})


def test_config_dict_and_yaml_round_trip(tmp_path):
    cfg = ModelConfig(channels=2, sir_iters=5, diff=True, sir_block="transformer", attn_heads=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    path = save_yaml(tmp_path / "model.yaml", cfg)
    assert ModelConfig.from_dict(load_yaml(path)) == cfg
    (tmp_path / "bad.yaml").write_text("channels: [1, 2\n")
    with pytest.raises(PsmambaError, match="bad.yaml"):
        load_yaml(tmp_path / "bad.yaml")


def test_presets_are_configs_of_one_class():
    table = {  # (level-5 block, level 4..1 block, K) per Table 4 row
        "baseline_conv": ("conv", "conv", 1),
        "sir_transformer": ("transformer", "conv", 3),
        "sir_mamba": ("mamba", "conv", 3),
        "sir_smb": ("smb", "conv", 3),
        "smb_only": ("smb", "smb", 1),
        "sir_transformer_smb": ("transformer", "smb", 3),
        "sir_mamba_smb": ("mamba", "smb", 3),
        "sir_smb_smb": ("smb", "smb", 3),
    }
    for name, (sir, level, k) in table.items():
        cfg = PRESETS[name]
        assert (cfg.sir_block, cfg.level_block, cfg.sir_iters, cfg.diff, cfg.channels) == (sir, level, k, False, 4)
    assert PRESETS["paper"] == PRESETS["sir_smb_smb"]
    assert PRESETS["paper_diff"] == PRESETS["paper"].replace(diff=True)
    assert not PRESETS["baseline_conv"].refines and PRESETS["paper"].refines
    assert build_model("paper", sir_iters=5).sir.iters == 5
    model = build_model(PRESETS["sir_mamba"])
    assert type(model) is PSMambaNet
    assert model.sir.block.kind == "mamba" and all(d.kind == "conv" for d in model.decoders)


# --------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_shapes_init_and_gradients(name):
    """Odd-sized input: shapes, a near-identity start, and a gradient for every parameter."""
    model = build_model(name)
    moving, fixed = smooth_pair(SMALL_ODD_SIZE)
    out = model(moving, fixed)
    assert isinstance(out, RegistrationOutput)
    assert out.warped.shape == (1, 1, *SMALL_ODD_SIZE) and out.ddf.shape == (1, 3, *SMALL_ODD_SIZE)
    # registration heads start at N(0, 1e-5): the field is ~0 and the warped image ~ moving
    assert float(out.ddf.detach().abs().max()) < 0.1
    assert float((out.warped.detach() - moving).abs().max()) < 0.05
    # warped is the ORIGINAL moving image resampled with the cropped field
    torch.testing.assert_close(out.warped, spatial.warp(moving, out.ddf))

    loss = (out.warped - fixed).pow(2).mean() + out.ddf.pow(2).mean()
    loss.backward()
    inert = {id(p) for _, p in inert_parameters(model)}
    dead = []
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} received no gradient"
        assert bool(torch.isfinite(p.grad).all()), f"{name}: {pname} has a non-finite gradient"
        if id(p) not in inert and float(p.grad.abs().max()) == 0.0:
            dead.append(pname)
    assert not dead, f"{name}: zero gradient for {dead}"
    # conv biases in front of a non-affine instance norm: gradient zero up to rounding
    for pname, p in inert_parameters(model):
        weight = model.get_parameter(pname.rsplit(".", 1)[0] + ".weight")
        assert float(p.grad.abs().max()) <= 1e-3 * float(weight.grad.abs().max()) + 1e-30, pname


def test_batch_of_two_equals_two_single_pairs():
    model = build_model("sir_mamba_smb").eval()
    m1, f1 = smooth_pair()
    m2, f2 = f1.clone(), m1.flip(2)
    with torch.no_grad():
        both = model(torch.cat([m1, m2]), torch.cat([f1, f2]))
        one = model(m1, f1)
        two = model(m2, f2)
    assert both.ddf.shape == (2, 3, *ODD_SIZE) and both.warped.shape == (2, 1, *ODD_SIZE)
    torch.testing.assert_close(both.ddf, torch.cat([one.ddf, two.ddf]), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(both.warped, torch.cat([one.warped, two.warped]), atol=1e-6, rtol=1e-4)


def test_swapping_moving_and_fixed_changes_the_output():
    model = build_model("paper").eval()
    moving, fixed = smooth_pair(SMALL_ODD_SIZE)
    with torch.no_grad():
        a = model(moving, fixed).ddf
        b = model(fixed, moving).ddf
    scale = float(a.abs().max())
    assert scale > 0
    assert float((a - b).abs().max()) > 1e-2 * scale


def test_input_validation():
    model = build_model("baseline_conv")
    x = torch.rand(1, 1, 20, 20, 20)
    cases = [
        ((x[0], x[0]), "shape"),
        ((x.repeat(1, 2, 1, 1, 1), x), "shape"),
        ((x, torch.rand(1, 1, 20, 20, 21)), "same shape"),
        ((x, (x * 10).long()), "floating"),
        ((torch.rand(1, 1, 16, 12, 16), torch.rand(1, 1, 16, 12, 16)), "too small"),
        ((x, torch.where(x > 0.5, float("nan"), x)), "NaN"),
        (("image", x), "torch.Tensor"),
    ]
    for (moving, fixed), msg in cases:
        with pytest.raises(PsmambaError, match=msg) as info:
            model(moving, fixed)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- SIR and _diff
class _ConstantBlock(torch.nn.Module):
    """Stands in for a decoder block: returns a constant displacement, counts its calls."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.calls = 0

    def forward(self, f, m):
        self.calls += 1
        return torch.full((f.shape[0], 3, *f.shape[2:]), self.value, dtype=f.dtype)


@pytest.mark.parametrize("iters", [1, 2, 3, 5])
def test_sir_runs_one_shared_block_k_times_and_composes(iters):
    block = _ConstantBlock(0.25)
    sir = SubstrateIterativeRefinement(block, iters=iters)
    f = torch.rand(1, 4, 12, 12, 12)
    phi = sir(f, f.clone())
    assert block.calls == iters
    # composing constant translations adds them (phi o (id + w) + w); zero padding corrupts
    # the far border, one more voxel per composition, so look below it
    n = 12 - iters
    interior = phi[:, :, :n, :n, :n]
    torch.testing.assert_close(interior, torch.full_like(interior, 0.25 * iters))


def test_model_sir_block_is_shared_and_diff_integrates(monkeypatch):
    calls = {"integrate": 0, "sir_block": 0}
    real = spatial.integrate_svf

    def counting(svf, steps=7, **kw):
        calls["integrate"] += 1
        assert steps == 7
        return real(svf, steps=steps, **kw)

    monkeypatch.setattr(spatial, "integrate_svf", counting)
    model = build_model("paper_diff").eval()
    model.sir.block.register_forward_hook(lambda *a: calls.__setitem__("sir_block", calls["sir_block"] + 1))
    moving, fixed = smooth_pair(SMALL_ODD_SIZE)
    with torch.no_grad():
        model(moving, fixed)
    assert calls == {"integrate": 5, "sir_block": 3}  # levels 4..1 once each + SIR result once
    calls.update(integrate=0, sir_block=0)
    plain = build_model("paper").eval()
    plain.sir.block.register_forward_hook(lambda *a: calls.__setitem__("sir_block", calls["sir_block"] + 1))
    with torch.no_grad():
        plain(moving, fixed)
    assert calls == {"integrate": 0, "sir_block": 3}
    # the _diff encoder starts with a plain conv + LeakyReLU 1 -> c
    stem = model.encoder.encoder.levels[0][0]
    assert isinstance(stem, torch.nn.Conv3d) and (stem.in_channels, stem.out_channels) == (1, 4)


# --------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_strict(tmp_path):
    model = build_model("sir_mamba_smb", sir_iters=2)
    with torch.no_grad():  # make the weights differ from a fresh initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_checkpoint(tmp_path / "model.pt", model, epoch=7, metrics={"dice": 0.5})
    assert not [p for p in tmp_path.iterdir() if p.name != "model.pt"]  # no temp file left behind
    loaded, ckpt = load_checkpoint(path)
    assert loaded.config == model.config and not loaded.training
    assert ckpt["epoch"] == 7 and ckpt["metrics"] == {"dice": 0.5}
    assert ckpt["config"] == model.config.to_dict()
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    moving, fixed = smooth_pair(SMALL_ODD_SIZE)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(moving, fixed).ddf, model(moving, fixed).ddf)
    other, _ = load_checkpoint(path, mamba_backend="reference")
    assert other.config.mamba_backend == "reference"
    with pytest.raises(PsmambaError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", model, config={})


def test_checkpoint_errors_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    mismatched = tmp_path / "mismatched.pt"
    model = build_model("baseline_conv")
    save_checkpoint(mismatched, model)
    ckpt = torch.load(mismatched, weights_only=True)
    ckpt["config"]["channels"] = 2  # weights of c = 4 under a c = 2 config
    torch.save(ckpt, mismatched)
    diverged = tmp_path / "diverged.pt"  # a training that blew up: NaN weights (crashed deep inside before)
    ckpt = torch.load(mismatched, weights_only=True)
    ckpt["config"]["channels"] = 4
    first = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][first][...] = float("nan")
    torch.save(ckpt, diverged)
    for path, msg in [
        (diverged, f"NaN or infinite values \\({first}\\)"),
        (corrupt, "not a readable checkpoint"),
        (foreign, "not a psmamba checkpoint"),
        (mismatched, "weights do not match"),
        (tmp_path / "missing.pt", "not found"),
    ]:
        with pytest.raises(PsmambaError, match=msg) as info:
            load_checkpoint(path)
        text = str(info.value)
        assert path.name in text and "\n" not in text


def test_text_file_as_checkpoint_says_what_failed(tmp_path):
    # torch.load on a text file raises KeyError('104'): the line must not end in a bare number
    text_file = tmp_path / "notes.pt"
    text_file.write_text("hello world\n")
    with pytest.raises(PsmambaError) as info:
        load_checkpoint(text_file)
    msg = str(info.value)
    assert "notes.pt" in msg and "not written by torch.save" in msg
    assert not msg.rstrip(")").split("(")[-1].strip().isdigit(), msg


# --------------------------------------------------------------------------- optimisation
def textured_blob_pair(n=32, shift=(3.0, -2.0, 2.0), texture=1.0):
    """A smooth textured ball (fixed) and the same ball moved by ``shift`` voxels (moving).

    ``moving(p) = fixed(p - shift)``, so the field that registers moving onto fixed is
    ``ddf = +shift``. Returns ``fixed, moving, fixed_mask, moving_mask`` (``(1, 1, n, n, n)``).
    """
    gen = torch.Generator().manual_seed(1)
    g = spatial.identity_grid((n, n, n))[0]
    dist = sum((g[i] - (n - 1) / 2) ** 2 for i in range(3)).sqrt()
    radius = 10.0 * n / 32
    # a sharp-ish edge and a strong texture give LNCC a clear optimum (a blurrier, smaller
    # ball left Dice near 0.83 with the right mean shift: LNCC is flat across soft edges)
    soft = torch.sigmoid((radius - dist) / 1.0)[None, None]
    mask = (dist <= radius).float()[None, None]
    noise = torch.randn(1, 1, n, n, n, generator=gen)
    taps = torch.exp(-torch.arange(-4, 5.0) ** 2 / 8.0)  # Gaussian, sigma 2, separable blur
    taps = taps / taps.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 9
        pad = [4 if i == axis else 0 for i in range(3)]
        noise = torch.nn.functional.conv3d(noise, taps.view(shape), padding=pad)
    noise = (noise - noise.mean()) / noise.std()
    fixed = soft * (1 + texture * noise.clamp(-2, 2) / 2)
    fixed = fixed / fixed.max()
    field = -torch.tensor(shift).view(1, 3, 1, 1, 1).expand(1, 3, n, n, n)
    moving = spatial.warp(fixed, field)
    moving_mask = spatial.warp(mask, field, mode="nearest")
    return fixed, moving, mask, moving_mask


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


def fit_pair(name: str, steps: int, lr: float, decay: bool = True):
    """Adam on one pair with the paper's loss (LNCC window 9 + 1 x diffusion).

    Returns ``(initial Dice, final Dice, final ddf)``; ``decay`` anneals lr to 0 (cosine).
    """
    from psmamba.losses import LNCC, Diffusion

    fixed, moving, fixed_mask, moving_mask = textured_blob_pair()
    model = build_model(name)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if decay:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    similarity, regulariser = LNCC(window=9), Diffusion()
    for _ in range(steps):
        out = model(moving, fixed)
        loss = similarity(out.warped, fixed) + regulariser(out.ddf)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if decay:
            sched.step()
    model.eval()
    with torch.no_grad():
        ddf = model(moving, fixed).ddf
    warped_mask = spatial.warp(moving_mask, ddf, mode="nearest")
    return _dice(moving_mask, fixed_mask), _dice(warped_mask, fixed_mask), ddf


def test_paper_starts_recovering_a_shift():
    """Fast version of the optimisation test: ten steps already give a clear Dice gain.

    Recorded: Dice 0.698 -> 0.822 after 10 steps (the slow test below reaches > 0.9).
    """
    initial, final, ddf = fit_pair("paper", steps=FAST_STEPS, lr=3e-4, decay=False)
    assert initial < 0.72
    assert final > initial + 0.08, (initial, final)
    assert bool(torch.isfinite(ddf).all())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper", "paper_diff"])
def test_optimisation_recovers_a_shift(name):
    """Adam steps with the paper's loss recover a 4-voxel shift of a 32^3 ball: Dice > 0.9.

    The issue asks for "a few hundred" steps; 60 (cosine-annealed lr) suffice here: in the run
    recorded in the model's report, ``paper`` passed Dice 0.9 after ~15 steps and reached 1.0
    after ~35.
    """
    from psmamba.metrics import folding_percent

    initial, final, ddf = fit_pair(name, steps=SLOW_STEPS, lr=3e-4)
    assert final > 0.9 > initial, (initial, final)
    if name == "paper_diff":
        assert folding_percent(ddf) == 0.0
