"""The pair data sets a training run uses: what ``TrainConfig.data`` describes, batched.

* :func:`build_datasets`: the training and validation pair data sets of a config (the demo,
  a folder or published layout, or SynthMorph-style pairs made on the fly);
* :class:`SynthEpochs`: new synthetic pairs every epoch, reproducibly;
* :class:`Resized`: pairs resampled to one grid on the fly (``data.resize``);
* :func:`collate_pairs`: pair dicts -> one batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psmamba.config import TrainConfig
from psmamba.errors import PsmambaError, first_line

__all__ = ["collate_pairs", "SynthEpochs", "Resized", "build_datasets", "resize_datasets", "open_file_source"]


def collate_pairs(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack pair dicts into a batch.

    Each item holds ``moving`` and ``fixed`` ``(1, D, H, W)`` float volumes (``(D, H, W)`` is
    accepted), optional integer ``moving_labels`` / ``fixed_labels`` and optional ids. The
    batch holds ``moving``, ``fixed`` ``(B, 1, D, H, W)`` float32, the labels ``(B, 1, D, H, W)``
    int64 when every item has them (then also ``num_classes``, ``1 +`` their largest code, an
    int), and ``moving_id`` / ``fixed_id`` lists. Images with NaN or infinite values fail here,
    on the host.
    """
    if not items:
        raise PsmambaError("collate_pairs: empty batch")
    out: dict[str, Any] = {}
    for key in ("moving", "fixed"):
        vols = []
        for item in items:
            if key not in item:
                raise PsmambaError(f"a training pair has no {key!r} volume (keys: {sorted(item)})")
            vols.append(_as_volume(item[key], key, torch.float32))
        _same_shapes(vols, key)
        out[key] = torch.stack(vols)
        # checked here, on the host, where it costs no device sync (the network checks again,
        # asynchronously on a GPU, where a failure is a crude device-side assert)
        if not bool(torch.isfinite(out[key]).all()):
            bad = [str(item.get(f"{key}_id", i)) for i, item in enumerate(items) if not torch.isfinite(vols[i]).all()]
            raise PsmambaError(f"{key} volume {', '.join(bad)} contains NaN or infinite values")
    if out["moving"].shape != out["fixed"].shape:
        raise PsmambaError(
            f"moving {tuple(out['moving'].shape[2:])} and fixed {tuple(out['fixed'].shape[2:])} grids differ"
        )
    for key in ("moving_labels", "fixed_labels"):
        if all(item.get(key) is not None for item in items):
            labs = [_as_volume(item[key], key, torch.int64) for item in items]
            _same_shapes(labs, key)
            out[key] = torch.stack(labs)
    if "moving_labels" in out and "fixed_labels" in out:
        # the Dice loss's class count, read here on the host (on the device it would be a sync)
        out["num_classes"] = int(max(out["moving_labels"].max(), out["fixed_labels"].max())) + 1
    for key in ("moving_id", "fixed_id"):
        out[key] = [str(item.get(key, "")) for item in items]
    return out


