"""Learn2Reg AbdomenCTCT (inter-patient abdominal CT), as the challenge distributes it.

Layout::

    AbdomenCTCT_dataset.json           lists "training" {image, label} and "registration_val" {fixed, moving}
    imagesTr/AbdomenCTCT_0001_0000.nii.gz
    labelsTr/AbdomenCTCT_0001_0000.nii.gz

Labels ``1..13`` (spleen ... left adrenal gland; names from the JSON when it has them).
Protocol: the volumes in ``registration_val`` pairs are the test split, with exactly those
pairs (moving, fixed); the other training volumes form the training split (all ordered pairs).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from psmamba.data.labels import ABDOMEN, ABDOMEN_NAMES, LabelMap, as_label_map
from psmamba.data.sources import Skipped, SourceData, find_files, strip_image_ext
from psmamba.data.volume import FileVolumeRef
from psmamba.errors import PsmambaError

__all__ = ["read_abdomen"]


def _case_id(rel: str) -> str:
    """``"./imagesTr/AbdomenCTCT_0001_0000.nii.gz"`` -> ``"AbdomenCTCT_0001"`` (channel suffix dropped)."""
    stem = strip_image_ext(Path(rel).name)
    return re.sub(r"_\d{4}$", "", stem)


def _label_names(data: dict, json_path: Path) -> dict[int, str] | None:
    labels = data.get("labels")
    if not labels:
        return None
    if isinstance(labels, dict) and all(isinstance(v, dict) for v in labels.values()):
        labels = next(iter(labels.values()))  # {"0": {"0": "background", ...}}: one modality's table
    try:
        if isinstance(labels, dict):
            names = {int(k): str(v) for k, v in labels.items()}
        else:
            names = {i: str(v) for i, v in enumerate(labels)}
    except (TypeError, ValueError):
        raise PsmambaError(f"{json_path}: 'labels' must map integer codes to names") from None
    names.pop(0, None)
    return names


def _entry(item: Any, key: str, where: str, json_path: Path) -> str:
    if not isinstance(item, dict) or key not in item:
        raise PsmambaError(f"{json_path}: {where} has no {key!r} entry (got {item!r:.80})")
    return str(item[key]).replace("\\", "/")  # a JSON written on Windows: imagesTr\\AbdomenCTCT_...


def read_abdomen(
    root: str | os.PathLike,
    json_name: str = "*_dataset.json",
    image_dir: str = "imagesTr",
    label_dir: str = "labelsTr",
    label_map: LabelMap | str | None = "json",
    require_labels: bool = True,
) -> SourceData:
    """List the AbdomenCTCT volumes and pairs under ``root`` (or from its JSON file).

    Args:
        root: the data set folder, or its ``*_dataset.json``.
        json_name: glob of the JSON file inside ``root``; without one, images are globbed from
            ``image_dir`` and labels matched by file name in ``label_dir`` (noted).
        label_map: ``"json"`` (identity over the JSON's label table, else the 13 organs),
            a :class:`LabelMap`, a protocol name, or ``None`` (raw codes).
        require_labels: leave out (and report) images without a label map.

    Raises:
        PsmambaError: missing folder, invalid JSON, an entry without ``image``/``fixed``/``moving``,
            or a listed pair naming a volume that does not exist.
    """
    root = Path(root)
    json_path: Path | None = None
    if root.is_file():
        json_path, root = root, root.parent
    if not root.is_dir():
        raise PsmambaError(f"{root}: AbdomenCTCT folder not found")
    if json_path is None:
        found = sorted(root.glob(json_name))
        json_path = found[0] if found else None
    skipped: list[Skipped] = []
    notes: list[str] = []
    data: dict = {}
    if json_path is not None:
        try:
            data = json.loads(json_path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PsmambaError(f"{json_path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise PsmambaError(f"{json_path}: expected a JSON object with 'training' and 'registration_val'")
    else:
        notes.append(f"no {json_name} in {root}: volumes globbed from {image_dir}/, no listed pairs")

    if label_map == "json":
        names = _label_names(data, json_path) if json_path else None
        label_map = LabelMap.identity(names, name="abdomenctct") if names else ABDOMEN
        if names and len(names) != len(ABDOMEN_NAMES):
            notes.append(f"{json_path.name} lists {len(names)} labels, the paper's protocol has 13")
    else:
        label_map = as_label_map(label_map)

    entries: list[tuple[str, Path, Path | None]] = []  # (id, image, label)
    if json_path is not None and "training" in data:
        if not isinstance(data["training"], list):
            raise PsmambaError(f"{json_path}: 'training' must be a list of {{image, label}} entries")
        for i, item in enumerate(data["training"]):
            img_rel = _entry(item, "image", f"training[{i}]", json_path)
            lab_rel = item.get("label") if isinstance(item, dict) else None
            lab_rel = str(lab_rel).replace("\\", "/") if lab_rel else None
            if not lab_rel:  # an entry without its label: the label folder's file of the same name
                by_name = root / label_dir / Path(img_rel).name
                lab_rel = by_name.relative_to(root) if by_name.is_file() else None
            entries.append((_case_id(img_rel), root / img_rel, root / lab_rel if lab_rel else None))
    else:
        if json_path is not None:
            notes.append(f"{json_path.name} has no 'training' list: volumes globbed from {image_dir}/")
        for p in find_files(root, f"{image_dir}/*", skipped):
            lab = root / label_dir / p.name
            entries.append((_case_id(p.name), p, lab if lab.exists() else None))
    if not entries:
        raise PsmambaError(f"{root}: no AbdomenCTCT images found (expected {image_dir}/AbdomenCTCT_XXXX_0000.nii.gz)")

    volumes: list[FileVolumeRef] = []
    why: dict[str, str] = {}  # id -> why it is not usable (for the pairs that name it)

    def leave_out(vid: str, path: Path, reason: str) -> None:
        skipped.append(Skipped(str(path), reason))
        why.setdefault(vid, f"{path}: {reason}")

    for vid, img, lab in entries:
        if any(v.id == vid for v in volumes):
            skipped.append(Skipped(str(img), f"{vid} listed twice"))
            continue
        if not img.is_file():
            leave_out(vid, img, "listed in the JSON but not on disk")
            continue
        if lab is not None and not lab.is_file():
            leave_out(vid, lab, "label map listed in the JSON but not on disk")
            lab = None
        if lab is None and require_labels:
            leave_out(vid, img, f"no label map in {label_dir}/")
            continue
        volumes.append(FileVolumeRef(vid, img, lab, subject=vid, label_map=label_map))

    known = {v.id for v in volumes}
    pairs: dict[str, list[tuple[str, str]]] = {}
    listed = data.get("registration_val") if json_path is not None else None
    if listed is not None:
        if not isinstance(listed, list):
            raise PsmambaError(f"{json_path}: 'registration_val' must be a list of {{fixed, moving}} entries")
        test_pairs = []
        for i, item in enumerate(listed):
            fixed = _case_id(_entry(item, "fixed", f"registration_val[{i}]", json_path))
            moving = _case_id(_entry(item, "moving", f"registration_val[{i}]", json_path))
            for role, vid in (("moving", moving), ("fixed", fixed)):
                if vid not in known:
                    reason = why.get(vid, "not in the JSON's 'training' list")
                    raise PsmambaError(
                        f"{json_path}: registration_val[{i}] {role} {item[role]!r} is not a usable training "
                        f"volume ({reason})"
                    )
            if moving == fixed:  # a volume against itself scores Dice 1 without registering
                raise PsmambaError(f"{json_path}: registration_val[{i}] pairs {item['fixed']!r} with itself")
            test_pairs.append((moving, fixed))
        pairs["test"] = test_pairs
    elif json_path is not None:
        notes.append(f"{json_path.name} has no 'registration_val' pairs: no published test split")
    test_ids = sorted({i for p in pairs.get("test", []) for i in p})
    splits = {"train": [v.id for v in volumes if v.id not in test_ids], "test": test_ids} if test_ids else {}
    return SourceData(
        layout="abdomen", root=root, volumes=volumes, label_map=label_map, splits=splits, pairs=pairs,
        skipped=skipped, notes=notes, preprocessing="abdomen",
    )
