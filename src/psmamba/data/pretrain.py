"""The pre-training mixture (``data.source: pretrain``): training pairs that need no download.

Each training pair is, with probability ``1 - real_fraction``, a SynthMorph-style pair
(:func:`psmamba.data.synth.synth_pair`) made from one of several real anatomical label maps
(:mod:`psmamba.data.atlases`: Harvard-Oxford, Juelich, Desikan-Killiany, Destrieux, AAL,
Neuromorphometrics, tissue classes), with random smooth deformations, random affine maps, a random
intensity per label, blur, resolution change, bias field, gamma and noise; otherwise a real pair
of the demo's ``train`` split (:mod:`psmamba.data.demo`: deformed copies of three real MNI
templates) with its own random deformation, affine map and the same image augmentations.
Validation uses the demo's real ``val`` pairs only (nothing synthetic, nothing of ``test``).

Everything lives on one grid, the network's (``data.resize``): the label maps are resampled
onto it from the atlas files (:func:`psmamba.data.atlases.atlas_grid` spans the demo's field
of view), the demo volumes are resized to it with :func:`psmamba.spatial.resize_volume`, as
``register`` resizes images for a checkpoint.

Item ``i`` of epoch ``e`` is drawn from one ``torch.Generator`` seeded ``seed + e * length + i``,
so a resumed run (``--resume``) sees the same pairs as an uninterrupted one.

Labels: a synthetic pair's labels are its atlas labels folded into ``dice_groups`` groups
(:func:`psmamba.data.atlases.group_labels`) so that a Dice loss stays cheap; a demo pair keeps
its 14 subcortical labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from psmamba.data.synth import SynthConfig
from psmamba.errors import PsmambaError

__all__ = ["MixedPairs", "build_pretrain"]


class MixedPairs(torch.utils.data.Dataset):
    """``length`` pairs per epoch, synthetic from ``label_maps`` or real from ``volumes``.

    Args:
        label_maps: integer label maps ``(D, H, W)``, all on the training grid.
        volumes: real ``(image (D, H, W) float, labels (D, H, W) int, id)`` on the same grid.
        pairs: ordered ``(i, j)`` index pairs into ``volumes`` (moving, fixed).
        length: pairs per epoch.
        seed: base seed.
        config: :class:`SynthConfig` (deformation, affine and image ranges; both kinds of pair).
        real_fraction: probability that an item is a real pair (0 with no ``pairs``).
        dice_groups: label groups of a synthetic pair (0: keep the atlas labels).
        fresh: new pairs every epoch (``set_epoch``); False keeps epoch 0's.

    Items: ``moving``, ``fixed`` ``(1, D, H, W)`` float32 in [0, 1], ``moving_labels``,
    ``fixed_labels`` ``(1, D, H, W)`` int64, ``moving_id``, ``fixed_id``.
    """

    def __init__(self, label_maps: Sequence, volumes: Sequence[tuple], pairs: Sequence[tuple[int, int]],
                 length: int, seed: int = 0, config: SynthConfig | None = None, real_fraction: float = 0.25,
                 dice_groups: int = 15, fresh: bool = True) -> None:
        if length < 1:
            raise PsmambaError(f"MixedPairs length must be >= 1, got {length}")
        if not 0.0 <= float(real_fraction) <= 1.0:
            raise PsmambaError(f"data.options.real_fraction must be in [0, 1], got {real_fraction}")
        self.label_maps = [torch.as_tensor(np.asarray(m)).long() for m in label_maps]
        self.volumes = [(torch.as_tensor(np.asarray(im), dtype=torch.float32), torch.as_tensor(np.asarray(lb)).long(),
                         str(vid)) for im, lb, vid in volumes]
        self.pairs = [(int(i), int(j)) for i, j in pairs]
        self.real_fraction = float(real_fraction) if self.pairs else 0.0
        if not self.label_maps and self.real_fraction < 1.0:
            raise PsmambaError("MixedPairs needs label maps unless every pair is real (real_fraction 1)")
        grids = {tuple(m.shape) for m in self.label_maps} | {tuple(v[0].shape) for v in self.volumes} \
            | {tuple(v[1].shape) for v in self.volumes}
        if len(grids) > 1:
            raise PsmambaError(f"MixedPairs: the label maps and volumes lie on different grids {sorted(grids)}")
        for i, j in self.pairs:
            if not (0 <= i < len(self.volumes) and 0 <= j < len(self.volumes)):
                raise PsmambaError(f"MixedPairs: pair ({i}, {j}) is outside the {len(self.volumes)} volumes")
        self.length, self.seed = int(length), int(seed)
        self.config = config or SynthConfig()
        self.dice_groups = int(dice_groups)
        self.fresh = bool(fresh)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if self.fresh:
            self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} pairs")
        g = torch.Generator().manual_seed(self.seed + self.epoch * self.length + index)
        if float(torch.rand((), generator=g)) < self.real_fraction:
            return self._real(g, index)
        return self._synthetic(g, index)

    def _synthetic(self, g: torch.Generator, index: int) -> dict:
        from psmamba.data.atlases import group_labels
        from psmamba.data.synth import synth_pair

        k = int(torch.randint(len(self.label_maps), (), generator=g))
        p = synth_pair(self.label_maps[k][None, None], config=self.config, seed=g)
        ml, fl = p.moving_labels[0], p.fixed_labels[0]
        if self.dice_groups > 0:
            ml, fl = group_labels(ml, self.dice_groups), group_labels(fl, self.dice_groups)
        return {"moving": p.moving[0].float(), "fixed": p.fixed[0].float(), "moving_labels": ml, "fixed_labels": fl,
                "moving_id": f"synth{k}-{index}-moving", "fixed_id": f"synth{k}-{index}-fixed"}

    def _real(self, g: torch.Generator, index: int) -> dict:
        from psmamba.data.synth import augment_image, random_deformation
        from psmamba.spatial import warp

        i, j = self.pairs[int(torch.randint(len(self.pairs), (), generator=g))]
        out = {}
        for side, v in (("moving", i), ("fixed", j)):
            image, labels, vid = self.volumes[v]
            ddf = random_deformation(tuple(image.shape), self.config, seed=g)
            img = warp(image[None, None], ddf, mode="bilinear", padding="zeros")
            lab = warp(labels[None, None], ddf, mode="nearest", padding="zeros")
            out[side] = augment_image(img, self.config, seed=g)[0]
            out[f"{side}_labels"] = lab[0]
            out[f"{side}_id"] = f"{vid}-aug{index}"
        return out


class _ListPairs(torch.utils.data.Dataset):
    """Fixed pairs of in-memory volumes (the validation pairs)."""

    def __init__(self, volumes: Sequence[tuple], pairs: Sequence[tuple[int, int]]) -> None:
        self.volumes, self.pairs = list(volumes), list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        i, j = self.pairs[index]
        (mi, ml, mid), (fi, fl, fid) = self.volumes[i], self.volumes[j]
        return {"moving": mi[None].float(), "fixed": fi[None].float(), "moving_labels": ml[None].long(),
                "fixed_labels": fl[None].long(), "moving_id": mid, "fixed_id": fid}


def _demo_volumes(demo, split: str, grid: tuple[int, int, int]) -> tuple[list[tuple], list[tuple[int, int]]]:
    """The demo split's volumes resized to ``grid`` (as ``register`` resizes) and its pairs as indices."""
    from psmamba.spatial import resize_volume

    ids = list(demo.splits.get(split, []))
    vols = []
    for vid in ids:
        v = demo.load(vid)
        img = resize_volume(torch.as_tensor(np.asarray(v.image, dtype=np.float32))[None, None], grid)[0, 0]
        lab = resize_volume(torch.as_tensor(np.asarray(v.labels).astype(np.int64))[None, None], grid, labels=True)[0, 0]
        vols.append((img, lab, vid))
    index = {vid: n for n, vid in enumerate(ids)}
    pairs = [(index[m], index[f]) for m, f in demo.pairs.get(split, []) if m in index and f in index]
    return vols, pairs


