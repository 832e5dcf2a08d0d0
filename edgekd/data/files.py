"""Image files as datasets: an imagefolder (class folders, optionally under train/val/test) or a filelist
(.csv / .jsonl of path,label), listed as paths and labels only (`Listed`); the loader decodes them batch by batch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekd.data.config import DataConfig
from edgekd.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}



@dataclass
class Listed:
    """Image files of one dataset: paths and labels only (images are decoded by the loader, batch by batch)."""

    files: list[str]
    labels: np.ndarray  # int64 (N,)
    source: str
    class_names: list[str]
    separate_val: tuple[list[str], np.ndarray] | None = None
    separate_test: tuple[list[str], np.ndarray] | None = None
    natural_images: bool = True


SPLIT_FOLDERS = ("train", "val", "test")


def image_channels(path: Path) -> int:
    """The channel count an image is read with when data.channels is not set (from its header only)."""
    from edgekd.data.images import bands_to_color, open_image

    with open_image(path) as image:
        return 1 if bands_to_color(len(image.getbands())) == "L" else 3


def _images_in(folder: Path) -> Iterator[Path]:
    return (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def split_layout(root: Path) -> bool:
    """True for root/{train,val,test}/<class>/...: a `train` folder and no other sub-folder than these."""
    if not root.is_dir():
        return False
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return "train" in folders and folders <= set(SPLIT_FOLDERS)


def class_folders(root: Path) -> list[str]:
    """The class names of an imagefolder root: its sub-folders, each holding at least one image.

    A class folder without images is refused (not dropped): it would become a label (labels.json, the report)
    that no model output ever predicts, or shift every class index after it. Stops at each folder's first
    image, so it is fast on large datasets. In the train/val/test layout the classes are those of `train`.
    """
    if not root.exists():
        raise InputError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    if split_layout(root):
        root = root / "train"
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise InputError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    empty = [name for name in found if next(_images_in(root / name), None) is None]
    if len(empty) == len(found):
        raise InputError(f"{root}: no images found (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    if empty:
        raise InputError(f"{root / empty[0]}: class folder without images (add images or remove the folder; "
                         f"{len(empty)} such folder{'s' if len(empty) > 1 else ''})")
    if len(found) < 2:
        raise InputError(f"{root}: needs at least 2 classes with images (found {found})")
    return found


def _list_folder(root: Path, class_names: list[str], strict: bool) -> tuple[list[str], np.ndarray]:
    """Sorted image paths and labels of root/<class>/...; `strict`: the folder that defined the classes."""
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    if not strict:  # a validation/test folder: the training classes, each may be missing or empty here
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if set(found) - set(class_names):
            raise InputError(f"{root}: classes {sorted(set(found) - set(class_names))} are not in the training folder")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        folder = root / name
        for file in sorted(_images_in(folder)) if folder.is_dir() else []:
            files.append(str(file))
            labels.append(label)
    if not files:
        raise InputError(f"{root}: no images found (suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, np.asarray(labels, dtype=np.int64)


def _imagefolder(cfg: DataConfig) -> Listed:
    assert cfg.root is not None  # checked by the config
    names = class_folders(cfg.root)
    layered = split_layout(cfg.root)
    files, labels = _list_folder(cfg.root / "train" if layered else cfg.root, names, strict=True)
    listed = Listed(files, labels, str(cfg.root), names)
    if layered:
        for split in ("val", "test"):
            if (cfg.root / split).is_dir():
                setattr(listed, f"separate_{split}", _list_folder(cfg.root / split, names, strict=False))
    if cfg.val_root is not None:
        listed.separate_val = _list_folder(cfg.val_root, names, strict=False)
    return listed


def _read_list(path: Path) -> list[tuple[int, str, str, str | None]]:
    """(line, path, label, split or None) rows of a .csv (header with path,label[,split]) or .jsonl file."""
    import csv
    import json

    if not path.is_file():
        raise InputError(f"{path}: no such file list")
    rows: list[tuple[int, str, str, str | None]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the file list ({type(exc).__name__}: {exc})") from None
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or "path" not in record or "label" not in record:
                raise InputError(f'{path}: line {number}: needs an object with "path" and "label"')
            split = record.get("split")
            rows.append((number, str(record["path"]), str(record["label"]), None if split is None else str(split)))
        return rows
    reader = csv.DictReader(text.splitlines())
    header = [name.strip() for name in reader.fieldnames or []]
    if "path" not in header or "label" not in header:
        raise InputError(f"{path}: the first line must be a header naming the columns path,label (got "
                         f"{','.join(header) or 'nothing'})")
    for number, record in enumerate(reader, start=2):
        record = {(k or "").strip(): (v or "").strip() for k, v in record.items()}
        rows.append((number, record["path"], record["label"], record.get("split") or None))
    return rows


_LISTED: dict[tuple, tuple[dict[str, tuple[list[str], list[int]]], list[str]]] = {}


def list_file_groups(path: Path, class_names: list[str] | None) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    """Rows of a file list grouped by split ("" when the list has no split column), and the class names
    (sorted labels of the training rows unless given). A missing file or an unknown label is an InputError
    naming the list, the line and the value. Remembered per list file version: the pre-flight, the dataset
    signature and the loading of one run read a large list once."""
    try:
        stat = path.stat()
        key: tuple | None = (str(path), stat.st_size, stat.st_mtime_ns, tuple(class_names or ()))
    except OSError:
        key = None
    if key is not None and key in _LISTED:
        groups, names = _LISTED[key]
        return {split: (list(files), list(labels)) for split, (files, labels) in groups.items()}, list(names)
    result = _list_files_uncached(path, class_names)
    if key is not None:
        while len(_LISTED) >= 2:  # a training list and its validation list
            _LISTED.pop(next(iter(_LISTED)))
        _LISTED[key] = result
        return {split: (list(files), list(labels)) for split, (files, labels) in result[0].items()}, list(result[1])
    return result


def _list_files_uncached(path: Path, class_names: list[str] | None,
                         ) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    rows = _read_list(path)
    if not rows:
        raise InputError(f"{path}: the file list is empty")
    for number, file, label, split in rows:
        if not file:
            raise InputError(f"{path}: line {number}: empty path")
        if not label:
            raise InputError(f"{path}: line {number}: empty label")
        if split is not None and split not in SPLIT_FOLDERS:
            raise InputError(f"{path}: line {number}: split '{split}' is not one of {', '.join(SPLIT_FOLDERS)}")
    if class_names is None:
        class_names = sorted({label for _, _, label, split in rows if split in (None, "train")})
        if len(class_names) < 2:
            raise InputError(f"{path}: needs at least 2 classes (found {class_names})")
    index = {name: i for i, name in enumerate(class_names)}
    groups: dict[str, tuple[list[str], list[int]]] = {}
    for number, file, label, split in rows:
        if label not in index:
            known = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
            raise InputError(f"{path}: line {number}: unknown label '{label}' (the training labels are: {known})")
        target = (path.parent / file) if not Path(file).is_absolute() else Path(file)
        if not target.is_file():
            raise InputError(f"{path}: line {number}: no such image file: {target}")
        files, labels = groups.setdefault(split or "", ([], []))
        files.append(str(target))
        labels.append(index[label])
    return groups, class_names


def _filelist(cfg: DataConfig) -> Listed:
    assert cfg.root is not None  # checked by the config
    groups, names = list_file_groups(cfg.root, None)
    main = groups.pop("", None) or groups.pop("train", None)
    if main is None:
        raise InputError(f"{cfg.root}: no training rows (split column: train)")
    files, labels = main
    listed = Listed(files, np.asarray(labels, dtype=np.int64), str(cfg.root), names)
    if "train" in groups:  # rows with and without a split: the unmarked ones are training rows too
        listed.files += groups["train"][0]
        listed.labels = np.concatenate([listed.labels, np.asarray(groups.pop("train")[1], dtype=np.int64)])
    for split in ("val", "test"):
        if split in groups:
            part_files, part_labels = groups[split]
            setattr(listed, f"separate_{split}", (part_files, np.asarray(part_labels, dtype=np.int64)))
    if cfg.val_root is not None:
        val_groups, _ = list_file_groups(cfg.val_root, names)
        val_files = [f for group in val_groups.values() for f in group[0]]
        val_labels = [label for group in val_groups.values() for label in group[1]]
        listed.separate_val = (val_files, np.asarray(val_labels, dtype=np.int64))
    return listed


def list_files(cfg: DataConfig) -> Listed:
    """The configured image files (imagefolder or filelist) with their labels; no image is decoded."""
    return _filelist(cfg) if cfg.dataset == "filelist" else _imagefolder(cfg)


def first_image(cfg: DataConfig) -> Path:
    """One image of the dataset (its header decides the default channel count)."""
    assert cfg.root is not None  # checked by the config
    if cfg.dataset == "filelist":
        groups, _ = list_file_groups(cfg.root, None)
        return Path(next(iter(groups.values()))[0][0])
    names = class_folders(cfg.root)
    root = cfg.root / "train" if split_layout(cfg.root) else cfg.root
    return next(_images_in(root / names[0]))
