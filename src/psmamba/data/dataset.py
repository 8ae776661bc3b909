"""A torch ``Dataset`` of registration pairs that reads volumes lazily, and a loader.

Only the two volumes of the pair being served are in memory (plus an optional small LRU
of recently used volumes); preprocessed volumes come from the on-disk cache
(:mod:`psmamba.data.cache`) after the first time.

Each item is a dict:

* ``"moving"``, ``"fixed"``: ``(1, D, H, W)`` float32 tensors,
* ``"moving_labels"``, ``"fixed_labels"``: ``(1, D, H, W)`` int64 tensors, when both volumes
  have labels and ``labels=True``,
* ``"moving_id"``, ``"fixed_id"``: strings,
* ``"moving_affine"``, ``"fixed_affine"``: ``(4, 4)`` float64 tensors (voxel -> world mm).

A ``DataLoader`` batches these into ``(B, 1, D, H, W)``, which needs equal shapes within a
batch: crop/pad with the pipeline, or keep ``batch_size=1`` (the paper's setting).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from psmamba.data.cache import prepare
from psmamba.data.volume import Volume, VolumeRef
from psmamba.errors import PsmambaError

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["PairDataset", "make_loader", "volume_to_tensors"]


def volume_to_tensors(vol: Volume) -> dict[str, torch.Tensor]:
    """``{"image": (1, D, H, W) float32, "labels": (1, D, H, W) int64 (if any), "affine": (4, 4)}``."""
    out = {
        "image": torch.from_numpy(np.ascontiguousarray(vol.image, dtype=np.float32))[None],
        "affine": torch.from_numpy(np.asarray(vol.affine, dtype=np.float64)),
    }
    if vol.labels is not None:
        out["labels"] = torch.from_numpy(np.ascontiguousarray(vol.labels).astype(np.int64))[None]
    return out


class PairDataset(Dataset):
    """Ordered pairs ``(moving, fixed)`` of volumes, loaded and preprocessed on demand.

    Args:
        volumes: the :class:`VolumeRef` objects (a list, or ``{id: ref}``).
        pairs: ``(moving_id, fixed_id)`` tuples.
        pipeline: preprocessing applied to each volume (``None``: none).
        cache_dir: on-disk cache of preprocessed volumes (see :mod:`psmamba.data.cache`).
        use_cache: ``False`` recomputes every time (no disk writes).
        labels: serve label maps when both volumes have them.
        keep_in_memory: how many preprocessed volumes an LRU keeps per worker (0: none).
    """

    def __init__(
        self,
        volumes: Sequence[VolumeRef] | Mapping[str, VolumeRef],
        pairs: Sequence[tuple[str, str]],
        pipeline=None,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        labels: bool = True,
        keep_in_memory: int = 2,
    ) -> None:
        self.volumes = dict(volumes) if isinstance(volumes, Mapping) else {v.id: v for v in volumes}
        self.pairs = [(str(m), str(f)) for m, f in pairs]
        for i, (m, f) in enumerate(self.pairs):
            for v in (m, f):
                if v not in self.volumes:
                    raise PsmambaError(f"pair {i} ({m} -> {f}) names volume {v!r}, which is not in the data set")
        self.pipeline = pipeline
        self.cache_dir = cache_dir
        self.use_cache = use_cache
        self.labels = labels
        self.keep_in_memory = int(keep_in_memory)
        self._lru: OrderedDict[str, Volume] = OrderedDict()

    def __len__(self) -> int:
        return len(self.pairs)

    def volume(self, vid: str) -> Volume:
        """The preprocessed volume ``vid`` (from the LRU, the disk cache, or computed)."""
        if vid in self._lru:
            self._lru.move_to_end(vid)
            return self._lru[vid]
        vol = prepare(self.volumes[vid], self.pipeline, self.cache_dir, self.use_cache)
        if self.keep_in_memory > 0:
            self._lru[vid] = vol
            while len(self._lru) > self.keep_in_memory:
                self._lru.popitem(last=False)
        return vol

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair index {index} out of range for {len(self)} pairs")
        m_id, f_id = self.pairs[index]
        mov, fix = self.volume(m_id), self.volume(f_id)
        tm, tf = volume_to_tensors(mov), volume_to_tensors(fix)
        item = {
            "moving": tm["image"], "fixed": tf["image"],
            "moving_id": m_id, "fixed_id": f_id,
            "moving_affine": tm["affine"], "fixed_affine": tf["affine"],
        }
        if self.labels and "labels" in tm and "labels" in tf:
            item["moving_labels"] = tm["labels"]
            item["fixed_labels"] = tf["labels"]
        return item

    def prepare_all(self, on_error: str = "raise", progress: bool = False) -> list[tuple[str, str]]:
        """Preprocess (and cache) every volume used by the pairs once, ahead of training; with
        ``labels``, a label map with no label (every voxel 0) counts as a failure.

        Args:
            on_error: ``"raise"`` stops at the first bad volume; ``"skip"`` drops it and every
                pair that uses it, and returns the ``(id, reason)`` list (nothing is skipped
                silently: print it).
            progress: show a tqdm bar.

        Returns:
            ``[(volume id, reason)]`` of what was left out (empty when all volumes loaded).
        """
        if on_error not in ("raise", "skip"):
            raise PsmambaError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        used = list(dict.fromkeys(v for p in self.pairs for v in p))
        it = used
        if progress:
            from tqdm import tqdm

            it = tqdm(used, desc="preparing volumes", unit="vol")
        bad: list[tuple[str, str]] = []
        for vid in it:
            try:
                vol = prepare(self.volumes[vid], self.pipeline, self.cache_dir, self.use_cache)
                if self.labels and vol.labels is not None and not vol.labels.any():  # Dice refuses it
                    where = getattr(self.volumes[vid], "label_path", None) or vid
                    raise PsmambaError(f"{where}: the label map holds no label (every voxel is 0)")
            except PsmambaError as exc:
                if on_error == "raise":
                    raise
                bad.append((vid, str(exc)))
        if bad:
            drop = {b for b, _ in bad}
            self.pairs = [(m, f) for m, f in self.pairs if m not in drop and f not in drop]
        return bad


def make_loader(
    dataset: Dataset,
    batch_size: int = 1,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int | None = 0,
    **kwargs,
) -> DataLoader:
    """A ``DataLoader`` over a pair data set (the paper: batch 1, shuffled each epoch).

    ``seed`` fixes the shuffle order (one ``torch.Generator``); ``None`` leaves it random.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=generator, **kwargs)