def build_pretrain(grid: Sequence[int], length: int, seed: int, size: str = "full", atlases=None,
                   real_fraction: float = 0.25, dice_groups: int = 15, demo_options: dict | None = None,
                   cache_dir=None, **synth_options) -> tuple[MixedPairs, _ListPairs | None]:
    """The training mixture and the demo validation pairs on ``grid``.

    Args:
        grid: the training grid ``(D, H, W)``.
        length: training pairs per epoch.
        seed: base seed (``run.seed``).
        size: the demo size whose volumes are resized to the grid (``full``: what ``register``
            sees at 160x192x160) and whose field of view the label maps span.
        atlases: names of :data:`psmamba.data.atlases.ATLASES` (default: all installed).
        real_fraction, dice_groups: see :class:`MixedPairs`.
        demo_options: keyword arguments of :func:`psmamba.data.build_demo`.
        cache_dir: cache root of the label maps (default ``PSMAMBA_CACHE`` / ``~/.cache/psmamba``).
        synth_options: fields of :class:`SynthConfig`.

    Returns:
        ``(train, val)``; ``val`` is None when the demo has no validation pairs.
    """
    from psmamba.data.atlases import atlas_label_maps
    from psmamba.data.demo import build_demo

    grid = tuple(int(s) for s in grid)
    try:
        config = SynthConfig(**synth_options)
    except TypeError as exc:
        raise PsmambaError(f"data.options: {str(exc).splitlines()[0]} (fields of psmamba.data.SynthConfig)") from None
    if isinstance(atlases, str):
        atlases = [atlases]
    maps = list(atlas_label_maps(atlases, grid, size, cache_dir).values()) if real_fraction < 1 else []
    demo = build_demo(size=size, **(demo_options or {}))
    train_vols, train_pairs = _demo_volumes(demo, "train", grid)
    val_vols, val_pairs = _demo_volumes(demo, "val", grid)
    train = MixedPairs(maps, train_vols, train_pairs, length, seed=seed, config=config,
                       real_fraction=real_fraction, dice_groups=dice_groups)
    val = _ListPairs(val_vols, val_pairs) if val_pairs else None
    return train, val