def _as_volume(x: Any, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[0] != 1:
        raise PsmambaError(f"{name} must be a (1, D, H, W) volume, got shape {tuple(t.shape)}")
    return t.to(dtype)


def _same_shapes(vols: list[torch.Tensor], name: str) -> None:
    shapes = {tuple(v.shape) for v in vols}
    if len(shapes) > 1:
        raise PsmambaError(f"{name}: volumes of one batch differ in shape {sorted(shapes)}; use batch_size 1")


#: ``data.options`` keys the engine handles itself for file sources; the rest go to the reader
_FILE_OPTIONS = ("pipeline", "cache_dir", "test", "atlas", "atlas_direction")
_LAYOUT_OF = {"abdomenct": "abdomen"}


class SynthEpochs(torch.utils.data.Dataset):
    """SynthMorph-style pairs, new ones every epoch: item ``i`` of epoch ``e`` is drawn from seed
    ``seed + e * length + i`` (reproducible, so a resumed run sees the same pairs).

    The training loop calls :meth:`set_epoch` before each epoch (the ``DistributedSampler``
    convention). Items: see :class:`psmamba.data.synth.SynthPairDataset`.
    """

    def __init__(self, length: int, seed: int, shape=(64, 64, 64), config=None, fresh: bool = True) -> None:
        from psmamba.data.synth import SynthPairDataset

        self.length, self.seed, self.fresh = int(length), int(seed), bool(fresh)
        self._make = lambda s: SynthPairDataset(self.length, shape=tuple(shape), config=config, seed=s)
        self.epoch = 0
        self._ds = self._make(self.seed)

    def set_epoch(self, epoch: int) -> None:
        if self.fresh and epoch != self.epoch:
            self.epoch = int(epoch)
            self._ds = self._make(self.seed + self.epoch * self.length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self._ds[index]


class Resized(torch.utils.data.Dataset):
    """Pairs of another data set resampled to one grid ``size = (D, H, W)`` on the fly.

    Images trilinear and labels nearest-neighbour, both with ``align_corners=True`` (the corner
    voxels of the two grids coincide, as :func:`psmamba.spatial.resize_ddf` assumes), so a field
    predicted on this grid maps back with ``resize_ddf``.
    """

    def __init__(self, dataset, size: Sequence[int]) -> None:
        self.dataset = dataset
        self.size = tuple(int(s) for s in size)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _resize(self, x: torch.Tensor, labels: bool) -> torch.Tensor:
        from psmamba.spatial import resize_volume

        x = torch.as_tensor(x)
        if tuple(x.shape[-3:]) == self.size:
            return x
        out = resize_volume(x.reshape(1, 1, *x.shape[-3:]), self.size, labels=labels)
        return out.to(x.dtype)[0]

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        for key in ("moving", "fixed"):
            item[key] = self._resize(item[key], labels=False)
        for key in ("moving_labels", "fixed_labels"):
            if item.get(key) is not None:
                item[key] = self._resize(item[key], labels=True)
        return item


def open_file_source(cfg: TrainConfig):
    """The file source ``cfg.data`` names, and its subject splits as ``psmamba train`` draws them.

    Returns ``(source, splits, engine_options)``: :func:`psmamba.data.open_source` on
    ``data.root`` with the layout of ``data.source``; ``source.make_splits(val=data.val_fraction,
    test=data.options.test (default 0.2), seed=run.seed)`` (a published split keeps its own
    parts: :meth:`psmamba.data.SourceData.make_splits`); the ``data.options`` handled here (``pipeline``, ``cache_dir``, ``test``,
    ``atlas``, ``atlas_direction``). Every other option goes to the reader.
    """
    from psmamba.data.sources import open_source

    d = cfg.data
    options = dict(d.options)
    root = Path(str(d.root)).expanduser()
    if not root.exists():
        raise PsmambaError(f"data.root {root} does not exist")
    engine_opts = {k: options.pop(k) for k in _FILE_OPTIONS if k in options}
    layout = _LAYOUT_OF.get(d.source, d.source)
    try:
        src = open_source(root, layout=layout, **options)
    except TypeError as exc:
        raise PsmambaError(f"data.options: {first_line(exc)} (options of the {layout} reader)") from None
    return src, src.make_splits(val=d.val_fraction, test=engine_opts.get("test", 0.2), seed=cfg.run.seed), engine_opts


def build_datasets(cfg: TrainConfig):
    """The training and validation pair data sets that ``cfg.data`` describes.

    * ``demo``: :func:`psmamba.data.build_demo` (``data.size``; ``data.options`` go to it), its
      ``train`` and ``val`` splits (the ``test`` pairs are never touched here).
    * file sources: :func:`psmamba.data.open_source` on ``data.root`` with the layout named by
      ``data.source``; ``data.options`` may set ``pipeline`` (a preprocessing preset; default
      the protocol's own), ``cache_dir``, ``test`` (test share when the source publishes no test
      part; default 0.2), ``atlas`` / ``atlas_direction`` (with ``data.pairs: atlas``); every
      other option goes to the reader (``image_glob``, ``label_glob``, ...). Validation subjects
      (``data.val_fraction``) are drawn from the training part, never from the test part, unless
      the source publishes a val part (then that is the validation set).
    * ``synth``: ``data.synth_pairs`` new :mod:`psmamba.data.synth` pairs per epoch;
      ``data.options`` may set ``shape`` (default 64^3) and any ``SynthConfig`` field.
      Validation: ``data.max_val_pairs`` (default 8) fixed pairs from other seeds.
    * ``pretrain``: :func:`psmamba.data.pretrain.build_pretrain` on the grid ``data.resize``
      (default: the demo grid of ``data.size``): ``data.synth_pairs`` pairs per epoch,
      synthetic from atlas label maps or augmented demo ``train`` pairs; validation on the
      demo's ``val`` pairs. ``data.options`` may set ``atlases``, ``real_fraction``,
      ``dice_groups``, ``demo_options`` and any ``SynthConfig`` field.

    Returns ``(train, val)``: map-style data sets of pair dicts; ``val`` is None when empty.

    Raises:
        PsmambaError: missing folder, unknown option, empty split (one line).
    """
    d = cfg.data
    seed = cfg.run.seed
    options = dict(d.options)
    if d.source == "demo":
        from psmamba.data.demo import build_demo

        try:
            demo = build_demo(size=d.size, **options)
        except TypeError as exc:
            raise PsmambaError(f"data.options: {first_line(exc)} (options of psmamba.data.build_demo)") from None
        train = demo.pair_dataset("train", labels=d.use_labels)
        val = demo.pair_dataset("val", labels=d.use_labels) if demo.pairs.get("val") else None
        return train, val
    if d.source == "synth":
        from psmamba.data.synth import SynthConfig

        shape = options.pop("shape", (64, 64, 64))
        if not (isinstance(shape, (list, tuple)) and len(shape) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in shape)):
            raise PsmambaError(f"data.options.shape must be three sizes >= 8, got {shape!r}")
        try:
            synth_cfg = SynthConfig(**options)
        except TypeError as exc:
            raise PsmambaError(f"data.options: {first_line(exc)} (fields of psmamba.data.SynthConfig)") from None
        train = SynthEpochs(d.synth_pairs, seed=seed, shape=shape, config=synth_cfg)
        val = SynthEpochs(d.max_val_pairs or 8, seed=seed + 10**9, shape=shape, config=synth_cfg, fresh=False)
        return train, val

    if d.source == "pretrain":
        from psmamba.data.demo import demo_grid
        from psmamba.data.pretrain import build_pretrain

        grid = d.resize if d.resize is not None else demo_grid(d.size)[0]
        try:
            return build_pretrain(grid, d.synth_pairs, seed=seed, size=d.size, **options)
        except TypeError as exc:
            raise PsmambaError(f"data.options: {first_line(exc)} (options of psmamba.data.pretrain.build_pretrain)") from None

    from psmamba.data.pairs import atlas_pairs

    src, splits, engine_opts = open_file_source(cfg)
    root = Path(str(d.root)).expanduser()
    used = dict(splits)
    if d.pairs == "atlas" and engine_opts.get("atlas") is not None:
        used["atlas"] = [engine_opts["atlas"]]  # in no split, but used
    report_left_out(src, used)
    pipeline = engine_opts.get("pipeline", "preset")
    cache_dir = engine_opts.get("cache_dir")
    parts = []
    for split in ("train", "val"):
        ids = splits.get(split, [])
        pairs = None
        if d.pairs == "atlas":
            atlas = engine_opts.get("atlas")
            if atlas is None:
                raise PsmambaError("data.pairs: atlas needs data.options.atlas (the atlas volume id)")
            if atlas not in src.ids:
                raise PsmambaError(f"data.options.atlas {atlas!r} is not a volume of {root}")
            pairs = atlas_pairs(atlas, ids, engine_opts.get("atlas_direction", "to_atlas"))
        ds = src.pair_dataset(split, splits=splits, pipeline=pipeline, cache_dir=cache_dir,
                              labels=d.use_labels, pairs=pairs)
        prepare_before_use(ds)
        parts.append(ds if len(ds) else None)
    train, val = parts
    if train is None:  # before the validation warning, whose advice would not help
        raise PsmambaError(f"data.root {root}: the training split holds no pairs ({len(splits.get('train', []))} volumes)")
    if val is None and (d.val_fraction > 0 or "val" in src.splits):
        advice = ("the data set's own split names it: give at least two subjects' volumes the split val "
                  "(a manifest's split column, a Val/ folder)" if "val" in src.splits else "raise data.val_fraction")
        warnings.warn(f"data.root {root}: the validation split ({len(splits.get('val', []))} volumes) holds no pairs; "
                      f"no validation, no best.pt ({advice}); last.pt is written")
    return train, val


def prepare_before_use(ds) -> None:
    """Read, check and cache every volume of a pair data set before a run starts: a broken
    file, a label map of another shape or an unknown label code fails here, before any output
    is written, not after hours of training or scoring (each volume is read once either way:
    later reads come from the cache)."""
    import sys

    if len(ds):
        ds.prepare_all(on_error="raise", progress=sys.stderr.isatty() and len(ds.volumes) > 4)


def report_left_out(src, splits: dict[str, list[str]], stream=None) -> None:
    """Print to ``stream`` (stderr) the reader's notes (how it read the data: subjects, counts)
    and what a run on ``src`` will not use: the files it left out, with the reason, and volumes
    in no split (nothing when there is nothing to say)."""
    import sys

    out = sys.stderr if stream is None else stream
    for note in src.notes:
        print(f"psmamba: note: {src.root}: {note}", file=out)
    lines = src.left_out_report(splits)
    if lines:
        print(f"psmamba: note: {src.root}: not used:", file=out)
        for line in lines:
            print(f"  - {line}", file=out)


def resize_datasets(cfg: TrainConfig, train, val):
    """``(train, val)`` resampled on the fly to ``cfg.data.resize`` when it is set (else as given)."""
    if cfg.data.resize is None:
        return train, val
    return Resized(train, cfg.data.resize), (Resized(val, cfg.data.resize) if val is not None else None)
